"""How many link delays does one exchange cost? Each transport of a layer's exchange, timed.

Command:  sudo .venv/bin/python experiments/collective_probe.py      (root; about 5 minutes)
Smoke:    .venv/bin/python experiments/collective_probe.py --smoke   (root: N = 2 and 3, one
          delay; without root it says so and exits 0, as the test suite expects)

A prism layer's exchange brings every device's block to the devices that need it
(`exchange.gather`, `Plan(transport=...)`). On JAX's CPU runtime the collectives run on gloo
over TCP, where a transfer starts only once its receiver has said it is ready: a step costs
about a round trip (2 x the one-way delay). gloo's all-gather is a ring of N - 1 such steps;
its all-to-all posts the N - 1 transfers at once, one step. The stream (`stream.py`) sends on
the nodes' own connections without waiting for the receiver; a causal model's device sends
only forward and waits only for the earlier devices. This probe times each on the testbed's
network (`testbed_net.py`: N node namespaces joined by the delay relay, no CPU quota), over
`--layers` rounds that each depend on the last, with `--bytes` a node a round (about a
SmolLM2 layer's at CR = 16, int4h).

Reported per N, one-way delay and transport: milliseconds a round (the last node's time, all
released together by a barrier; median of `--repeats`), and
the round trips a round is worth: (ms a round - the same at delay 0) / (2 x delay). Writes
experiments/results/collective_probe.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common
import testbed_net
from testbed_net import SUBNET, usable
from testbed_relay import set_link

WAYS = ("all_gather", "all_to_all", "stream", "stream (causal)")


def node_main(args) -> None:
    """One node: join the cluster; under every delay, time every transport; node 0 writes."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import PartitionSpec as P

    import prism_jax as pj
    from prism_jax import cluster, partition

    cluster.watchdog(args.rank, args.timeout)
    cluster.initialize(args.rank, args.nodes, f"{SUBNET}.1:29519", bind=f"{SUBNET}.1")
    mesh = pj.edge_mesh(args.nodes)
    words = max(args.bytes // 4, 1)
    programs = {w: _program(w, args.layers, words, args.nodes, mesh) for w in WAYS}
    x = partition.put(np.ones((args.nodes, words), np.float32), mesh, P("edge"))
    for fn in programs.values():
        jax.block_until_ready(fn(x))  # compiles
    rows = []
    for step, delay in enumerate(args.delays):
        if args.rank == 0:
            set_link(Path(args.control), Path(args.ack), step + 1, None, delay)
        multihost_utils.sync_global_devices(f"link{step}")
        for name, fn in programs.items():
            times = []
            for i in range(args.repeats):
                multihost_utils.sync_global_devices(f"{name}{step}{i}")
                start = time.perf_counter()
                jax.block_until_ready(fn(x))
                times.append(time.perf_counter() - start)
            # done when the last node is: a causal stream's node 0 finishes first
            last = multihost_utils.process_allgather(np.array(times)).max(axis=0)
            rows.append({"nodes": args.nodes, "delay_ms": delay, "transport": name,
                         "round_ms": 1000 * float(np.median(last)) / args.layers})  # fmt: skip
    if args.rank == 0:
        Path(args.result).write_text(json.dumps(rows))


def _program(way: str, layers: int, words: int, nodes: int, mesh):
    """`layers` rounds of the exchange (`exchange.gather`) as `way` moves it, each on the
    last's result."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import prism_jax as pj
    from prism_jax import exchange, stream

    transport, causal = way.removesuffix(" (causal)"), way.endswith("(causal)")
    ex = exchange.Exchange(pj.Plan(transport=transport), "edge", nodes, causal)
    if transport == "stream":
        stream.connect(mesh)

    def per_device(h):  # [1, words]
        local = exchange.local_view(ex, jnp.ones((1, nodes), bool))
        for _ in range(layers):
            every = exchange.gather(h[:, None], ex, local)  # [1, N, 1, words]
            h = h + every.sum(axis=(1, 2)) * 1e-30
        return h

    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("edge"), out_specs=P("edge")))


def run(args, nodes: int, delays: list[float]) -> list[dict]:
    from edge_testbed import link_files

    files = link_files(f"probe-{nodes}")
    argv = ["--nodes", str(nodes), "--layers", str(args.layers), "--bytes", str(args.bytes),
            "--repeats", str(args.repeats), "--timeout", str(args.timeout),
            "--delays", ",".join(map(str, delays)), "--control", files["control"],
            "--ack", files["ack"]]  # fmt: skip
    first = {"rate_mbit": None, "delay_ms": delays[0]}
    net = testbed_net.relay_network(nodes, {**files, **first})
    rows = testbed_net.run_nodes(__file__, nodes, None, argv, args.timeout, net=net)
    for path in files.values():
        Path(path).unlink(missing_ok=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Each row with the round trips its delay costs over the same transport at delay 0."""
    base = {(r["nodes"], r["transport"]): r["round_ms"] for r in rows if r["delay_ms"] == 0}
    out = []
    for r in rows:
        zero = base.get((r["nodes"], r["transport"]))
        trips = (r["round_ms"] - zero) / (2 * r["delay_ms"]) if r["delay_ms"] and zero else None
        out.append({**r, "round_trips": trips})
    return out


def markdown(lines: list[dict], args) -> str:
    text = [
        f"Each node sends {args.bytes:,} bytes a round (its block, to every other node); "
        f"{args.layers} rounds, each on the last's result; medians of {args.repeats}. "
        "Round trips: (ms a round - the same at delay 0) / (2 x delay).",
        "",
        "| N | one-way delay (ms) | transport | ms a round | round trips a round |",
        "|---:|---:|---|---:|---:|",
    ]
    for r in lines:
        trips = "-" if r["round_trips"] is None else f"{r['round_trips']:.2f}"
        text.append(f"| {r['nodes']} | {r['delay_ms']:g} | {r['transport']} | "
                    f"{r['round_ms']:.2f} | {trips} |")  # fmt: skip
    return "\n".join(text) + "\n"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main(argv=None) -> int:
    from prism_jax.cli.parser import Parser

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=_ints, default=[2, 4, 8], help="cluster sizes")
    parser.add_argument(
        "--delays", type=_floats, default=[0, 1, 5, 20], help="one-way delays (ms); 0 first"
    )
    parser.add_argument("--layers", type=int, default=30, help="rounds an inference")
    parser.add_argument("--bytes", type=int, default=4096, help="bytes a node sends a round")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each program")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a cluster may take")
    common.add_out(parser)
    parser.add_argument("--smoke", action="store_true", help="N = 2 and 3, one delay")
    parser.add_argument("--node", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    for hidden in ("--result", "--control", "--ack"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.node:  # one cluster's size
        args.nodes = args.nodes[0]
        return node_main(args)
    if min(args.layers, args.bytes, args.repeats, *args.nodes) < 1 or min(args.nodes) < 2:
        parser.error("--layers, --bytes and --repeats must be >= 1, --nodes >= 2")
    if args.delays[0] != 0 or min(args.delays) < 0:
        parser.error("--delays: one-way delays >= 0 in ms, the first 0 (the baseline)")
    if not usable():
        print("| collective_probe needs root and iproute2 (ip, tc) to build namespaces; skipped |")
        return 0 if args.smoke else 2
    if args.smoke:
        args.nodes, args.delays, args.layers, args.repeats = [2, 3], [0, 5], 4, 1
    rows = [r for n in args.nodes for r in run(args, n, args.delays)]
    lines = summary(rows)
    text = markdown(lines, args)
    print(text)
    heading = "# How many link delays one exchange costs, by transport\n\n"
    common.save(args, "collective_probe", {"rows": rows, "summary": lines}, heading + text)
    return 0


if __name__ == "__main__":
    common.run_script(main)
