"""The planner against the testbed: in every measured cell, the plan it picks, that plan's
measured latency, the best measured plan within the same budget, and the paper's static CR = 16.

Command:  .venv/bin/python experiments/table_planner.py          (minutes: the calibrations)
Smoke:    .venv/bin/python experiments/table_planner.py --smoke  (2 layers, 2 short rows)

Reads the testbed's record (`edge_testbed.py`, default results/edge_testbed_v2.json): per cell
(model, N, Mbit/s, one-way delay) the plans it timed under the nodes' CPU quota, and the latency
model's prediction of each (`prism_jax.latency.predict`, one device's time measured under the
same quota, a collective's cost fitted on N = 2). Accuracy is calibrated here the way
`pj.plan_for` does it (`planner.Calibration`, cached): SmolLM2, the perplexity's rise on
held-out Wikipedia rows at the cell's T (`--budget`); the encoders, points of accuracy lost
(`--accuracy-budget`) by the task model of the same family, since the testbed times bert-base
and ViT-B/16 on random weights (no such trained weights offline): the fine-food classifier
(`make finefood-model`, all-MiniLM-L6-v2; skipped until built) and the
Fashion-MNIST ViT (`experiments/models`), each at its own length, the same plan. In each cell
the planner weighs the measured plans alone, fastest predicted first (`planner.choose`),
within budget; it is scored on what was measured: its choice's latency against the fastest
measured plan within budget, and against the paper's fixed CR = 16 (`paper:16`), within budget
or not. Writes results/table_planner.{json,md,png} and
table_planner_frontier.png: per N and link, every measured plan's speed-up over one device
against its perplexity rise, the budget, and issue #35's targets where it sets one.
`--report results/.../table_planner.json` draws the tables and plots again from an earlier
run's record (nothing calibrated or measured).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import common

# testbed model -> the name in the tables and where its accuracy comes from
MODELS = {"smollm2-135m": "SmolLM2", "bert-base": "BERT", "vit-base-patch16-224": "ViT"}
CLASSIFIER = common.HERE.parent / "artifacts" / "minilm-finefood"
# issue #35's speed-ups over one device at 10 Mbit/s within +10 % perplexity or 1 point of
# accuracy: (N, ms) -> x
TARGETS = {(2, 5.0): 1.6, (4, 5.0): 2.0, (4, 1.0): 2.64}


@dataclasses.dataclass
class Config:
    smoke: bool = common.setting(False, "2 layers, 2 rows of 32 tokens, one cell")
    testbed: str = common.setting(
        str(common.RESULTS / "edge_testbed_v2.json"), "the testbed's results (JSON)"
    )
    rows: int = common.setting(8, "calibration rows (held-out Wikipedia)")
    budget: float = common.setting(0.10, "perplexity rise allowed (0.10 = +10 %)")
    accuracy_budget: float = common.setting(0.01, "accuracy lost allowed (0.01 = 1 point)")
    reviews: int = common.setting(400, "fine-food test reviews (the BERT classifier)")
    images: int = common.setting(500, "Fashion-MNIST test images (the ViT)")
    out: str | None = common.output(None, "results folder")
    report: str | None = common.setting(None, "an earlier run's table_planner.json to draw again")


def cells(record: dict) -> dict:
    """(model, N, Mbit/s, delay) -> {plan spec: row, with the prediction}, for LM models; a
    plan the latency model has no prediction for (not timed at N = 2) is left out."""
    predicted = {(p["model"], p["nodes"], p["rate_mbit"], p["delay_ms"], p["plan"]): p
                 for p in record["predictions"]}  # fmt: skip
    out = {}
    for r in record["rows"]:
        if r["model"] not in MODELS or r["strategy"] in ("single", "voltage"):
            continue
        key = (r["model"], r["nodes"], r["rate_mbit"], r["delay_ms"])
        single = next(s for s in record["rows"] if (s["model"], s["nodes"], s["strategy"])
                      == (r["model"], r["nodes"], "single"))  # fmt: skip
        out.setdefault(key, {"single": {**single, "predicted_s": single["latency_s"]}})
        if (*key, r["plan"]) not in predicted:  # not timed at N = 2: nothing to fit it on
            print(f"table_planner.py: {r['plan']} at N = {r['nodes']} has no prediction; left out")
            continue
        out[key][r["plan"]] = {**r, "predicted_s": predicted[(*key, r["plan"])]["predicted_s"]}
    return out


def decide(cell: dict, loss_of, budget: float, cfg) -> dict:
    """The planner on one cell's measured plans; beside it the best measured within budget
    and the paper's CR = 16."""
    from testbed_model import make_plan

    from prism_jax import cost, latency, planner

    cands = {}
    for spec, r in cell.items():
        n, kind = (1, "single") if spec == "single" else (r["nodes"], spec.split(":")[0])
        est = latency.Estimate(r["predicted_s"], 0.0, 0.0, 0.0)  # the model's total
        plan = make_plan(spec, cfg, devices=r["nodes"], seq_len=r["seq_len"])
        tokens = cost.local_len(r["seq_len"], n)
        cands[spec] = planner.Candidate(n, plan, kind, est, 0, tokens=tokens)
    order = sorted(cands, key=lambda s: cands[s].estimate.total)
    weighed = planner.choose([cands[s] for s in order], loss_of, budget)
    choice = next(s for s, c in zip(order, weighed, strict=True) if c.status == "chosen")
    losses = {s: 0.0 if s == "single" else loss_of(c) for s, c in cands.items()}
    best = min((s for s in cell if losses[s] <= budget), key=lambda s: cell[s]["latency_s"])
    paper = cell.get("paper:16", {})
    return {"choice": choice, "choice_s": cell[choice]["latency_s"], "best": best,
            "best_s": cell[best]["latency_s"], "single_s": cell["single"]["latency_s"],
            "paper16_s": paper.get("latency_s"), "paper16_loss": losses.get("paper:16"),
            "losses": losses, "measured_s": {s: r["latency_s"] for s, r in cell.items()},
            "predicted_s": {s: r["predicted_s"] for s, r in cell.items()}}  # fmt: skip


