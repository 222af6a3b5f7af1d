"""`prism-jax plan`: the planner (`prism_jax.planner`) on the command line. Its flags are
checked at parse time (one line, exit code 2); the table of candidates is its output.

Across nodes (`prism-jax launch|node ... -- plan --profile`), every node times the model and
the nodes time the link's all-gathers (`latency.measure_nodes`); node 0 then plans with that
profile, calibrating on emulated devices in a child process (a node holds one device). And
`launch ... --plan auto` plans once, in the launcher, and starts the choice's devices with its
flags (`for_launch`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

from prism_jax import latency
from prism_jax.cli.values import nonnegative_float, positive_int
from prism_jax.errors import PrismError
from prism_jax.plan import TRANSPORTS

# How the exchange may travel where the devices are emulated in one process (`infer --plan
# auto`): not the stream, which needs a process per device.
ONE_PROCESS = ("all_gather", "all_to_all")


def _unit(parse):
    def checked(text: str):
        try:
            return parse(text)
        except PrismError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    checked.__name__ = parse.__name__.removeprefix("parse_")
    return checked


def percent(high: float):
    """'1%' or '0.01' -> 0.01, in [0, `high`)."""

    def fraction(text: str) -> float:
        value = str(text).strip()
        try:
            number = float(value[:-1]) / 100 if value.endswith("%") else float(value)
        except ValueError:
            number = float("nan")
        if not 0 <= number < high:
            raise argparse.ArgumentTypeError(
                f"a share in [0, {high:.0%}) such as 1% or 0.01 expected, got {text!r}"
            )
        return number

    return fraction


def speeds(text: str) -> tuple[float, ...]:
    """'1,1,0.5,0.5' -> each node's speed relative to this host (> 0)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"speeds > 0 such as 1,1,0.5,0.5 expected, got {text!r}")
    return values


def link_args(p, *, required: bool = True) -> None:
    """The link and budget flags the planner reads."""
    p.add_argument(
        "--bandwidth",
        type=_unit(latency.parse_bandwidth),
        required=required,
        default=None,
        help="each node's uplink: 10mbit, 500kbit, 1gbit, or unlimited",
    )
    p.add_argument(
        "--latency", type=_unit(latency.parse_latency), default=0.0, help="one-way: 5ms, 200us"
    )
    p.add_argument(
        "--node-speed", type=speeds, default=None, help="speed of each node against this host"
    )
    p.add_argument(
        "--collective-ms",
        type=nonnegative_float,
        default=None,
        help="a collective's own cost a layer, ms (default: gloo over TCP on the testbed, "
        f"{latency.COLLECTIVE_S * 1000:g})",
    )
    p.add_argument(
        "--max-loss",
        type=percent(1),
        default=0.01,
        help="accuracy points a classifier may lose (default 1%%)",
    )
    p.add_argument(
        "--max-ppl-rise",
        type=percent(100),
        default=0.10,
        help="how much a language model's perplexity may rise (default 10%%)",
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="pick devices, CR, compressor and wire for a link and an accuracy budget",
        description="Predict the latency of one device alone and of every plan on N' <= N "
        "devices (CR, compressor, wire) for the link, calibrate their accuracy on the data "
        "(fastest first, until one is within the budget; cached), and print the candidates "
        "and the choice.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory or .gguf file")
    p.add_argument(
        "--devices", type=positive_int, default=None, help="edge devices at most (under "
        "launch/node: the nodes)"
    )  # fmt: skip
    link_args(p, required=False)
    p.add_argument(
        "--profile",
        action="store_true",
        help="under launch/node: measure each node's speed and the link's all-gathers (and "
        "its bandwidth, without --bandwidth) instead of timing this host",
    )
    p.add_argument("--measured", default=None, help=argparse.SUPPRESS)  # node 0's child
    p.add_argument("--dataset", default=None, help="calibration data (default: the model's)")
    p.add_argument("--limit", type=positive_int, default=None, help="calibration examples")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens (default 256)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


# The flags `--plan auto` chooses itself, with the values that mean "not given".
_CHOSEN = {"compressor": ("paper",), "grouping": (None,),
           "salient": (None,), "sink": (None,), "wire": ("f32",), "kmeans_iters": (None,),
           "value_tilt": (False,), "strategy": ("prism",), "exchange": ("auto",),
           "groups": (None,), "transport": ("all_gather",)}  # fmt: skip


