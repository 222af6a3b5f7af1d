"""Mlp, Attention and the one Block shared by BERT, GPT-2, ViT and Llama (Flax NNX)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from prism_jax import exchange
from prism_jax.attention import attend
from prism_jax.configs import ACTIVATIONS, ModelConfig


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as PyTorch and HF define it, x/2 (1 + erf(x / sqrt 2)), written with erfc:
    x/2 erfc(-x / sqrt 2). The erf form rounds 1 + erf(x) near 1 and, with XLA:CPU's erf on
    some processors, is 2 ulp off for x around 5 (measured 9.9e-7 against 3.8e-7 here)."""
    return 0.5 * x * lax.erfc(-x * jnp.asarray(0.7071067811865476, x.dtype))


_FUNCTIONS = {  # the functions behind `configs.ACTIVATIONS`' names
    "gelu": gelu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def layer_norm(width: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=eps, rngs=rngs)


def norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.LayerNorm | nnx.RMSNorm:
    """The family's normalisation: LayerNorm, or RMSNorm (Llama)."""
    if cfg.rms_norm:
        return nnx.RMSNorm(cfg.width, epsilon=cfg.ln_eps, rngs=rngs)
    return layer_norm(cfg.width, cfg.ln_eps, rngs)


class Mlp(nnx.Module):
    """fc1 -> activation -> fc2 on local rows only; gated (SwiGLU, Llama):
    fc2(act(gate(x)) * fc1(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, bias = cfg.width, cfg.mlp_width, cfg.mlp_bias
        self.gate = nnx.Linear(d, f, use_bias=bias, rngs=rngs) if cfg.gated_mlp else None
        self.fc1 = nnx.Linear(d, f, use_bias=bias, rngs=rngs)
        self.fc2 = nnx.Linear(f, d, use_bias=bias, rngs=rngs)
        self.act = cfg.act

    def __call__(self, x: jax.Array) -> jax.Array:
        act = _FUNCTIONS[ACTIVATIONS[self.act]]
        if self.gate is not None:
            return self.fc2(act(self.gate(x)) * self.fc1(x))
        return self.fc2(act(self.fc1(x)))


def rotate(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding in HF's rotate-half convention.

    Args:
      x: `[B, L, H, K]` queries or keys.
      positions: `[B|1, L]` global positions of the rows.
      theta: the rotary base (`rope_theta`).
    """
    angles = positions.astype(jnp.float32)[..., None] * _frequencies(x.shape[-1], theta)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B|1, L, 1, K]
    x32 = x.astype(jnp.float32)
    return (x32 * jnp.cos(angles) + _rotate_half(x32) * jnp.sin(angles)).astype(x.dtype)


def _frequencies(k: int, theta: float) -> jax.Array:
    """`[K/2]` rotary angular frequencies theta^(-2i/K)."""
    return 1.0 / theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k)


