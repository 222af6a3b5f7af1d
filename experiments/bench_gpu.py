"""One accelerator: prism-jax against transformers on PyTorch, bf16, and prism on a 1-device mesh.

Command (a GPU host; JAX with CUDA, flax, torch and transformers installed):
          PYTHONPATH=. python3 experiments/bench_gpu.py           (under 5 minutes on one H100)
Smoke:    .venv/bin/python experiments/bench_gpu.py --smoke      (tiny models on the CPU; tests)

Random weights at the real shapes (the same weights on both sides: transformers builds the
model, saves it, prism-jax loads that checkpoint), cast to bfloat16: bert-base (batch 8,
T in {128, 512}, its limit) and SmolLM2-135M (batch 1, T in {1024, 4096}, logits at every
position). Per shape: `single` (the one-device program), `prism` on a 1-device mesh (the
shard_map path with nothing to exchange: its overhead) and PyTorch (`sdpa` attention).
Steady times are medians of `--repeats` calls after one untimed call (JAX's compile is
reported apart); ratios are jax / torch (< 1: JAX faster). The device is recorded beside the
numbers. A shape whose start would pass `--budget-s` is skipped and listed, so that one call
ends in time. Writes experiments/results/bench_gpu.{json,md}.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import common
import numpy as np


@dataclasses.dataclass
class Config:
    smoke: bool = common.setting(False, "tiny models, T = 32, on whatever device there is")
    repeats: int = common.setting(10, "timed calls per shape")
    budget_s: float = common.setting(240.0, "skip shapes that would start after this")
    out: str | None = common.output(None, "results folder")


def _models(smoke: bool):
    """(name, transformers config, batch, lengths) of each benchmarked model."""
    from transformers import BertConfig, LlamaConfig

    if smoke:
        bert = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, vocab_size=1000)  # fmt: skip
        llama = LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                            num_key_value_heads=2, intermediate_size=96, vocab_size=1000,
                            max_position_embeddings=128, tie_word_embeddings=True)  # fmt: skip
        return [("bert (tiny)", bert, 2, [32]), ("llama (tiny)", llama, 1, [32])]
    smollm2 = LlamaConfig(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=1e5, tie_word_embeddings=True,
    )  # fmt: skip
    return [("bert-base", BertConfig(), 8, [128, 512]), ("SmolLM2-135M", smollm2, 1, [1024, 4096])]


def _pair(hf_config, directory, device):
    """(prism-jax model in bf16, transformers model in bf16 on `device`), same weights."""
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import BertModel, LlamaForCausalLM

    import prism_jax as pj

    torch.manual_seed(0)
    cls = LlamaForCausalLM if hf_config.model_type == "llama" else BertModel
    reference = cls(hf_config).eval()  # transformers' default attention: sdpa
    reference.save_pretrained(directory)
    model = pj.load_pretrained(directory)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params)
    model = dataclasses.replace(model, params=params)
    return model, reference.to(device=device, dtype=torch.bfloat16)


def _time_shape(model, reference, batch: int, t: int, mesh, repeats: int) -> dict:
    """PyTorch, `single` and prism on the 1-device `mesh`, at one (batch, T)."""
    import jax
    import torch

    import prism_jax as pj
    from prism_jax.evaluation.timing import timed
    from prism_jax.partition import place, program, shard_inputs

    device = next(reference.parameters()).device
    jax_device = mesh.devices.flat[0]
    single = program(model.graphdef, model.config, pj.Plan(strategy="single"), None)
    prism = program(model.graphdef, model.config, pj.Plan(cr=1), mesh)
    params = jax.device_put(model.params, jax_device)
    ids = np.random.default_rng(t).integers(100, 900, (batch, t)).astype(np.int32)
    hf = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    inputs, valid = model.prepare(hf)
    args = jax.device_put((inputs, valid), jax_device)
    sharded = shard_inputs(inputs, valid, mesh)
    tensors = {k: torch.tensor(v, device=device).long() for k, v in hf.items()}

    def call_torch():
        with torch.inference_mode():
            reference(**tensors)
        if device.type == "cuda":
            torch.cuda.synchronize()

    _, torch_s = timed(call_torch, repeats=repeats)
    single_first, single_s = timed(
        lambda: jax.block_until_ready(single(params, *args)), repeats=repeats
    )
    prism_first, prism_s = timed(
        lambda: jax.block_until_ready(prism(place(model, mesh), *sharded)), repeats=repeats
    )
    return {"torch_s": torch_s, "single_s": single_s, "single_first_call_s": single_first,
            "prism_1_device_s": prism_s, "prism_first_call_s": prism_first,
            "single_over_torch": single_s / torch_s,
            "prism_over_single": prism_s / single_s}  # fmt: skip


def run(cfg: Config) -> tuple[list[dict], list[str], str]:
    import jax
    import torch

    import prism_jax as pj

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    jax_device = jax.devices()[0]
    start, rows, skipped = time.perf_counter(), [], []
    for label, hf_config, batch, lengths in _models(cfg.smoke):
        with tempfile.TemporaryDirectory() as tmp:
            model, reference = _pair(hf_config, tmp, device)
        mesh = pj.edge_mesh(1)  # the default backend's first device: the GPU when there is one
        for t in lengths:
            if time.perf_counter() - start > cfg.budget_s:
                skipped.append(f"{label} T={t}")
                continue
            rows.append({"model": label, "batch": batch, "tokens": t,
                         **_time_shape(model, reference, batch, t, mesh, cfg.repeats)})  # fmt: skip
            print(rows[-1], flush=True)
    return rows, skipped, f"{name} (torch {device}, JAX {jax_device.platform})"


def markdown(rows, skipped, device) -> str:
    lines = [
        f"Device: {device}; bfloat16, random weights at the real shapes.",
        "",
        "| model | B x T | PyTorch (s) | JAX single (s) | JAX / PyTorch | prism N=1 (s) "
        "| prism / single | JAX first call (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['batch']} x {r['tokens']} | {r['torch_s']:.4f} | "
        f"{r['single_s']:.4f} | {r['single_over_torch']:.2f} | {r['prism_1_device_s']:.4f} | "
        f"{r['prism_over_single']:.2f} | {r['single_first_call_s']:.1f} |"
        for r in rows
    ]
    lines += [f"\nSkipped (time budget): {', '.join(skipped)}"] if skipped else []
    return "\n".join(lines) + "\n"


def main(argv=None):
    cfg = common.parse(Config, __doc__, argv, devices=None)
    rows, skipped, device = run(cfg if not cfg.smoke else dataclasses.replace(cfg, repeats=1))
    text = markdown(rows, skipped, device)
    print(text)
    common.save(cfg, "bench_gpu", {"device": device, "rows": rows, "skipped": skipped}, text)


if __name__ == "__main__":
    common.run_script(main)
