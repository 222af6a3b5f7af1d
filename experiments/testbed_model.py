"""The edge testbed's latency model, its tables and its plot (`edge_testbed.py`).

The model is `prism_jax.latency.predict` (the planner's): compute (one device's time measured
under the node's quota x the plan's per-device share of the layers' FLOPs) + depth x (N - 1)
x the one-way delay (a ring all-gather a layer) + (N - 1) x the bytes a node sends x 8 / rate
+ depth x a collective's own cost. That cost is fitted per model and plan on the N = 2 cells
(the mean residual per collective; it may come out negative where the model overestimates),
and the rest of the cells are predicted with it.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path


def make_plan(spec: str, cfg, *, devices: int = 2, seq_len: int = 512):
    """`single`, `voltage`, `paper:CR` (fixed segments, f32), `best:CR:WIRE`
    (`Plan.best(CR, cfg, wire=WIRE)`) or `fill:CR:WIRE` (`Plan.best` with one sink token on
    WIRE, as many groups as fit the bytes of `paper:CR` at `devices` and `seq_len`:
    `planner.fill`); `:notilt` after best's or fill's WIRE drops the value tilt (its words go
    to more groups in a fill); `@TRANSPORT` after any but `single` sets the plan's transport
    (`paper:16@stream`; default all_gather)."""
    import dataclasses

    import prism_jax as pj
    from prism_jax import cost, planner

    spec, _, transport = spec.partition("@")
    kind, *rest = spec.split(":")
    tilt = rest[2:] != ["notilt"]
    if kind in ("single", "voltage"):
        plan = pj.Plan(strategy=kind)
    elif kind == "paper":
        plan = pj.Plan(cr=int(rest[0]))
    else:  # best, fill
        fill = kind == "fill"
        plan = pj.Plan.best(1 if fill else int(rest[0]), cfg, wire=rest[1],
                            **({"sink": 1} if fill else {}))  # fmt: skip
        plan = plan if tilt else dataclasses.replace(plan, value_tilt=False)
        if fill:
            shape = dict(devices=devices, seq_len=seq_len)
            budget = cost.bytes_closed_form(cfg, pj.Plan(cr=int(rest[0])), **shape)
            plan = planner.fill(cfg, plan, budget, **shape)
    return dataclasses.replace(plan, transport=transport) if transport else plan


def _single(rows, model, nodes) -> dict:
    return next(r for r in rows if (r["model"], r["nodes"], r["plan"]) == (model, nodes, "single"))


def estimate(rows: list[dict], r: dict, cfg, overhead_s: float):
    """`latency.predict` for row `r` (one device's time: the `single` row of r's cluster),
    with no collective cost; returns (estimate, total with `overhead_s` a collective)."""
    from prism_jax import latency

    rate = r["rate_mbit"] * 1e6 if r["rate_mbit"] else math.inf
    link = latency.Link(rate, r["delay_ms"] / 1000)
    profile = latency.Profile(_single(rows, r["model"], r["nodes"])["latency_s"])
    plan = make_plan(r["plan"], cfg, devices=r["nodes"], seq_len=r["seq_len"])
    est = latency.predict(cfg, plan, devices=r["nodes"],
                          seq_len=r["seq_len"], link=link, profile=profile)  # fmt: skip
    return est, est.total + cfg.depth * overhead_s


def predictions(rows: list[dict], config_of) -> list[dict]:
    """Per distributed row: the model's prediction, the collective cost fitted on the N = 2
    rows of the same model and plan. `config_of(model name)`: its ModelConfig."""
    out = []
    for r in rows:
        fit = [v for v in rows if (v["model"], v["plan"], v["nodes"]) == (r["model"], r["plan"], 2)]
        if r["strategy"] == "single" or not fit:
            continue
        cfg = config_of(r["model"])
        overhead = statistics.mean(
            (v["latency_s"] - estimate(rows, v, cfg, 0.0)[1]) / cfg.depth for v in fit
        )
        est, predicted = estimate(rows, r, cfg, overhead)
        # a diagnostic beside the model: the collective cost as CPU work, slower by as much
        # as one device under this N's quota is slower than under N = 2's
        slower = _single(rows, r["model"], r["nodes"])["latency_s"]
        slower /= _single(rows, r["model"], 2)["latency_s"]
        scaled = estimate(rows, r, cfg, overhead * slower)[1]
        out.append({"model": r["model"], "nodes": r["nodes"], "rate_mbit": r["rate_mbit"],
                    "delay_ms": r["delay_ms"], "plan": r["plan"], "overhead_s": overhead,
                    "compute_s": est.compute, "rounds_s": est.rounds,
                    "transfer_s": est.transfer, "predicted_s": predicted,
                    "measured_s": r["latency_s"], "fitted": r["nodes"] == 2,
                    "error": predicted / r["latency_s"] - 1,
                    "error_overhead_scaled": scaled / r["latency_s"] - 1})  # fmt: skip
    return out


def rounds(rows: list[dict]) -> list[dict]:
    """One-way delays per collective seen on the wire: the slope of latency against the
    delay, per collective, beside the model's 2 (N - 1) (a round trip a step)."""
    out = []
    keys = dict.fromkeys(
        (r["model"], r["nodes"], r["plan"], r["rate_mbit"])
        for r in rows
        if r["strategy"] != "single"
    )
    for key in keys:
        mine = sorted(
            (r for r in rows if (r["model"], r["nodes"], r["plan"], r["rate_mbit"]) == key),
            key=lambda r: r["delay_ms"],
        )
        lo, hi = mine[0], mine[-1]
        if hi["delay_ms"] == lo["delay_ms"]:
            continue
        slope = (hi["latency_s"] - lo["latency_s"]) / ((hi["delay_ms"] - lo["delay_ms"]) / 1000)
        out.append({"model": key[0], "nodes": key[1], "plan": key[2], "rate_mbit": key[3],
                    "rounds_per_collective": slope / hi["collectives"]})  # fmt: skip
    return out