def _rotate_half(x: jax.Array) -> jax.Array:
    """HF's rotate_half: (x1, x2) -> (-x2, x1) over the two halves of the last axis."""
    k = x.shape[-1]
    return jnp.concatenate([-x[..., k // 2 :], x[..., : k // 2]], axis=-1)


def mean_rotation(centre: jax.Array, variance: jax.Array, k: int, theta: float):
    """(cos, sin) `[..., K]` of the expected rotation E[R(p)] over a group whose positions
    have mean `centre` and variance `variance` `[...]` (Gaussian: each frequency w damped by
    exp(-w^2 var / 2)); E[R]^T q = cos * q - sin * rotate_half(q) (the value tilt for rotary
    keys, derived in `compress`)."""
    w = _frequencies(k, theta)
    angles = centre[..., None] * w
    damp = jnp.exp(-0.5 * variance[..., None] * w**2)
    cos, sin = jnp.cos(angles) * damp, jnp.sin(angles) * damp
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


class KVCache(NamedTuple):
    """One layer's decode cache (DESIGN.md section 1a): the keys and values the last prefill
    query saw (on the device that owns the end of the sequence: `[own K/V | remote K/V
    means]`), then room for the generated tokens' own.

    Attributes:
      keys, values: `[B, C, H_kv, K]`.
      mask: `[B, C]` bool, which slots a new query sees (empty groups, padding and unwritten
        slots do not).
      bias: `[B, C]` float32 logit bias (log count of a remote mean, else 0).
      stats: `[B, C, 1 | 3]` float32 value-tilt statistics of each slot (zero but for remote
        means; `compress.group_means`), or None without the tilt.
      tilt: `[G, K, K]` float32 matrices M_h of the value tilt (this layer's weights, computed
        once in the prefill, not at every decoded token), or None without the tilt.
    """

    keys: jax.Array
    values: jax.Array
    mask: jax.Array
    bias: jax.Array
    stats: jax.Array | None = None
    tilt: jax.Array | None = None

    def grown(self, extra: int) -> KVCache:
        """Room for `extra` more slots at the end (not yet visible)."""

        def grow(x):
            return jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2))

        slotted = ("keys", "values", "mask", "bias", "stats")
        return self._replace(
            **{f: grow(getattr(self, f)) for f in slotted if getattr(self, f) is not None}
        )


class Mode(NamedTuple):
    """How a forward pass is traced (static): `unrolled` runs the layers as a Python loop with
    dense attention, for XLA's cost analysis, which counts a loop body once (`cost`);
    `keep_cache` keeps what each layer's last query saw, the decode cache (a prefill for
    generation)."""

    unrolled: bool = False
    keep_cache: bool = False


PLAIN = Mode()  # an inference pass


class Attention(nnx.Module):
    """Multi-head (or grouped-query) attention, restructured for PRISM (DESIGN.md section 1,
    step 4; section 1a for K/V exchange and rotary keys).

    Queries come from the local tokens only; keys and values are [local tokens | what
    `exchange.share` returns for the other devices]: nothing (single), their tokens (voltage)
    or their group means (prism). With `exchange="hidden"` what travels is attention inputs,
    projected here when they arrive; with `"kv"` it is keys (rotated at their own positions,
    where the tokens live) and values. No device projects another device's individual tokens.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, g, k = cfg.width, cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q = nnx.Linear(d, h * k, use_bias=cfg.qkv_bias, rngs=rngs)
        self.k = nnx.Linear(d, g * k, use_bias=cfg.qkv_bias, rngs=rngs)
        self.v = nnx.Linear(d, g * k, use_bias=cfg.qkv_bias, rngs=rngs)
        self.o = nnx.Linear(h * k, d, use_bias=cfg.out_bias, rngs=rngs)
        self.heads, self.kv_heads, self.head_dim = h, g, k
        self.rope_theta = cfg.rope_theta

    def __call__(
        self, a: jax.Array, ex: exchange.Exchange, local: exchange.Local, mode: Mode = PLAIN
    ) -> tuple[jax.Array, KVCache | None]:
        """`[B, L, D]` attention output of the local rows, and (`mode.keep_cache`, a prefill
        for generation) the `KVCache` of what the last query row saw, else None."""
        b, l, _ = a.shape
        h, g, k = self.heads, self.kv_heads, self.head_dim
        q = self.q(a).reshape(b, l, h, k)
        if self.rope_theta is not None:
            q = rotate(q, local.positions, self.rope_theta)
        keys, values, remote = self._keys_values(a, ex, local)  # [B, L + M, G*K] each
        m = keys.shape[1]
        keys, values = keys.reshape(b, m, g, k), values.reshape(b, m, g, k)
        mask, bias, stats = remote.mask, remote.bias, remote.stats
        loops = not mode.unrolled
        tilt = None if stats is None else self._tilt_matrices()
        if stats is not None:
            out = self._tilted(q, keys, values, mask, bias, stats, tilt, loops=loops)
        else:
            out = attend(q, keys, values, mask, bias, loops=loops)  # [B, L, H, K]
        cache = None
        if mode.keep_cache:  # generation: what the last query row saw becomes the decode cache
            seen = jnp.zeros((b, m), jnp.float32) if bias is None else bias[:, 0, 0]
            cache = KVCache(keys, values, mask[:, 0, -1], seen, stats, tilt)
        return self.o(out.reshape(b, l, h * k)), cache

    def _keys_values(self, a: jax.Array, ex: exchange.Exchange, local: exchange.Local):
        """Keys and values `[B, L + M, G*K]` of [local tokens | remote rows], and the
        `exchange.Remote` they came with."""
        rotary = self.rope_theta is not None
        keys = self._keys(a, local.positions)
        values = self.v(a)
        hidden = ex.plan.exchange == "hidden"
        sent = a if hidden else jnp.concatenate([keys, values], axis=-1)  # [B, L, W]
        remote = exchange.share(
            ex, local, sent, keys=keys, inputs=a, positions=local.positions if rotary else None,
            vectors=1 if hidden else 2 * self.kv_heads,
        )  # fmt: skip
        # Remote means are projected when they arrive (hidden exchange); the local rows' keys
        # and values did not wait for them (the runtime may compute them while means travel).
        if hidden:
            far_keys, far_values = self.k(remote.rows), self.v(remote.rows)
        else:
            far_keys, far_values = jnp.split(remote.rows, 2, axis=-1)
        keys = jnp.concatenate([keys, far_keys.astype(keys.dtype)], axis=1)
        values = jnp.concatenate([values, far_values.astype(values.dtype)], axis=1)
        return keys, values, remote

    def _tilt_matrices(self) -> jax.Array:
        """`[G, K, K]` float32 M_h = W_k^(h)T W_v^(h) of each KV head, from this device's own
        weights (DESIGN.md section 1b.4)."""
        g, k = self.kv_heads, self.head_dim
        wk = self.k.kernel[...].reshape(-1, g, k)  # [D, G, K]
        wv = self.v.kernel[...].reshape(-1, g, k)
        return jnp.einsum("dgk,dgj->gkj", wk, wv).astype(jnp.float32)

    def _tilted(self, q, keys, values, mask, bias, stats, m_h, *, loops=True) -> jax.Array:
        """Masked softmax attention plus the first-order value tilt of DESIGN.md section 1b.4:
        each head's output gains (sum over remote rows m of p_m * s2_m) * q~_h M_h, with
        q~_h = q_h / sqrt(K) and `m_h` the `_tilt_matrices`. With
        rotary keys (derived in `compress`'s docstring) each row's term first turns the query
        back by the group's expected rotation: sum_m p_m s2_m (E_m[R]^T q~_h) M_h.

        The sums over m weigh each row by the same p_m as its value, so they ride through
        `attend` as extra value columns (s2_m; rotary: s2_m E_m[cos], s2_m E_m[sin]): one
        softmax, on whichever core `attend` picks, all in float32."""
        b, l, h, k = q.shape
        m, g = keys.shape[1], keys.shape[2]
        f32 = jnp.float32
        s2 = stats[..., :1].astype(f32)  # [B, M, 1]
        carried = s2  # the columns the tilt's sums need, J of them
        if self.rope_theta is not None:
            cos, sin = mean_rotation(stats[..., 1], stats[..., 2], k, self.rope_theta)
            carried = jnp.concatenate([s2 * cos, s2 * sin], axis=-1)  # [B, M, 2K]
        carried = jnp.broadcast_to(carried[:, :, None], (b, m, g, carried.shape[-1]))
        wide = jnp.concatenate([values.astype(f32), carried], axis=-1)  # [B, M, G, K + J]
        both = attend(q.astype(f32), keys.astype(f32), wide, mask, bias, loops=loops)
        out, weighted = both[..., :k], both[..., k:]  # [B, L, H, K], [B, L, H, J]
        qg = q.astype(f32) / jnp.sqrt(f32(k))
        if self.rope_theta is None:
            turned = weighted * qg
        else:
            c, s = jnp.split(weighted, 2, axis=-1)
            turned = c * qg - s * _rotate_half(qg)
        r = h // g  # query heads per KV head
        turned = turned.reshape(b, l, g, r, k)
        out = out + jnp.einsum("blgrk,gkj->blgrj", turned, m_h).reshape(b, l, h, k)
        return out.astype(q.dtype)

    def decode(self, a: jax.Array, cache: KVCache, index: jax.Array, positions: jax.Array):
        """One new token per row: `a` `[B, 1, D]` at `positions` `[B]`; its key and value are
        written into cache slot `index`, and it attends to every visible slot. No collective:
        the cache already holds what the other devices sent during the prefill."""
        b = a.shape[0]
        h, g, k = self.heads, self.kv_heads, self.head_dim
        q = self.q(a).reshape(b, 1, h, k)
        new_k, new_v = self.k(a).reshape(b, 1, g, k), self.v(a).reshape(b, 1, g, k)
        if self.rope_theta is not None:
            q = rotate(q, positions[:, None], self.rope_theta)
            new_k = rotate(new_k, positions[:, None], self.rope_theta)
        keys = lax.dynamic_update_slice(
            cache.keys, new_k.astype(cache.keys.dtype), (0, index, 0, 0)
        )
        values = lax.dynamic_update_slice(
            cache.values, new_v.astype(cache.values.dtype), (0, index, 0, 0)
        )
        mask = lax.dynamic_update_slice(cache.mask, jnp.ones((b, 1), bool), (0, index))
        visible, bias = mask[:, None, None, :], cache.bias[:, None, None, :]
        if cache.stats is None:
            out = attend(q, keys, values, visible, bias)
        else:  # the remote means keep their tilt; own and generated slots have none (exact)
            out = self._tilted(q, keys, values, visible, bias, cache.stats, cache.tilt)
        return self.o(out.reshape(b, 1, h * k)), cache._replace(keys=keys, values=values, mask=mask)

    def _keys(self, a: jax.Array, positions: jax.Array) -> jax.Array:
        """`[B, L, G*K]` keys of the local tokens, rotated at their `positions` (rotary)."""
        b, l, _ = a.shape
        keys = self.k(a)
        if self.rope_theta is None:
            return keys
        keys = keys.reshape(b, l, self.kv_heads, self.head_dim)
        return rotate(keys, positions, self.rope_theta).reshape(b, l, -1)


class Block(nnx.Module):
    """One Transformer layer: pre-norm (GPT-2, ViT, Llama) or post-LN (BERT), causal or not."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.ln1 = norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln2 = norm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        self.norm_first = cfg.norm_first

    def __call__(self, x: jax.Array, ex: exchange.Exchange, local: exchange.Local, mode: Mode):
        """The layer's output rows, and its decode cache (None unless `mode.keep_cache`)."""
        if self.norm_first:
            h, cache = self.attn(self.ln1(x), ex, local, mode)
            x = x + h
            return x + self.mlp(self.ln2(x)), cache
        h, cache = self.attn(x, ex, local, mode)
        x = self.ln1(x + h)
        return self.ln2(x + self.mlp(x)), cache

    def decode(self, x: jax.Array, cache: KVCache, index: jax.Array, positions: jax.Array):
        """One new token per row through a pre-norm causal layer (generation)."""
        h, cache = self.attn.decode(self.ln1(x), cache, index, positions)
        x = x + h
        return x + self.mlp(self.ln2(x)), cache


class Encoder(nnx.Module):
    """The stack of Blocks and the final norm of pre-norm models.

    The Blocks' parameters are stacked on a leading layer axis (`blocks.attn.q.kernel` is
    `[depth, D, H*K]`) and the layers run as one `lax.scan`, so a model compiles one layer
    whatever its depth. `Mode.unrolled` unrolls the scan instead (XLA's cost analysis counts
    a loop body once: `cost` measures FLOPs on the unrolled program)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs)

        self.blocks = stacked(rngs)
        self.depth = cfg.depth
        self.ln_f = norm(cfg, rngs) if cfg.norm_first else None

    def __call__(
        self, x: jax.Array, ex: exchange.Exchange, local: exchange.Local, mode: Mode = PLAIN
    ) -> jax.Array:
        graphdef, params = nnx.split(self.blocks)

        def layer(x, layer_params):
            return nnx.merge(graphdef, layer_params)(x, ex, local, mode)

        x, caches = _layers(layer, x, params, self.depth, unrolled=mode.unrolled)
        if mode.keep_cache:  # a prefill for generation: every layer's cache, stacked
            self.sow(nnx.Intermediate, "caches", caches)
        return self.ln_f(x) if self.ln_f is not None else x

    def decode(self, x: jax.Array, caches: KVCache, index, positions):
        """`x` `[B, 1, D]` of one new token per row and the stacked caches (`[depth, ...]`
        each) -> (final hidden state, updated caches)."""
        graphdef, params = nnx.split(self.blocks)

        def layer(x, layer_params_and_cache):
            layer_params, cache = layer_params_and_cache
            return nnx.merge(graphdef, layer_params).decode(x, cache, index, positions)

        x, caches = _layers(layer, x, (params, caches), self.depth, unrolled=False)
        return self.ln_f(x), caches


def _layers(layer, x, stacked, depth: int, *, unrolled: bool):
    """`lax.scan(layer, x, stacked)`, or the same loop in Python (`unrolled`)."""
    if not unrolled:
        return lax.scan(layer, x, stacked)
    outs = []
    for i in range(depth):
        x, out = layer(x, jax.tree.map(lambda a, i=i: a[i], stacked))
        outs.append(out)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs[0] is not None else None


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
