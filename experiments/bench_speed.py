"""Wall time and peak memory: prism-jax against PyTorch, and prism against single, one run.

Command:  .venv/bin/python experiments/bench_speed.py          (about 8 minutes on 2 cores)
Smoke:    .venv/bin/python experiments/bench_speed.py --smoke  (seconds; run by the tests)

(a) `single` (one device) against transformers on PyTorch CPU, for all-MiniLM-L6-v2 (real
    weights) and the bert-base preset (random weights, the same in both), batch 8,
    T in {128, 256, 512}: ratio jax / torch (< 1: JAX faster).
(b) `prism` at N = 4 emulated CPU devices, CR in {1, 8, 32}, against `single`, MiniLM.
    The emulated devices share this machine's 2 cores, so this measures overhead and
    compute saved, not the parallel speed-up of real edge devices.
(c) Peak memory of each: a fresh process loads both models, reads every weight (so that
    a weight mapped from its file but not yet read is not counted, as it was before
    2026-12-06: the rise then held the weights or not as the mapping happened to go),
    resets its peak RSS (VmHWM) to its RSS, runs the configuration twice (compile + one
    call) and reports how far the peak rose; compiler memory counts, emulated devices
    count together.

Compile time is kept apart (the first call); times are medians of `--repeats` calls.
Writes experiments/results/bench_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)

import common  # noqa: E402
import numpy as np  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int = 8
    lengths: tuple[int, ...] = (128, 256, 512)
    crs: tuple[int, ...] = (1, 8, 32)
    devices: int = 4
    repeats: int = 5
    bert_base: bool = True
    memory: bool = True


SMOKE = Config(
    batch=2, lengths=(32,), crs=(1, 8), devices=2, repeats=1, bert_base=False, memory=False
)


def _status(key: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def peak_mb(model: str, t: int, run: str, cfg: Config) -> float:
    """Peak RSS growth (MB) of one configuration, measured in a fresh process."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, __file__, "--peak", model, str(t), run, str(cfg.batch), str(cfg.devices)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return float(done.stdout.strip().splitlines()[-1])


def _peak_child(model: str, t: int, run: str, batch: int, devices: int) -> None:
    """In a fresh process: load, read every weight, reset the peak, note RSS, run twice,
    print the peak's rise in MB."""
    cfg = Config(batch=batch, lengths=(t,), crs=(), devices=devices, bert_base=True)
    with tempfile.TemporaryDirectory() as tmp:
        name, ours, reference = next(m for m in _models(cfg, Path(tmp)) if m[0] == model)
        fn = _runner(ours, reference, run, batch, t, devices)
        _read_weights(ours, reference)
        _reset_peak()
        base = _status("VmRSS")
        fn()
        fn()
        print((_status("VmHWM") - base) / 2**20)