def main(argv=None):
    args = common.parse(Config, __doc__, argv)
    if args.report:
        return rerender(args)
    path = Path(args.testbed)
    if not path.is_file():
        print(f"table_planner.py: no testbed record at {path} (run edge_testbed.py)")
        return 0
    record = json.loads(path.read_text())
    from prism_jax import planner

    found = cells(record)
    if args.smoke:  # one SmolLM2 cell, on 2 layers
        found = dict([next(item for item in found.items() if item[0][0] == "smollm2-135m")])
    out, judges = [], {}
    for (name, n, rate, delay), cell in found.items():
        key = (name, cell["single"]["seq_len"])
        if key not in judges:
            judges[key] = judge(args, *key)
        if judges[key] is None:
            continue
        model, task, dataset, limit, budget = judges[key]
        cache = common.HERE.parent / "artifacts" / "calibration"
        calib = planner.Calibration(model, task, dataset=dataset, limit=limit,
                                    cache_dir=cache)  # fmt: skip
        got = decide(cell, calib.loss, budget, model.config)
        out.append({"model": MODELS[name], "nodes": n, "rate_mbit": rate, "delay_ms": delay,
                    "seq_len": task.seq_len, "metric": task.metric, "budget": budget,
                    **got})  # fmt: skip
        print(out[-1], flush=True)
    result = {"budget": args.budget, "accuracy_budget": args.accuracy_budget,
              "testbed": str(path), "cells": out}  # fmt: skip
    save(args, result)
    return 0


def judge(args, name: str, seq_len: int):
    """(model, task, dataset, limit, budget) that scores the plans of the testbed's `name`,
    or None when its task model is not built."""
    import prism_jax as pj
    from prism_jax.data import sources
    from prism_jax.evaluation import tasks

    if name == "smollm2-135m":
        model = pj.load_pretrained(sources.smollm2_gguf())
        model = common.first_layers(model, 2) if args.smoke else model
        rows, t = (2, 32) if args.smoke else (args.rows, seq_len)
        task = tasks.load(model, "wikipedia_leads", limit=rows, max_length=t)
        return model, task, "wikipedia_leads", rows, args.budget
    if name == "bert-base":
        if not CLASSIFIER.is_dir():
            print(f"table_planner.py: no BERT classifier at {CLASSIFIER} (make finefood-model);"
                  " its cells are left out")  # fmt: skip
            return None
        model = pj.load_pretrained(CLASSIFIER)
        task = tasks.load(model, "fine_food_reviews", limit=args.reviews)
        return model, task, "fine_food_reviews", args.reviews, args.accuracy_budget
    model = pj.load_pretrained(common.HERE / "models" / "vit-fashion-mnist")
    task = tasks.load(model, "fashion_mnist_local", limit=args.images)
    return model, task, "fashion_mnist_local", args.images, args.accuracy_budget


def save(args, result: dict) -> None:
    text = markdown(result)
    print(text)
    common.save(args, "table_planner", result, text, lambda png: plot(result, png))
    folder = common.results_dir(args)
    if folder is not None:
        frontier(result, folder / "table_planner_frontier.png")


def rerender(args) -> int:
    """The Markdown and plots of an earlier run's record; its provenance kept as an earlier
    run's. Writes beside it unless `--out` says where."""
    path = Path(args.report)
    if not path.is_file():
        print(f"table_planner.py: error: no record at {path}", file=sys.stderr)
        return 2
    result = json.loads(path.read_text())
    earlier = [result.pop("provenance")] if "provenance" in result else []
    result["earlier_runs"] = result.pop("earlier_runs", []) + earlier
    save(dataclasses.replace(args, out=args.out or str(path.parent)), result)
    return 0


