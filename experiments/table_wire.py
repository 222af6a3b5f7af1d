"""What the wire costs (DESIGN.md 1d): float32, bfloat16, int8 and int4 means, per model, with
its best compressor, at the same CR and against bytes per device.

Command:  .venv/bin/python experiments/table_wire.py          (about 30 minutes on 2 cores)
Smoke:    .venv/bin/python experiments/table_wire.py --smoke  (the ViT on 8 images, seconds)

Training-free, N devices (default 4), `Plan.best(cr, model)` (encoders: k-means, a salient
token, the value tilt; causal LMs: the sink, the tail grouping, the tilt) on each wire at each
CR (`--sink s`: each also with the first s tokens exact, e.g. BERT's CLS or the ViT's class
token): the ViT task model's accuracy on Fashion-MNIST test images, the GPT-2 task model's and
SmolLM2's perplexity on held-out Wikipedia rows of 256 tokens, MiniLM sentence embeddings'
cosine with the exact model on fine-food reviews (the BERT encoder; the fine-tuned BERT
classifier is used when `make finefood-model` has built it). Bytes per device are the closed
form, checked equal to the lowered program's collectives. Writes
experiments/results/table_wire.{json,md,png} (a panel per model: metric against bytes per
device, a line per wire).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import common

WIRES = ("f32", "bf16", "int8", "int4", "int4h")
MODELS = ("vit", "gpt2", "minilm", "smollm2", "bert")
CLASSIFIER = common.HERE.parent / "artifacts" / "minilm-finefood"


@dataclasses.dataclass
class Config:
    smoke: bool = common.setting(False, "the ViT on 8 images, CR 16")
    devices: int = common.setting(4, "edge devices", minimum=2)
    crs: str = common.setting("2,4,16,32", "CRs, comma-separated")
    images: int = common.setting(300, "ViT test images")
    rows: int = common.setting(8, "GPT-2 and SmolLM2 test rows of 256 tokens")
    reviews: int = common.setting(64, "MiniLM reviews (and BERT classifier reviews x 4)")
    models: str = common.setting(",".join(MODELS), "models, comma-separated")
    wires: str = common.setting(",".join(WIRES), "wires, comma-separated")
    sink: int = common.setting(
        0, "also each wire with this many first tokens sent exactly (0: not)", minimum=0
    )
    out: str | None = common.output(None, "results folder")


def tasks_of(args):
    """(name, model, task) per model asked for; the BERT classifier only when it is built."""
    from table_compress import cosine_task

    import prism_jax as pj
    from prism_jax.data import sources
    from prism_jax.evaluation import tasks

    names = ["vit"] if args.smoke else args.models.split(",")
    for name in names:
        if name == "vit":
            model = pj.load_pretrained(common.HERE / "models" / "vit-fashion-mnist")
            limit = 8 if args.smoke else args.images
            yield "ViT accuracy", model, tasks.load(model, "fashion_mnist_local", limit=limit)
        elif name == "gpt2":
            model = pj.load_pretrained(common.HERE / "models" / "gpt2-wikipedia")
            yield "GPT-2 perplexity", model, tasks.load(model, "wikipedia_leads", limit=args.rows)
        elif name == "minilm":
            model = pj.load_pretrained(sources.minilm_dir())
            texts = sources.fine_food_reviews("test")[0][: args.reviews]
            yield "MiniLM cosine", model, cosine_task(model, texts)
        elif name == "smollm2":
            model = pj.load_pretrained(sources.smollm2_gguf())
            task = tasks.load(model, "wikipedia_leads", limit=args.rows, max_length=256)
            yield "SmolLM2 perplexity", model, task
        elif name == "bert" and Path(CLASSIFIER).is_dir():
            model = pj.load_pretrained(CLASSIFIER)
            task = tasks.load(model, "fine_food_reviews", limit=4 * args.reviews)
            yield "BERT classifier accuracy", model, task
        elif name == "bert":
            print(f"BERT classifier: no model at {CLASSIFIER} (make finefood-model): skipped")


def _bad_flag(args) -> str | None:
    """The first comma-separated flag holding an item it does not take, said as an error."""
    rules = (("--wires", args.wires, WIRES.__contains__),
             ("--models", args.models, MODELS.__contains__),
             ("--crs", args.crs, lambda x: x.isdigit() and int(x) >= 1))  # fmt: skip
    for flag, given, ok in rules:
        if not all(map(ok, given.split(","))):
            return f"argument {flag}: {given!r}"
    return None


def main(argv=None):
    args = common.parse(Config, __doc__, argv)
    bad = _bad_flag(args)
    if bad:  # before anything loads
        print(f"table_wire.py: error: {bad}", file=sys.stderr)
        return 2
    crs = [16] if args.smoke else [int(c) for c in args.crs.split(",")]
    import prism_jax as pj
    from prism_jax import cost

    mesh, n = pj.edge_mesh(args.devices), args.devices
    record = {"devices": n, "models": []}
    for name, model, task in tasks_of(args):
        exact = float(task.score(None, pj.Plan(strategy="single")))
        cells = []
        local = cost.local_len(task.seq_len, n)
        variants = [(w, s) for s in sorted({0, args.sink}) for w in args.wires.split(",")]
        for cr in (c for c in crs if c <= local):
            for wire, sink in variants:
                plan = pj.Plan.best(cr, model, wire=wire)
                plan = dataclasses.replace(plan, sink=sink) if sink else plan
                shape = dict(devices=n, seq_len=task.seq_len, batch=1)
                sent = cost.bytes_closed_form(model.config, plan, **shape)
                assert sent == cost.measured_bytes(model.config, plan, **shape), plan
                value = float(task.score(mesh, plan))
                wire = f"{wire} + sink {sink}" if sink else wire
                cells.append({"cr": cr, "wire": wire, "plan": dataclasses.asdict(plan),
                              "bytes_per_device": sent, "value": value})  # fmt: skip
                print(f"{name} CR={cr} {wire}: {value:.4f} ({sent:,} bytes)", flush=True)
        record["models"].append({"name": name, "metric": task.metric, "exact": exact,
                                 "seq_len": task.seq_len, "examples": task.examples,
                                 "cells": cells})  # fmt: skip
    text = markdown(record)
    print(text)
    common.save(args, "table_wire", record, text, lambda png: plot(record, png))


def _against_f32(m: dict, c: dict) -> str:
    """The change from float32 at the same CR: points (accuracy, cosine) or % (perplexity)."""
    f32 = [x for x in m["cells"] if x["cr"] == c["cr"] and x["wire"] == "f32"]
    if not f32:
        return "-"
    f32 = f32[0]["value"]
    if m["metric"] == "perplexity":
        return f"{c['value'] / f32 - 1:+.2%}"
    return f"{(c['value'] - f32) * 100:+.2f} pt"


def markdown(record: dict) -> str:
    lines = [
        f"### The wire at the same CR, N = {record['devices']}, each model's `Plan.best`",
        "",
        "| model | exact | CR | wire | bytes/device | metric | vs float32 at this CR "
        "(points, or perplexity %) |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for m in record["models"]:
        for c in m["cells"]:
            lines.append(
                f"| {m['name']} ({m['examples']}) | {m['exact']:.4f} | {c['cr']} | {c['wire']} | "
                f"{c['bytes_per_device']:,} | {c['value']:.4f} | {_against_f32(m, c)} |"
            )
    return "\n".join(lines) + "\n"


def plot(record: dict, path) -> None:
    """A panel per model: the metric against bytes per device, a line per wire."""
    import matplotlib.pyplot as plt

    models = record["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.8), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        for wire in dict.fromkeys(c["wire"] for c in m["cells"]):
            cells = sorted((c for c in m["cells"] if c["wire"] == wire),
                           key=lambda c: c["bytes_per_device"])  # fmt: skip
            ax.plot([c["bytes_per_device"] for c in cells], [c["value"] for c in cells],
                    marker="o", label=wire)  # fmt: skip
        ax.axhline(m["exact"], color="black", linestyle=":", label="exact")
        ax.set(xscale="log", xlabel="bytes per device", ylabel=m["metric"], title=m["name"])
        if m["metric"] == "perplexity":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    common.run_script(main)
