"""Compression-robust fine-tuning: prism in the training loop against CR = 1, same steps.

Command:  .venv/bin/python experiments/robust_finetune.py --family bert --mixed (36 min training)
          .venv/bin/python experiments/robust_finetune.py --family vit    (about 6 minutes)
          .venv/bin/python experiments/robust_finetune.py --family vit --mixed  (about 20)
          .venv/bin/python experiments/robust_finetune.py --family vit --mixed --distill 1  (30)
          (minutes of training per arm: `train_minutes` in results/robust_*.json)
Smoke:    .venv/bin/python experiments/robust_finetune.py --smoke --mixed (seconds; the tests)

Arms with the same recipe, data order and steps: one fine-tunes under `prism` at (N, CR)
(gradients through the shard_map and the segment-means exchange), another at CR = 1 (the
exact model, run as `single`). With `--mixed`, two more: each step at a CR drawn from
`--mixed-crs` (every CR once per cycle, `train.step_cr`), with the paper's segments and with
all four changes of DESIGN.md 1b (`Plan.best`); the CR = 1 arm and the start are then also
scored under `Plan.best` (training-free references for the last arm); `--distill W` adds
one more, mixed prism+ that also learns the exact starting model's predictions (KL weight W,
`TrainConfig.distill`). Every arm is scored at
`--eval-crs` with the compressor it was trained with. BERT: the whole recipe from
all-MiniLM-L6-v2 with a fresh head (one epoch of the fine-food reviews, inputs padded to 128).
ViT: further training of the Fashion-MNIST task model (from scratch would be another hour),
150 steps at batch 128. Writes
experiments/results/robust_{family}_n{N}_cr{CR}_{bias}_{layout}.{json,md,png}.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import common

from prism_jax.configs import LOGIT_BIASES
from prism_jax.evaluation.tasks import LAYOUTS

HERE = common.HERE
RECIPES = {
    "bert": dict(steps=125, batch_size=32, lr=1e-4, warmup=12, limit=1000, max_length=128),
    "vit": dict(steps=150, batch_size=128, lr=5e-4, warmup=15, limit=1000, max_length=None),
}
SMOKE = dict(steps=2, batch_size=4, lr=1e-4, warmup=1, limit=6, max_length=16)


def start_model(family: str, smoke: bool):
    import prism_jax as pj
    from prism_jax import models
    from prism_jax.data import sources

    if family == "bert":
        return models.with_classifier(pj.load_pretrained(sources.minilm_dir()), 2, seed=0)
    return pj.load_pretrained(HERE / "models" / "vit-fashion-mnist")


@dataclasses.dataclass
class Config:
    smoke: bool = common.setting(False, "two steps per arm, seconds")
    family: str = common.setting("bert", "the task model", choices=sorted(RECIPES))
    devices: int = common.setting(4, "N in the training loop")
    cr: int = common.setting(16, "CR in the training loop")
    eval_crs: str = common.setting("1,2,4,8,16,32", "CRs to score every arm at")
    mixed_crs: str = common.setting("1,2,4,8,16", "the mixed-CR arms' training CRs")
    mixed: bool = common.setting(False, "also the mixed-CR arms (paper's segments, prism+)")
    steps: int | None = common.setting(None, "training steps an arm (default: the recipe's)")
    distill: float = common.setting(
        0.0, "with --mixed, one more arm: mixed prism+ with this weight of distillation (ViT)"
    )
    logit_bias: str = common.setting("log_count", "logit bias", choices=LOGIT_BIASES)
    layout: str = common.setting("padded", "BERT inputs", choices=LAYOUTS)
    checkpoints: str = common.setting(str(HERE.parent / "artifacts"), "checkpoint folders")
    restart: bool = common.setting(False, "discard checkpoints, start over")
    out: str | None = common.setting(None, "results folder")


def main(argv=None):
    args = common.parse(Config, __doc__, argv)
    if args.distill and (args.family != "vit" or not args.mixed):
        # (BERT starts from a fresh head: there is no model worth distilling from)
        print("robust_finetune.py: error: --distill is for --family vit --mixed", file=sys.stderr)
        return 2

    import prism_jax as pj
    from prism_jax.evaluation import tasks
    from prism_jax.training import train

    recipe = SMOKE if args.smoke else RECIPES[args.family]
    longer = "" if args.steps in (None, recipe["steps"]) else f"-steps{args.steps}"
    recipe = {**recipe, "steps": args.steps or recipe["steps"]}  # (the smoke's too)
    dataset = {"bert": "fine_food_reviews", "vit": "fashion_mnist_local"}[args.family]
    eval_crs = [1, args.cr] if args.smoke else [int(c) for c in args.eval_crs.split(",")]
    base = start_model(args.family, args.smoke)
    length = recipe["max_length"]
    train_task = tasks.load(base, dataset, split="train", max_length=length)
    task = tasks.load(base, dataset, limit=recipe["limit"], max_length=length, layout=args.layout)
    examples = train_task.train_examples
    if args.smoke:
        examples = {k: v[:16] for k, v in examples.items()}
    cfg = train.TrainConfig(
        steps=recipe["steps"],
        batch_size=recipe["batch_size"],
        lr=recipe["lr"],
        warmup=recipe["warmup"],
        checkpoint_every=25,
    )
    mesh = pj.edge_mesh(args.devices)
    bias = args.logit_bias
    paper, best = pj.Plan(logit_bias=bias), pj.Plan.best(1, logit_bias=bias)
    mixed = [int(c) for c in (("1," + str(args.cr)) if args.smoke else args.mixed_crs).split(",")]
    # (name, training plan or None, mixed CRs or None, the compressor it is scored with)
    arms = [
        # BERT starts from a fresh random head: nothing to score before training.
        *([("start (no extra training)", None, None, paper)] if args.family == "vit" else []),
        *([("start, prism+", None, None, best)] if args.family == "vit" and args.mixed else []),
        ("trained at CR=1", pj.Plan(strategy="single"), None, paper),
        (f"trained at N={args.devices} CR={args.cr}", pj.Plan(cr=args.cr, logit_bias=bias),
         None, paper),
    ]  # fmt: skip
    if args.mixed:
        label = "{" + ",".join(map(str, mixed)) + "}"
        arms += [
            ("trained at CR=1, scored prism+", pj.Plan(strategy="single"), None, best),
            (f"mixed CR {label}", pj.Plan(cr=args.cr, logit_bias=bias), mixed, paper),
            (f"mixed CR {label}, prism+", pj.Plan.best(args.cr, logit_bias=bias), mixed, best),
        ]  # fmt: skip
    arms = [(*arm, 0.0) for arm in arms]  # and the weight of distillation
    if args.distill:
        name = f"mixed CR {label}, prism+, distilled ({args.distill:g})"
        arms.append((name, pj.Plan.best(args.cr, logit_bias=bias), mixed, best, args.distill))
    results, trained = {}, {}
    for name, plan, crs, template, distill in arms:
        tic = time.perf_counter()
        model = base
        if plan is not None:
            tag = f"n{args.devices}-cr{args.cr}-{args.logit_bias}-{args.layout}"
            tag = "cr1" if plan.strategy == "single" else f"prism-{tag}"
            tag += "" if crs is None else "-mixed-" + "-".join(map(str, crs))
            tag += "" if plan.paper else "-prism+"
            tag += f"-distill{distill:g}" if distill else ""
            tag += longer
            ckpt = None if args.smoke else Path(args.checkpoints) / f"robust-{args.family}-{tag}"
            data = examples
            if args.layout == "unpadded" and plan.strategy == "prism":  # each input at its length
                relaid = tasks.unpadded(
                    {k: v for k, v in examples.items() if k != "labels"}, args.devices
                )
                data = {**relaid, "labels": examples["labels"]}
            if tag not in trained:
                arm_cfg = dataclasses.replace(cfg, distill=distill)
                run = train.train(base, data, arm_cfg, plan=plan, mesh=mesh, crs=crs,
                                  checkpoint_dir=ckpt, restart=args.restart)  # fmt: skip
                trained[tag] = run.model
            model = trained[tag]
        minutes = (time.perf_counter() - tic) / 60
        plans = {cr: dataclasses.replace(template, cr=cr) for cr in eval_crs}
        scores = {cr: task.score(mesh, plans[cr], model) for cr in eval_crs}
        results[name] = {"train_minutes": minutes, "accuracy": scores, "crs": crs,
                         "distill": distill,
                         "scored_with": "paper" if template.paper else "prism+"}  # fmt: skip
        print(name, {cr: round(100 * v, 2) for cr, v in scores.items()}, flush=True)

    lines = [
        f"### Robust fine-tuning, {args.family}: accuracy (%) at N = {args.devices}, "
        f"logit bias {args.logit_bias}, {args.layout}",
        "",
        f"{recipe['steps']} steps, batch {recipe['batch_size']}, lr {recipe['lr']}; "
        f"{task.examples} {dataset} test examples.",
        "",
        "| model | " + " | ".join(f"CR={cr}" for cr in eval_crs) + " | train min |",
        "|---|" + "---:|" * (len(eval_crs) + 1),
    ]
    for name, r in results.items():
        cells = [f"{100 * r['accuracy'][cr]:.1f}" for cr in eval_crs]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['train_minutes']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    stem = f"robust_{args.family}_n{args.devices}_cr{args.cr}_{args.logit_bias}_{args.layout}"
    stem += longer.replace("-", "_")
    record = {"family": args.family, "devices": args.devices, "cr": args.cr,
              "logit_bias": args.logit_bias, "layout": args.layout,
              "recipe": recipe, "results": results}  # fmt: skip
    common.save(args, stem, record, text, lambda png: plot(results, eval_crs, args, png))


def plot(results, crs, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, r in results.items():
        ax.plot(crs, [100 * r["accuracy"][cr] for cr in crs], marker="o", ms=3, label=name)
    ax.axvline(args.cr, color="k", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"compression rate CR (N = {args.devices})")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{args.family}: robust fine-tuning (N = {args.devices})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
