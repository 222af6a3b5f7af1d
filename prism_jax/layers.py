"""Mlp, Attention and the one Block shared by BERT, GPT-2 and ViT (Flax NNX)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prism_jax import exchange
from prism_jax.configs import ACTIVATIONS, ModelConfig

_FUNCTIONS = {  # the functions behind `configs.ACTIVATIONS`' names
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def layer_norm(width: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=eps, rngs=rngs)


class Mlp(nnx.Module):
    """fc1 -> activation -> fc2, on local rows only."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(cfg.width, cfg.mlp_width, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.mlp_width, cfg.width, rngs=rngs)
        self.act = cfg.act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_FUNCTIONS[ACTIVATIONS[self.act]](self.fc1(x)))


class Attention(nnx.Module):
    """Multi-head attention, restructured for PRISM (DESIGN.md section 1, step 4).

    Queries come from the local tokens only. Keys and values come from what
    `exchange.keys_and_mask` returns: the local tokens (single), all tokens (voltage), or the
    local tokens followed by the other devices' segment means (prism). No device projects
    another device's individual tokens.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d = cfg.width
        self.q = nnx.Linear(d, d, use_bias=cfg.qkv_bias, rngs=rngs)
        self.k = nnx.Linear(d, d, use_bias=cfg.qkv_bias, rngs=rngs)
        self.v = nnx.Linear(d, d, use_bias=cfg.qkv_bias, rngs=rngs)
        self.o = nnx.Linear(d, d, rngs=rngs)
        self.heads = cfg.heads

    def __call__(self, a: jax.Array, ex: exchange.Exchange) -> jax.Array:
        b, l, d = a.shape
        h, k = self.heads, d // self.heads
        kv_in, mask, bias = exchange.keys_and_mask(a, ex)  # [B, M, D]
        m = kv_in.shape[1]
        q = self.q(a).reshape(b, l, h, k)
        keys = self.k(kv_in).reshape(b, m, h, k)
        values = self.v(kv_in).reshape(b, m, h, k)
        # One fused masked softmax: the boolean mask carries padding, empty segments and the
        # partition-aware causal rule; the additive bias carries log(count). The XLA path is
        # used on every backend so that CPU and accelerator runs compute the same thing.
        out = jax.nn.dot_product_attention(
            q, keys, values, bias=bias, mask=mask, implementation="xla"
        )  # [B, L, H, K]
        return self.o(out.reshape(b, l, d))


class Block(nnx.Module):
    """One Transformer layer: pre-LN (GPT-2, ViT) or post-LN (BERT), causal or not."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.ln1 = layer_norm(cfg.width, cfg.ln_eps, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln2 = layer_norm(cfg.width, cfg.ln_eps, rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        self.norm_first = cfg.norm_first

    def __call__(self, x: jax.Array, ex: exchange.Exchange) -> jax.Array:
        if self.norm_first:
            x = x + self.attn(self.ln1(x), ex)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, ex))
        return self.ln2(x + self.mlp(x))


class Encoder(nnx.Module):
    """The stack of Blocks, with the final LayerNorm of pre-LN models."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.ln_f = layer_norm(cfg.width, cfg.ln_eps, rngs) if cfg.norm_first else None

    def __call__(self, x: jax.Array, ex: exchange.Exchange) -> jax.Array:
        for block in self.blocks:
            x = block(x, ex)
        return self.ln_f(x) if self.ln_f is not None else x


def cls_layers(cfg: ModelConfig, rngs: nnx.Rngs) -> tuple[nnx.Linear | None, nnx.Linear | None]:
    """The (pooler, classifier) of BERT and ViT, each None when the config has none."""
    d = cfg.width
    pooler = nnx.Linear(d, d, rngs=rngs) if cfg.pooler else None
    head = nnx.Linear(d, cfg.num_labels, rngs=rngs) if cfg.head == "classifier" else None
    return pooler, head


def cls_outputs(x: jax.Array, pooler, head, *, classify_pooled: bool) -> dict[str, jax.Array]:
    """What BERT and ViT read from the CLS row `x[:, 0]` (device 0): `pooler_output` (tanh
    pooler) and `logits`, from the pooled row (BERT) or the CLS row itself (ViT)."""
    out = {}
    if pooler is not None:
        out["pooler_output"] = jnp.tanh(pooler(x[:, 0]))  # [B, D]
    if head is not None:
        out["logits"] = head(out["pooler_output"] if classify_pooled else x[:, 0])  # [B, C]
    return out


def embed_lookup(table: nnx.Embed, ids: jax.Array) -> jax.Array:
    """Row lookup that clamps out-of-range ids (padding positions past the table) to the
    last row instead of filling NaN: padded rows are masked, but NaN would leak through 0*NaN."""
    return jnp.take(table.embedding[...], ids, axis=0, mode="clip")
