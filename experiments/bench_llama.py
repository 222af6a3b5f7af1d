"""SmolLM2-135M on one CPU device, prism-jax (JAX/XLA) against transformers (PyTorch): prefill,
and greedy decoding with `pj.generate` against `transformers`' `generate`.

Command:  .venv/bin/python experiments/bench_llama.py         (about 3 minutes on 2 cores)
Smoke:    .venv/bin/python experiments/bench_llama.py --smoke (seconds after loading)

The same dequantized weights (the GGUF file of DESIGN.md section 4, read by our converter and
by transformers' own GGUF loader) on the same inputs in this process.

Prefill: batch 1 and 4, T in {128, 512}, every token valid, logits for every position. JAX's
first call (trace + compile) is reported apart from its steady state; steady states are
medians of `--repeats` calls. The figure of merit is jax / torch wall time (< 1: faster).

Decode: one prompt of 26 tokens (batch 1 and 4), `--new` tokens, greedy, end of sequence
ignored; each side runs once to warm up (ours compiles the prefill and the decode step),
then `--repeats` times. Time per new token: ours, the median step of `generation.run`;
theirs, (time for `new` tokens - time for 1 token) / (new - 1): both leave the prefill out.
Writes experiments/results/bench_llama.{json,md}.
"""

from __future__ import annotations

import functools
import os
import statistics
import time

import common
import numpy as np

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type with an oil-based ink and a wooden press"
)


def load(depth: int | None = None):
    """(our model, transformers' model) of the same GGUF file; for the smoke, its first
    `depth` layers, handed to transformers through our HF export (its GGUF loader takes 20 s)."""
    import tempfile

    import torch
    import transformers

    import prism_jax as pj
    from prism_jax.checkpoints import hf
    from prism_jax.data import sources

    torch.set_num_threads(os.cpu_count())
    path = sources.smollm2_gguf()
    model = pj.load_pretrained(path)
    if depth is None:
        source = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
        return model, transformers.LlamaForCausalLM.from_pretrained(**source).eval()
    model = common.first_layers(model, depth)
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(model, directory)
        return model, transformers.LlamaForCausalLM.from_pretrained(directory).eval()


def prefill(model, reference, shapes: list[tuple[int, int]], repeats: int) -> list[dict]:
    import jax
    import torch

    import prism_jax as pj
    from prism_jax.evaluation.timing import timed
    from prism_jax.partition import program

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


def decode(model, reference, batch_size: int, new: int, repeats: int) -> dict:
    import torch

    from prism_jax import generation

    ids = np.array([model.tokenizer.encode_plain(PROMPT)] * batch_size)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def ours() -> float:
        out = generation.run(model, batch, max_new_tokens=new, eos=False)
        return statistics.median(out.step_seconds[1:] or out.step_seconds)

    def theirs(tokens: int) -> float:
        tic = time.perf_counter()
        with torch.inference_mode():
            reference.generate(
                input_ids=torch.tensor(ids).long(),
                attention_mask=torch.ones(ids.shape, dtype=torch.long),
                max_new_tokens=tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=2,
            )
        return time.perf_counter() - tic

    ours(), theirs(new)  # warm up (compile, allocator)
    jax_step = statistics.median(ours() for _ in range(repeats))
    torch_step = statistics.median((theirs(new) - theirs(1)) / (new - 1) for _ in range(repeats))
    return {
        "batch": batch_size,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": new,
        "jax_tokens_per_s": 1 / jax_step,
        "torch_tokens_per_s": 1 / torch_step,
        "jax_over_torch_time": jax_step / torch_step,
    }


def decode_markdown(rows: list[dict]) -> str:
    lines = [
        "| batch | prompt | new | pj.generate tokens/s | transformers tokens/s | time ratio |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['batch']} | {r['prompt_tokens']} | {r['new_tokens']} | "
        f"{r['jax_tokens_per_s']:.1f} | {r['torch_tokens_per_s']:.1f} | "
        f"{r['jax_over_torch_time']:.2f} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv=None):
    from prism_jax.cli.parser import Parser

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="one tiny shape (writes only to --out)"
    )
    parser.add_argument("--repeats", type=common.positive_int, default=5)
    parser.add_argument(
        "--new", type=common.positive_int, default=64, help="decoded tokens per run"
    )
    common.add_out(parser)
    args = parser.parse_args(argv)
    smoke = args.smoke
    shapes = [(1, 16)] if smoke else [(1, 128), (1, 512), (4, 128), (4, 512)]
    repeats, new = (1, 4) if smoke else (args.repeats, args.new)
    model, reference = load(2 if smoke else None)
    rows = prefill(model, reference, shapes, repeats)
    decoded = [
        decode(model, reference, b, new, min(repeats, 3)) for b in ([1] if smoke else [1, 4])
    ]
    table = (
        "## Prefill\n\n"
        + common.speed_table(rows)
        + "\n\n## Greedy decode\n\n"
        + decode_markdown(decoded)
    )
    print(table)
    heading = "# SmolLM2-135M on one CPU device: prefill (logits of every position), greedy decode"
    record = {"prefill": rows, "decode": decoded}
    common.save(args, "bench_llama", record, heading + "\n\n" + table + "\n")


if __name__ == "__main__":
    common.run_script(main)