def chosen(args):
    """The plan `--plan auto` runs: the planner's choice once `auto` has made it; before, the
    flags are checked (a link, and no flag the planner sets) and the paper's plan stands in."""
    from prism_jax.plan import Plan

    if getattr(args, "choice", None) is not None:
        return args.choice
    if args.bandwidth is None:
        raise PrismError("--plan auto needs the link: --bandwidth (and --latency)")
    given = [k for k, default in _CHOSEN.items() if getattr(args, k, default[0]) not in default]
    given = ["cr"] * bool(getattr(args, "cr_given", False)) + given
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise PrismError(f"--plan auto chooses the plan itself; drop {flags}")
    _check_speeds(args)
    return Plan()


# The planner's flags with the values that mean "not given": without --plan auto they would
# change nothing, so giving them is refused.
_PLANNER_FLAGS = {"bandwidth": None, "latency": 0.0, "node_speed": None, "collective_ms": None,
                  "max_loss": 0.01, "max_ppl_rise": 0.10}  # fmt: skip


def check_unplanned(args) -> None:
    """Without `--plan auto`, no planner flag (a link, node speeds, a budget) may be given."""
    if getattr(args, "plan", None) == "auto" or not hasattr(args, "bandwidth"):
        return
    given = [k for k, v in _PLANNER_FLAGS.items() if getattr(args, k, v) != v]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise PrismError(f"{flags}: the planner's flags apply only with --plan auto")


def _check_speeds(args) -> None:
    speeds = getattr(args, "node_speed", None)
    if speeds and args.devices is not None and len(speeds) < args.devices:
        raise PrismError(
            f"--node-speed names {len(speeds)} nodes, fewer than --devices {args.devices}"
        )


def auto(args, model, *, tokens: int | None = None, nodes: bool = False) -> None:
    """With `--plan auto`: run the planner for `model` and the link flags, and make its choice
    the plan (`chosen`) and `args.devices` (at most the devices asked for, and at most the
    input's `tokens` when known); say which on stderr. Nothing without it. `nodes`: the plan
    runs on a cluster of one process per device (launch), where the stream may carry it."""
    if getattr(args, "plan", None) != "auto":
        return
    chosen(args)  # the flags, checked
    if tokens is not None:
        args.devices = max(1, min(args.devices, tokens))
    args.choice = _plan_for(args, model, transports=TRANSPORTS if nodes else ONE_PROCESS)
    args.devices = args.choice.devices
    if isinstance(args.cr, list):  # eval: the chosen CR alone
        args.cr = [args.choice.cr]
    c = args.choice.chosen
    name = _name({"compressor": c.compressor, "plan": dataclasses.asdict(c.plan)})
    print(f"--plan auto: {name} on {c.devices} device(s), predicted {c.estimate.total:.3f} s",
          file=sys.stderr)  # fmt: skip


def run(args) -> dict | int:
    import jax

    import prism_jax as pj

    check_flags(args, nodes=jax.process_count())
    if args.measured:  # node 0's child: it ends with node 0
        _end_with(int(os.environ.get(_PARENT, os.getppid())))
    model = pj.load_pretrained(args.model)
    if args.profile:
        return _profiled(args, model)
    measured = json.loads(args.measured) if args.measured else None
    result = summary(_plan_for(args, model, measured), args.model)
    return result | ({"profile": measured} if measured else {})


def check_flags(args, *, nodes: int) -> None:
    """What `plan` needs given, checked before a model loads (or, under launch, a node starts)."""
    if args.profile and nodes == 1:
        raise PrismError(
            "--profile measures the nodes and the link between them: run `prism-jax launch "
            "--nodes N -- plan --profile ...` (or, on each machine, `prism-jax node --rank R "
            "--nodes N --coordinator HOST:PORT plan --profile ...`)"
        )
    if args.devices is None:
        raise PrismError("plan needs --devices N (the edge devices it may use)")
    _check_speeds(args)
    if args.profile and (args.node_speed or args.collective_ms is not None):
        given = "--node-speed" if args.node_speed else "--collective-ms"
        raise PrismError(f"--profile measures what {given} states; drop {given}")
    if args.bandwidth is None and not args.profile:
        raise PrismError("plan needs the link: --bandwidth (or --profile under launch to measure)")


