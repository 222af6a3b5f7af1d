"""`prism-jax plan`: the planner (`prism_jax.planner`) on the command line. Its flags are
checked at parse time (one line, exit code 2); the table of candidates is its output."""

from __future__ import annotations

import argparse
import dataclasses

from prism_jax import latency
from prism_jax.cli.values import nonnegative_float, positive_int
from prism_jax.errors import PrismError


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
        default=latency.COLLECTIVE_S * 1000,
        help="a collective's own cost a layer, ms (default: gloo over TCP on the testbed)",
    )
    p.add_argument(
        "--max-loss", type=percent(1), default=0.01, help="accuracy points a classifier may lose"
    )
    p.add_argument(
        "--max-ppl-rise", type=percent(100), default=0.10, help="a language model's perplexity"
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
    p.add_argument("--devices", type=positive_int, required=True, help="edge devices at most")
    link_args(p)
    p.add_argument("--dataset", default=None, help="calibration data (default: the model's)")
    p.add_argument("--limit", type=positive_int, default=None, help="calibration examples")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens (default 256)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


# The flags `--plan auto` chooses itself, with the values that mean "not given".
_CHOSEN = {"cr": (1, [1, 2, 4, 8, 16]), "compressor": ("paper",), "grouping": (None,),
           "salient": (None,), "sink": (None,), "wire": ("f32",), "kmeans_iters": (None,),
           "value_tilt": (False,), "strategy": ("prism",), "exchange": ("auto",)}  # fmt: skip


def chosen(args):
    """The plan `--plan auto` runs: the planner's choice once `auto` has made it; before, the
    flags are checked (a link, and no flag the planner sets) and the paper's plan stands in."""
    from prism_jax.plan import Plan

    if getattr(args, "choice", None) is not None:
        return args.choice
    if args.bandwidth is None:
        raise PrismError("--plan auto needs the link: --bandwidth (and --latency)")
    given = [k for k, default in _CHOSEN.items() if getattr(args, k, default[0]) not in default]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise PrismError(f"--plan auto chooses the plan itself; drop {flags}")
    return Plan()


def auto(args, model) -> None:
    """With `--plan auto`: run the planner for `model` and the link flags, and make its choice
    the plan (`chosen`) and `args.devices` (at most the devices asked for); say which on
    stderr. Nothing without it."""
    import sys

    if getattr(args, "plan", None) != "auto":
        return
    chosen(args)  # the flags, checked
    args.choice = _plan_for(args, model)
    args.devices = args.choice.devices
    if isinstance(args.cr, list):  # eval: the chosen CR alone
        args.cr = [args.choice.cr]
    c = args.choice.chosen
    name = _name({"compressor": c.compressor, "plan": dataclasses.asdict(c.plan)})
    print(f"--plan auto: {name} on {c.devices} device(s), predicted {c.estimate.total:.3f} s",
          file=sys.stderr)  # fmt: skip


def run(args) -> dict:
    import prism_jax as pj

    model = pj.load_pretrained(args.model)
    return summary(_plan_for(args, model), args.model)


def _plan_for(args, model):
    """`planner.plan_for` with the command line's link, budget and (`plan`) data flags, and a
    progress bar while it calibrates."""
    from tqdm import tqdm

    from prism_jax import planner

    data = {k: getattr(args, k) for k in ("dataset", "limit", "seq_len") if hasattr(args, k)}
    with tqdm(desc="calibrating", unit="plan", disable=args.json, leave=False) as bar:
        return planner.plan_for(
            model,
            devices=args.devices,
            bandwidth=args.bandwidth,
            latency=args.latency,
            node_speed=args.node_speed,
            max_loss=args.max_loss,
            max_ppl_rise=args.max_ppl_rise,
            collective_s=args.collective_ms / 1000,
            progress=bar,
            **data,
        )


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
    return {"model": model, "metric": choice.metric, "exact": choice.exact, "choice": chosen,
            "candidates": rows}  # fmt: skip


def show(r: dict) -> None:
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


def _name(row: dict) -> str:
    p = row["plan"]
    if row["compressor"] == "single":
        return "one device"
    return f"{row['compressor']} CR={p['cr']} {p['grouping']} sink={p['sink']} {p['wire']}"
