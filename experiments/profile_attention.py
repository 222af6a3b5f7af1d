"""Where one encoder layer's time goes, part by part, JAX against PyTorch in the same run.

Command:  .venv/bin/python experiments/profile_attention.py          (about 3 minutes, 2 cores)
Smoke:    .venv/bin/python experiments/profile_attention.py --smoke  (seconds; run by the tests)

One bert-base layer (D = 768, 12 heads of 64, MLP 3072), batch 8, T in {128, 256, 512},
float32, random weights shared by both frameworks. Each part is its own compiled program
(JAX) or eager call (PyTorch, same threads), timed as the median of `--repeats` calls after
a warm-up:

- `qkv`, `out`, `mlp`, `norms`: the dense projections, the MLP and two layer norms;
- the attention core with a padding mask: `dense` and `blocked` (several block sizes) of
  `prism_jax.attention`, `jax.nn.dot_product_attention(implementation="xla")`, against
  torch's `scaled_dot_product_attention`;
- `layer`: the whole prism-jax Block against transformers' BertLayer.

For every JAX program it also prints XLA's own cost analysis (FLOPs, bytes accessed) and the
largest buffer it allocates (`memory_analysis`): where the attention core materialises
`[B, H, T, T]` logits, the temporaries show it. Writes
experiments/results/profile_attention.{json,md}.
"""

from __future__ import annotations

import dataclasses
import functools
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import common  # noqa: E402
import numpy as np  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int = 8
    lengths: tuple[int, ...] = (128, 256, 512)
    blocks: tuple[int, ...] = (64, 128, 256)
    width: int = 768
    heads: int = 12
    mlp: int = 3072
    repeats: int = 7


SMOKE = Config(batch=2, lengths=(16,), blocks=(8,), width=32, heads=4, mlp=64, repeats=1)


def _timed(fn, repeats: int) -> float:
    from prism_jax.evaluation.timing import timed

    return timed(fn, repeats=repeats)[1]


def _xla_costs(fn, *args) -> dict:
    """FLOPs, bytes accessed and temporary bytes XLA reports for `fn` compiled on `args`."""
    compiled = fn.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    return {
        "gflops": float(cost.get("flops", 0)) / 1e9,
        "mb_accessed": float(cost.get("bytes accessed", 0)) / 2**20,
        "temp_mb": getattr(memory, "temp_size_in_bytes", 0) / 2**20,
    }


def _parts(cfg: Config, t: int):
    """(part, jax callable, its args, torch callable) for one sequence length."""
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F
    from flax import nnx
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    from prism_jax import attention, configs, exchange, layers
    from prism_jax.plan import Plan

    b, d, h = cfg.batch, cfg.width, cfg.heads
    k = d // h
    rng = np.random.default_rng(t)
    x = rng.standard_normal((b, t, d)).astype(np.float32)
    valid = np.ones((b, t), bool)
    valid[b // 2 :, t - t // 4 :] = False  # half the rows padded by a quarter
    q, keys, values = (rng.standard_normal((b, t, h, k)).astype(np.float32) for _ in range(3))
    mask = jnp.asarray(valid[:, None, None, :])

    torch.manual_seed(0)
    hf_cfg = BertConfig(hidden_size=d, num_attention_heads=h, intermediate_size=cfg.mlp)
    hf_cfg._attn_implementation = "sdpa"
    hf_layer = BertLayer(hf_cfg).eval()
    ours = configs.BertConfig.from_hf_config(hf_cfg.to_dict(), head="base", pooler=False)
    single = Plan(strategy="single")
    block = layers.Block(ours, rngs=nnx.Rngs(0))
    _copy_layer(hf_layer, block)
    graphdef, params = nnx.split(block)

    def jax_layer(params, x, valid):
        ex = exchange.Exchange(single)
        local = exchange.local_view(ex, valid)
        return nnx.merge(graphdef, params)(x, ex, local, layers.Mode())[0]  # (rows, no cache)

    def jit(fn):
        return jax.jit(fn)

    def lin(name):
        kernel = jnp.asarray(rng.standard_normal(name).astype(np.float32) * 0.02)
        return kernel, torch.tensor(np.asarray(kernel).T.copy())

    (wqkv, tqkv), (wo, to), (w1, t1), (w2, t2) = (
        lin((d, 3 * d)),
        lin((d, d)),
        lin((d, cfg.mlp)),
        lin((cfg.mlp, d)),
    )
    tx, tq, tk, tv = (torch.tensor(a) for a in (x, q, keys, values))
    tmask = torch.tensor(valid[:, None, None, :])
    ln = torch.nn.LayerNorm(d)

    yield "qkv", jit(lambda x, w: x @ w), (x, wqkv), lambda: F.linear(tx, tqkv)
    yield "out", jit(lambda x, w: x @ w), (x, wo), lambda: F.linear(tx, to)
    yield (
        "mlp",
        jit(lambda x, a, c: jax.nn.gelu(x @ a, approximate=False) @ c),
        (x, w1, w2),
        lambda: F.linear(F.gelu(F.linear(tx, t1)), t2),
    )
    yield (
        "norms",
        jit(lambda x: 2 * jax.nn.standardize(x, axis=-1)),
        (x,),
        lambda: ln(ln(tx)),
    )
    torch_core = functools.partial(
        F.scaled_dot_product_attention,
        tq.transpose(1, 2),
        tk.transpose(1, 2),
        tv.transpose(1, 2),
        attn_mask=tmask,
    )
    core_args = (q, keys, values, mask)
    yield "core: dense", jit(attention.dense), core_args, torch_core
    yield "core: tiled", jit(attention.tiled), core_args, torch_core
    for size in cfg.blocks:
        if size < t:
            blocked = functools.partial(attention.blocked, block=size)
            yield f"core: blocked {size}", jit(blocked), core_args, torch_core
    yield (
        "core: jax.nn.dot_product_attention",
        jit(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, implementation="xla")),
        core_args,
        torch_core,
    )
    ext = (1.0 - torch.tensor(valid, dtype=torch.float32))[:, None, None, :] * -1e9
    with torch.inference_mode():  # the two layers compute the same function on valid rows
        want = hf_layer(tx, attention_mask=ext)
    want = (want[0] if isinstance(want, tuple) else want).numpy()
    got = np.asarray(jax.jit(jax_layer)(params, x, jnp.asarray(valid)))
    np.testing.assert_allclose(got[valid], want[valid], atol=2e-4, rtol=1e-4)
    yield (
        "layer",
        jit(jax_layer),
        (params, x, jnp.asarray(valid)),
        lambda: hf_layer(tx, attention_mask=ext),
    )


