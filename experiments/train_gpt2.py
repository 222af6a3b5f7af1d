"""The GPT-2 task model: the GPT-2 architecture trained from scratch on the Wikipedia leads.

Command:  .venv/bin/python experiments/train_gpt2.py          (about 17 minutes on 2 cores)
          (17.1: `minutes` in results/train_gpt2.json)
Smoke:    .venv/bin/python experiments/train_gpt2.py --smoke  (seconds; run by the tests)

A byte-level BPE tokenizer (8,192 tokens, trained by `tokenizers` on the training split), the
leads joined by <|endoftext|> and packed into 256-token rows. Width 192, 4 layers, 3 heads,
MLP 768, tied LM head (3.4 M parameters). Data through the `wikipedia_leads` TFDS builder
(90 / 5 / 5 split by title). Reports held-out perplexity (validation each epoch, test at the
end). Writes the HF checkpoint directory (committed: 14 MB) and results/train_gpt2.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import common

HERE = common.HERE
CONTEXT = 256
# Two epochs of the ~4,300 training rows at batch 16.
FULL = dict(steps=540, batch_size=16, lr=1e-3, warmup=30, vocab=8192, width=192, depth=4, heads=3)
SMOKE = dict(steps=3, batch_size=4, lr=1e-3, warmup=1, vocab=400, width=32, depth=2, heads=2)


def main(argv=None):
    args = common.parse(common.TrainFlags, __doc__, argv, devices=None)

    from prism_jax import models
    from prism_jax.checkpoints import hf
    from prism_jax.configs import GPT2Config
    from prism_jax.data import text, tfds_builders
    from prism_jax.evaluation import metrics
    from prism_jax.training import train

    s = SMOKE if args.smoke else FULL
    limit = 200 if args.smoke else None
    train_texts, _ = tfds_builders.texts("wikipedia_leads", "train", limit, args.data_dir)
    valid_texts, _ = tfds_builders.texts("wikipedia_leads", "validation", limit, args.data_dir)
    test_texts, _ = tfds_builders.texts("wikipedia_leads", "test", limit, args.data_dir)
    tokenizer = text.train_bpe(train_texts, s["vocab"], max_length=CONTEXT)
    rows = {
        name: text.pack(tokenizer, texts, CONTEXT)
        for name, texts in (
            ("train", train_texts),
            ("validation", valid_texts),
            ("test", test_texts),
        )
    }
    cfg = GPT2Config(
        vocab_size=tokenizer.backend.get_vocab_size(),
        width=s["width"],
        depth=s["depth"],
        heads=s["heads"],
        mlp_width=4 * s["width"],
        act="gelu_new",
        ln_eps=1e-5,
        max_positions=CONTEXT,
        head="lm",
    )
    model = models.init(cfg, seed=0)
    model = models.Model(cfg, model.graphdef, model.params, tokenizer)

    def score(m):
        return {"validation_ppl": metrics.perplexity(m, rows["validation"], batch_size=16)}

    tc = train.TrainConfig(
        steps=s["steps"],
        batch_size=s["batch_size"],
        lr=s["lr"],
        warmup=s["warmup"],
        weight_decay=0.1,
        checkpoint_every=100,
    )
    tic = time.perf_counter()
    run = train.train(
        model,
        {"input_ids": rows["train"]},
        tc,
        checkpoint_dir=args.checkpoint_dir,
        restart=args.restart,
        evaluate=score,
    )
    minutes = (time.perf_counter() - tic) / 60
    test_ppl = metrics.perplexity(run.model, rows["test"], batch_size=16)
    print("| epoch end (step) | validation perplexity |\n|---|---|")
    for e in run.evals:
        print(f"| {e['step']} | {e['validation_ppl']:.2f} |")
    print(
        f"\ntest perplexity {test_ppl:.2f} ({rows['test'].size:,} tokens); "
        f"{rows['train'].size:,} training tokens, {tc.steps} steps, {minutes:.1f} min"
    )
    if not args.smoke or args.out:
        out = Path(args.out or (HERE / "models" / "gpt2-wikipedia"))
        hf.save_pretrained(run.model, out, replace=True)
        record = {
            "config": s,
            "minutes": minutes,
            "test_perplexity": test_ppl,
            "test_tokens": int(rows["test"].size),
            "train_tokens": int(rows["train"].size),
            "evals": run.evals,
            "losses_every_20": run.losses[::20],
        }
        common.write(out.parent if args.smoke else common.RESULTS, "train_gpt2", record)


if __name__ == "__main__":
    common.run_script(main)
