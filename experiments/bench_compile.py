"""Compile time: the layers as one `lax.scan` against the same layers unrolled, one run.

Command:  .venv/bin/python experiments/bench_compile.py          (about 1 minute on 2 cores)
Smoke:    .venv/bin/python experiments/bench_compile.py --smoke  (seconds; run by the tests)

For bert-base (12 layers) and SmolLM2-135M (30 layers) at their preset shapes (abstract
weights: nothing is allocated), batch 1, T = 128: trace + lower, then XLA's compile, of
the inference program as it runs (`scanned`: the stacked layers through one `lax.scan`) and
of the same program with the layers unrolled in Python (`unrolled`: what every program was
before the layers were stacked, and what `cost` still lowers for its FLOP counts, since
XLA's cost analysis counts a loop body once). Both `single` and prism at N = 4, CR = 4.
Ratio = scanned / unrolled (< 1: scanning compiles faster). Then what `cost` now takes for
the FLOPs instead of the whole unrolled program (`cost.measured_flops`: for models of more
than `cost.SHALLOW` layers, unrolled copies of 2 and 3 layers, extrapolated in depth), its
seconds and its FLOPs against the whole unrolled program's.
Writes experiments/results/bench_compile.{json,md}.
"""

from __future__ import annotations

import dataclasses
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)

import common  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    models: tuple[str, ...] = ("bert-base", "smollm2-135m")
    tokens: int = 128
    devices: int = 4
    cr: int = 4


def _tiny(name: str):
    """The preset shrunk to a few narrow layers (the smoke)."""
    from prism_jax import configs

    cfg = configs.PRESETS[name]()
    return dataclasses.replace(cfg, width=32, heads=2, kv_heads=1, mlp_width=64, depth=3)


SMOKE = Config(models=("smollm2-135m",), tokens=16, devices=2, cr=2)


def compile_seconds(cfg, plan, *, devices: int, tokens: int, straight: bool) -> tuple:
    """(trace + lower, compile) seconds of one fresh program, and its FLOPs."""
    from prism_jax import cost

    tic = time.perf_counter()
    lowered = cost.lower(cfg, plan, devices=devices, seq_len=tokens, straight=straight)
    lowered_at = time.perf_counter()
    flops = cost.compiled_flops(lowered.compile())
    return lowered_at - tic, time.perf_counter() - lowered_at, flops


def cost_seconds(cfg, plan, *, devices: int, tokens: int) -> tuple[float, float]:
    """Seconds `cost` takes for a program's FLOPs, and the FLOPs (no program reused: for a
    model of SHALLOW layers or fewer it is the unrolled one, compiled again)."""
    import jax

    from prism_jax import cost

    jax.clear_caches()
    tic = time.perf_counter()
    flops = cost.measured_flops(cfg, plan, devices=devices, seq_len=tokens)
    return time.perf_counter() - tic, flops


def run(cfg: Config, *, smoke: bool) -> list[dict]:
    import prism_jax as pj
    from prism_jax import configs

    rows = []
    for name in cfg.models:
        model_cfg = _tiny(name) if smoke else configs.PRESETS[name]()
        for plan, n in ((pj.Plan(strategy="single"), 1), (pj.Plan(cr=cfg.cr), cfg.devices)):
            times = {}
            for layout, straight in (("unrolled", True), ("scanned", False)):
                times[layout] = compile_seconds(
                    model_cfg, plan, devices=n, tokens=cfg.tokens, straight=straight
                )
            row = {
                "model": name,
                "depth": model_cfg.depth,
                "run": "single" if n == 1 else f"prism N={n} CR={cfg.cr}",
                **{f"{k}_lower_s": v[0] for k, v in times.items()},
                **{f"{k}_compile_s": v[1] for k, v in times.items()},
            }
            row["ratio"] = sum(times["scanned"][:2]) / sum(times["unrolled"][:2])
            row["cost_s"], flops = cost_seconds(model_cfg, plan, devices=n, tokens=cfg.tokens)
            row["cost_flops_ratio"] = flops / times["unrolled"][2]
            rows.append(row)
    return rows


def markdown(rows: list[dict], cfg: Config) -> str:
    lines = [
        f"# Compile time, scanned layers against unrolled (batch 1, T = {cfg.tokens}, 2-core CPU)",
        "",
        "`.venv/bin/python experiments/bench_compile.py`",
        "",
        "| model (layers) | run | unrolled: lower + compile (s) | scanned: lower + compile (s) "
        "| scanned / unrolled | cost's FLOPs (s) | its FLOPs / unrolled's |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['depth']}) | {r['run']} | "
            f"{r['unrolled_lower_s']:.2f} + {r['unrolled_compile_s']:.2f} | "
            f"{r['scanned_lower_s']:.2f} + {r['scanned_compile_s']:.2f} | {r['ratio']:.2f} | "
            f"{r['cost_s']:.2f} | {r['cost_flops_ratio']:.7f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    from prism_jax.cli.parser import Parser

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model (writes only to --out)")
    common.add_out(parser)
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else Config()
    rows = run(cfg, smoke=args.smoke)
    print(markdown(rows, cfg))
    common.save(args, "bench_compile", rows, markdown(rows, cfg))


if __name__ == "__main__":
    common.run_script(main)
