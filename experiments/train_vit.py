"""The ViT task model: a ViT trained from scratch on Fashion-MNIST with patch size 2.

Command:  .venv/bin/python experiments/train_vit.py          (about 50 minutes on 2 cores)
Smoke:    .venv/bin/python experiments/train_vit.py --smoke  (seconds; run by the tests)

28 x 28 greyscale images in 2 x 2 patches: 196 patches + CLS = 197 tokens, the token count of
ViT-B/16 at 224 px, so that PRISM's segments cut the same sequence length as in the paper.
Width 64, 4 layers, 2 heads, MLP 128 (0.15 M parameters): the largest that trains for several
epochs within the hour on 2 cores. Data through the `fashion_mnist_local` TFDS builder.
Writes the HF checkpoint directory (committed: under 1 MB) and results/train_vit.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import common

HERE = common.HERE
# One cosine schedule, AdamW with warm-up, down to 0 at the last step: 6 epochs of the 60,000
# images at batch 128 and peak lr 2e-3.
FULL = dict(steps=2814, batch_size=128, lr=2e-3, warmup=100, final_lr=0.0, weight_decay=0.05)
SMOKE = dict(steps=6, batch_size=16, lr=2e-3, warmup=1, final_lr=0.0, weight_decay=0.05)


def vit_config(smoke: bool):
    from prism_jax.configs import ViTConfig

    width, depth, heads, mlp = (16, 2, 2, 32) if smoke else (64, 4, 2, 128)
    return ViTConfig(
        width=width,
        depth=depth,
        heads=heads,
        mlp_width=mlp,
        act="gelu",
        ln_eps=1e-6,
        max_positions=197,
        image_size=28,
        patch_size=2,
        channels=1,
        head="classifier",
        num_labels=10,
    )


def main(argv=None):
    args = common.parse(common.TrainFlags, __doc__, argv, devices=None)

    from prism_jax import models
    from prism_jax.checkpoints import hf
    from prism_jax.checkpoints.preprocess import ImageProcessor
    from prism_jax.data import tfds_builders
    from prism_jax.data.images import pixel_values
    from prism_jax.evaluation import metrics
    from prism_jax.training import train

    settings = SMOKE if args.smoke else FULL
    train_limit, test_limit = (256, 64) if args.smoke else (None, None)
    x_train, y_train = tfds_builders.arrays(
        "fashion_mnist_local", "train", train_limit, args.data_dir
    )
    x_test, y_test = tfds_builders.arrays("fashion_mnist_local", "test", test_limit, args.data_dir)
    processor = ImageProcessor(size=(28, 28), mean=(0.5,), std=(0.5,), channels=1)
    model = models.init(vit_config(args.smoke), seed=0)
    model = models.Model(model.config, model.graphdef, model.params, None, processor)
    test = {"pixel_values": pixel_values(x_test, processor)}

    def score(m):
        return {"test_accuracy": metrics.accuracy(m, test, y_test, batch_size=250)}

    tic = time.perf_counter()
    run = train.train(
        model,
        {"pixel_values": pixel_values(x_train, processor), "labels": y_train},
        train.TrainConfig(**settings, checkpoint_every=200),
        checkpoint_dir=args.checkpoint_dir,
        restart=args.restart,
        evaluate=score,
    )
    if not run.evals:  # resumed after its last step: score the restored model
        run.evals.append({"step": settings["steps"], **score(run.model)})
    minutes = (time.perf_counter() - tic) / 60
    final = run.evals[-1]["test_accuracy"]
    print("| epoch end (step) | test accuracy |\n|---|---|")
    for e in run.evals:
        print(f"| {e['step']} | {100 * e['test_accuracy']:.2f} % |")
    print(f"\n{len(x_train)} training images, {minutes:.1f} min")
    out = Path(args.out or (HERE / "models" / "vit-fashion-mnist"))
    if not args.smoke or args.out:
        hf.save_pretrained(run.model, out, replace=True)
        record = {
            "config": settings,
            "minutes": minutes,
            "test_accuracy": final,
            "evals": run.evals,
            "losses_every_50": run.losses[::50],
            "resumed_from": run.resumed_from,
        }
        common.write(out.parent if args.smoke else common.RESULTS, "train_vit", record)


if __name__ == "__main__":
    common.run_script(main)
