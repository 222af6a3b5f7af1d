"""The language-model commands: `generate` (text from a partitioned prefill and a compressed
cache) and `convert` (a GGUF file to a HF directory)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

import prism_jax as pj
from prism_jax import generation
from prism_jax.checkpoints import atomic, hf
from prism_jax.cli import planning, printing
from prism_jax.cli.parser import plan_of, plan_summary
from prism_jax.errors import PrismError


def run_generate(args) -> dict:
    plan = plan_of(args)
    model = pj.load_pretrained(args.model)
    planning.auto(args, model)  # --plan auto: the planner's devices and plan
    plan = plan_of(args, cfg=model.config)  # `--compressor prism+` is the model's best
    tok = model.tokenizer
    if tok is None:
        raise PrismError(f"{args.model} has no tokenizer to read the prompt with")
    texts = [tok.chat(t) if args.chat else t for t in args.prompt]
    rows = [tok.encode_plain(t) for t in texts]
    empty = [i for i, r in enumerate(rows, 1) if not r]
    if empty:
        rendered = " (as the chat template renders it)" if args.chat else ""
        raise PrismError(f"prompt {empty[0]} is empty{rendered}: there is no token to continue")
    t = max(len(r) for r in rows)
    batch = {
        "input_ids": np.zeros((len(rows), t), np.int32),
        "attention_mask": np.zeros((len(rows), t), np.int32),
    }
    for i, r in enumerate(rows):
        batch["input_ids"][i, : len(r)], batch["attention_mask"][i, : len(r)] = r, 1
    # one prompt streams as it decodes, in one process (a cluster's node 0 prints at the end)
    alone = jax.process_count() == 1
    stream = printing.TextStream(tok) if len(rows) == 1 and not args.json and alone else None
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, seed=args.seed)  # fmt: skip
    mesh = pj.edge_mesh(args.devices)
    run = generation.run(model, batch, mesh=mesh, plan=plan, on_token=stream, **kw)
    result = {
        "model": str(args.model),
        "devices": args.devices,
        "plan": plan_summary(plan, model.config),
        "prompts": texts,
        "prompt_tokens": [len(r) for r in rows],
        "texts": [tok.decode(ids) for ids in run.ids],
        "ids": run.ids.tolist(),
        "new_tokens": run.steps,
        "prefill_seconds": run.prefill_seconds,
        "decode_tokens_per_second": run.tokens_per_second,
        "prefill_bytes_per_device": run.prefill_bytes,
        "cache_bytes": run.cache_bytes,
        "exact_cache_bytes": run.exact_cache_bytes,
        "streamed": stream is not None,
    }
    if args.compare:
        exact = generation.run(model, batch, **kw).ids
        result["compare"] = {
            "texts": [tok.decode(ids) for ids in exact],
            "token_agreement": float((exact == run.ids).mean()),
        }
    return result


def run_convert(args) -> dict:
    source = Path(args.source)
    if source.suffix != ".gguf":
        raise PrismError(f"{source} is not a .gguf file")
    if not source.is_file():
        raise PrismError(f"no GGUF file at {source}")
    out = atomic.check_target(
        args.out, replace=args.force, what="out", hint="--force", source=source
    )
    return hf.convert_gguf(source, out, replace=args.force)
