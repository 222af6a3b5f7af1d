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
scored under `Plan.best` (training-free references for the last arm); `--distill W` adds one
more, mixed prism+ that also learns the exact starting model's predictions (KL weight W,
`TrainConfig.distill`); `--mixed-crs` of `--cr` alone makes the prism+ arm a single-CR one
(and leaves out the paper's, a copy of the single-CR arm); `--no-paper` leaves out both arms
trained with the paper's segments (half the training, when only prism+ against exact is
asked); `--resume` takes the arms the results file of the same run (name and recipe) already
holds, scored at every `--eval-crs`, from it, trains only the others and keeps the file's
arms this run does not list (checkpoints stay on one machine; the results file is
committed); `--exact-from FILE` takes the CR = 1 model's arms from another run's results
file on the same test examples (a longer run measured against a shorter run's exact arm,
without training it again; a later `--resume` without it trains them),
`--distilled-only` leaves the undistilled mixed prism+ arm out, and `--start-steps S` (ViT)
starts every arm, and the distillation teacher, from the CR = 1 arm trained S steps (robust
fine-tuning of a converged exact model; the exact reference is then that model trained
`--steps` more at CR = 1, and "start" the model itself). Every arm is scored at
`--eval-crs` with the compressor it was trained with, and each score is also given as points
from exact (the CR = 1 arm at CR = 1) with the standard error of that paired difference over
the same test examples (every example's hit is kept in the JSON, `hits`). BERT: the whole
recipe from all-MiniLM-L6-v2 with a fresh head (one epoch of the fine-food reviews, inputs
padded to 128). ViT: further training of the Fashion-MNIST task model (from scratch would be
another hour), 150 steps at batch 128. Writes
experiments/results/robust_{family}_n{N}_cr{CR}_{bias}_{layout}.{json,md,png}.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import common
import numpy as np

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
    no_paper: bool = common.setting(
        False, "with --mixed, leave out the arms trained with the paper's segments"
    )
    resume: bool = common.setting(
        False, "take the arms this run's results file already holds (same recipe) from it"
    )
    steps: int | None = common.setting(None, "training steps an arm (default: the recipe's)")
    lr: float | None = common.setting(None, "peak learning rate (default: the recipe's)")
    test_examples: int | None = common.setting(
        None, "test examples every arm is scored on (default: the recipe's 1,000)"
    )
    distill: float = common.setting(
        0.0, "with --mixed, one more arm: mixed prism+ with this weight of distillation (ViT)"
    )
    distilled_only: bool = common.setting(
        False, "with --distill, leave out the mixed prism+ arm without distillation"
    )
    start_steps: int | None = common.setting(
        None,
        "ViT: start every arm from the CR = 1 arm trained this many steps (its checkpoints, "
        "trained first where missing): robust fine-tuning of a converged exact model, which "
        "is also the distillation teacher",
    )
    exact_from: str | None = common.setting(
        None,
        "take the CR = 1 arms (the exact reference) from this results file, scored on "
        "the same test examples, instead of training them (a longer run against a shorter's)",
    )
    logit_bias: str = common.setting("log_count", "logit bias", choices=LOGIT_BIASES)
    layout: str = common.setting("padded", "BERT inputs", choices=LAYOUTS)
    checkpoints: str = common.output(str(HERE.parent / "artifacts"), "checkpoint folders")
    restart: bool = common.setting(False, "discard checkpoints, start over")
    out: str | None = common.output(None, "results folder")


def main(argv=None):
    args = common.parse(Config, __doc__, argv)
    problem = usage_problem(args)
    if problem:
        print(f"robust_finetune.py: error: {problem}", file=sys.stderr)
        return 2

    run = setup(args)
    if run.task.examples < run.recipe["limit"] and args.test_examples:  # before any training
        have = f"the {run.dataset} test split has {run.task.examples}"
        print(f"robust_finetune.py: error: argument --test-examples: {have}", file=sys.stderr)
        return 2
    stem = results_stem(run)
    try:
        earlier = earlier_results(run, stem) if args.resume else {}
    except ValueError as e:  # before any training
        print(f"robust_finetune.py: error: argument --resume: {e}", file=sys.stderr)
        return 2
    try:
        earlier |= exact_results(run, Path(args.exact_from)) if args.exact_from else {}
    except ValueError as e:  # before any training
        print(f"robust_finetune.py: error: argument --exact-from: {e}", file=sys.stderr)
        return 2
    results = {}
    for arm in arms(args):
        reused = reusable(earlier.get(arm.name), arm, run.eval_crs)
        results[arm.name] = reused or run_arm(arm, run)
        print(arm.name, {cr: round(100 * v, 2) for cr, v in results[arm.name]["accuracy"].items()},
              "(from the results file)" if reused else "", flush=True)  # fmt: skip
    for name, result in earlier.items():  # the file's arms that this run does not list: kept
        results.setdefault(name, scored(result))
    add_gaps(results)
    text = markdown(results, run)
    print(text)
    record = {"family": args.family, "devices": args.devices, "cr": args.cr,
              "logit_bias": args.logit_bias, "layout": args.layout,
              "recipe": run.recipe, "results": results}  # fmt: skip
    common.save(args, stem, record, text, lambda png: plot(results, run.eval_crs, args, png))


def results_stem(run: Run) -> str:
    """The results file's name: the run's family, N, CR, bias, layout, and its steps, learning
    rate and test examples where they are not the recipe's."""
    args = run.args
    stem = f"robust_{args.family}_n{args.devices}_cr{args.cr}_{args.logit_bias}_{args.layout}"
    stem += run.longer.replace("-", "_")
    if run.recipe["limit"] != base_recipe(args)["limit"]:
        stem += f"_test{run.recipe['limit']}"  # another test set size: its own results file
    return stem


def earlier_results(run: Run, stem: str) -> dict:
    """The arms of this run's results file (`--resume`), keyed by name; {} when there is no
    file. A file written with another recipe (steps, batch, learning rate, test examples) is
    refused (ValueError): its arms are not this run's; so are the arms it took from another
    run's file (`--exact-from`): they are left out (trained now, unless taken again)."""
    folder = common.results_dir(run.args)
    path = None if folder is None else folder / f"{stem}.json"
    if path is None or not path.exists():
        return {}
    record = json.loads(path.read_text())
    if record["recipe"] != json.loads(json.dumps(run.recipe)):
        raise ValueError(f"{path} was written with another recipe ({record['recipe']})")
    return {name: r for name, r in record["results"].items() if "from" not in r}


EXACT_ARMS = ("trained at CR=1", "trained at CR=1, scored prism+")  # the CR = 1 model's arms


def exact_results(run: Run, path: Path) -> dict:
    """The CR = 1 model's arms of another results file (`--exact-from`), keyed by name, each
    with `from` naming the file and its steps. Refused (ValueError) unless the file is of the
    same family, N, bias and layout, scored on the same test examples, and holds each of those
    arms that this run lists scored at every `--eval-crs`: else they would train here."""
    args = run.args
    record = json.loads(path.read_text())
    same = {"family": args.family, "devices": args.devices, "logit_bias": args.logit_bias,
            "layout": args.layout}  # fmt: skip
    other = {k: record.get(k) for k in same}
    if other != same or record["recipe"]["limit"] != run.recipe["limit"]:
        other["test examples"] = record["recipe"]["limit"]
        raise ValueError(f"{path} is another run's ({other}): its CR = 1 arms are not this one's")
    steps = record["recipe"]["steps"]
    taken = {}
    for arm in arms(args):
        if arm.name not in EXACT_ARMS:
            continue
        result = record["results"].get(arm.name)
        if reusable(result, arm, run.eval_crs) is None:
            raise ValueError(f"{path} lacks {arm.name!r} scored at CR = {run.eval_crs}")
        taken[arm.name] = {**result, "from": f"{path.name}, {steps} steps"}  # as in a file
    return taken


def reusable(result: dict | None, arm: Arm, crs: list[int]) -> dict | None:
    """An arm's result from the results file, its CRs as integers again, when it is this arm
    (the same training CRs, distillation and scoring compressor) scored at every CR of `crs`;
    else None (the arm is trained, or resumed from its checkpoints, and scored again)."""
    if result is None:
        return None
    same = (result["crs"] == arm.crs and result["distill"] == arm.distill
            and result["scored_with"] == ("paper" if arm.template.paper else "prism+"))  # fmt: skip
    if not same or not {str(cr) for cr in crs} <= set(result["hits"]):
        return None
    return scored(result, crs)


def scored(result: dict, crs: list[int] | None = None) -> dict:
    """An arm's result read back from JSON: its CRs integers again (only `crs`, when given),
    its gaps left to `add_gaps`."""
    keep = None if crs is None else set(crs)
    by_cr = {k: {int(cr): v for cr, v in result[k].items() if keep is None or int(cr) in keep}
             for k in ("accuracy", "hits")}  # fmt: skip
    return {k: v for k, v in result.items() if k != "gap"} | by_cr


def usage_problem(args: Config) -> str | None:
    """What is wrong with the flags together, before anything trains (None: nothing)."""
    if args.distill and (args.family != "vit" or not args.mixed):
        # (BERT starts from a fresh head: there is no model worth distilling from)
        return "--distill is for --family vit --mixed"
    if args.exact_from and not Path(args.exact_from).is_file():
        return f"argument --exact-from: no results file {args.exact_from}"
    if args.start_steps and args.family != "vit":
        return "--start-steps is for --family vit (BERT's start is a fresh head)"
    if args.distilled_only and not args.distill:
        return "--distilled-only is for --distill"
    if args.no_paper and not args.mixed:
        return "--no-paper is for --mixed (without it every trained arm but CR = 1 is the paper's)"
    for flag, text in (("--eval-crs", args.eval_crs), ("--mixed-crs", args.mixed_crs)):
        if not re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", text):
            return f"argument {flag}: expected CRs >= 1, comma-separated: {text!r}"
    if 1 not in crs_of(args.eval_crs):
        return "argument --eval-crs: must include 1 (the exact reference of every gap)"
    if args.lr == 0:
        return "argument --lr: expected a learning rate > 0"
    return None


def crs_of(text: str) -> list[int]:
    """The CRs of a comma-separated flag: `1,2,16` -> [1, 2, 16]."""
    return [int(c) for c in text.split(",")]


@dataclasses.dataclass
class Run:
    """What every arm of one run shares."""

    args: Config
    recipe: dict
    longer: str  # "", "-steps<n>", "-lr<x>", "-from<s>": another step count, lr or start
    dataset: str
    eval_crs: list[int]
    base: object  # the starting model
    task: object  # the test set, scored at every CR
    examples: dict  # the training set
    cfg: object  # train.TrainConfig
    mesh: object
    models: dict = dataclasses.field(default_factory=dict)  # checkpoint tag -> trained model


def base_recipe(args: Config) -> dict:
    """The family's recipe (the smoke's with --smoke), before --steps, --lr and
    --test-examples."""
    return SMOKE if args.smoke else RECIPES[args.family]


def recipe_of(args: Config) -> tuple[dict, str]:
    """(this run's recipe, its names' suffix): the family's recipe with --steps, --lr,
    --test-examples and --start-steps applied; the suffix names another step count, learning
    rate or start, so that their checkpoints and results stay apart from the recipe's."""
    recipe = base_recipe(args)
    longer = "" if args.steps in (None, recipe["steps"]) else f"-steps{args.steps}"
    longer += "" if args.lr in (None, recipe["lr"]) else f"-lr{args.lr:g}"
    recipe = {**recipe, "steps": args.steps or recipe["steps"], "lr": args.lr or recipe["lr"]}
    recipe["limit"] = args.test_examples or recipe["limit"]
    if args.start_steps:  # (absent otherwise: earlier results files stay this recipe's)
        recipe["start_steps"] = args.start_steps
        longer += f"-from{args.start_steps}"
    return recipe, longer


def setup(args: Config) -> Run:
    import prism_jax as pj
    from prism_jax.evaluation import tasks
    from prism_jax.training import train

    recipe, longer = recipe_of(args)
    dataset = {"bert": "fine_food_reviews", "vit": "fashion_mnist_local"}[args.family]
    eval_crs = [1, args.cr] if args.smoke else crs_of(args.eval_crs)
    base = start_model(args.family, args.smoke)
    length = recipe["max_length"]
    examples = tasks.load(base, dataset, split="train", max_length=length).train_examples
    if args.smoke:
        examples = {k: v[:16] for k, v in examples.items()}
    task = tasks.load(base, dataset, limit=recipe["limit"], max_length=length, layout=args.layout)
    keys = ("steps", "batch_size", "lr", "warmup")
    cfg = train.TrainConfig(**{k: recipe[k] for k in keys}, checkpoint_every=25)
    run = Run(args, recipe, longer, dataset, eval_crs, base, task, examples, cfg,
              pj.edge_mesh(args.devices))  # fmt: skip
    if args.start_steps:
        run.base = converged_start(run)
    return run


def converged_start(run: Run):
    """The CR = 1 arm of this recipe trained `--start-steps` steps (from the family's start
    model, as `--steps` of that many would train it; resumed from its checkpoints, which a
    run with that `--steps` leaves): the start of every arm of a `--start-steps` run."""
    steps = run.args.start_steps
    args = dataclasses.replace(run.args, steps=steps, start_steps=None)
    recipe, longer = recipe_of(args)
    first = dataclasses.replace(run, args=args, recipe=recipe, longer=longer, models={},
                                cfg=dataclasses.replace(run.cfg, steps=steps))  # fmt: skip
    exact = next(arm for arm in arms(args) if arm.name == EXACT)
    return trained(exact, first)[0]


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    plan: object | None  # the training plan; None: the start, not trained
    crs: list[int] | None  # mixed-CR training's CRs
    template: object  # the plan it is scored with (its CR replaced)
    distill: float = 0.0


def arms(args: Config) -> list[Arm]:
    """Every arm of the run, in order. `--mixed-crs` equal to `--cr` alone makes the prism+
    arm a single-CR one (the paper's would repeat the single-CR arm, so it is left out)."""
    import prism_jax as pj

    bias, n, cr = args.logit_bias, args.devices, args.cr
    paper, best = pj.Plan(logit_bias=bias), pj.Plan.best(1, logit_bias=bias)
    mixed = [1, cr] if args.smoke else crs_of(args.mixed_crs)
    vit = args.family == "vit"  # BERT starts from a fresh random head: nothing to score
    out = [
        *([Arm("start (no extra training)", None, None, paper)] if vit else []),
        *([Arm("start, prism+", None, None, best)] if vit and args.mixed else []),
        Arm("trained at CR=1", pj.Plan(strategy="single"), None, paper),
        *([] if args.no_paper else
          [Arm(f"trained at N={n} CR={cr}", pj.Plan(cr=cr, logit_bias=bias), None, paper)]),
    ]  # fmt: skip
    if not args.mixed:
        return out
    label = "{" + ",".join(map(str, mixed)) + "}"
    single = mixed == [cr]
    prism_plus = pj.Plan.best(cr, logit_bias=bias)
    out.append(Arm("trained at CR=1, scored prism+", pj.Plan(strategy="single"), None, best))
    if not single and not args.no_paper:
        out.append(Arm(f"mixed CR {label}", pj.Plan(cr=cr, logit_bias=bias), mixed, paper))
    name = f"trained at N={n} CR={cr}, prism+" if single else f"mixed CR {label}, prism+"
    if not args.distilled_only:
        out.append(Arm(name, prism_plus, mixed, best))
    if args.distill:
        out.append(Arm(f"{name}, distilled ({args.distill:g})", prism_plus, mixed, best,
                       args.distill))  # fmt: skip
    return out


def run_arm(arm: Arm, run: Run) -> dict:
    """Train `arm` (or resume it from its checkpoint) and score it at every CR."""
    model, minutes = (run.base, 0.0) if arm.plan is None else trained(arm, run)
    hits = {cr: run.task.correct(run.mesh, dataclasses.replace(arm.template, cr=cr), model)
            for cr in run.eval_crs}  # fmt: skip
    return {
        "train_minutes": minutes,  # None: trained by an earlier run that did not record it
        "accuracy": {cr: float(h.mean()) for cr, h in hits.items()},
        "examples": run.task.examples,
        "hits": {cr: np.packbits(h).tobytes().hex() for cr, h in hits.items()},  # bits, in order
        "crs": arm.crs,
        "distill": arm.distill,
        "scored_with": "paper" if arm.template.paper else "prism+",
    }


MINUTES = "train_minutes.json"  # beside an arm's checkpoints: the minutes its training took


def trained(arm: Arm, run: Run) -> tuple[object, float | None]:
    """`arm`'s model, trained now or resumed from its checkpoint, and the minutes its training
    took (kept beside the checkpoints, so that a resumed arm reports them too; 0 for a second
    arm of the same training in one run)."""
    from prism_jax.evaluation import tasks
    from prism_jax.training import train

    args = run.args
    tag = checkpoint_tag(arm, run)
    if tag in run.models:
        return run.models[tag], 0.0
    ckpt = None if args.smoke else Path(args.checkpoints) / f"robust-{args.family}-{tag}"
    data = run.examples
    if args.layout == "unpadded" and arm.plan.strategy == "prism":  # each input at its length
        inputs = {k: v for k, v in data.items() if k != "labels"}
        data = {**tasks.unpadded(inputs, args.devices), "labels": data["labels"]}
    cfg = dataclasses.replace(run.cfg, distill=arm.distill)
    tic = time.perf_counter()
    done = train.train(run.base, data, cfg, plan=arm.plan, mesh=run.mesh, crs=arm.crs,
                       checkpoint_dir=ckpt, restart=args.restart)  # fmt: skip
    minutes = (time.perf_counter() - tic) / 60
    run.models[tag] = done.model
    if ckpt is None:
        return done.model, minutes
    return done.model, _spent(ckpt / MINUTES, minutes, done.resumed_from, cfg.steps)


def checkpoint_tag(arm: Arm, run: Run) -> str:
    """The name of `arm`'s checkpoint folder (after `robust-{family}-`) in `run`: its plan,
    training CRs, distillation, and the run's other steps, lr or start."""
    args = run.args
    tag = f"n{args.devices}-cr{args.cr}-{args.logit_bias}-{args.layout}"
    tag = "cr1" if arm.plan.strategy == "single" else f"prism-{tag}"
    tag += "" if arm.crs is None else "-mixed-" + "-".join(map(str, arm.crs))
    tag += "" if arm.plan.paper else "-prism+"
    tag += f"-distill{arm.distill:g}" if arm.distill else ""
    return tag + run.longer


def _spent(path: Path, minutes: float, resumed_from: int | None, steps: int) -> float | None:
    """The arm's training minutes in all: this run's `minutes`, plus what `path` holds from
    the runs it resumed (None when they left nothing there). Written back to `path`."""
    before = json.loads(path.read_text())["train_minutes"] if path.exists() else None
    if resumed_from is None:  # trained from the start in this run
        total = minutes
    elif resumed_from >= steps:  # nothing left to train: the minutes are the earlier run's
        return before
    else:
        total = None if before is None else before + minutes
    if total is not None:
        path.write_text(json.dumps({"train_minutes": total}))
    return total


EXACT = "trained at CR=1"  # the reference: this arm at CR = 1


def _hits(result: dict, cr) -> np.ndarray:
    packed = np.frombuffer(bytes.fromhex(result["hits"][cr]), np.uint8)
    return np.unpackbits(packed, count=result["examples"]).astype(bool)


def add_gaps(results: dict) -> None:
    """Each arm's accuracy minus exact's (EXACT at CR = 1) at every CR, in points, with the
    standard error of that paired difference over the same test examples: `gap[cr]` =
    [points, standard error]."""
    from prism_jax.evaluation.metrics import paired_difference

    reference = _hits(results[EXACT], 1)
    for r in results.values():
        r["gap"] = {cr: [100 * v for v in paired_difference(_hits(r, cr), reference)]
                    for cr in r["hits"]}  # fmt: skip


def markdown(results: dict, run: Run) -> str:
    """The accuracy table, then each arm's distance from exact with its paired error."""
    args, recipe, crs = run.args, run.recipe, run.eval_crs
    start = recipe.get("start_steps")
    start = f" from the CR = 1 arm at {start} steps" if start else ""
    head = "| model | " + " | ".join(f"CR={cr}" for cr in crs)
    lines = [
        f"### Robust fine-tuning, {args.family}: accuracy (%) at N = {args.devices}, "
        f"logit bias {args.logit_bias}, {args.layout}",
        "",
        f"{recipe['steps']} steps{start}, batch {recipe['batch_size']}, lr {recipe['lr']}; "
        f"{run.task.examples} {run.dataset} test examples.",
        "",
        head + " | train min |",
        "|---|" + "---:|" * (len(crs) + 1),
    ]
    for name, r in results.items():  # ("-": an arm kept from the results file, not at that CR)
        cells = [f"{100 * r['accuracy'][cr]:.1f}" if cr in r["accuracy"] else "-" for cr in crs]
        minutes = "-" if r["train_minutes"] is None else f"{r['train_minutes']:.1f}"
        label = f"{name} ({r['from']})" if "from" in r else name  # another run's arm
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {minutes} |")
    exact = 100 * results[EXACT]["accuracy"][1]
    lines += [
        "",
        f"Points from exact ({EXACT} at CR = 1, {exact:.1f} %), ± the standard error of the "
        "paired difference over the same test examples:",
        "",
        head + " |",
        "|---|" + "---:|" * len(crs),
    ]
    for name, r in results.items():
        cells = [f"{r['gap'][cr][0]:+.1f} ± {r['gap'][cr][1]:.1f}" if cr in r["gap"] else "-"
                 for cr in crs]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results, crs, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, r in results.items():
        at = [cr for cr in crs if cr in r["accuracy"]]
        ax.plot(at, [100 * r["accuracy"][cr] for cr in at], marker="o", ms=3, label=name)
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
    common.run_script(main)
