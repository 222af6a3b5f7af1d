"""What a device sends, at equal bytes: the paper's segment means against content-aware groups.

Command:  .venv/bin/python experiments/table_compress.py          (about 2.5 hours on 2 cores)
Smoke:    .venv/bin/python experiments/table_compress.py --smoke  (the ViT, seconds)

Training-free, each compressor of DESIGN.md section 1b at the same V = ceil(L / CR) vectors
per device (the value tilt adds one float32 a group, three for rotary keys).

(a) Each change alone, N = 4: the paper's fixed segments; balanced groups over valid tokens;
    one salient token (balanced rest); k-means in key space; the value tilt on the paper's
    segments; all four (`Plan.best`). ViT (CR 16), GPT-2 perplexity (CR 16), MiniLM (CR 8, 2),
    SmolLM2 perplexity (CR 16; its tilt turns queries back by each group's mean rotation,
    see prism_jax/compress.py, so it is also shown without the tilt).
(b) Grids, paper's segments against all four, both logit biases: N in {2, 4, 8} and every CR
    up to L for the ViT (Fashion-MNIST test images), GPT-2 perplexity and cloze (held-out
    Wikipedia rows of 256 tokens), MiniLM sentence embeddings (cosine with the exact model,
    fine-food reviews padded to buckets of 64), SmolLM2 perplexity and the BERT fine-food
    classifier (`make finefood-model`), with reviews padded to 256 and at their own lengths
    (skipped, and said, when that model is absent).

`--resume` computes only the cells the results file lacks; `--recost` also measures the bytes
and compute of the rows it keeps again, from today's programs (their metric is kept).

Bytes each device sends and the per-device compute reduction are measured from the compiled
programs. Writes experiments/results/table_compress.{json,md,png} (the plot: a row per model,
metric against bytes per device, a line per compressor and bias).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import common
import jax

import prism_jax as pj
from prism_jax import cost
from prism_jax.data import sources
from prism_jax.evaluation import metrics, report, tasks
from prism_jax.evaluation.report import _fmt

COMPRESSORS = {
    "segments (paper)": {},
    "balanced": {"grouping": "balanced"},
    "salient": {"salient": 1},
    "k-means": {"grouping": "kmeans"},
    "value tilt": {"value_tilt": True},
    "k-means + salient": {"grouping": "kmeans", "salient": 1},
    "all four": {"grouping": "kmeans", "salient": 1, "value_tilt": True},
}
ALONE = [k for k in COMPRESSORS if k != "k-means + salient"]
MODELS = ("vit", "gpt2", "minilm", "smollm2", "bert")
TEMPLATES = {"paper": {}, "all four": COMPRESSORS["all four"]}
CLASSIFIER = common.HERE.parent / "artifacts" / "minilm-finefood"


@dataclasses.dataclass
class Config:
    smoke: bool = common.setting(False, "the ViT grid on 16 images, N = 4, CR = 16")
    images: int = common.setting(500, "ViT test images")
    rows: int = common.setting(16, "GPT-2 test rows of 256 tokens")
    questions: int = common.setting(32, "GPT-2 cloze questions")
    reviews: int = common.setting(128, "MiniLM reviews")
    classifier_reviews: int = common.setting(200, "BERT classifier test reviews")
    llama_rows: int = common.setting(8, "SmolLM2 test rows of 256 tokens")
    classifier: str = common.setting(str(CLASSIFIER), "the BERT fine-food classifier")
    resume: bool = common.setting(
        False, "keep the results file's rows; compute only the cells its grids lack"
    )
    recost: bool = common.setting(
        False,
        "keep the results file's rows (their metric) and measure their bytes and "
        "compute again from today's programs; then compute the cells it lacks",
    )
    models: str | None = common.setting(  # (a list: nargs)
        None, "only these models, in this order (default: all)", nargs="+", choices=MODELS
    )
    out: str | None = common.output(None, "results folder")


def alone_rows(name, model, score, crs, seq_len, labels):
    """(a): one row per (compressor, CR) at N = 4: the metric, bytes and compute measured."""
    rows = []
    for cr in crs:
        for label in labels:
            row = {"model": name, "compressor": label, "cr": cr}
            row["value"] = score(alone_plan(row)[1])
            recost(model.config, [row], alone_plan, seq_len)
            rows.append(row)
            print(row, flush=True)
    return rows


def alone_plan(row: dict):
    """(N, plan) of a row of (a)."""
    return 4, pj.Plan(cr=row["cr"], **COMPRESSORS[row["compressor"]])


def grid_plan(label: str):
    """(N, plan) of a row of (b) under template `label` (the bias costs nothing)."""
    return lambda row: (row["devices"], pj.Plan(cr=row["cr"], **TEMPLATES[label]))


def grids(model, task, have: dict | None = None, *, devices, crs) -> dict:
    """(b): `report.grid` once per template and N for the cells (N, CR in `crs(N)`) that
    `have` (an earlier run's grids of this model) lacks; its rows are kept."""
    out = {}
    for label, fields in TEMPLATES.items():
        grid = (have or {}).get(label)
        for n in devices:
            missing = tuple(cr for cr in crs(n) if (n, cr) not in _cells(grid))
            if not missing:
                continue
            new = report.grid(model, task, template=pj.Plan(**fields), devices=(n,),
                              only_crs=missing)  # fmt: skip
            if grid is not None:  # the same task: the rows of both runs in one grid
                new = {**new, "rows": grid["rows"] + new["rows"],
                       "seconds": grid["seconds"] + new["seconds"]}  # fmt: skip
            grid = new
        out[label] = grid
    return out


def _cells(grid: dict | None) -> set[tuple[int, int]]:
    return {(r["devices"], r["cr"]) for r in grid["rows"]} if grid else set()


def recost(cfg, rows: list[dict], plan_of, seq_len: int) -> None:
    """Bytes and compute of `rows` measured again from today's compiled programs (the metric
    kept): `plan_of(row)` is the row's (N, plan); once per (N, plan)."""
    for row in rows:
        n, plan = plan_of(row)
        report = _measure(cfg, plan, n, seq_len)
        row |= {"bytes_per_device": report.bytes_sent, "comm_reduction": report.comm_reduction,
                "compute_reduction": report.compute_reduction}  # fmt: skip


@functools.cache
def _measure(cfg, plan, devices: int, seq_len: int):
    return cost.measure(cfg, plan, devices=devices, seq_len=seq_len)


def cosine_task(model, texts):
    """MiniLM sentence embeddings as a Task: cosine with the exact embeddings."""
    batches = metrics.text_batches(model, texts, batch_size=8, max_length=128, bucket=64)
    reference = metrics.embed(model, batches)

    def score(mesh, plan, model=model):
        got = metrics.embed(model, batches, mesh=mesh, plan=plan)
        return float((got * reference).sum(-1).mean())

    return tasks.Task("fine_food_reviews", "cosine", len(texts), 128, score)


class Runner:
    """The results record and what a run computes: every cell a grid lacks (all of them in a
    fresh run), and with `--recost` the bytes and compute of every row measured again."""

    def __init__(self, args):
        self.args, self.mesh = args, pj.edge_mesh(4)
        self.devices = (4,) if args.smoke else (2, 4, 8)
        self.record = {"alone": [], "grids": {}, "skipped": []}
        saved = common.RESULTS / "table_compress.json" if args.out is None else None
        if (args.resume or args.recost) and saved is not None and saved.exists():
            self.record = json.loads(saved.read_text())  # an earlier run: its rows kept

    def crs(self, seq_len: int):
        """A grid's CRs at N = n: every CR up to the local length L."""
        return lambda n: [16] if self.args.smoke else report.crs_up_to(-(-seq_len // n))

    def todo(self, grid: str) -> bool:
        """Whether `grid` lacks a cell (or its costs are to be measured again)."""
        have = self.record["grids"].get(grid, {})
        if self.args.recost or any(t not in have for t in TEMPLATES):
            return True
        crs = self.crs(have["paper"]["seq_len"])
        return any((n, cr) not in _cells(have[t]) for t in TEMPLATES
                   for n in self.devices for cr in crs(n))  # fmt: skip

    def run(self, grid: str, model, task):
        have = self.record["grids"].get(grid)
        if self.args.recost and have is not None:
            for label, g in have.items():
                recost(model.config, g["rows"], grid_plan(label), g["seq_len"])
        crs = self.crs(task.seq_len)
        self.record["grids"][grid] = grids(model, task, have, devices=self.devices, crs=crs)
        self.save()
        jax.clear_caches()  # a grid's compiled programs: hundreds over a run, gigabytes

    def alone(self, name: str, model, score, crs, seq_len, labels):
        rows = [r for r in self.record["alone"] if r["model"] == name]
        if not rows:
            self.record["alone"] += alone_rows(name, model, score, crs, seq_len, labels)
        elif self.args.recost:
            recost(model.config, rows, alone_plan, seq_len)

    def save(self):
        save(self.args, self.record)


def main(argv=None):
    args = common.parse(Config, __doc__, argv)
    runner = Runner(args)
    steps = {"vit": vit, "gpt2": gpt2, "minilm": minilm, "smollm2": smollm2, "bert": bert}
    for name in ["vit"] if args.smoke else args.models or MODELS:
        steps[name](runner)
    if not args.smoke:
        runner.save()


def vit(r: Runner) -> None:
    if r.todo("ViT accuracy"):
        model = pj.load_pretrained(common.HERE / "models" / "vit-fashion-mnist")
        limit = 16 if r.args.smoke else r.args.images
        task = tasks.load(model, "fashion_mnist_local", limit=limit)
        if not r.args.smoke:  # (the smoke: the grid alone)
            r.alone("ViT (accuracy)", model, lambda plan: task.score(r.mesh, plan), [16],
                    model.config.max_positions, ALONE)  # fmt: skip
        r.run("ViT accuracy", model, task)


def gpt2(r: Runner) -> None:
    if r.todo("GPT-2 perplexity") or r.todo("GPT-2 cloze"):
        model = pj.load_pretrained(common.HERE / "models" / "gpt2-wikipedia")
        lm = tasks.load(model, "wikipedia_leads", limit=r.args.rows)
        r.run("GPT-2 perplexity", model, lm)
        r.alone("GPT-2 (perplexity)", model, lambda plan: lm.score(r.mesh, plan), [16],
                lm.seq_len, ALONE)  # fmt: skip
        cloze = tasks.load(model, "wikipedia_cloze", limit=r.args.questions)
        r.run("GPT-2 cloze", model, cloze)


def minilm(r: Runner) -> None:
    if r.todo("MiniLM cosine"):
        model = pj.load_pretrained(sources.minilm_dir())
        texts = sources.fine_food_reviews("test")[0][: r.args.reviews]
        cos = cosine_task(model, texts)
        r.alone("MiniLM (cosine)", model, lambda plan: cos.score(r.mesh, plan), [8, 2], 128,
                ALONE)  # fmt: skip
        r.run("MiniLM cosine", model, cos)


def smollm2(r: Runner) -> None:
    if r.todo("SmolLM2 perplexity"):
        model = pj.load_pretrained(sources.smollm2_gguf())
        ppl = tasks.load(model, "wikipedia_leads", limit=r.args.llama_rows, max_length=256)
        labels = ["segments (paper)", "k-means + salient", "value tilt", "all four"]
        r.alone("SmolLM2 (perplexity)", model, lambda plan: ppl.score(r.mesh, plan), [16], 256,
                labels)  # fmt: skip
        r.run("SmolLM2 perplexity", model, ppl)


def bert(r: Runner) -> None:
    if not Path(r.args.classifier).is_dir():
        skipped = f"BERT classifier: no model at {r.args.classifier}"
        r.record["skipped"] = [*(s for s in r.record["skipped"] if s != skipped), skipped]
        return
    grids_ = {layout: f"BERT classifier ({layout})" for layout in ("unpadded", "padded")}
    if not any(r.todo(g) for g in grids_.values()):
        return
    model = pj.load_pretrained(r.args.classifier)
    for layout, grid in grids_.items():
        if r.todo(grid):
            task = tasks.load(model, "fine_food_reviews", limit=r.args.classifier_reviews,
                              layout=layout)  # fmt: skip
            r.run(grid, model, task)


def markdown(record) -> str:
    lines = [
        "## (a) Each change alone, N = 4",
        "",
        "Bytes: per device and inference; compute: per-device FLOPs against one device on the "
        "whole sequence.",
        "",
        "| model | CR | compressor | metric | bytes/device | compute |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in record["alone"]:
        value = r["value"]
        shown = f"{100 * value:.2f} %" if "accuracy" in r["model"] else f"{value:.4g}"
        lines.append(
            f"| {r['model']} | {r['cr']} | {r['compressor']} | {shown} | "
            f"{r['bytes_per_device']:,} | {-100 * r['compute_reduction']:+.1f} % |"
        )
    lines += ["", "## (b) Paper's segments against all four, at equal vectors per device", ""]
    for title, by_template in record["grids"].items():
        lines += grid_markdown(title, by_template)
    lines += [f"Skipped: {s}" for s in record["skipped"]]
    return "\n".join(lines) + "\n"


def grid_markdown(title: str, by_template: dict) -> list[str]:
    paper = by_template["paper"]
    metric = paper["metric"]
    cells = {
        (label, r["devices"], r["cr"], r["logit_bias"]): r
        for label, grid in by_template.items()
        for r in grid["rows"]
    }
    lines = [
        f"### {title}",
        "",
        f"{metric} on {paper['examples']} {paper['dataset']} examples, T = {paper['seq_len']}; "
        f"exact model: {_fmt(metric, paper['exact'])}.",
        "",
        "| N | CR | bytes paper | bytes all four | paper log_count | paper none "
        "| all four log_count | all four none |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, cr in sorted({(r["devices"], r["cr"]) for r in paper["rows"]}):
        row = [str(n), str(cr)]
        for label in TEMPLATES:
            r = cells.get((label, n, cr, "log_count"))
            row.append(f"{r['bytes_per_device']:,}" if r else "")
        for label in TEMPLATES:
            for bias in ("log_count", "none"):
                r = cells.get((label, n, cr, bias))
                row.append(_fmt(metric, r["value"]) if r else "")
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def plot(record, path) -> None:
    """A row per model, a panel per N: the metric against bytes per device (log), a line per
    compressor (colour) and logit bias (solid log_count, dashed none); exact dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    grids_ = record["grids"]
    width = max(len({r["devices"] for r in g["paper"]["rows"]}) for g in grids_.values())
    fig, axes = plt.subplots(
        len(grids_), width, figsize=(4 * width, 3 * len(grids_)), squeeze=False
    )
    for row, (title, by_template) in zip(axes, grids_.items(), strict=True):
        metric = by_template["paper"]["metric"]
        scale = 100 if metric in ("accuracy", "cloze_accuracy") else 1
        devices = sorted({r["devices"] for r in by_template["paper"]["rows"]})
        for ax in row[len(devices) :]:
            ax.axis("off")
        for ax, n in zip(row, devices, strict=False):
            for color, (label, grid) in enumerate(by_template.items()):
                for bias, style in (("log_count", "-"), ("none", "--")):
                    pts = sorted(
                        (r["bytes_per_device"], scale * r["value"])
                        for r in grid["rows"]
                        if r["devices"] == n and r["logit_bias"] == bias and r["cr"] > 1
                    )
                    if pts:
                        ax.plot(*zip(*pts, strict=True), style, marker="o", ms=3,
                                color=f"C{color}", label=f"{label} {bias}")  # fmt: skip
            ax.axhline(scale * by_template["paper"]["exact"], color="k", ls=":", lw=1,
                       label="exact")  # fmt: skip
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # (overlapping)
            ax.set_title(f"{title}, N = {n}", fontsize=9)
            ax.set_xlabel("bytes per device", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save(args, record):
    text = markdown(record)
    print(text, flush=True)
    common.save(args, "table_compress", record, text, lambda png: plot(record, png))


if __name__ == "__main__":
    common.run_script(main)
