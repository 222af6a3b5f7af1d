"""Accuracy-against-compression grids: the task metric at every (N, CR, logit bias), with the
measured savings, as JSON, a paper-style Markdown table and a plot."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prism_jax.evaluation import sweep
from prism_jax.evaluation.tasks import Task
from prism_jax.plan import Plan

BIASES = ("log_count", "none")


def crs_up_to(local_len: int) -> list[int]:
    """1, 2, 4, ... below the local length L, then L itself (one segment per device)."""
    out, cr = [], 1
    while cr < local_len:
        out.append(cr)
        cr *= 2
    return [*out, local_len]


def grid(
    model,
    task: Task,
    *,
    devices: tuple[int, ...] = (2, 4, 8),
    biases: tuple[str, ...] = BIASES,
    progress: bool = True,
    most_crs: int | None = None,
    max_cr: int | None = None,
    template: Plan | None = None,
    only_crs: tuple[int, ...] | None = None,
) -> dict:
    """The metric of `task` at each N, every CR up to the local length (`crs_up_to`; only its
    first `most_crs - 1` and the local length itself when given; only those in `only_crs`
    when given; none above `max_cr`), each
    logit bias, each plan the `template` (compressor, exchange) at that CR and bias; bytes and
    FLOPs measured once per (N, CR) from the compiled programs."""
    tic = time.perf_counter()
    exact = task.score(None, None)

    def crs(n: int) -> list[int]:
        every = crs_up_to(-(-task.seq_len // n))
        every = every if most_crs is None else [*every[: most_crs - 1], every[-1]]
        every = [cr for cr in every if only_crs is None or cr in only_crs]
        return [cr for cr in every if max_cr is None or cr <= max_cr]

    plans = sweep.cases(devices, crs, biases, template)
    scored = sweep.sweep(
        model.config, plans, task.score, metric="value", seq_len=task.seq_len,
        progress=progress, desc=f"{task.dataset} {task.metric}",
    )  # fmt: skip
    # CR = 1 was scored once (log 1 = 0: the biases coincide); a row for each bias in tables
    rows = [
        {**row, "logit_bias": bias, "plan": {**row["plan"], "logit_bias": bias}}
        for row in scored
        for bias in (biases if row["cr"] == 1 else [row["logit_bias"]])
    ]
    return {
        "dataset": task.dataset,
        "metric": task.metric,
        "examples": task.examples,
        "seq_len": task.seq_len,
        "exact": exact,
        "rows": rows,
        "seconds": time.perf_counter() - tic,
    }


def _fmt(metric: str, value: float) -> str:
    if metric == "cosine":
        return f"{value:.4f}"
    return f"{value:.2f}" if metric == "perplexity" else f"{100 * value:.1f}"


def markdown(result: dict, title: str) -> str:
    """Rows: CR; columns: N x logit bias; cells: the metric (accuracies in %), then the
    measured communication / compute reduction at that (N, CR)."""
    metric, rows = result["metric"], result["rows"]
    devices = sorted({r["devices"] for r in rows})
    biases = [b for b in BIASES if any(r["logit_bias"] == b for r in rows)]
    crs = sorted({r["cr"] for r in rows})
    cell = {(r["devices"], r["cr"], r["logit_bias"]): r for r in rows}
    unit = "" if metric in ("perplexity", "cosine") else " (%)"
    head = [f"N={n} {b}" for n in devices for b in biases]
    head += [f"comm / compute N={n}" for n in devices]
    lines = [
        f"### {title}",
        "",
        f"{metric}{unit} on {result['examples']} {result['dataset']} examples, T = "
        f"{result['seq_len']}; exact model (single device): {_fmt(metric, result['exact'])}.",
        "",
        "| CR | " + " | ".join(head) + " |",
        "|---:|" + "---:|" * len(head),
    ]
    for cr in crs:
        cells = [
            _fmt(metric, cell[(n, cr, b)]["value"]) if (n, cr, b) in cell else ""
            for n in devices
            for b in biases
        ]
        for n in devices:
            r = cell.get((n, cr, biases[0]))
            cells.append(
                f"{-100 * r['comm_reduction']:+.1f} / {-100 * r['compute_reduction']:+.1f} %"
                if r
                else ""
            )
        lines.append(f"| {cr} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[tuple[str, dict]], path) -> None:
    """One panel per result: the metric against CR (log scale), a line per N; solid
    log_count, dashed no bias; the exact model dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, (title, result) in zip(axes[0], results, strict=True):
        metric = result["metric"]
        scale = 1 if metric == "perplexity" else 100
        for i, n in enumerate(sorted({r["devices"] for r in result["rows"]})):
            for bias, style in (("log_count", "-"), ("none", "--")):
                pts = [
                    (r["cr"], scale * r["value"])
                    for r in result["rows"]
                    if r["devices"] == n and r["logit_bias"] == bias
                ]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, marker="o", ms=3, color=f"C{i}",
                            label=f"N={n} {bias}")  # fmt: skip
        ax.axhline(scale * result["exact"], color="k", ls=":", lw=1, label="exact")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression rate CR")
        ax.set_ylabel(metric + ("" if metric == "perplexity" else " (%)"))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_dir(out: str | None, smoke: bool, default: Path) -> Path | None:
    """Where an experiment writes: `--out` when given, else `default`; a smoke run without
    `--out` writes nothing, so that the tests leave the committed results alone."""
    return Path(out) if out else (None if smoke else default)


def save(out: Path | None, stem: str, record, text: str, plot=None) -> None:
    """`<out>/<stem>.json` (the record), `.md` (the text) and, given `plot(path)`, `.png`."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"{stem}.md").write_text(text)
    if plot is not None:
        plot(out / f"{stem}.png")
