"""What a device sends, at equal bytes: the paper's segment means against content-aware groups.

Command:  .venv/bin/python experiments/table_compress.py          (4 minutes on 2 cores)
Smoke:    .venv/bin/python experiments/table_compress.py --smoke  (ViT, 2 compressors; tests)

N = 4, training-free, each compressor of DESIGN.md section 1b at the same V = ceil(L / CR)
vectors per device (the value tilt adds one float per vector): the paper's fixed segments;
balanced groups over valid tokens; one salient token (balanced rest); k-means in key space;
the value tilt on the paper's segments; all four (`Plan.best`). Models: the ViT task model on
Fashion-MNIST test images (CR = 16), the GPT-2 task model on held-out Wikipedia rows of 256
tokens (perplexity, CR = 16) and all-MiniLM-L6-v2 on fine-food reviews (cosine of sentence
embeddings with the exact model, padded to buckets of 64 tokens, CR = 8 and 2). Bytes each
device sends per inference and the per-device compute reduction are measured from the compiled
programs. Writes experiments/results/table_compress.{json,md,png}.
"""

from __future__ import annotations

import dataclasses

import common

COMPRESSORS = {
    "segments (paper)": {},
    "balanced": {"grouping": "balanced"},
    "salient": {"salient": 1},
    "k-means": {"grouping": "kmeans"},
    "value tilt": {"value_tilt": True},
    "all four": {"grouping": "kmeans", "salient": 1, "value_tilt": True},
}


@dataclasses.dataclass
class Config:
    smoke: bool = common.setting(False, "ViT only, 16 images, the paper's and all four")
    images: int = common.setting(1000, "ViT test images")
    rows: int = common.setting(32, "GPT-2 test rows of 256 tokens")
    reviews: int = common.setting(128, "MiniLM reviews")
    out: str | None = common.setting(None, "results folder")


def rows_for(name, model, score, crs, metric, seq_len, smoke):
    """One row per (compressor, CR): the metric, bytes and compute measured."""
    import prism_jax as pj
    from prism_jax import cost

    rows = []
    chosen = {k: COMPRESSORS[k] for k in ("segments (paper)", "all four")} if smoke else COMPRESSORS
    for cr in crs:
        for label, fields in chosen.items():
            plan = pj.Plan(cr=cr, **fields)
            report = cost.measure(model.config, plan, devices=4, seq_len=seq_len)
            rows.append({"model": name, "compressor": label, "cr": cr, metric: score(plan),
                         "bytes_per_device": report.bytes_sent,
                         "compute_reduction": report.compute_reduction})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def main(argv=None):
    args = common.parse(Config, __doc__, argv)

    import prism_jax as pj
    from prism_jax.data import sources
    from prism_jax.evaluation import metrics, tasks

    smoke = args.smoke
    mesh = pj.edge_mesh(4)
    results = []
    vit = pj.load_pretrained(common.HERE / "models" / "vit-fashion-mnist")
    task = tasks.load(vit, "fashion_mnist_local", limit=16 if smoke else args.images)
    exact = {"vit": task.score(None, None)}
    results += rows_for("ViT (accuracy)", vit, lambda plan: task.score(mesh, plan), [16],
                        "value", vit.config.max_positions, smoke)  # fmt: skip
    if smoke:
        return save(args, results, exact | {"gpt2": float("nan")})
    gpt2 = pj.load_pretrained(common.HERE / "models" / "gpt2-wikipedia")
    lm = tasks.load(gpt2, "wikipedia_leads", limit=args.rows)
    exact["gpt2"] = lm.score(None, None)
    results += rows_for("GPT-2 (perplexity)", gpt2, lambda plan: lm.score(mesh, plan), [16],
                        "value", lm.seq_len, smoke)  # fmt: skip
    minilm = pj.load_pretrained(sources.minilm_dir())
    texts = sources.fine_food_reviews("test")[0][: args.reviews]
    batches = metrics.text_batches(minilm, texts, batch_size=8, max_length=128, bucket=64)
    reference = metrics.embed(minilm, batches)

    def cosine(plan):
        return float(
            (metrics.embed(minilm, batches, mesh=mesh, plan=plan) * reference).sum(-1).mean()
        )

    results += rows_for("MiniLM (cosine)", minilm, cosine, [8, 2], "value", 128, smoke)
    save(args, results, exact)


def markdown(results, exact) -> str:
    lines = [
        f"Exact models: ViT {100 * exact['vit']:.2f} %, GPT-2 perplexity {exact['gpt2']:.2f}, "
        "MiniLM cosine 1. N = 4; bytes: per device and inference; compute: per-device FLOPs "
        "against one device on the whole sequence.",
        "",
        "| model | CR | compressor | metric | bytes/device | compute |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        value = r["value"]
        shown = f"{100 * value:.2f} %" if "accuracy" in r["model"] else f"{value:.4g}"
        lines.append(
            f"| {r['model']} | {r['cr']} | {r['compressor']} | {shown} | "
            f"{r['bytes_per_device']:,} | {-100 * r['compute_reduction']:+.1f} % |"
        )
    return "\n".join(lines) + "\n"


def plot(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["model"], r["cr"]) for r in results))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (model, cr) in zip(axes[0], panels, strict=True):
        rows = [r for r in results if r["model"] == model and r["cr"] == cr]
        ax.barh([r["compressor"] for r in rows], [r["value"] for r in rows], color="C0")
        ax.set_title(f"{model}, CR = {cr}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(args, results, exact):
    text = markdown(results, exact)
    print(text)
    common.save(args, "table_compress", {"exact": exact, "rows": results}, text,
                lambda png: plot(results, png))  # fmt: skip


if __name__ == "__main__":
    main()
