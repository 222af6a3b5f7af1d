"""Single-device prefill of SmolLM2-135M: prism-jax (JAX/XLA) against transformers (PyTorch).

Command:  .venv/bin/python experiments/bench_llama.py         (about 2 minutes on 2 cores)
Smoke:    .venv/bin/python experiments/bench_llama.py --smoke (seconds after loading)

The same dequantized weights (the GGUF file of DESIGN.md section 4, read by our converter and
by transformers' own GGUF loader) on the same inputs in this process: batch 1 and 4, T in
{128, 512}, every token valid, logits for every position. JAX's first call (trace + compile)
is reported apart from its steady state; steady states are medians of `--repeats` calls. The
figure of merit is jax / torch wall time (< 1: faster).
Writes experiments/results/bench_llama.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "results"


def run(shapes: list[tuple[int, int]], repeats: int) -> list[dict]:
    import jax
    import torch
    import transformers

    import prism_jax as pj
    from prism_jax.data import sources
    from prism_jax.evaluation.timing import timed
    from prism_jax.partition import program

    torch.set_num_threads(os.cpu_count())
    path = sources.smollm2_gguf()
    model = pj.load_pretrained(path)
    reference = transformers.LlamaForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name
    ).eval()
    fn = program(model.graphdef, model.config, pj.Plan(strategy="single"), None)
    rows = []
    for b, t in shapes:
        ids = np.random.default_rng(t).integers(100, 40000, (b, t)).astype(np.int32)
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        inputs, valid = model.prepare(batch)
        run_jax = functools.partial(
            lambda *a: jax.block_until_ready(fn(*a)), model.params, inputs, valid
        )
        compile_s, jax_s = timed(run_jax, repeats=repeats)
        run_torch = functools.partial(
            reference, **{k: torch.tensor(v).long() for k, v in batch.items()}
        )
        with torch.inference_mode():
            _, torch_s = timed(run_torch, repeats=repeats)
        rows.append(
            {
                "batch": b,
                "tokens": t,
                "jax_first_call_s": compile_s,
                "jax_s": jax_s,
                "torch_s": torch_s,
                "jax_over_torch": jax_s / torch_s,
            }
        )
        print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| batch | T | JAX first call (s) | JAX (s) | PyTorch (s) | JAX / PyTorch |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['batch']} | {r['tokens']} | {r['jax_first_call_s']:.2f} | {r['jax_s']:.4f} "
        f"| {r['torch_s']:.4f} | {r['jax_over_torch']:.2f} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one tiny shape, writes nothing")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    shapes = [(1, 16)] if args.smoke else [(1, 128), (1, 512), (4, 128), (4, 512)]
    rows = run(shapes, 1 if args.smoke else args.repeats)
    table = markdown(rows)
    print(table)
    if not args.smoke:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "bench_llama.json").write_text(json.dumps(rows, indent=2) + "\n")
        (OUT / "bench_llama.md").write_text(
            "# SmolLM2-135M prefill (logits of every position), one CPU device\n\n"
            "`.venv/bin/python experiments/bench_llama.py`\n\n" + table + "\n"
        )


if __name__ == "__main__":
    main()
