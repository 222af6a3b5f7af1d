"""An edge network on one machine: N weak nodes, a slow link with latency, time per inference.

Command:  sudo .venv/bin/python experiments/edge_testbed.py      (root; about 25 minutes)
Smoke:    .venv/bin/python experiments/edge_testbed.py --smoke   (root: the link probe, a tiny
          model at N = 2 and 4, two delays; without root it says so and exits 0, as the test
          suite expects)

Nodes: one OS process each, in its own Linux network namespace, with one CPU device, under a
CPU quota of its own (`testbed_net.cpu_groups`, cgroup v1): the machine's cores less
`--reserve-cores` (0.2: the delay relay's, which runs outside the nodes' groups and would
otherwise take its CPU from the nodes while they exchange, never from `single`) shared out,
at most a core a node (N = 2 on 2 cores: 0.9 core each, also pinned; N = 4: 0.45; N = 8:
0.225). `single`, the one-device baseline, is node 0's run under the same quota, so the
speed-up is that of N such devices over one of them. Each node's CPU seconds, waiting on the
stream, and throttled time are recorded per run ("Where each node's time went").

Link: every node's uplink is its TUN device into the delay relay (`testbed_relay.py`): tbf at
the rate (burst about 1 ms of it), then the relay holds each packet for the one-way delay
before handing it to the destination node. The link is changed while the cluster runs, so
each program is compiled once and timed under every (rate, delay). `testbed_probe.py` checks
the link first: TCP round trips of 16 bytes (2 x delay expected) and bulk throughput, against
the plain bridge of `testbed_net.network`.

Latency: wall time of one compiled inference (outputs left on their devices) until its last
node is done (`single`: node 0's), median of `--repeats` rounds, all nodes released together
by a barrier before each. Every plan, `single` too, runs once a round, in turn, so that a
drift in what shares the machine during a run reaches every plan alike: `speedup` is one
device's median over every round against the plan's median, `speedup_paired` the median
over rounds of single's time against the plan's in the same round. Wire bytes: each node's
`tx_bytes` counter (IP packets: the TUN device carries no Ethernet header) over each timed
run and the barrier after it (a stream's node sends on after its own part is done; the
barrier's own few KB are counted too).
The latency model (`prism_jax.latency.predict`, through `testbed_model.py`) gets its
collective cost fitted on N = 2 and predicts N = 4 (and 8).
Writes experiments/results/edge_testbed_v2.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

import common
import testbed_model
import testbed_net
import testbed_probe
from testbed_net import SUBNET, usable
from testbed_relay import set_link

PLANS = {  # per model: what each cluster runs ("paper:CR", "best:CR:WIRE", "fill:CR:WIRE";
    # see `testbed_model.make_plan`)
    "bert-base": ("single", "voltage", "paper:16", "best:16:int8", "best:64:int8"),
    "vit-base-patch16-224": ("single", "voltage", "paper:16", "best:16:int8", "best:64:int8"),
    "smollm2-135m": ("single", "voltage", "paper:16", "best:4:int8", "best:16:int8",
                     "best:4:int4", "best:16:int4", "fill:16:int4h", "fill:64:int4h"),
    "tiny": ("single", "voltage", "paper:4", "best:4:int8"),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Config:
    models: tuple[tuple[str, int], ...] = (("bert-base", 256), ("smollm2-135m", 512))
    nodes: tuple[int, ...] = (2, 4)
    rates_mbit: tuple[int | None, ...] = (10,)
    delays_ms: tuple[float, ...] = (0, 1, 5)
    voltage_nodes: tuple[int, ...] = (2,)  # voltage's megabytes at 10 Mbit/s: N = 2 only
    repeats: int = 3
    timeout: float = 1500
    probe_delays_ms: tuple[float, ...] = (0, 1, 5, 20)
    probe_count: int = 20
    plans: tuple[str, ...] | None = None  # None: each model's PLANS
    reserve_cores: float = 0.2  # left out of the nodes' quotas for the link's relay


SMOKE = Config(models=(("tiny", 32),), nodes=(2, 4), rates_mbit=(50,), delays_ms=(0, 5),
               repeats=1, timeout=300, probe_delays_ms=(0, 5), probe_count=5)  # fmt: skip


def link_files(tag: str) -> dict:
    return {
        k: f"/tmp/prism-link-{os.getpid()}-{tag}.{k}" for k in ("control", "ack", "ready", "stats")
    }


def run_cluster(cfg: Config, model: str, seq_len: int, nodes: int) -> tuple[list[dict], dict]:
    """One cluster: every plan of `model` at N = `nodes` under every link; node 0's rows
    and the relay's statistics."""
    quota = testbed_net.quota_us(nodes, os.cpu_count(), cfg.reserve_cores)
    files = link_files(f"{model}-{nodes}")
    links = [(r, d) for r in cfg.rates_mbit for d in cfg.delays_ms]
    plans = [p for p in cfg.plans or PLANS[model] if p != "voltage" or nodes in cfg.voltage_nodes]
    argv = ["--nodes", str(nodes), "--model", model, "--seq-len", str(seq_len),
            "--plans", ",".join(plans), "--links", json.dumps(links),
            "--repeats", str(cfg.repeats), "--timeout", str(cfg.timeout),
            "--control", files["control"], "--ack", files["ack"]]  # fmt: skip
    first = {"rate_mbit": links[0][0], "delay_ms": links[0][1]}
    with testbed_net.cpu_groups(nodes, quota) as groups:
        net = testbed_net.relay_network(nodes, {**files, **first})
        rows = testbed_net.run_nodes(__file__, nodes, None, argv, cfg.timeout, net=net,
                                     groups=groups)  # fmt: skip
    relay = relay_stats(files)
    extra = {"model": model, "seq_len": seq_len, "nodes": nodes,
             "quota_cores": quota / testbed_net.PERIOD_US, "cfs_quota_us": quota,
             "reserve_cores": cfg.reserve_cores,
             "cfs_period_us": testbed_net.PERIOD_US}  # fmt: skip
    single = next(r["latency_s"] for r in rows if r["strategy"] == "single")
    rows = [{**extra, **r, "speedup": single / r["latency_s"]} for r in rows]
    return rows, {**extra, **relay}


