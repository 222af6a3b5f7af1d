"""A bandwidth-limited edge network on one machine: latency and bytes on the wire.

Command:  sudo .venv/bin/python experiments/edge_testbed.py      (root; about 15 minutes)
Smoke:    .venv/bin/python experiments/edge_testbed.py --smoke   (root: a tiny model, 2 nodes,
          one bandwidth; without root it says so and exits 0, as the test suite expects)

Each edge node is one OS process in its own Linux network namespace, joined to the others by a
bridge and rate-limited on its uplink with `tc qdisc tbf` whose burst is about one millisecond
of the line rate (`testbed_net`): a layer's message leaves at the set rate, not at the veth's
line speed from a full bucket. Each node is pinned to its own core (`os.sched_setaffinity`), so
N = 2 nodes on this 2-core machine are two honest devices and `single` (node 0's run) is one
device on one core. The nodes form a `jax.distributed` cluster (gloo over TCP) and run `single`,
`voltage` and `prism` (CR in {4, 16, 64}) for the bert-base (T = 256) and vit-base (T = 197)
presets with N = 2, at 10, 50 and 100 Mbit/s and unlimited.

Latency: wall time on node 0 of one compiled inference (inputs placed, outputs left on their
devices), median of `--repeats` after a warm-up, all nodes released together by a barrier.
Wire bytes: each node's `tx_bytes` counter over the timed repeats, per inference, beside the
bytes the program's collectives send (cost.collective_bytes).

A model of latency, checked against the N = 2 measurements and extended to N = 4 and 8 on
separate cores: compute = (one device's measured time) x (the plan's per-device FLOPs / one
device's, from the compiled programs) + the per-inference overhead of the collectives
measured at N = 2 unlimited; transfer = (N - 1) x (bytes one node's collectives send) x 8 /
rate (gloo's all-gather sends a node's block to each other node over its uplink).
Writes experiments/results/edge_testbed.*.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import common
from testbed_net import SUBNET, burst_bytes, run_nodes, usable


@dataclasses.dataclass(frozen=True)
class Config:
    models: tuple[tuple[str, int], ...] = (("bert-base", 256), ("vit-base-patch16-224", 197))
    nodes: tuple[int, ...] = (2,)
    rates_mbit: tuple[int | None, ...] = (10, 50, 100, None)  # None: unlimited
    crs: tuple[int, ...] = (4, 16, 64)
    predict_nodes: tuple[int, ...] = (2, 4, 8)
    repeats: int = 3
    timeout: float = 900


SMOKE = Config(
    models=(("tiny", 32),), nodes=(2,), rates_mbit=(50,), crs=(4,), repeats=1, timeout=180,
    predict_nodes=(2,),
)  # fmt: skip


def run_cluster(cfg: Config, model: str, seq_len: int, nodes: int, rate: int | None) -> dict:
    """One cluster: every plan for one (model, N, rate); node 0 writes the results."""
    argv = ["--nodes", str(nodes), "--model", model, "--seq-len", str(seq_len),
            "--crs", ",".join(map(str, cfg.crs)), "--repeats", str(cfg.repeats),
            "--timeout", str(cfg.timeout)]  # fmt: skip
    rows = run_nodes(__file__, nodes, rate, argv, cfg.timeout)
    burst = burst_bytes(rate) if rate else None
    return [
        {"model": model, "seq_len": seq_len, "nodes": nodes, "rate_mbit": rate,
         "burst_bytes": burst, **r}
        for r in rows
    ]  # fmt: skip


def _model(name: str):
    import prism_jax as pj

    if name == "tiny":
        cfg = pj.BertConfig(
            vocab_size=64,
            width=32,
            depth=2,
            heads=2,
            mlp_width=64,
            act="gelu",
            ln_eps=1e-12,
            max_positions=64,
        )
    else:
        cfg = pj.PRESETS[name]()
    return pj.init(cfg, seed=0)  # the same weights on every node


def node_main(args) -> None:
    """One node: join, then time every plan; node 0 writes the rows."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    import prism_jax as pj
    from prism_jax import cluster, cost
    from prism_jax.partition import place, program, shard_inputs

    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[args.rank % len(cores)]})  # one core per node
    cluster.watchdog(args.rank, args.timeout)
    cluster.initialize(
        args.rank, args.nodes, f"{SUBNET}.1:29517", bind=f"{SUBNET}.1", timeout_s=120
    )
    model = _model(args.model)
    cfg = model.config
    if cfg.family == "vit":
        s = cfg.image_size
        batch = {"pixel_values": np.random.default_rng(0).standard_normal((1, 3, s, s))}
    else:
        batch = {
            "input_ids": np.random.default_rng(0).integers(1, cfg.vocab_size, (1, args.seq_len))
        }
    inputs, valid = model.prepare(batch)
    mesh = pj.edge_mesh(args.nodes)
    plans = [pj.Plan(strategy="single"), pj.Plan(strategy="voltage")]
    plans += [pj.Plan(cr=cr) for cr in args.crs]
    counter = Path("/sys/class/net/eth0/statistics/tx_bytes")
    rows = []
    for plan in plans:
        if plan.strategy == "single":
            fn, call_args = program(model.graphdef, cfg, plan, None), (model.params, inputs, valid)
        else:
            fn = program(model.graphdef, cfg, plan, mesh)
            call_args = (place(model, mesh), *shard_inputs(inputs, valid, mesh))
        jax.block_until_ready(fn(*call_args))  # compile + warm-up
        times = []
        multihost_utils.sync_global_devices("before")
        sent = int(counter.read_text())
        for i in range(args.repeats):
            multihost_utils.sync_global_devices(f"go{i}")
            start = time.perf_counter()
            jax.block_until_ready(fn(*call_args))
            times.append(time.perf_counter() - start)
        sent = (int(counter.read_text()) - sent) / args.repeats
        wire = multihost_utils.process_allgather(np.array([sent]))
        lowered = cost.lower(cfg, plan, devices=args.nodes, seq_len=valid.shape[1])
        rows.append(
            {
                "strategy": plan.strategy,
                "cr": plan.cr,
                "latency_s": float(np.median(times)),
                "wire_bytes_per_node": float(np.mean(wire)),
                "collective_bytes_per_node": cost.collective_bytes(lowered.as_text())[0],
            }
        )
    if args.rank == 0:
        Path(args.result).write_text(json.dumps(rows))