def _reset_peak() -> None:
    """VmHWM := VmRSS (Linux: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def _read_weights(model, reference) -> None:
    """Read every weight of both models in place (sums, no copies)."""
    import jax
    import torch

    jax.block_until_ready(jax.tree.map(lambda x: x.sum(), model.params))
    with torch.inference_mode():
        for tensor in [*reference.parameters(), *reference.buffers()]:
            tensor.sum()


def _models(cfg: Config, tmp: Path):
    """(name, prism_jax model, torch model) triples sharing weights."""
    import torch
    from transformers import BertConfig, BertModel

    import prism_jax as pj
    from prism_jax.data import sources

    yield (
        "all-MiniLM-L6-v2",
        pj.load_pretrained(sources.minilm_dir()),
        BertModel.from_pretrained(sources.minilm_dir()).eval(),
    )
    if cfg.bert_base:
        torch.manual_seed(0)
        BertModel(BertConfig()).eval().save_pretrained(tmp / "bert-base")
        yield (
            "bert-base (random)",
            pj.load_pretrained(tmp / "bert-base"),
            BertModel.from_pretrained(tmp / "bert-base").eval(),
        )


def _runner(model, reference, run: str, batch: int, t: int, devices: int):
    """A no-argument callable for one configuration: torch, single or prism-CR<n>."""
    import jax
    import torch

    import prism_jax as pj
    from prism_jax.partition import place, program, shard_inputs

    ids = np.random.default_rng(t).integers(1000, 30000, (batch, t))
    hf = {
        "input_ids": ids.astype(np.int32),
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
    }
    if run == "torch":
        tensors = {k: torch.tensor(v) for k, v in hf.items()}

        def call():
            with torch.inference_mode():
                return reference(**tensors)

        return call
    inputs, valid = model.prepare(hf)
    if run == "single":
        fn = program(model.graphdef, model.config, pj.Plan(strategy="single"), None)
        args = (model.params, *jax.device_put((inputs, valid)))
    else:
        mesh = pj.edge_mesh(devices)
        fn = program(model.graphdef, model.config, pj.Plan(cr=int(run.split("CR")[1])), mesh)
        args = (place(model, mesh), *shard_inputs(inputs, valid, mesh))
    return functools.partial(lambda *a: jax.block_until_ready(fn(*a)), *args)


def run(cfg: Config) -> tuple[list[dict], list[dict]]:
    """(one row per configuration, one floor row per model and T). The runs of one model
    and T are timed in turn, call by call, so that a drift of the machine's speed during
    the run moves them alike."""
    import torch

    torch.set_num_threads(os.cpu_count())
    rows, floors = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, reference in _models(cfg, Path(tmp)):
            for t in cfg.lengths:
                base = {"model": name, "batch": cfg.batch, "tokens": t}
                runs = ["torch", "single"]
                if name == "all-MiniLM-L6-v2":
                    runs += [f"prism-CR{cr}" for cr in cfg.crs]
                fns = {r: _runner(model, reference, r, cfg.batch, t, cfg.devices) for r in runs}
                measured = _interleaved(fns, cfg.repeats)
                for run_name in runs:
                    row = {**base, "run": run_name, **measured[run_name]}
                    if run_name != "torch":
                        against = "torch" if run_name == "single" else "single"
                        row.update(ratio=row["s"] / measured[against]["s"], against=against)
                    if cfg.memory:
                        row["peak_mb"] = peak_mb(name, t, run_name, cfg)
                    rows.append(row)
                floors.append(
                    {**base, **_floor(model.config, cfg.batch, t, measured["torch"]["s"])}
                )
    return rows, floors


def _interleaved(fns: dict, repeats: int) -> dict:
    """{name: {"first_call_s", "s"}}: each function's first call, then `repeats` rounds
    calling every function once in turn; "s" is the median of its rounds."""
    import statistics
    import time

    def clock(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    first = {name: clock(fn) for name, fn in fns.items()}
    rounds = [{name: clock(fn) for name, fn in fns.items()} for _ in range(repeats)]
    return {
        name: {"first_call_s": first[name], "s": statistics.median(r[name] for r in rounds)}
        for name in fns
    }


def _floor(config, batch: int, t: int, torch_s: float) -> dict:
    """What 0.8x PyTorch asks of this CPU: the model's matrix-product FLOPs
    (`cost.flops_closed_form`, one device), the rate PyTorch's whole forward reached on them,
    the best rate each framework gave one of the model's own products, and two floors: the
    ratio to PyTorch of a forward that ran every product at JAX's best rate, or at the best
    of both, and everything else in no time."""
    from prism_jax import cost
    from prism_jax.plan import Plan

    flops = cost.flops_closed_form(
        config, Plan(strategy="single"), devices=1, seq_len=t, batch=batch
    )
    rates = _best_product_rates(batch * t, config.width, config.mlp_width)
    best = max(rates.values())
    return {
        "matmul_gflop": flops / 1e9,
        "torch_s": torch_s,
        "torch_gflops": flops / torch_s / 1e9,
        "jax_product_gflops": rates["jax"] / 1e9,
        "torch_product_gflops": rates["torch"] / 1e9,
        "floor_jax_rate": flops / rates["jax"] / torch_s,
        "floor": flops / best / torch_s,
    }


def _best_product_rates(rows: int, width: int, mlp: int, repeats: int = 10) -> dict:
    """{"jax", "torch"}: FLOP/s of each framework's fastest of the layer's products
    ([rows, D] x [D, D], [D, F], [F, D] in float32), each the median of `repeats` calls."""
    import jax
    import jax.numpy as jnp
    import torch

    from prism_jax.evaluation.timing import timed

    def seconds(call, *args) -> float:  # median of `repeats` calls after a first one
        return timed(lambda: call(*args), repeats=repeats)[1]

    rng = np.random.default_rng(0)
    product = jax.jit(jnp.matmul)
    rates = {"jax": 0.0, "torch": 0.0}
    for k, n in ((width, width), (width, mlp), (mlp, width)):
        a = rng.standard_normal((rows, k), np.float32)
        b = rng.standard_normal((k, n), np.float32)
        flops = 2 * rows * k * n
        jax_s = seconds(
            lambda x, y: product(x, y).block_until_ready(), jnp.asarray(a), jnp.asarray(b)
        )
        torch_s = seconds(torch.matmul, torch.from_numpy(a), torch.from_numpy(b))
        rates["jax"] = max(rates["jax"], flops / jax_s)
        rates["torch"] = max(rates["torch"], flops / torch_s)
    return rates


def markdown(rows: list[dict], floors: list[dict]) -> str:
    lines = [
        "| model | B x T | run | first call (s) | steady (s) | peak RSS rise (MB) | ratio |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f} vs {r['against']}" if "ratio" in r else ""
        peak = f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-"
        lines.append(
            f"| {r['model']} | {r['batch']} x {r['tokens']} | {r['run']} | "
            f"{r['first_call_s']:.2f} | {r['s']:.4f} | {peak} | {ratio} |"
        )
    lines += [
        "",
        "What 0.8x PyTorch asks of this CPU: the matrix products' FLOPs, the rate PyTorch's",
        "forward reached on them, the best rate each framework gave one of the model's products",
        "(same run), and two floors: jax / torch for a forward running every product at JAX's",
        "best rate, or at the best of both, and nothing else.",
        "",
        "| model | B x T | matmul GFLOP | torch (s) | torch GFLOP/s | best product GFLOP/s, "
        "jax / torch | floor at jax's rate | floor at the best rate |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for f in floors:
        lines.append(
            f"| {f['model']} | {f['batch']} x {f['tokens']} | {f['matmul_gflop']:.1f} | "
            f"{f['torch_s']:.4f} | {f['torch_gflops']:.0f} | "
            f"{f['jax_product_gflops']:.0f} / {f['torch_product_gflops']:.0f} | "
            f"{f['floor_jax_rate']:.2f} | {f['floor']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    from prism_jax.cli.parser import Parser

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (writes only to --out)")
    parser.add_argument("--repeats", type=common.positive_int, default=Config.repeats)
    parser.add_argument("--peak", nargs=5, help=argparse.SUPPRESS)
    common.add_out(parser)
    args = parser.parse_args(argv)
    if args.peak:
        model, t, run_name, batch, devices = args.peak
        return _peak_child(model, int(t), run_name, int(batch), int(devices))
    cfg = SMOKE if args.smoke else Config(repeats=args.repeats)
    rows, floors = run(cfg)
    text = markdown(rows, floors)
    print(text)
    heading = "# Wall time and peak memory (one run, 2-core CPU)\n\n"
    common.save(args, "bench_speed", {"runs": rows, "floor": floors}, heading + text)


if __name__ == "__main__":
    common.run_script(main)
