"""SmolLM2-135M (real Q4_1 weights; `--model gpt2`: the GPT-2 task model): the attention
sink, the tail grouping and the int8 and int4 wires against the paper's segment means, at equal
or fewer bytes per device (DESIGN.md 1c, 1d).

Command:  .venv/bin/python experiments/table_sink.py          (about 15 minutes on 2 cores)
Smoke:    .venv/bin/python experiments/table_sink.py --smoke  (2 layers, seconds; run by tests)

Training-free perplexity on packed rows of the Wikipedia leads' test split, N devices, each
budget of bytes per device set by the paper's float32 segments at a CR. Per budget, the
compressors (K/V exchange, log-count bias):

- paper: fixed segments of CR positions;
- prism+: k-means groups, a salient token, the rotary value tilt (DESIGN.md 1b);
- sink + balanced: the first `--sink` valid tokens exact, the rest in balanced groups (1c);
- sink + tail: the same with groups finest at the device's last token (`grouping="tail"`);
- sink + tail, int8: the same on the int8 wire at the smallest CR whose bytes stay within the
  budget (four times the vectors, about);
- sink + tail + tilt, int8: the same with the rotary value tilt (12 more bytes a group);
- sink + prism+, int8: the sink with k-means groups, a salient token and the tilt, on int8;
- sink + tail + tilt and sink + prism+: the last two on float32 (not run by default);
- sink + tail + tilt, int4 and sink + prism+, int4: on the int4 wire (two codes a byte, about
  seven times the vectors of float32; not run by default).

Bytes per device are the closed form, checked equal to the lowered program's collectives for
every plan. Writes experiments/results/table_sink.{json,md,png}.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys

import common
import numpy as np

COMPRESSORS = (
    "paper",
    "prism+",
    "sink + balanced",
    "sink + tail",
    "sink + tail, int8",
    "sink + tail + tilt, int8",
    "sink + prism+, int8",
    "sink + tail + tilt",
    "sink + prism+",
    "sink + tail + tilt, int4",
    "sink + prism+, int4",
    "sink + tail + tilt, int4h",
    "sink + tail, int4h",
    "sink + balanced, int4h",
)


@dataclasses.dataclass
class Config:
    smoke: bool = common.setting(False, "2 layers, 2 short rows, seconds")
    rows: int = common.setting(8, "test rows of --seq-len tokens")
    seq_len: int = common.setting(256, "tokens per row")
    devices: str = common.setting("4", "device counts, comma-separated")
    crs: str = common.setting("4,16,64", "budgets: the paper's float32 CR, comma-separated")
    compressors: str = common.setting(";".join(COMPRESSORS[:7]), "compressors, separated by ;")
    sinks: str = common.setting("4", "sink tokens sent exactly, comma-separated")
    model: str = common.setting("smollm2", "smollm2, or gpt2 (the GPT-2 task model)")
    questions: int = common.setting(
        0, "cloze questions (wikipedia_cloze, 10 options) scored per cell (0: none)", minimum=0
    )
    cloze_len: int = common.setting(128, "tokens per cloze candidate (context left-truncated)")
    fill: str = common.setting(
        "cr",
        "how an integer wire spends the budget: cr (the smallest CR within it) or groups "
        "(the most groups within it, Plan(groups=V))",
    )
    out: str | None = common.output(None, "results folder")


def plan_for(name: str, cr: int, sink: int, cfg, local_len: int, fill: str = "cr"):
    """The plan of compressor `name` within the bytes of the paper's float32 plan at `cr`
    (`fill`: on an integer wire, the smallest CR within them, or the most groups)."""
    import prism_jax as pj
    from prism_jax import cost

    if name == "paper":
        return pj.Plan(cr=cr)
    if name == "prism+":
        return pj.Plan.best(cr)
    kw = dict(grouping="balanced" if name.startswith("sink + balanced") else "tail", sink=sink)
    if "prism+" in name:
        kw = dict(grouping="kmeans", salient=1, value_tilt=True, sink=sink)
    if "tilt" in name:
        kw["value_tilt"] = True
    wire = name.rpartition(", ")[2] if ", int" in name else "f32"
    if wire == "f32":
        return pj.Plan(cr=cr, **kw)
    budget = cost.group_bytes(cfg, pj.Plan(cr=cr)) * pj.Plan(cr=cr).segments(local_len)
    if fill == "groups":  # per layer and row: the closed form at one device's L, N = 1 apart
        from prism_jax import planner

        shape = dict(devices=2, seq_len=2 * local_len)
        return planner.fill(cfg, pj.Plan(wire=wire, **kw), budget * cfg.depth, **shape)
    for smaller in range(1, cr + 1):  # the most vectors that fit the budget
        plan = pj.Plan(cr=smaller, wire=wire, **kw)
        if cost.group_bytes(cfg, plan) * plan.segments(local_len) <= budget:
            return plan
    return pj.Plan(cr=cr, wire=wire, **kw)


def main(argv=None):
    args = common.parse(Config, __doc__, argv)
    names = args.compressors.split(";")
    unknown = sorted(set(names) - set(COMPRESSORS))
    if unknown:  # before the model loads
        print(f"table_sink.py: error: unknown compressors {unknown}", file=sys.stderr)
        return 2
    if args.fill not in ("cr", "groups"):
        print(f"table_sink.py: error: --fill {args.fill!r}: cr or groups", file=sys.stderr)
        return 2
    sinks = [int(s) for s in args.sinks.split(",") if s.strip().isdigit() and int(s) >= 1]
    if len(sinks) != len(args.sinks.split(",")):
        print(f"table_sink.py: error: --sinks {args.sinks!r}: integers >= 1", file=sys.stderr)
        return 2

    import prism_jax as pj
    from prism_jax import cost
    from prism_jax.data import sources
    from prism_jax.evaluation import metrics, tasks

    if args.model not in ("smollm2", "gpt2"):
        print(f"table_sink.py: error: --model {args.model!r}: smollm2 or gpt2", file=sys.stderr)
        return 2
    gpt2 = common.HERE / "models" / "gpt2-wikipedia"
    model = pj.load_pretrained(gpt2 if args.model == "gpt2" else sources.smollm2_gguf())
    if args.smoke:
        model = common.first_layers(model, 2)
    rows, seq_len = (2, 32) if args.smoke else (args.rows, args.seq_len)
    devices = [int(n) for n in args.devices.split(",")]
    crs = [int(c) for c in args.crs.split(",")]
    task = tasks.load(model, "wikipedia_leads", limit=rows, max_length=seq_len)
    ids = task.train_examples["input_ids"]
    exact_logp = metrics.token_logprobs(model, ids)
    exact = float(np.exp(-exact_logp.mean()))
    print(f"exact perplexity {exact:.3f} on {task.examples} rows of {seq_len} tokens")
    cloze = None
    if args.questions:  # each candidate its own row of cloze_len tokens; same budgets
        cloze = tasks.load(model, "wikipedia_cloze", limit=args.questions,
                           max_length=args.cloze_len)  # fmt: skip
        cloze_exact = float(cloze.score(None, pj.Plan(strategy="single")))
        print(f"exact cloze accuracy {cloze_exact:.3f} on {cloze.examples} questions")
    cells = []
    for n in devices:
        mesh, local = pj.edge_mesh(n), cost.local_len(seq_len, n)
        for cr, sink, name in itertools.product(crs, sinks, names):
            if sink != sinks[0] and "sink" not in name:
                continue  # the same plan again
            plan = plan_for(name, cr, sink, model.config, local, args.fill)
            shape = dict(devices=n, seq_len=seq_len, batch=1)
            sent = cost.bytes_closed_form(model.config, plan, **shape)
            assert sent == cost.measured_bytes(model.config, plan, **shape), plan
            logp = metrics.token_logprobs(model, ids, mesh=mesh, plan=plan)
            value = float(np.exp(-logp.mean()))
            per_device = metrics.perplexity_per_device
            cells.append({"devices": n, "budget_cr": cr, "compressor": name,
                          "plan": dataclasses.asdict(plan), "bytes_per_device": sent,
                          "perplexity": value, "over_exact": value / exact,
                          "per_device": per_device(logp, n),
                          "exact_per_device": per_device(exact_logp, n)})  # fmt: skip
            if cloze is not None:
                short = cost.local_len(cloze.seq_len, n)
                asked = plan_for(name, cr, sink, model.config, short, args.fill)
                cells[-1] |= {"cloze": float(cloze.score(mesh, asked)),
                              "cloze_plan": dataclasses.asdict(asked)}  # fmt: skip
            print(f"N={n} CR={cr:>3} s={plan.sink} {name:<24} {value:8.2f} "
                  f"({value / exact - 1:+.1%}) {sent:,} bytes "
                  + (f"cloze {cells[-1]['cloze']:.3f}" if cloze else ""))  # fmt: skip
    name = "GPT-2 task model" if args.model == "gpt2" else "SmolLM2"
    record = {"model": name, "exact": exact, "rows": task.examples, "seq_len": seq_len,
              "sinks": sinks, "cells": cells}  # fmt: skip
    if cloze is not None:
        record |= {"cloze_exact": cloze_exact, "cloze_questions": cloze.examples,
                   "cloze_len": cloze.seq_len}  # fmt: skip
    text = markdown(record)
    print(text)
    common.save(args, "table_sink", record, text, lambda png: plot(record, png))


def markdown(record: dict) -> str:
    lines = [
        f"### {record.get('model', 'SmolLM2')} perplexity at equal bytes: {record['rows']} "
        "Wikipedia rows of "
        f"{record['seq_len']} tokens, exact {record['exact']:.2f}",
        "",
        "Per device: the perplexity of the next-token predictions each device makes (exact: "
        + " / ".join(_per_device(record["cells"]))
        + ").",
        "",
        "| N | budget (paper CR) | compressor | plan | bytes/device | perplexity | vs exact "
        "| per device |" + (" cloze |" if "cloze_exact" in record else ""),
        "|---:|---:|---|---|---:|---:|---:|---|" + ("---:|" if "cloze_exact" in record else ""),
    ]
    if "cloze_exact" in record:
        lines.insert(2, f"Cloze: {record['cloze_questions']} `wikipedia_cloze` questions, 10 "
                        f"options of {record['cloze_len']} tokens, exact "
                        f"{record['cloze_exact']:.1%}; the plan within the same budget at "
                        "that length.\n")  # fmt: skip
    for c in record["cells"]:
        p = c["plan"]
        extras = " salient" * p["salient"] + " tilt" * p["value_tilt"]
        size = f"V={p['groups']}" if p.get("groups") else f"CR={p['cr']}"
        plan = f"{size} {p['grouping']}{extras} sink={p['sink']} {p['wire']}"
        lines.append(
            f"| {c['devices']} | {c['budget_cr']} | {c['compressor']} | {plan} | "
            f"{c['bytes_per_device']:,} | {c['perplexity']:.2f} | {c['over_exact'] - 1:+.1%} | "
            + " / ".join(f"{v:.1f}" for v in c["per_device"])
            + " |"
            + (f" {c['cloze']:.1%} |" if "cloze" in c else "")
        )
    return "\n".join(lines) + "\n"


def _per_device(cells: list[dict]) -> list[str]:
    """The exact model's perplexity per device, once per N."""
    seen = {c["devices"]: c["exact_per_device"] for c in cells}
    return [f"N = {n}: " + ", ".join(f"{v:.1f}" for v in seen[n]) for n in sorted(seen)]


def plot(record: dict, path) -> None:
    """Perplexity against bytes per device, one line per compressor, a panel per N."""
    import matplotlib.pyplot as plt

    devices = sorted({c["devices"] for c in record["cells"]})
    fig, axes = plt.subplots(1, len(devices), figsize=(5 * len(devices), 4), squeeze=False)
    for ax, n in zip(axes[0], devices, strict=True):
        here = [c for c in record["cells"] if c["devices"] == n]
        lines = dict.fromkeys((c["compressor"], c["plan"]["sink"]) for c in here)
        for name, sink in lines:
            cells = [c for c in here if (c["compressor"], c["plan"]["sink"]) == (name, sink)]
            cells.sort(key=lambda c: c["bytes_per_device"])
            xs = [c["bytes_per_device"] for c in cells]
            label = f"{name} (s = {sink})" if len(record["sinks"]) > 1 and sink else name
            ax.plot(xs, [c["perplexity"] for c in cells], marker="o", label=label)
        ax.axhline(record["exact"], color="black", linestyle=":", label="exact")
        ax.set(xscale="log", yscale="log", xlabel="bytes per device", ylabel="perplexity",
               title=f"{record.get('model', 'SmolLM2')}, N = {n}")  # fmt: skip
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    common.run_script(main)
