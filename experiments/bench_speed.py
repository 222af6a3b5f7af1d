"""Wall time and peak memory: prism-jax against PyTorch, and prism against single, one run.

Command:  .venv/bin/python experiments/bench_speed.py          (about 8 minutes on 2 cores)
Smoke:    .venv/bin/python experiments/bench_speed.py --smoke  (seconds; run by the tests)

(a) `single` (one device) against transformers on PyTorch CPU, for all-MiniLM-L6-v2 (real
    weights) and the bert-base preset (random weights, the same in both), batch 8,
    T in {128, 256, 512}: ratio jax / torch (< 1: JAX faster).
(b) `prism` at N = 4 emulated CPU devices, CR in {1, 8, 32}, against `single`, MiniLM.
    The emulated devices share this machine's 2 cores, so this measures overhead and
    compute saved, not the parallel speed-up of real edge devices.
(c) Peak memory of each: a fresh process loads the model, notes its RSS, runs the
    configuration twice (compile + one call) and reports how far its peak RSS (VmHWM) rose
    above that; compiler memory counts, emulated devices count together.

Compile time is kept apart (the first call); times are medians of `--repeats` calls.
Writes experiments/results/bench_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
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
    out: str = str(Path(__file__).parent / "results")


SMOKE = Config(
    batch=2, lengths=(32,), crs=(1, 8), devices=2, repeats=1, bert_base=False, memory=False, out=""
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
    """In a fresh process: load, note RSS, run twice, print the peak's rise in MB."""
    cfg = Config(batch=batch, lengths=(t,), crs=(), devices=devices, bert_base=True)
    with tempfile.TemporaryDirectory() as tmp:
        name, ours, reference = next(m for m in _models(cfg, Path(tmp)) if m[0] == model)
        fn = _runner(ours, reference, run, batch, t, devices)
        base = _status("VmRSS")
        fn()
        fn()
        print((_status("VmHWM") - base) / 2**20)


def _measure(fn, repeats: int) -> dict:
    from prism_jax.evaluation.timing import timed

    first, steady = timed(fn, repeats=repeats)
    return {"first_call_s": first, "s": steady}


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


def run(cfg: Config) -> list[dict]:
    import torch

    torch.set_num_threads(os.cpu_count())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, reference in _models(cfg, Path(tmp)):
            for t in cfg.lengths:
                base = {"model": name, "batch": cfg.batch, "tokens": t}
                runs = ["torch", "single"]
                if name == "all-MiniLM-L6-v2":
                    runs += [f"prism-CR{cr}" for cr in cfg.crs]
                measured = {}
                for run_name in runs:
                    fn = _runner(model, reference, run_name, cfg.batch, t, cfg.devices)
                    measured[run_name] = _measure(fn, cfg.repeats)
                    row = {**base, "run": run_name, **measured[run_name]}
                    if run_name != "torch":
                        against = "torch" if run_name == "single" else "single"
                        row.update(ratio=row["s"] / measured[against]["s"], against=against)
                    if cfg.memory:
                        row["peak_mb"] = peak_mb(name, t, run_name, cfg)
                    rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
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
    return "\n".join(lines) + "\n"


def main(argv=None):
    from prism_jax.cli.parser import Parser

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, writes nothing")
    parser.add_argument("--repeats", type=common.positive_int, default=Config.repeats)
    parser.add_argument("--peak", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak:
        model, t, run_name, batch, devices = args.peak
        return _peak_child(model, int(t), run_name, int(batch), int(devices))
    cfg = SMOKE if args.smoke else Config(repeats=args.repeats)
    rows = run(cfg)
    text = markdown(rows)
    print(text)
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_speed.json").write_text(json.dumps(rows, indent=2) + "\n")
        (out / "bench_speed.md").write_text(
            "# Wall time and peak memory (one run, 2-core CPU)\n\n"
            "`.venv/bin/python experiments/bench_speed.py`\n\n" + text
        )


if __name__ == "__main__":
    common.run_script(main)