def _loss(cell: dict, loss: float) -> str:
    """A loss as the tables print it: +x % perplexity, or -x points of accuracy."""
    if cell.get("metric", "perplexity") == "perplexity":
        return f"{loss:+.1%}"
    return f"{-100 * loss:+.1f} pt"


def markdown(result: dict) -> str:
    budgets = f"perplexity +{result['budget']:.0%}"
    if "accuracy_budget" in result:
        budgets += f", accuracy -{100 * result['accuracy_budget']:g} point"
    lines = [
        f"### The planner on the testbed's cells (budget: {budgets})",
        "",
        "| model | N | Mbit/s | delay (ms) | planner's choice | its latency (s) | best within "
        "budget | its latency (s) | choice / best | paper CR = 16 (s, loss) | cut against it |",
        "|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for c in result["cells"]:
        p16 = c["paper16_s"]
        paper = "-" if p16 is None else f"{p16:.2f}, {_loss(c, c['paper16_loss'])}"
        cut = "-" if p16 is None else f"{1 - c['choice_s'] / p16:.0%}"
        lines.append(
            f"| {c['model']} | {c['nodes']} | {c['rate_mbit'] or 'unlimited'} | "
            f"{c['delay_ms']:g} | {c['choice']} | {c['choice_s']:.2f} | {c['best']} | "
            f"{c['best_s']:.2f} | {c['choice_s'] / c['best_s']:.2f} | {paper} | {cut} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    """Per cell: the choice's measured latency against the best within budget's."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    best = [c["best_s"] for c in result["cells"]]
    chosen = [c["choice_s"] for c in result["cells"]]
    ax.scatter(best, chosen, label="planner's choice")
    paper = [(c["best_s"], c["paper16_s"]) for c in result["cells"] if c["paper16_s"]]
    if paper:
        ax.scatter(*zip(*paper, strict=True), marker="x", label="paper CR = 16")
    top = max(chosen + best + [p for _, p in paper]) * 1.1
    ax.plot([0, top], [0, top], color="black", linestyle=":", label="= best")
    ax.plot([0, top], [0, 1.1 * top], color="grey", linestyle="--", label="+10 %")
    ax.set(xlabel="best measured within budget (s)", ylabel="measured latency (s)",
           xlim=(0, top), ylim=(0, top), title="planner vs best, per testbed cell")  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def frontier(result: dict, path) -> None:
    """Per model and N (rows) and link (columns): each measured plan's speed-up over one
    device against its loss (perplexity rise or accuracy lost, symlog), the budget, one
    device's 1.0x, the planner's choice ringed and the issue's target where it sets one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    panels = list(dict.fromkeys((c["model"], c["nodes"]) for c in cells))
    links = sorted({(c["rate_mbit"] or 0, c["delay_ms"]) for c in cells})
    fig, axes = plt.subplots(len(panels), len(links), figsize=(4.2 * len(links),
                             3.4 * len(panels)), squeeze=False)  # fmt: skip
    for ax in axes.flat:
        ax.set_visible(False)
    for c in cells:
        row = panels.index((c["model"], c["nodes"]))
        ax = axes[row][links.index((c["rate_mbit"] or 0, c["delay_ms"]))]
        perplexity = c.get("metric", "perplexity") == "perplexity"
        ax.set_visible(True)
        for spec, seconds in c["measured_s"].items():
            x, y = 100 * c["losses"][spec], c["single_s"] / seconds
            ax.scatter(x, y, s=18, color="C1" if spec.startswith("paper") else "C0")
            ax.annotate(spec, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
            if spec == c["choice"]:
                ax.scatter(x, y, s=110, facecolors="none", edgecolors="C3", label="choice")
        budget = c.get("budget", result["budget"])
        ax.axvline(100 * budget, color="grey", ls="--", lw=0.8, label="budget")
        ax.axhline(1.0, color="black", ls=":", lw=0.8, label="one device")
        target = TARGETS.get((c["nodes"], c["delay_ms"])) if c["rate_mbit"] == 10 else None
        if target:
            ax.axhline(target, color="C2", ls="-.", lw=1, label="target (#35)")
        ax.set_xscale("symlog", linthresh=1.0)
        shown = [100 * v for v in c["losses"].values()] + [100 * budget]
        ax.set_xlim(min(-0.3, 2 * min(shown)), 3 * max(shown))
        top = max(c["single_s"] / s for s in c["measured_s"].values())
        ax.set_ylim(0.5 if c["paper16_s"] and c["single_s"] / c["paper16_s"] < 0.9 else 0.9,
                    1.12 * max(top, target or 0))  # fmt: skip
        xlabel = "perplexity rise (%)" if perplexity else "accuracy lost (points)"
        ax.set(xlabel=xlabel, ylabel="speed-up over one device",
               title=f"{c['model']} N = {c['nodes']}, {c['rate_mbit'] or 'unlimited'} Mbit/s, "
               f"{c['delay_ms']:g} ms")  # fmt: skip
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes.flat:
        handles.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=len(handles),
               fontsize=8)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    common.run_script(main)
