"""Wall time and peak memory: prism-jax against PyTorch, and prism against single, one run.

Command:  .venv/bin/python experiments/bench_speed.py          (about 5 minutes on 2 cores)
Smoke:    .venv/bin/python experiments/bench_speed.py --smoke  (seconds; run by the tests)

(a) `single` (one device) against transformers on PyTorch CPU, for all-MiniLM-L6-v2 (real
    weights) and the bert-base preset (random weights, the same in both), batch 8,
    T in {128, 256, 512}: ratio jax / torch (< 1: JAX faster).
(b) `prism` at N = 4 emulated CPU devices, CR in {1, 8, 32}, against `single`, MiniLM.
    The emulated devices share this machine's 2 cores, so this measures overhead and
    compute saved, not the parallel speed-up of real edge devices.
(c) Peak memory of each: the growth of the process's peak RSS (VmHWM, reset through
    /proc/self/clear_refs) during one steady-state call; emulated devices count together.

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

import numpy as np  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int = 8
    lengths: tuple[int, ...] = (128, 256, 512)
    crs: tuple[int, ...] = (1, 8, 32)
    devices: int = 4
    repeats: int = 5
    bert_base: bool = True
    out: str = str(Path(__file__).parent / "results")


SMOKE = Config(batch=2, lengths=(32,), crs=(1, 8), devices=2, repeats=1, bert_base=False, out="")


def _status(key: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def peak_growth(fn) -> int:
    """Bytes the peak RSS grows by during one call of `fn` (0 where /proc is missing)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return 0
    before = _status("VmRSS")
    fn()
    return max(_status("VmHWM") - before, 0)


def _measure(fn, repeats: int) -> dict:
    from prism_jax.timing import timed

    first, steady = timed(fn, repeats=repeats)
    return {"first_call_s": first, "s": steady, "peak_mb": peak_growth(fn) / 2**20}


def _models(cfg: Config, tmp: Path):
    """(name, prism_jax model, torch model) pairs sharing weights."""
    import torch
    from transformers import BertConfig, BertModel

    import prism_jax as pj
    from prism_jax import data

    yield (
        "all-MiniLM-L6-v2",
        pj.load_pretrained(data.minilm_dir()),
        BertModel.from_pretrained(data.minilm_dir()).eval(),
    )
    if cfg.bert_base:
        torch.manual_seed(0)
        BertModel(BertConfig()).eval().save_pretrained(tmp / "bert-base")
        yield (
            "bert-base (random)",
            pj.load_pretrained(tmp / "bert-base"),
            BertModel.from_pretrained(tmp / "bert-base").eval(),
        )


def run(cfg: Config) -> list[dict]:
    import jax
    import torch

    import prism_jax as pj
    from prism_jax.partition import place, program, shard_inputs

    torch.set_num_threads(os.cpu_count())
    mesh = pj.edge_mesh(cfg.devices)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, reference in _models(cfg, Path(tmp)):
            for t in cfg.lengths:
                ids = np.random.default_rng(t).integers(1000, 30000, (cfg.batch, t))
                batch = {
                    "input_ids": ids.astype(np.int32),
                    "attention_mask": np.ones_like(ids),
                    "token_type_ids": np.zeros_like(ids),
                }
                inputs, valid = model.prepare(batch)
                run_single = functools.partial(
                    lambda f, *a: jax.block_until_ready(f(*a)),
                    program(model.graphdef, model.config, pj.Plan(strategy="single"), None),
                    model.params,
                    *jax.device_put((inputs, valid)),
                )
                tensors = {k: torch.tensor(v) for k, v in batch.items()}
                with torch.inference_mode():
                    torch_row = _measure(functools.partial(reference, **tensors), cfg.repeats)
                single = _measure(run_single, cfg.repeats)
                base = {"model": name, "batch": cfg.batch, "tokens": t}
                rows.append({**base, "run": "torch", **torch_row})
                rows.append(
                    {
                        **base,
                        "run": "single",
                        **single,
                        "ratio": single["s"] / torch_row["s"],
                        "against": "torch",
                    }
                )
                if name != "all-MiniLM-L6-v2":
                    continue
                sharded = shard_inputs(inputs, valid, mesh)
                for cr in cfg.crs:
                    fn = program(model.graphdef, model.config, pj.Plan(cr=cr), mesh)
                    run_prism = functools.partial(
                        lambda f, *a: jax.block_until_ready(f(*a)), fn, place(model, mesh), *sharded
                    )
                    prism = _measure(run_prism, cfg.repeats)
                    rows.append(
                        {
                            **base,
                            "run": f"prism N={cfg.devices} CR={cr}",
                            **prism,
                            "ratio": prism["s"] / single["s"],
                            "against": "single",
                        }
                    )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | B x T | run | first call (s) | steady (s) | peak RSS growth (MB) | ratio |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f} vs {r['against']}" if "ratio" in r else ""
        lines.append(
            f"| {r['model']} | {r['batch']} x {r['tokens']} | {r['run']} | "
            f"{r['first_call_s']:.2f} | {r['s']:.4f} | {r['peak_mb']:.0f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, writes nothing")
    parser.add_argument("--repeats", type=int, default=Config.repeats)
    args = parser.parse_args(argv)
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
    main()