def probe_markdown(link: dict) -> str:
    bridge = link["bridge"]["rtt_median_s"]
    lines = [
        "Link probe (N = 2, TCP, 16 bytes a round trip, TCP_NODELAY; medians of the round "
        f"trips). Plain bridge (veth, no relay): RTT {bridge * 1e3:.3f} ms.",
        "",
        "| Mbit/s | one-way delay (ms) | expected RTT: 2 x delay + bridge (ms) | RTT median "
        "(ms) | min | max | error of the median | bulk throughput (Mbit/s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in link["relay"]:
        want = 2 * p["delay_ms"] / 1000 + bridge
        bulk = f"{p['throughput_mbit']:.1f}" if "throughput_mbit" in p else "-"
        lines.append(
            f"| {p['rate_mbit'] or 'unlimited'} | {p['delay_ms']:g} | {want * 1e3:.3f} | "
            f"{p['rtt_median_s'] * 1e3:.3f} | {p['rtt_min_s'] * 1e3:.3f} | "
            f"{p['rtt_max_s'] * 1e3:.3f} | {(p['rtt_median_s'] - want) * 1e3:+.3f} ms | {bulk} |"
        )
    zero = next(p for p in link["relay"] if p["delay_ms"] == 0 and p["rate_mbit"] is None)
    added = (zero["rtt_median_s"] - bridge) / 2
    lines += ["", f"The relay's own one-way cost at 0 ms: {added * 1e6:.0f} us "
              "((RTT over the relay - RTT over the bridge) / 2)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _late_markdown(relays: list[dict]) -> str:
    lines = [
        "Relay, per cluster and link: packets forwarded, how late each left against its "
        "release time (mean, max, share over 200 us), its CPU seconds for the whole cluster.",
        "",
        "| model | N | Mbit/s | delay (ms) | packets | late mean (us) | late max (ms) | "
        "> 200 us | relay CPU (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in relays:
        for p in c["periods"]:
            if not p["packets"]:
                continue
            lines.append(
                f"| {c['model']} | {c['nodes']} | {p['rate_mbit'] or 'unlimited'} | "
                f"{p['delay_ms']:g} | {p['packets']:,} | {p['late_mean_s'] * 1e6:.0f} | "
                f"{p['late_max_s'] * 1e3:.2f} | {p['late_over_200us'] / p['packets']:.1%} | "
                f"{c['cpu_s']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def grid_markdown(rows: list[dict]) -> str:
    lines = [
        "| model | N | CPU quota (cores/node) | Mbit/s | delay (ms) | plan | latency (s) | "
        "speed-up over one device | paired by round | wire bytes/node | (N-1) x closed form |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        single = _single(rows, r["model"], r["nodes"])["latency_s"]
        link = ("-", "-") if r["strategy"] == "single" else (r["rate_mbit"], f"{r['delay_ms']:g}")
        paired = f"{r['speedup_paired']:.2f}x" if "speedup_paired" in r else "-"  # (earlier runs)
        lines.append(
            f"| {r['model']} | {r['nodes']} | {r['quota_cores']:g} | {link[0]} | {link[1]} | "
            f"{r['plan']} | {r['latency_s']:.3f} | {single / r['latency_s']:.2f}x | "
            f"{paired} | {r['wire_bytes_per_node']:,.0f} | "
            f"{(r['nodes'] - 1) * r['closed_form_bytes_per_node']:,} |"
        )
    return "\n".join(lines) + "\n"


def usage_markdown(rows: list[dict]) -> str:
    """Per cell, each node's median over the rounds: wall time of its own part, CPU seconds
    (every thread of its process), seconds it waited for blocks (the stream's), seconds its
    quota held it back (the cgroup's throttled time), seconds in Python's garbage collector;
    all but the wall time counted until the barrier after the run, so that what a node sends
    after its own part is done counts too. Empty for runs that did not record them."""
    rows = [r for r in rows if "node_cpu_s" in r]
    if not rows:
        return ""

    def per_node(values):
        return " / ".join(f"{v:.2f}" for v in values)

    lines = [
        "## Where each node's time went\n",
        "Per node (node 0 / 1 / ...), medians over the rounds: its own wall time, its CPU "
        "seconds (every thread), the seconds it waited for blocks on the stream, the seconds "
        "its CPU quota held it back, and the seconds in Python's garbage collector, these "
        "four until the barrier after the run (what it sends after its own part included); "
        "CPU / wall is its share of a core (a little high where it sent on after its part).\n",
        "| model | N | Mbit/s | delay (ms) | plan | wall (s) | CPU (s) | CPU / wall | "
        "waited (s) | throttled (s) | Python GC (s) |",
        "|---|---:|---:|---:|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        link = ("-", "-") if r["strategy"] == "single" else (r["rate_mbit"], f"{r['delay_ms']:g}")
        share = [c / w for c, w in zip(r["node_cpu_s"], r["node_wall_s"], strict=True)]
        lines.append(
            f"| {r['model']} | {r['nodes']} | {link[0]} | {link[1]} | {r['plan']} | "
            f"{per_node(r['node_wall_s'])} | {per_node(r['node_cpu_s'])} | {per_node(share)} | "
            f"{per_node(r['node_waited_s'])} | {per_node(r['node_throttled_s'])} | "
            f"{per_node(r.get('node_gc_s', []))} |"
        )
    return "\n".join(lines) + "\n"


def prediction_markdown(preds: list[dict]) -> str:
    lines = [
        "| model | N | Mbit/s | delay (ms) | plan | compute (s) | rounds (s) | transfer (s) | "
        "overhead/collective (ms) | predicted (s) | measured (s) | error | within 15 % | "
        "error, overhead x slowness |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for p in preds:
        within = "fitted" if p["fitted"] else ("yes" if abs(p["error"]) <= 0.15 else "**no**")
        lines.append(
            f"| {p['model']} | {p['nodes']} | {p['rate_mbit']} | {p['delay_ms']:g} | "
            f"{p['plan']} | {p['compute_s']:.3f} | {p['rounds_s']:.3f} | {p['transfer_s']:.3f} | "
            f"{p['overhead_s'] * 1e3:.2f} | "
            f"{p['predicted_s']:.3f} | {p['measured_s']:.3f} | {p['error']:+.1%} | {within} | "
            f"{p['error_overhead_scaled']:+.1%} |"
        )
    return "\n".join(lines) + "\n"


def report(cfg, link, rows, relays, preds) -> str:
    loads = ", ".join(f"{r['model']} N={r['nodes']}: {r['load_average_after'][0]:.1f}"
                      for r in relays if "load_average_after" in r)  # fmt: skip
    note = (
        f"Load average (1 min) on the {os.cpu_count()} cores after each cluster: {loads} "
        "(the nodes' own share is at most the cores; more is other work on the machine, "
        "and the quotas are caps, not guarantees).\n\n"
    )
    wrong = [p for p in preds if not p["fitted"] and abs(p["error"]) > 0.15]
    scaled = [p for p in preds if not p["fitted"] and abs(p["error_overhead_scaled"]) > 0.15]
    tally = f"{len(wrong)} of {sum(not p['fitted'] for p in preds)} predicted cells off by > 15 %"
    tally += f" ({len(scaled)} with the collective cost scaled by the node's slowness: the "
    tally += "last column, one device's time under this N's quota / under N = 2's)"
    return (
        note + probe_markdown(link) + "\n## Grid\n\n" + grid_markdown(rows)
        + "\n" + _late_markdown(relays) + "\n" + usage_markdown(rows)
        + "\n## Latency model (testbed_model.py; fitted on N = 2, predicting the rest)\n\n"
        + f"{tally}.\n\n" + prediction_markdown(preds)
        + "\nRounds per all-gather seen on the wire (latency slope over the delays / "
        "collectives; a ring: N - 1):\n\n"
        + "\n".join(f"- {r['model']} N={r['nodes']} {r['plan']} @ {r['rate_mbit']} Mbit/s: "
                    f"{r['rounds_per_collective']:.2f}" for r in rounds(rows))
        + "\n"
    )  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    """Per model and link: speed-up over one device against the bytes a node sends, one
    point per plan and N, the 1.0x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    links = list(dict.fromkeys((r["rate_mbit"], r["delay_ms"]) for r in rows
                               if r["strategy"] != "single"))  # fmt: skip
    fig, axes = plt.subplots(len(models), len(links), figsize=(4.2 * len(links),
                             3.6 * len(models)), squeeze=False)  # fmt: skip
    for row, model in zip(axes, models, strict=True):
        for ax, (rate, delay) in zip(row, links, strict=True):
            for r in rows:
                if (r["model"], r["rate_mbit"], r["delay_ms"]) != (model, rate, delay):
                    continue
                speedup = _single(rows, model, r["nodes"])["latency_s"] / r["latency_s"]
                marker = {2: "o", 4: "s", 8: "^"}.get(r["nodes"], "x")
                ax.scatter(max(r["wire_bytes_per_node"], 1e3), speedup, marker=marker,
                           color=f"C{r['nodes'] // 2 - 1}")  # fmt: skip
                ax.annotate(f"{r['plan']} N={r['nodes']}", (max(r["wire_bytes_per_node"], 1e3),
                            speedup), fontsize=6)  # fmt: skip
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.set_title(f"{model}, {rate} Mbit/s, {delay:g} ms", fontsize=9)
            ax.set_xlabel("bytes on the wire per node per inference")
            ax.set_ylabel("speed-up over one device")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