def _copy_layer(hf_layer, block) -> None:
    """Give our Block the weights of transformers' BertLayer (post-LN)."""
    import jax.numpy as jnp

    def linear(ours, theirs):
        ours.kernel[...] = jnp.asarray(theirs.weight.detach().numpy().T)
        ours.bias[...] = jnp.asarray(theirs.bias.detach().numpy())

    def norm(ours, theirs):
        ours.scale[...] = jnp.asarray(theirs.weight.detach().numpy())
        ours.bias[...] = jnp.asarray(theirs.bias.detach().numpy())

    attn = hf_layer.attention
    linear(block.attn.q, attn.self.query)
    linear(block.attn.k, attn.self.key)
    linear(block.attn.v, attn.self.value)
    linear(block.attn.o, attn.output.dense)
    norm(block.ln1, attn.output.LayerNorm)
    linear(block.mlp.fc1, hf_layer.intermediate.dense)
    linear(block.mlp.fc2, hf_layer.output.dense)
    norm(block.ln2, hf_layer.output.LayerNorm)


def run(cfg: Config) -> list[dict]:
    import jax
    import torch

    torch.set_num_threads(os.cpu_count())
    rows = []
    for t in cfg.lengths:
        for part, fn, args, torch_fn in _parts(cfg, t):
            ours = _timed(lambda fn=fn, args=args: jax.block_until_ready(fn(*args)), cfg.repeats)
            with torch.inference_mode():
                theirs = _timed(torch_fn, cfg.repeats)
            row = {"tokens": t, "part": part, "jax_ms": ours * 1e3, "torch_ms": theirs * 1e3}
            row.update(ratio=ours / theirs, **_xla_costs(fn, *args))
            rows.append(row)
            print(
                f"T={t:4d} {part:36s} jax {row['jax_ms']:8.2f} ms  torch {row['torch_ms']:8.2f} ms"
                f"  ratio {row['ratio']:.2f}  temp {row['temp_mb']:.0f} MB",
                flush=True,
            )
    return rows


def markdown(rows: list[dict], cfg: Config) -> str:
    lines = [
        f"# Where one bert-base layer's time goes (batch {cfg.batch}, float32, 2-core CPU)",
        "",
        "`.venv/bin/python experiments/profile_attention.py`",
        "",
        "Medians of one run; ratio = JAX / PyTorch (< 1: JAX faster); XLA's cost analysis per",
        "JAX program (temp: the largest scratch XLA allocates).",
        "",
        "| T | part | JAX (ms) | PyTorch (ms) | ratio | GFLOP | MB accessed | temp MB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['part']} | {r['jax_ms']:.2f} | {r['torch_ms']:.2f} | "
            f"{r['ratio']:.2f} | {r['gflops']:.2f} | {r['mb_accessed']:.0f} | {r['temp_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    common.timing_main(__doc__, Config(), SMOKE, run, markdown, "profile_attention", argv)


if __name__ == "__main__":
    common.run_script(main)