def _plan_for(args, model, measured: dict | None = None, *, transports=TRANSPORTS):
    """`planner.plan_for` with the command line's link, budget and (`plan`) data flags, and a
    progress bar while it calibrates; `measured`: a profile measured across nodes
    (`latency.measure_nodes`) instead of timing this host; `transports`: how the exchange may
    travel."""
    from tqdm import tqdm

    from prism_jax import planner

    data = {k: getattr(args, k) for k in ("dataset", "limit", "seq_len") if hasattr(args, k)}
    collective_ms = (
        latency.COLLECTIVE_S * 1000 if args.collective_ms is None else args.collective_ms
    )
    profile = None
    if measured is not None:
        profile = latency.Profile.from_measured(measured, latency=args.latency)
    with tqdm(desc="calibrating", unit="plan", disable=args.json, leave=False) as bar:
        return planner.plan_for(
            model,
            devices=args.devices,
            bandwidth=args.bandwidth,
            latency=args.latency,
            node_speed=args.node_speed,
            max_loss=args.max_loss,
            max_ppl_rise=args.max_ppl_rise,
            collective_s=collective_ms / 1000,
            profile=profile,
            transports=transports,
            progress=bar,
            **data,
        )


def _profiled(args, model) -> dict | int:
    """`plan --profile` on a node: measure with the others, then node 0 plans with what was
    measured (in a child process with `--devices` emulated devices to calibrate on) while the
    others wait for it; they return 0 (node 0 prints the result)."""
    import jax

    from prism_jax import planner

    cfg = model.config
    seq_len = args.seq_len or planner.default_length(cfg) or 0
    measured = latency.measure_nodes(model, planner.example_batch(cfg, seq_len))
    given = args.bandwidth
    measured["given_bandwidth"] = None if given in (None, float("inf")) else given
    if args.bandwidth is None:
        args.bandwidth = measured["bandwidth"] or float("inf")
    done = "prism_jax/plan/done"
    if jax.process_index() != 0:
        _client().blocking_key_value_get(done, 2**31 - 1)  # node 0's watchdog bounds it
        return 0
    try:
        return _plan_in_child(args, measured)
    finally:
        _client().key_value_set(done, "1")


_PARENT = "PRISM_JAX_PLANNER_PARENT"  # node 0's pid, for its planner child


def _end_with(parent: int) -> None:
    """End this process (exit 3) once `parent` has gone (it is then no longer our parent)."""
    import threading
    import time

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _client():
    from jax._src import distributed  # the running jax.distributed cluster's client

    return distributed.global_state.client


def _plan_in_child(args, measured: dict) -> dict:
    from prism_jax.cli import emulate_devices

    argv = [sys.executable, "-m", "prism_jax.cli", "plan", "--model", args.model,
            "--devices", str(args.devices), "--bandwidth", _rate(args.bandwidth),
            "--latency", f"{args.latency!r}s", "--max-loss", repr(args.max_loss),
            "--max-ppl-rise", repr(args.max_ppl_rise), "--json",
            "--measured", json.dumps(measured)]  # fmt: skip
    for flag in ("dataset", "limit", "seq_len"):
        if getattr(args, flag) is not None:
            argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    saved = dict(os.environ)
    try:
        emulate_devices(args.devices, exact=True)  # for the child, which starts JAX anew
        env = dict(os.environ) | {_PARENT: str(os.getpid())}
    finally:
        os.environ.clear()
        os.environ.update(saved)
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise PrismError(f"the planner on node 0 failed (exit code {done.returncode})")
    return json.loads(done.stdout)


def _rate(bits: float) -> str:
    return "unlimited" if bits == float("inf") else repr(float(bits))


def flags(plan, command: str) -> list[str]:
    """The command-line flags that name `plan` for `command` (what the nodes run after
    `launch ... --plan auto`); eval has no --strategy: one device is CR = 1 there, the exact
    model."""
    if plan.strategy == "single":
        return ["--cr", "1"] if command == "eval" else ["--strategy", "single"]
    named = {"cr": plan.cr, "logit-bias": plan.logit_bias, "exchange": plan.exchange,
             "grouping": plan.grouping, "kmeans-iters": plan.kmeans_iters,
             "salient": plan.salient, "sink": plan.sink, "wire": plan.wire}  # fmt: skip
    if plan.groups:
        named["groups"] = plan.groups
    if plan.transport != "all_gather":
        named["transport"] = plan.transport
    named = [token for k, v in named.items() for token in ("--" + k, str(v))]
    return named + (["--value-tilt"] if plan.value_tilt else [])


