"""What a device sends, at equal bytes: the paper's segment means against content-aware groups.

Command:  .venv/bin/python experiments/table_compress.py          (about 80 minutes on 2 cores)
Smoke:    .venv/bin/python experiments/table_compress.py --smoke  (the ViT, seconds)

Training-free, each compressor of DESIGN.md section 1b at the same V = ceil(L / CR) vectors
per device (the value tilt adds one float32 a group, three for rotary keys).

(a) Each change alone, N = 4: the paper's fixed segments; balanced groups over valid tokens;
    one salient token (balanced rest); k-means in key space; the value tilt on the paper's
    segments; all four (`Plan.best`). ViT (CR 16), GPT-2 perplexity (CR 16), MiniLM (CR 8, 2),
    SmolLM2 perplexity (CR 16; its tilt turns queries back by each group's mean rotation,
    see prism_jax/compress.py, so it is also shown without the tilt).
(b) Grids, paper's segments against all four, both logit biases: N in {2, 4, 8} and every CR
    up to L for the ViT (Fashion-MNIST test images), GPT-2 perplexity (held-out Wikipedia rows
    of 256 tokens) and MiniLM sentence embeddings (cosine with the exact model, fine-food
    reviews padded to buckets of 64); N in {2, 4, 8} and a few CRs for GPT-2 cloze, SmolLM2
    perplexity and the BERT fine-food classifier (`make finefood-model`), with reviews padded
    to 256 and at their own lengths (skipped, and said, when that model is absent).

Bytes each device sends and the per-device compute reduction are measured from the compiled
programs. Writes experiments/results/table_compress.{json,md,png} (the plot: a row per model,
metric against bytes per device, a line per compressor and bias).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import common

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
        False, "keep the results file's grids; compute only the device counts they lack"
    )
    out: str | None = common.setting(None, "results folder")


def alone_rows(name, model, score, crs, seq_len, labels):
    """(a): one row per (compressor, CR) at N = 4: the metric, bytes and compute measured."""
    import prism_jax as pj
    from prism_jax import cost

    rows = []
    for cr in crs:
        for label in labels:
            plan = pj.Plan(cr=cr, **COMPRESSORS[label])
            report = cost.measure(model.config, plan, devices=4, seq_len=seq_len)
            rows.append({"model": name, "compressor": label, "cr": cr, "value": score(plan),
                         "bytes_per_device": report.bytes_sent,
                         "compute_reduction": report.compute_reduction})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def grids(model, task, have: dict | None = None, *, devices, **kw) -> dict:
    """(b): `report.grid` once per template (the paper's segments, all four), at the device
    counts that `have` (an earlier run's grids of this model) lacks; its rows are kept."""
    import prism_jax as pj
    from prism_jax.evaluation import report

    out = {}
    for label, fields in TEMPLATES.items():
        old = (have or {}).get(label)
        todo = tuple(n for n in devices if n not in _devices(old))
        if not todo:
            out[label] = old
            continue
        new = report.grid(model, task, template=pj.Plan(**fields), devices=todo, **kw)
        if old is not None:  # the same task: the rows of both runs in one grid
            new = {**new, "rows": old["rows"] + new["rows"],
                   "seconds": old["seconds"] + new["seconds"]}  # fmt: skip
        out[label] = new
    return out


def _devices(grid: dict | None) -> set[int]:
    return {r["devices"] for r in grid["rows"]} if grid else set()


def cosine_task(model, texts):
    """MiniLM sentence embeddings as a Task: cosine with the exact embeddings."""
    from prism_jax.evaluation import metrics, tasks

    batches = metrics.text_batches(model, texts, batch_size=8, max_length=128, bucket=64)
    reference = metrics.embed(model, batches)

    def score(mesh, plan, model=model):
        got = metrics.embed(model, batches, mesh=mesh, plan=plan)
        return float((got * reference).sum(-1).mean())

    return tasks.Task("fine_food_reviews", "cosine", len(texts), 128, score)


def main(argv=None):
    args = common.parse(Config, __doc__, argv)

    import prism_jax as pj
    from prism_jax.data import sources
    from prism_jax.evaluation import tasks

    smoke = args.smoke
    mesh = pj.edge_mesh(4)
    record = {"alone": [], "grids": {}, "skipped": []}
    saved = common.RESULTS / "table_compress.json" if args.out is None else None
    if args.resume and saved is not None and saved.exists():
        record = json.loads(saved.read_text())  # an earlier run: its grids kept
    every = dict(devices=(4,), only_crs=(16,)) if smoke else dict(devices=(2, 4, 8))

    def done():
        save(args, record)

    def todo(grid: str) -> bool:
        """Whether `grid` lacks a device count (a resumed run computes only those)."""
        have = record["grids"].get(grid, {})
        return any(not set(every["devices"]) <= _devices(have.get(t)) for t in TEMPLATES)

    def run(grid: str, model, task, devices=every["devices"], **kw):
        kw = {**every, **kw, "devices": devices}
        record["grids"][grid] = grids(model, task, record["grids"].get(grid), **kw)
        done()

    def alone(name: str, *args):
        if not any(r["model"] == name for r in record["alone"]):
            record["alone"] += alone_rows(name, *args)

    if todo("ViT accuracy"):
        vit = pj.load_pretrained(common.HERE / "models" / "vit-fashion-mnist")
        task = tasks.load(vit, "fashion_mnist_local", limit=16 if smoke else args.images)
        if not smoke:  # (the smoke: the grid alone)
            alone("ViT (accuracy)", vit, lambda plan: task.score(mesh, plan), [16],
                  vit.config.max_positions, ALONE)  # fmt: skip
        run("ViT accuracy", vit, task)
    if smoke:
        return
    if todo("GPT-2 perplexity") or todo("GPT-2 cloze"):
        gpt2 = pj.load_pretrained(common.HERE / "models" / "gpt2-wikipedia")
        lm = tasks.load(gpt2, "wikipedia_leads", limit=args.rows)
        if todo("GPT-2 perplexity"):
            run("GPT-2 perplexity", gpt2, lm)
        alone("GPT-2 (perplexity)", gpt2, lambda plan: lm.score(mesh, plan), [16], lm.seq_len,
              ALONE)  # fmt: skip
        cloze = tasks.load(gpt2, "wikipedia_cloze", limit=args.questions)
        run("GPT-2 cloze", gpt2, cloze, only_crs=(4, 16, 64))
    if todo("MiniLM cosine"):
        minilm = pj.load_pretrained(sources.minilm_dir())
        texts = sources.fine_food_reviews("test")[0][: args.reviews]
        cos = cosine_task(minilm, texts)
        alone("MiniLM (cosine)", minilm, lambda plan: cos.score(mesh, plan), [8, 2], 128, ALONE)
        run("MiniLM cosine", minilm, cos)
    if todo("SmolLM2 perplexity"):
        smollm = pj.load_pretrained(sources.smollm2_gguf())
        ppl = tasks.load(smollm, "wikipedia_leads", limit=args.llama_rows, max_length=256)
        labels = ["segments (paper)", "k-means + salient", "value tilt", "all four"]
        alone("SmolLM2 (perplexity)", smollm, lambda plan: ppl.score(mesh, plan), [16], 256,
              labels)  # fmt: skip
        run("SmolLM2 perplexity", smollm, ppl, only_crs=(4, 32))

    if not Path(args.classifier).is_dir():
        record["skipped"].append(f"BERT classifier: no model at {args.classifier}")
        return done()
    bert = pj.load_pretrained(args.classifier)
    for layout in ("unpadded", "padded"):
        if todo(f"BERT classifier ({layout})"):
            task = tasks.load(bert, "fine_food_reviews", limit=args.classifier_reviews,
                              layout=layout)  # fmt: skip
            run(f"BERT classifier ({layout})", bert, task, only_crs=(4, 16, 64))


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
    from prism_jax.evaluation.report import _fmt

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
    main()