def predictions(rows: list[dict], cfg: Config) -> list[dict]:
    """The latency model of the docstring: fitted on the N = 2 runs without a limit (the
    fastest rate when all are limited, its transfer time taken off), predicted for
    every N of `cfg.predict_nodes`, plan and rate (beside the measurement where there is one)."""
    import prism_jax as pj
    from prism_jax import cost

    out = []
    fit = None if None in cfg.rates_mbit else max(cfg.rates_mbit)  # unlimited, else the fastest
    for model, t in cfg.models:
        mine = [r for r in rows if r["model"] == model and r["nodes"] == 2]
        mine = [r for r in mine if r["rate_mbit"] == fit]
        single = next(r["latency_s"] for r in mine if r["strategy"] == "single")
        model_cfg = _model(model).config
        for plan in [pj.Plan(strategy="voltage")] + [pj.Plan(cr=cr) for cr in cfg.crs]:
            name = plan.strategy if plan.strategy != "prism" else f"prism CR={plan.cr}"
            key = (plan.strategy, plan.cr)

            def share(n, plan=plan, model_cfg=model_cfg, t=t):  # per-device FLOPs / one device's
                return 1 - cost.measure(model_cfg, plan, devices=n, seq_len=t).compute_reduction

            def transfer(n, rate, plan=plan, model_cfg=model_cfg, t=t):
                sent = cost.bytes_closed_form(model_cfg, plan, devices=n, seq_len=t)
                return (n - 1) * sent * 8 / (rate * 1e6) if rate else 0.0

            at2 = next(r for r in mine if (r["strategy"], r["cr"]) == key)["latency_s"]
            overhead = at2 - transfer(2, fit) - single * share(2)  # the collectives' own cost
            for n in cfg.predict_nodes:
                compute = single * share(n) + overhead
                for rate in cfg.rates_mbit:
                    measured = next(
                        (r["latency_s"] for r in rows if (r["model"], r["nodes"], r["rate_mbit"])
                         == (model, n, rate) and (r["strategy"], r["cr"]) == key), None,
                    )  # fmt: skip
                    predicted = compute + transfer(n, rate)
                    out.append({"model": model, "nodes": n, "rate_mbit": rate, "plan": name,
                                "predicted_s": predicted, "measured_s": measured,
                                "single_s": single,
                                "speedup_predicted": single / predicted})  # fmt: skip
    return out


