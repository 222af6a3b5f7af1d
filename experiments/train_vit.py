"""The ViT task model: a ViT trained from scratch on Fashion-MNIST with patch size 2.

Command:  .venv/bin/python experiments/train_vit.py          (about 55 minutes on 2 cores)
Smoke:    .venv/bin/python experiments/train_vit.py --smoke  (seconds; run by the tests)

28 x 28 greyscale images in 2 x 2 patches: 196 patches + CLS = 197 tokens, the token count of
ViT-B/16 at 224 px, so that PRISM's segments cut the same sequence length as in the paper.
Width 64, 4 layers, 2 heads, MLP 128 (0.2 M parameters): the largest that trains for several
epochs within the hour on 2 cores. Data through the `fashion_mnist_local` TFDS builder.
Writes the HF checkpoint directory (committed: under 1 MB) and results/train_vit.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
# Two phases, each AdamW with warm-up and cosine decay to 10 %: 4 epochs of the 60,000 images
# at batch 128 and lr 2e-3, then 2 more epochs at lr 5e-4 from the result.
FULL = dict(
    batch_size=128,
    weight_decay=0.05,
    eval_limit=None,
    phases=[dict(steps=1875, lr=2e-3, warmup=50), dict(steps=938, lr=5e-4, warmup=20, seed=1)],
)
SMOKE = dict(
    batch_size=16,
    weight_decay=0.05,
    eval_limit=64,
    phases=[dict(steps=4, lr=2e-3, warmup=1), dict(steps=2, lr=5e-4, warmup=1, seed=1)],
)


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model, a few steps")
    parser.add_argument("--out", default=None, help="model directory to write")
    parser.add_argument("--checkpoint-dir", default=None, help="orbax checkpoints (resumable)")
    parser.add_argument("--data-dir", default=None, help="where TFDS prepares its array_record")
    args = parser.parse_args(argv)

    from prism_jax import datasets, evaluate, export, models, train
    from prism_jax.preprocess import ImageProcessor

    settings = SMOKE if args.smoke else FULL
    limit = 256 if args.smoke else None
    x_train, y_train = datasets.arrays("fashion_mnist_local", "train", limit, args.data_dir)
    x_test, y_test = datasets.arrays(
        "fashion_mnist_local", "test", settings["eval_limit"], args.data_dir
    )
    processor = ImageProcessor(size=(28, 28), mean=(0.5,), std=(0.5,), channels=1)
    model = models.init(vit_config(args.smoke), seed=0)
    model = models.Model(model.config, model.graphdef, model.params, None, processor)
    test = {"pixel_values": datasets.pixels(x_test, processor)}

    def score(m):
        return {"test_accuracy": evaluate.accuracy(m, test, y_test, batch_size=250)}

    tic = time.perf_counter()
    evals, losses, resumed = [], [], []
    for i, phase in enumerate(settings["phases"]):
        cfg = train.TrainConfig(
            batch_size=settings["batch_size"],
            weight_decay=settings["weight_decay"],
            checkpoint_every=200,
            **phase,
        )
        ckpt = Path(args.checkpoint_dir) / f"phase{i + 1}" if args.checkpoint_dir else None
        run = train.train(
            model,
            {"pixel_values": datasets.pixels(x_train, processor), "labels": y_train},
            cfg,
            checkpoint_dir=ckpt,
            evaluate=score,
        )
        model = run.model
        if not run.evals:  # resumed after its last step: score the restored model
            run.evals.append({"step": cfg.steps, **score(model)})
        evals += [{"phase": i + 1, **e} for e in run.evals]
        losses += run.losses
        resumed.append(run.resumed_from)
    minutes = (time.perf_counter() - tic) / 60
    final = evals[-1]["test_accuracy"]
    print("| phase | epoch end (step) | test accuracy |\n|---|---|---|")
    for e in evals:
        print(f"| {e['phase']} | {e['step']} | {100 * e['test_accuracy']:.2f} % |")
    print(f"\n{len(x_train)} training images, {minutes:.1f} min")
    out = Path(args.out or (HERE / "models" / "vit-fashion-mnist"))
    if not args.smoke or args.out:
        export.save_pretrained(model, out)
        record = {
            "config": settings,
            "minutes": minutes,
            "test_accuracy": final,
            "evals": evals,
            "losses_every_50": losses[::50],
            "resumed_from": resumed,
        }
        results = (
            out.parent / "train_vit.json" if args.smoke else HERE / "results" / "train_vit.json"
        )
        results.write_text(json.dumps(record, indent=2) + "\n")
    return float(np.asarray(final))


if __name__ == "__main__":
    main()