def relay_stats(files: dict) -> dict:
    """The relay's statistics of a finished cluster; its control files removed."""
    stats = json.loads(Path(files["stats"]).read_text())
    for path in files.values():
        Path(path).unlink(missing_ok=True)
    return stats


def config_of(name: str):
    """The ModelConfig of a model name (the SmolLM2 GGUF's is its preset's)."""
    import prism_jax as pj

    if name == "tiny":
        return pj.BertConfig(vocab_size=64, width=32, depth=2, heads=2, mlp_width=64,
                             act="gelu", ln_eps=1e-12, max_positions=64)  # fmt: skip
    return pj.PRESETS[name]()


def _model(name: str):
    import prism_jax as pj

    if name == "smollm2-135m":  # real weights, as the issue asks
        from prism_jax.data import sources

        return pj.load_pretrained(sources.smollm2_gguf())
    # bert-base and ViT-B/16: no such weights offline (DESIGN.md section 4); random ones, the
    # same on every node, cost the same time
    return pj.init(config_of(name), seed=0)


def _inputs(model, seq_len: int):
    """One random example: token ids of length `seq_len`, or an image (a ViT: its tokens are
    its patches and the CLS token, `seq_len` checked against them by `_models`)."""
    import numpy as np

    cfg, rng = model.config, np.random.default_rng(0)
    if cfg.family == "vit":
        shape = (1, cfg.channels, cfg.image_size, cfg.image_size)
        return model.prepare({"pixel_values": rng.standard_normal(shape, np.float32)})
    return model.prepare({"input_ids": rng.integers(1, cfg.vocab_size, (1, seq_len))})