def for_launch(inner, rest: list[str]) -> tuple[int, list[str]]:
    """`launch ... --plan auto`: the planner runs here, once (the launcher emulates the
    devices it calibrates on); returns how many nodes to start and the command they run: the
    choice's flags in place of `--plan auto`, `--devices` and the planner's flags."""
    import numpy as np

    import prism_jax as pj

    model = pj.load_pretrained(inner.model)
    tokens = None
    if getattr(inner, "text", None) and model.tokenizer is not None:  # infer: its own length
        batch = model.tokenizer(inner.text, max_length=inner.max_length)
        tokens = np.shape(batch["input_ids"])[-1]
    auto(inner, model, tokens=tokens, nodes=True)
    named = flags(inner.choice, inner.command)
    print(f"--plan auto: the nodes run {inner.command} {' '.join(named)}", file=sys.stderr)
    planner_flags = tuple("--" + k.replace("_", "-") for k in _PLANNER_FLAGS)
    return inner.choice.devices, _without(rest, ("--plan", "--devices", *planner_flags)) + named


def _without(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """`argv` without the options `names` and their values (`--name v` or `--name=v`)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in names:
            skip = True
        elif not token.startswith(tuple(n + "=" for n in names)):
            out.append(token)
    return out


def summary(choice, model: str) -> dict:
    single = next(c for c in choice.candidates if c.compressor == "single").estimate.total
    rows = [
        {
            "devices": c.devices,
            "compressor": c.compressor,
            "plan": dataclasses.asdict(c.plan),
            "predicted_s": c.estimate.total,
            "terms_s": c.estimate._asdict(),
            "bytes_per_device": c.bytes_per_device,
            "speedup": single / c.estimate.total,
            "loss": c.loss,
            "status": c.status,
        }
        for c in choice.candidates
    ]
    chosen = next(r for r in rows if r["status"] == "chosen")
    chosen["flags"] = flags(choice.chosen.plan, "infer")  # what `node` runs for it
    return {"model": model, "metric": choice.metric, "exact": choice.exact, "choice": chosen,
            "candidates": rows}  # fmt: skip


def show(r: dict) -> None:
    if r.get("profile"):
        m = r["profile"]
        rate = "unmeasurable" if m["bandwidth"] is None else f"{m['bandwidth'] / 1e6:,.1f} Mbit/s"
        if m.get("given_bandwidth"):
            rate += f" (planned with the given {m['given_bandwidth'] / 1e6:,.1f} Mbit/s)"
        speeds = ", ".join(f"{v:.2f}" for v in m["node_speed"])
        print(f"measured on {len(m['node_s'])} nodes: speed against node 0 {speeds}; an "
              f"all-gather round {m['round_s'] * 1000:.2f} ms; bandwidth {rate}")  # fmt: skip
    print(f"{r['model']}: {r['metric']} exact {r['exact']:.4g}; candidates, fastest first")
    print(f"{'N':>2} {'plan':<34} {'predicted':>10} {'speed-up':>8} {'bytes/dev':>11} "
          f"{'loss':>8}  status")  # fmt: skip
    for row in r["candidates"]:
        loss = "-" if row["loss"] is None else f"{row['loss']:+.2%}"
        print(f"{row['devices']:>2} {_name(row):<34} {row['predicted_s']:>9.3f}s "
              f"{row['speedup']:>7.2f}x {row['bytes_per_device']:>11,} {loss:>8}  "
              f"{row['status']}")  # fmt: skip
    c = r["choice"]
    print(f"choice: {_name(c)} on {c['devices']} device(s), predicted {c['predicted_s']:.3f} s "
          f"({c['speedup']:.2f}x one device)")  # fmt: skip
    print(f"run it: --devices {c['devices']} {' '.join(c['flags'])} (or --plan auto)")


def _name(row: dict) -> str:
    p = row["plan"]
    if row["compressor"] == "single":
        return "one device"
    return f"{row['compressor']} CR={p['cr']} {p['grouping']} sink={p['sink']} {p['wire']}"
