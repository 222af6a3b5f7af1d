"""What a plan costs the nodes in compute: N devices' work against one device's, per plan.

Command:  .venv/bin/python experiments/profile_plans.py          (about 7 minutes, 2 cores)
Smoke:    .venv/bin/python experiments/profile_plans.py --smoke  (a tiny model, N = 2)

The N edge devices are emulated in one process pinned to one core, so one call's wall time is
the work of every device together (the emulated collective included, the link not): `work /
single` says how much the plan adds to the model's compute beyond cutting the tokens N ways
(1.00: nothing), and `N x single / work` is the speed-up N such devices could reach on a free
link if every device carried an even share (a causal model's later devices carry a little
more). The testbed's speed-ups (`edge_testbed.py`) sit under this ceiling; where a plan is far
from N there, this says whether its compute or its link is what is missing. Same models and
lengths as the testbed: bert-base (T = 256) and ViT-B/16 on random weights, SmolLM2 prefill
(T = 512, real weights); plans as `edge_testbed.py --plans` spells them (`testbed_model`).
Medians of `--repeats` calls after a warm-up. Writes results/profile_plans.{json,md}.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import common

PLANS = {
    "bert-base": ("paper:16", "paper:64", "best:16:int8", "best:64:int8", "best:64:int8:notilt"),
    "vit-base-patch16-224": ("paper:16", "best:16:int8", "best:64:int8",
                             "best:64:int8:notilt"),
    "smollm2-135m": ("paper:16", "best:16:int4", "fill:16:int4h", "fill:16:int4h:notilt",
                     "fill:12:int4h", "fill:8:int4h"),
}  # fmt: skip
LENGTHS = {"bert-base": 256, "vit-base-patch16-224": 197, "smollm2-135m": 512}


@dataclasses.dataclass
class Config:
    smoke: bool = common.setting(False, "a tiny model at N = 2, one repeat")
    models: str = common.setting(",".join(PLANS), "models, comma-separated")
    nodes: str = common.setting("2,4", "device counts, comma-separated")
    repeats: int = common.setting(3, "timed calls per plan")
    out: str | None = common.output(None, "results folder")


def _timed(fn, args, repeats: int) -> float:
    """Median seconds of `fn(*args)` after a compiling first call."""
    import jax

    from prism_jax.evaluation.timing import timed

    return timed(lambda: jax.block_until_ready(fn(*args)), repeats=repeats)[1]


def profile(name: str, model, seq_len: int, nodes: int, plans, repeats: int) -> list[dict]:
    """`work` of each plan at N = `nodes` and of `single`, on this process's one core."""
    import edge_testbed
    import testbed_model

    import prism_jax as pj
    from prism_jax.partition import place, program, shard_inputs

    cfg = model.config
    inputs, valid = edge_testbed._inputs(model, seq_len)
    solo = program(model.graphdef, cfg, pj.Plan(strategy="single"), None)
    single = _timed(solo, (model.params, inputs, valid), repeats)
    mesh = pj.edge_mesh(nodes)
    placed, sharded = place(model, mesh), shard_inputs(inputs, valid, mesh)
    rows = []
    for spec in plans:
        plan = testbed_model.make_plan(spec, cfg, devices=nodes, seq_len=seq_len)
        work = _timed(program(model.graphdef, cfg, plan, mesh), (placed, *sharded), repeats)
        rows.append({"model": name, "nodes": nodes, "seq_len": seq_len, "plan": spec,
                     "single_s": single, "work_s": work, "work_per_single": work / single,
                     "ceiling": nodes * single / work})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    args = common.parse(Config, __doc__, argv, devices=None)
    names = ["tiny"] if args.smoke else args.models.split(",")
    nodes = [2] if args.smoke else args.nodes.split(",")
    bad = [m for m in names if m not in PLANS and not args.smoke]
    bad += [n for n in nodes if not str(n).isdigit() or int(n) < 2]
    if bad:
        print(f"profile_plans.py: error: {bad[0]!r} is no model ({', '.join(PLANS)}) or device "
              "count >= 2", file=sys.stderr)  # fmt: skip
        return 2
    nodes = [int(n) for n in nodes]
    common.emulate_devices(max(nodes))
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # every device on one core
    import edge_testbed

    rows = []
    for name in names:
        if args.smoke:
            import prism_jax as pj

            model, t, plans = pj.init(edge_testbed.config_of("tiny"), seed=0), 32, ("paper:4",)
        else:
            model, t, plans = edge_testbed._model(name), LENGTHS[name], PLANS[name]
        for n in nodes:
            rows += profile(name, model, t, n, plans, 1 if args.smoke else args.repeats)
    text = markdown(rows)
    print(text)
    common.save(args, "profile_plans", rows, text)
    return 0


def markdown(rows: list[dict]) -> str:
    lines = [
        "### N devices' work against one device's, on one core",
        "",
        "| model | T | N | plan | one device (s) | N devices' work (s) | work / one device | "
        "ceiling on a free link (N x one / work) |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['seq_len']} | {r['nodes']} | {r['plan']} | "
            f"{r['single_s']:.3f} | {r['work_s']:.3f} | {r['work_per_single']:.2f} | "
            f"{r['ceiling']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    common.run_script(main)