def node_main(args) -> None:
    """One node: join, compile every plan, then time them round by round under every link."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    import prism_jax as pj
    from prism_jax import cluster, cost
    from prism_jax.partition import place, program, shard_inputs

    if args.nodes == 2:  # a core each: pinned as well as limited
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[args.rank % len(cores)]})
    cluster.watchdog(args.rank, args.timeout)
    cluster.initialize(
        args.rank, args.nodes, f"{SUBNET}.1:29517", bind=f"{SUBNET}.1", timeout_s=300
    )
    model = _model(args.model)
    cfg = model.config
    inputs, valid = _inputs(model, args.seq_len)
    mesh = pj.edge_mesh(args.nodes)
    counter = Path("/sys/class/net/eth0/statistics/tx_bytes")
    control, ack = Path(args.control), Path(args.ack)
    links = json.loads(args.links)
    programs = []  # (spec, plan, compiled program, its arguments)
    for spec in args.plans:
        plan = testbed_model.make_plan(spec, cfg, devices=args.nodes, seq_len=args.seq_len)
        if plan.strategy == "single":
            fn, call_args = program(model.graphdef, cfg, plan, None), (model.params, inputs, valid)
        else:
            fn = program(model.graphdef, cfg, plan, mesh)
            call_args = (place(model, mesh), *shard_inputs(inputs, valid, mesh))
        jax.block_until_ready(fn(*call_args))  # compile + warm-up
        programs.append((spec, plan, fn, call_args))
    # Round by round: every plan (single too) once a round, so that a drift in what shares the
    # machine reaches every plan alike, and each plan's speed-up is also taken against single
    # in the same round.
    times = {(spec, k): [] for spec in args.plans for k in range(len(links))}
    sent = dict.fromkeys(times, 0)
    spent = {key: [] for key in times}  # per run: this node's `_used`
    gc.callbacks.append(_time_gc)
    for k, (rate, delay) in enumerate(links):
        if args.rank == 0:
            set_link(control, ack, k + 1, rate, delay)
        multihost_utils.sync_global_devices(f"link{k}")
        for i in range(args.repeats):
            for spec, _, fn, call_args in programs:
                multihost_utils.sync_global_devices(f"go{k}-{i}-{spec}")
                before, used = int(counter.read_text()), _used()
                start = time.perf_counter()
                jax.block_until_ready(fn(*call_args))
                times[spec, k].append(time.perf_counter() - start)
                # a stream's node sends on after its own part is done (device 0 never waits):
                # every block has left once every node has its own
                multihost_utils.sync_global_devices(f"done{k}-{i}-{spec}")
                sent[spec, k] += int(counter.read_text()) - before
                spent[spec, k].append(_used() - used)
    rows, single, single_spent, single_every = [], [], [], []
    for k, (rate, delay) in enumerate(links):
        for spec, plan, _, _ in programs:
            wire = multihost_utils.process_allgather(np.array([sent[spec, k] / args.repeats]))
            # done when its last node is (a causal stream's node 0 is first); `single` runs
            # on every node at once, node 0's time is its
            every = multihost_utils.process_allgather(np.array(times[spec, k]))
            took = times[spec, k] if plan.strategy == "single" else every.max(axis=0).tolist()
            if plan.strategy == "single":  # one row, every round of every link
                single += took
                single_spent += spent[spec, k]
                single_every.append(every)
                continue
            paired = [s / t for s, t in zip(times["single", k], took, strict=True)]
            rows.append({
                "plan": spec, "strategy": plan.strategy, "cr": plan.cr, "wire": plan.wire,
                "rate_mbit": rate, "delay_ms": delay,
                "latency_s": float(np.median(took)), "times_s": took,
                "speedup_paired": float(np.median(paired)),
                "wire_bytes_per_node": float(np.mean(wire)),
                "closed_form_bytes_per_node": cost.bytes_closed_form(
                    cfg, plan, devices=args.nodes, seq_len=args.seq_len),
                "collectives": cfg.depth,  # one exchange a layer (cost.lower)
                **_per_node(spent[spec, k], every),
            })  # fmt: skip
    rows.insert(0, {"plan": "single", "strategy": "single", "cr": 1, "wire": "f32",
                    "rate_mbit": None, "delay_ms": None, "latency_s": float(np.median(single)),
                    "times_s": single, "wire_bytes_per_node": 0.0,
                    "closed_form_bytes_per_node": 0, "collectives": 0,
                    **_per_node(single_spent, np.concatenate(single_every, axis=1))})  # fmt: skip
    if args.rank == 0:
        Path(args.result).write_text(json.dumps(rows))


def _used():
    """What this node has used so far: CPU seconds (every thread), seconds waited for blocks
    on the stream, seconds its quota held it back, seconds in Python's garbage collector."""
    import numpy as np

    from prism_jax import stream

    return np.array([time.process_time(), stream.waited(), testbed_net.throttled_s(), GC_S[0]])


def _per_node(spent: list, every) -> dict:
    """A row's usage columns: each node's median over its runs of what `_used` took (its wall
    time from `every`, [node, run])."""
    import numpy as np
    from jax.experimental import multihost_utils

    used = multihost_utils.process_allgather(np.median(spent, axis=0))  # [node, 4]
    names = ("node_cpu_s", "node_waited_s", "node_throttled_s", "node_gc_s")
    return {name: used[:, i].tolist() for i, name in enumerate(names)} | {
        "node_wall_s": np.median(every, axis=1).tolist()
    }


