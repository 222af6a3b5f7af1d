"""Does XLA overlap a collective with compute that does not depend on it? A probe on the testbed.

Command:  sudo .venv/bin/python experiments/overlap_probe.py          (root; about 2 minutes)
Smoke:    .venv/bin/python experiments/overlap_probe.py --smoke  (root: tiny sizes, one rate;
          without root it says so and exits 0, as the test suite expects)

PRISM could hide a layer's exchange behind the work that does not need it (the queries, the
local keys and values, the local part of attention) only if the runtime runs an `all_gather`
and independent compute at the same time. This asks the runtime directly, on the testbed's
network (`testbed_net.py`: two nodes in their own namespaces, each pinned to its own core, a
tbf-limited uplink, gloo over TCP), with three programs of one `shard_map` each, over `--layers`
rounds:

  gather:   each round gathers a message (the prism CR = 16 bert-base bytes of one inference,
            split over the rounds) that depends on the previous round;
  compute:  `--matmuls` matmuls of `--width`-square float32 matrices, split over the rounds;
  both:     both in every round, neither waiting for the other until the round ends.

Serial execution gives both = gather + compute; full overlap gives both = max(gather, compute).
Reported: overlap = (gather + compute - both) / min(gather, compute), 0 serial, 1 full (medians
of `--repeats`). Writes experiments/results/overlap_probe.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import common
from testbed_net import SUBNET, run_nodes, usable

MESSAGE_BYTES = 12 * 8 * 768 * 4  # bert-base, T = 256, N = 2, CR = 16: 12 layers x 8 means
RATES = (10, 50)  # Mbit/s (unlimited: the gather takes a few ms, too short to compare)


def node_main(args) -> None:
    """One node: join the cluster, time the three programs; node 0 writes the rows."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.experimental import multihost_utils
    from jax.sharding import PartitionSpec as P

    import prism_jax as pj
    from prism_jax import cluster, partition

    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[args.rank % len(cores)]})  # one core per node
    cluster.watchdog(args.rank, args.timeout)
    cluster.initialize(args.rank, 2, f"{SUBNET}.1:29518", bind=f"{SUBNET}.1")
    mesh = pj.edge_mesh(2)
    rows = []
    for layers in args.layers:
        message = min(MESSAGE_BYTES // 4 // layers, args.width**2)  # float32 elements a round
        for kind in ("gather", "compute", "both"):
            steps = -(-args.matmuls // layers)
            fn = _program(kind, layers, message, steps, mesh, jax, jnp, lax, P)
            h = partition.put(np.full((2 * args.width, args.width), 0.01, np.float32),
                                 mesh, P("edge"))  # fmt: skip
            jax.block_until_ready(fn(h))  # compile + warm-up
            times = []
            for i in range(args.repeats):
                multihost_utils.sync_global_devices(f"{kind}{layers}{i}")
                start = time.perf_counter()
                jax.block_until_ready(fn(h))
                times.append(time.perf_counter() - start)
            rows.append({"layers": layers, "kind": kind, "seconds": float(np.median(times)),
                         "bytes_per_node": 4 * message * layers})  # fmt: skip
    if args.rank == 0:
        Path(args.result).write_text(json.dumps(rows))


def _program(kind, layers, message, steps, mesh, jax, jnp, lax, P):
    """`layers` rounds; in each, a gather of `message` floats taken from the running state
    and/or `steps` matmuls of it, joined only at the round's end."""
    gather, compute = kind in ("gather", "both"), kind in ("compute", "both")

    def per_device(h):
        w = h * 0.5
        for _ in range(layers):
            got = 0.0
            if gather:
                sent = h.reshape(-1)[:message] + 1.0
                got = lax.all_gather(sent, "edge").sum() * 1e-30
            out = h
            if compute:
                for _ in range(steps):
                    out = jnp.tanh(out @ w)
            h = out + got
        return h.sum(keepdims=True)

    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("edge"), out_specs=P("edge")))


def run(args, rate: int | None) -> list[dict]:
    argv = ["--matmuls", str(args.matmuls), "--width", str(args.width),
            "--repeats", str(args.repeats), "--timeout", str(args.timeout),
            "--layers", ",".join(map(str, args.layers))]  # fmt: skip
    rows = run_nodes(__file__, 2, rate, argv, args.timeout)
    return [{"rate_mbit": rate, **r} for r in rows]


def summary(rows: list[dict]) -> list[dict]:
    """One line per (rate, layers): the three times and the overlap fraction."""
    out = []
    for rate, layers in dict.fromkeys((r["rate_mbit"], r["layers"]) for r in rows):
        mine = [r for r in rows if r["rate_mbit"] == rate and r["layers"] == layers]
        t = {r["kind"]: r["seconds"] for r in mine}
        hidden = t["gather"] + t["compute"] - t["both"]
        out.append({"rate_mbit": rate, "layers": layers, **t,
                    "bytes_per_node": mine[0]["bytes_per_node"],
                    "overlap": hidden / min(t["gather"], t["compute"])})  # fmt: skip
    return out


def markdown(lines: list[dict], args) -> str:
    text = [
        "Message: what one node sends per inference (at most the prism CR = 16 bert-base bytes), "
        "split over the rounds; compute: "
        f"{args.matmuls} matmuls of {args.width} x {args.width} float32, split likewise; "
        f"medians of {args.repeats}. Overlap 0: serial, 1: the shorter one fully hidden.",
        "",
        "| uplink | rounds | bytes/node | gather (s) | compute (s) | both (s) | overlap |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in lines:
        rate = f"{r['rate_mbit']} Mbit/s" if r["rate_mbit"] else "unlimited"
        times = " | ".join(f"{r[k]:.3f}" for k in ("gather", "compute", "both"))
        text.append(f"| {rate} | {r['layers']} | {r['bytes_per_node']:,} | {times} | "
                    f"{r['overlap']:.2f} |")  # fmt: skip
    return "\n".join(text) + "\n"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv=None) -> int:
    from prism_jax.cli.parser import Parser

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--matmuls", type=int, default=96, help="matmuls an inference")
    parser.add_argument("--width", type=int, default=384, help="matrix side")
    parser.add_argument("--layers", type=_ints, default=[1, 4, 12], help="rounds, comma-separated")
    parser.add_argument("--repeats", type=int, default=11, help="timed runs of each program")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a cluster may take")
    common.add_out(parser)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, one rate (writes only to --out)"
    )
    parser.add_argument("--node", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.matmuls, args.width, args.repeats, *args.layers) < 1:
        parser.error("--matmuls, --width, --repeats and --layers must be >= 1")
    if args.node:
        return node_main(args)
    if not usable():
        print("| overlap_probe needs root and iproute2 (ip, tc) to build namespaces; skipped |")
        return 0 if args.smoke else 2
    if args.smoke:
        args.matmuls, args.width, args.layers, args.repeats = 4, 64, [2], 1
    rows = [r for rate in (RATES[-1:] if args.smoke else RATES) for r in run(args, rate)]
    lines = summary(rows)
    text = markdown(lines, args)
    print(text)
    heading = "# Does the runtime overlap a collective with independent compute?\n\n"
    common.save(args, "overlap_probe", {"rows": rows, "summary": lines}, heading + text)
    return 0


if __name__ == "__main__":
    common.run_script(main)