def prediction_markdown(preds: list[dict]) -> str:
    lines = [
        "| model | N | Mbit/s | plan | predicted (s) | measured (s) | speed-up over one device "
        "(predicted) |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for p in preds:
        measured = f"{p['measured_s']:.3f}" if p["measured_s"] is not None else "-"
        lines.append(
            f"| {p['model']} | {p['nodes']} | {p['rate_mbit'] or 'unlimited'} | {p['plan']} | "
            f"{p['predicted_s']:.3f} | {measured} | {p['speedup_predicted']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | N | Mbit/s | plan | latency (s) | wire bytes/node | collective bytes/node "
        "| wire / collective | latency vs voltage | speed-up over one device |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]

    def beside(r, strategy):  # the row of `strategy` in r's cluster (model, N, rate)
        cluster = (r["model"], r["nodes"], r["rate_mbit"])
        return next(
            v for v in rows
            if (v["model"], v["nodes"], v["rate_mbit"]) == cluster and v["strategy"] == strategy
        )  # fmt: skip

    for r in rows:
        voltage, single = beside(r, "voltage"), beside(r, "single")
        plan = r["strategy"] if r["strategy"] != "prism" else f"prism CR={r['cr']}"
        ratio = (
            r["wire_bytes_per_node"] / r["collective_bytes_per_node"]
            if r["collective_bytes_per_node"]
            else float("nan")
        )
        lines.append(
            f"| {r['model']} | {r['nodes']} | {r['rate_mbit'] or 'unlimited'} | {plan} "
            f"| {r['latency_s']:.3f} | {r['wire_bytes_per_node']:,.0f} | "
            f"{r['collective_bytes_per_node']:,} | {ratio:.2f} | "
            f"{r['latency_s'] / voltage['latency_s']:.2f} | "
            f"{single['latency_s'] / r['latency_s']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["nodes"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
    for ax, (model, n) in zip(axes[0], groups, strict=True):
        sel = [r for r in rows if (r["model"], r["nodes"]) == (model, n)]
        rates = sorted({r["rate_mbit"] or 10**4 for r in sel})
        for plan in sorted({(r["strategy"], r["cr"]) for r in sel}):
            ys = [
                next(
                    r["latency_s"]
                    for r in sel
                    if (r["strategy"], r["cr"]) == plan and (r["rate_mbit"] or 10**4) == rate
                )
                for rate in rates
            ]
            label = plan[0] if plan[0] != "prism" else f"prism CR={plan[1]}"
            ax.plot(rates, ys, "o-", label=label)
        ax.set_xscale("log")
        ax.set_xticks(rates, [str(r) if r < 10**4 else "unl." for r in rates])
        ax.set_title(f"{model}, N={n}")
        ax.set_xlabel("uplink (Mbit/s)")
        ax.set_ylabel("latency per inference (s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, comma-separated: {text!r}")
    return values


def _positive_int(text: str) -> int:
    values = _positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one integer >= 1: {text!r}")
    return values[0]


def _rates(text: str) -> tuple[int | None, ...]:
    return tuple(None if p == "unlimited" else _positive_ints(p)[0] for p in text.split(","))


def _models(text: str) -> tuple[tuple[str, int], ...]:
    out = []
    for item in text.split(","):
        name, _, t = item.partition(":")
        if name not in ("tiny", "bert-base", "vit-base-patch16-224") or not t.isdigit():
            raise argparse.ArgumentTypeError(
                f"expected NAME:T with NAME tiny, bert-base or vit-base-patch16-224: {item!r}"
            )
        out.append((name, int(t)))
    return tuple(out)


def main(argv=None):
    from prism_jax.cli.parser import Parser

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model, one rate")
    parser.add_argument("--models", type=_models, help="NAME:T,... (default: every model)")
    parser.add_argument("--rates", type=_rates, help="Mbit/s,... or unlimited (default: all)")
    parser.add_argument("--crs", type=_positive_ints, help="prism CRs, comma-separated")
    parser.add_argument("--repeats", type=_positive_int, help="timed runs of each plan")
    common.add_out(parser)
    parser.add_argument("--node", action="store_true", help=argparse.SUPPRESS)
    for flag, kind in [("--rank", int), ("--nodes", int), ("--model", str), ("--seq-len", int),
                       ("--timeout", float), ("--result", str)]:  # fmt: skip
        parser.add_argument(flag, type=kind, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.node:
        return node_main(args)
    if not usable():
        print(
            "| edge_testbed needs root and iproute2 (ip, tc) to build network namespaces; skipped |"
        )
        return 0 if args.smoke else 2
    cfg = SMOKE if args.smoke else Config()
    chosen = {"models": args.models, "rates_mbit": args.rates, "crs": args.crs,
              "repeats": args.repeats}  # fmt: skip
    cfg = dataclasses.replace(cfg, **{k: v for k, v in chosen.items() if v is not None})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that namespaces are torn down
    from prism_jax.cli import emulate_devices

    emulate_devices(max(cfg.predict_nodes))  # the model's FLOPs: programs for every N here
    from tqdm.auto import tqdm

    jobs = [(m, t, n, r) for m, t in cfg.models for n in cfg.nodes for r in cfg.rates_mbit]
    rows = []
    for model, t, n, rate in tqdm(jobs, desc="clusters"):
        rows += run_cluster(cfg, model, t, n, rate)
    preds = predictions(rows, cfg)
    text = (
        "Each node pinned to its own core; tbf burst about 1 ms of the line rate "
        "(`burst_bytes` in the JSON rows).\n\n" + markdown(rows)
        + "\n## Latency model (fitted at N = 2 without a limit; see the docstring)\n\n"
        + prediction_markdown(preds)
    )  # fmt: skip
    print(text)
    heading = "# Edge testbed: namespaces, tbf-limited uplinks, one process per node\n\n"
    record = {"rows": rows, "predictions": preds}
    common.save(args, "edge_testbed", record, heading + text, lambda png: plot(rows, png))


if __name__ == "__main__":
    common.run_script(main)