GC_S = [0.0, 0.0]  # seconds in Python's garbage collector so far, the current one's start


def _time_gc(phase: str, info: dict) -> None:
    if phase == "start":
        GC_S[1] = time.perf_counter()
    else:
        GC_S[0] += time.perf_counter() - GC_S[1]


def probe(cfg: Config) -> dict:
    """The link checked (N = 2): RTTs per delay over the relay and over the plain bridge, the
    relay's throughput unlimited and at the fastest rate, with the relay's statistics."""
    files = link_files("probe")
    out = {"relay": [], "bridge": None}
    with testbed_net.network(2, None) as names:
        out["bridge"] = testbed_probe.probe(names, f"{SUBNET}.2", count=cfg.probe_count,
                                            mbytes=None)  # fmt: skip
    fastest = max(r or 0 for r in cfg.rates_mbit) or None
    links = [(None, d) for d in cfg.probe_delays_ms] + [(fastest, 0), (fastest, 5)]
    with testbed_net.relay_network(2, {**files, "rate_mbit": None, "delay_ms": 0}) as names:
        for seq, (rate, delay) in enumerate(links, 1):
            set_link(Path(files["control"]), Path(files["ack"]), seq, rate, delay)
            mbytes = 30 if rate is None and delay == 0 else (rate or 100) * 0.25
            big = delay == 0 or rate is not None
            got = testbed_probe.probe(names, f"{SUBNET}.2", count=cfg.probe_count,
                                      mbytes=mbytes if big else None)  # fmt: skip
            out["relay"].append({"rate_mbit": rate, "delay_ms": delay, **got})
    out["relay_stats"] = relay_stats(files)
    return out


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


def _reserve(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < os.cpu_count():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of cores in [0, {os.cpu_count()})"
        )
    return value


def _rates(text: str) -> tuple[int | None, ...]:
    return tuple(None if p == "unlimited" else _positive_ints(p)[0] for p in text.split(","))


def _delays(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected milliseconds >= 0, comma-separated: {text!r}")
    return values


def _plans(text: str) -> tuple[str, ...]:
    """single, voltage, paper:CR, best:CR:WIRE[:notilt] or fill:CR:WIRE[:notilt], each but
    single with an optional @TRANSPORT, comma-separated."""
    from prism_jax.plan import TRANSPORTS, WIRES

    out = tuple(text.split(","))
    for spec in out:
        base, at, transport = spec.partition("@")
        kind, *rest = base.split(":")
        ok = (kind in ("single", "voltage") and not rest) or (
            kind == "paper" and len(rest) == 1 and rest[0].isdigit() and int(rest[0]) >= 1
        ) or (kind in ("best", "fill") and len(rest) in (2, 3) and rest[0].isdigit()
              and int(rest[0]) >= 1 and rest[1] in WIRES and rest[2:] in ([], ["notilt"])
              )  # fmt: skip
        ok = ok and (not at or (transport in TRANSPORTS and kind != "single"))
        if not ok:
            raise argparse.ArgumentTypeError(
                "expected single, voltage, paper:CR, best:CR:WIRE[:notilt] or "
                "fill:CR:WIRE[:notilt], each but "
                f"single with an optional @TRANSPORT ({', '.join(TRANSPORTS)}): {spec!r}"
            )
    if "single" not in out:
        raise argparse.ArgumentTypeError(f"the plans need single, the baseline: {text!r}")
    return out


def _models(text: str) -> tuple[tuple[str, int], ...]:
    """NAME:T,... (a ViT's T is its patches and the CLS token: NAME alone, or that T)."""
    out = []
    for item in text.split(","):
        name, _, t = item.partition(":")
        vit = name in PLANS and name.startswith("vit")
        fixed = config_of(name).max_positions if vit else None
        t = t or (str(fixed) if vit else "")
        if name not in PLANS or not t.isdigit() or (fixed and int(t) != fixed):
            raise argparse.ArgumentTypeError(
                f"expected NAME:T with NAME one of {', '.join(PLANS)} (a ViT: NAME or "
                f"NAME:its tokens): {item!r}"
            )
        out.append((name, int(t)))
    return tuple(out)


def main(argv=None):
    from prism_jax.cli.parser import Parser

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the probe and a tiny model")
    parser.add_argument("--models", type=_models, help="NAME:T,... (default: every model)")
    parser.add_argument("--nodes", type=_positive_ints, help="N,... (default: 2,4)")
    parser.add_argument("--rates", type=_rates, help="Mbit/s,... or unlimited (default: 10)")
    parser.add_argument("--delays", type=_delays, help="one-way ms,... (default: 0,1,5)")
    parser.add_argument("--repeats", type=_positive_int, help="timed runs of each plan")
    parser.add_argument("--plans", type=_plans, help="plans each cluster runs (default: PLANS)")
    parser.add_argument("--reserve-cores", type=_reserve, dest="reserve_cores",
                        help="cores left out of the nodes' quotas for the link's relay "
                             "(default 0.2; 0: the runs before 2026-12-08)")  # fmt: skip
    parser.add_argument("--report", help="re-render the tables of an earlier run's JSON")
    common.add_out(parser)
    parser.add_argument("--node", action="store_true", help=argparse.SUPPRESS)
    for flag, kind in [("--rank", int), ("--model", str), ("--seq-len", int),
                       ("--links", str), ("--timeout", float), ("--result", str),
                       ("--control", str), ("--ack", str)]:  # fmt: skip
        parser.add_argument(flag, type=kind, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.node:
        args.nodes = args.nodes[0]
        return node_main(args)
    if args.report:
        return rerender(args)
    cfg = SMOKE if args.smoke else Config()
    chosen = {"models": args.models, "nodes": args.nodes, "rates_mbit": args.rates,
              "delays_ms": args.delays, "repeats": args.repeats, "plans": args.plans,
              "reserve_cores": args.reserve_cores}  # fmt: skip
    cfg = dataclasses.replace(cfg, **{k: v for k, v in chosen.items() if v is not None})
    try:  # before the probe: a reserve that leaves a node less than the kernel's least quota
        for n in cfg.nodes:
            testbed_net.quota_us(n, os.cpu_count(), cfg.reserve_cores)
    except ValueError as e:
        print(f"edge_testbed.py: error: {e}", file=sys.stderr)
        return 2
    if not usable():
        print("| edge_testbed needs root and iproute2 (ip, tc) to build network namespaces "
              "and cgroups; skipped |")  # fmt: skip
        return 0 if args.smoke else 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that namespaces are torn down
    link = probe(cfg)
    print(testbed_model.probe_markdown(link), flush=True)
    rows, relays = [], []
    for model, t in cfg.models:
        for n in cfg.nodes:
            start = time.monotonic()
            got, relay = run_cluster(cfg, model, t, n)
            rows, relays = rows + got, relays + [relay]
            relay["load_average_after"] = os.getloadavg()  # the machine's other work, if any
            print(f"{model} N={n}: {time.monotonic() - start:.0f} s", flush=True)
            write(args, cfg, link, rows, relays)  # after every cluster: a cut run keeps its cells
    print(write(args, cfg, link, rows, relays))


def write(args, cfg: Config | dict, link: dict, rows: list[dict], relays: list[dict],
          earlier: dict | None = None) -> str:  # fmt: skip
    """edge_testbed_v2.{json,md,png} of the cells so far (`earlier`: the provenance of the
    run that measured them, when re-rendered); returns the Markdown."""
    preds = testbed_model.predictions(rows, config_of)
    text = testbed_model.report(cfg, link, rows, relays, preds)
    heading = "# Edge testbed v2: N nodes under a CPU quota, a link with rate and latency\n\n"
    config = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    record = {"config": config, "probe": link, "rows": rows, "relays": relays,
              "predictions": preds, **(earlier or {})}  # fmt: skip
    common.save(args, "edge_testbed_v2", record, heading + text,
                lambda png: testbed_model.plot(rows, png))  # fmt: skip
    return text


def rerender(args) -> None:
    """The tables, model and plot again from earlier runs' JSON (`--report A.json[,B.json]`):
    nothing is measured; their rows are pooled (the latency model fitted on N = 2 of one run
    predicts N = 8 of another), the first run's config and probe head the record, and every
    measuring run's provenance is kept under "earlier_runs"."""
    records = [json.loads(Path(p).read_text()) for p in args.report.split(",")]
    runs = [run for r in records for run in r.get("earlier_runs", []) + [r["provenance"]]]
    config = {**records[0]["config"],
              "nodes": sorted({n for r in records for n in r["config"]["nodes"]})}  # fmt: skip
    rows = [row for r in records for row in r["rows"]]
    relays = [relay for r in records for relay in r["relays"]]
    print(write(args, config, records[0]["probe"], rows, relays, {"earlier_runs": runs}))


if __name__ == "__main__":
    common.run_script(main)
