"""The attention core: masked softmax over keys with grouped KV heads, four ways.

All four compute the same function (tested against `jax.nn.dot_product_attention`):

- `dense`: logits `[B, H, L, M]` at once, softmax in float32, normalised after the value
  product. Fastest for short key rows.
- `tiled`: the same, one (batch row, KV head) tile at a time (one flat `lax.map`), so that a
  tile's logits stay in the CPU's caches. On this project's 2-core CPU it beats `dense` from
  about 128 keys on (`experiments/profile_attention.py`): there the passes over
  `[B, H, L, M]` (mask, maximum, exponential, sum), bound by memory bandwidth, cost more than
  the products. Its gradient is its own (a custom VJP, tile by tile from each row's
  log-sum-exp), not JAX's differentiation of the map, which keeps every tile's probabilities
  (`experiments/bench_train_attention.py` times training through each).
- `blocked`: an online softmax over key blocks (`lax.scan`), never holding more than
  `[B, H, L, block]` logits: a running maximum, a running sum and a running output per query
  row, rescaled when a block raises the maximum; masks and the log-count bias are cut into
  the same blocks. Memory O(block) instead of O(M); measured, not faster than `tiled` here,
  so `attend` does not pick it.
- `fused`: `jax.nn.dot_product_attention` with `implementation=None`, the choice left to
  JAX (in JAX 0.10 that is still its XLA path; cuDNN once JAX selects it by itself).

`attend` chooses: on a GPU `fused` (`dense` for values wider than the keys, which
`jax.nn.dot_product_attention` does not take); on the CPU `tiled` from `TILED_FROM` keys on,
else `dense`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

TILED_FROM = 128  # key rows from which `attend` computes tile by tile on the CPU
BLOCK = 256  # default key rows per block of `blocked`


def attend(q, keys, values, mask, bias=None, *, loops: bool = True) -> jax.Array:
    """Masked softmax attention: `q` `[B, L, H, K]` against `keys` `[B, M, G, K]` and `values`
    `[B, M, G, Kv]` (query head h reads KV head h // (H / G); Kv is K but where a caller
    carries extra columns through the same weights, as prism+'s tilt does), `mask`
    `[B, 1, L|1, M]` (padding, empty groups, the partition-aware causal rule), `bias`
    `[B, 1, 1, M]` float32 (log counts) or None. A row that sees no key gives zeros. Returns
    `[B, L, H, Kv]` in `q`'s dtype. `loops=False` keeps to `dense` on the CPU (a straight-line
    program for XLA's cost analysis, which counts a loop body once)."""
    if jax.default_backend() == "gpu":  # `fused` takes values only as wide as the keys
        wide = values.shape[-1] != q.shape[-1]
        return (dense if wide else fused)(q, keys, values, mask, bias)
    if loops and keys.shape[1] >= TILED_FROM:
        return tiled(q, keys, values, mask, bias)
    return dense(q, keys, values, mask, bias)


def dense(q, keys, values, mask, bias=None) -> jax.Array:
    """`attend` with every logit at once: float32 logits with the mask applied once, and the
    normalisation divided out of the `[B, L, H, K]` output instead of the `[B, H, L, M]`
    probabilities (cheaper on the CPU than `jax.nn.dot_product_attention`)."""
    b, l, h, _ = q.shape
    qg = _grouped_queries(q, keys.shape[2])
    logits = _logits(qg, keys, mask, bias)  # [B, G, R, L, M]
    top = logits.max(-1)
    weights = jnp.exp(logits - _finite(top)[..., None])
    out = jnp.einsum("bgrlm,bmgk->blgrk", weights, values, preferred_element_type=jnp.float32)
    return _normalised(out, weights.sum(-1)).reshape(b, l, h, -1).astype(q.dtype)


def blocked(q, keys, values, mask, bias=None, *, block: int = BLOCK) -> jax.Array:
    """`attend` as an online softmax over key blocks of `block` rows (the last one padded with
    masked keys): peak memory `[B, H, L, block]` instead of `[B, H, L, M]`."""
    b, l, h, _ = q.shape
    m, g = keys.shape[1], keys.shape[2]
    count = -(-m // block)
    pad = count * block - m
    keys, values = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (keys, values))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, pad)))
    bias = jnp.zeros((b, 1, 1, m), jnp.float32) if bias is None else bias
    bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, pad)))

    def blocks(x, axis):  # cut `axis` into [count, block] and bring `count` to the front
        x = x.reshape(*x.shape[:axis], count, block, *x.shape[axis + 1 :])
        return jnp.moveaxis(x, axis, 0)

    qg = _grouped_queries(q, g)

    def first(kb, vb, mb, bb):  # the first block: its maximum, sum and output start the run
        logits = _logits(qg, kb, mb, bb)  # [B, G, R, L, block]
        top = logits.max(-1)
        weights = jnp.exp(logits - _finite(top)[..., None])
        out = jnp.einsum("bgrlm,bmgk->blgrk", weights, vb, preferred_element_type=jnp.float32)
        return top, weights.sum(-1), out

    def step(carry, xs):  # one more block: rescale what was summed when the maximum rises
        top, total, out = carry  # [B, G, R, L], [B, G, R, L], [B, L, G, R, K]
        block_top, block_total, block_out = first(*xs)
        new_top = jnp.maximum(top, block_top)
        shift = _finite(new_top)
        old, new = jnp.exp(top - shift), jnp.exp(block_top - shift)  # 0 where nothing seen
        total = total * old + block_total * new
        out = out * _per_row(old) + block_out * _per_row(new)
        return (new_top, total, out), None

    xs = (blocks(keys, 1), blocks(values, 1), blocks(mask, 3), blocks(bias, 3))
    start = first(*(x[0] for x in xs))  # from the inputs, so it varies over a mesh axis as they do
    (_, total, out), _ = lax.scan(step, start, tuple(x[1:] for x in xs))
    return _normalised(out, total).reshape(b, l, h, -1).astype(q.dtype)


def tiled(q, keys, values, mask, bias=None) -> jax.Array:
    """`attend` one (batch row, KV head) tile at a time, in one flat `lax.map` over the B·G
    tiles: a tile's logits `[R·L, M]` stay in the CPU's caches through the mask, maximum,
    exponential and sum, where `dense` streams `[B, H, L, M]` through memory for each of those
    passes. Each tile is two plain matrix products (its R query heads stacked as rows).

    Differentiated tile by tile too (`_tiles`' VJP): the forward keeps each row's log-sum-exp
    and the backward recomputes a tile's probabilities from it, so neither pass stores the
    `[B, H, L, M]` probabilities that autodiff through the map would stack."""
    b, l, h, k = q.shape
    m, g = keys.shape[1], keys.shape[2]
    r = h // g
    rows = _grouped_queries(q, g).transpose(0, 2, 3, 1, 4).reshape(b * g, r * l, k)
    keys, values = (x.transpose(0, 2, 1, 3).reshape(b * g, m, -1) for x in (keys, values))
    bias = jnp.zeros((b, 1, 1, m), jnp.float32) if bias is None else bias
    out = _tiles(rows, keys, values, mask, bias)  # [B·G, R·L, Kv] float32
    out = out.reshape(b, g, r, l, -1).transpose(0, 3, 1, 2, 4)  # [B, L, G, R, Kv]
    return out.reshape(b, l, h, -1).astype(q.dtype)


def _tile_logits(q_tile, k_tile, row_mask, row_bias) -> jax.Array:
    """One tile's `[R·L, M]` float32 logits: the bias added, masked keys at -inf (`row_mask`
    `[1, L|1, M]` and `row_bias` `[1, 1, M]` broadcast over the R heads of the tile)."""
    n, m = q_tile.shape[0], k_tile.shape[0]
    heads = n // row_mask.shape[1]  # R, or R·L where one mask row holds for every query row
    logits = jnp.einsum("nk,mk->nm", q_tile, k_tile, preferred_element_type=jnp.float32)
    logits = jnp.where(row_mask, logits.reshape(heads, -1, m) + row_bias, -jnp.inf)
    return logits.reshape(n, m)


def _tile_forward(rows, keys, values, mask, bias):
    """`_tiles`' value and each row's log-sum-exp `[B·G, R·L]` (+inf for a row that sees no
    key, so that its recomputed probabilities are 0)."""
    g = rows.shape[0] // mask.shape[0]

    def tile(xs):  # [R·L, K] queries, [M, K] keys and values of tile i = (batch row, KV head)
        q_tile, k_tile, v_tile, i = xs
        row_mask, row_bias = _batch_row(i // g, mask, bias)
        logits = _tile_logits(q_tile, k_tile, row_mask, row_bias)
        top = _finite(logits.max(-1))
        weights = jnp.exp(logits - top[:, None])
        out = jnp.einsum("nm,mk->nk", weights, v_tile, preferred_element_type=jnp.float32)
        total = weights.sum(-1)
        seen = total > 0
        out = out / jnp.where(seen, total, 1)[:, None]
        return out, jnp.where(seen, top + jnp.log(jnp.where(seen, total, 1)), jnp.inf)

    return lax.map(tile, (rows, keys, values, jnp.arange(rows.shape[0])))


def _batch_row(index, *xs) -> tuple[jax.Array, ...]:
    """Row `index` of each of `xs` (the batch axis dropped)."""
    return tuple(lax.dynamic_index_in_dim(x, index, keepdims=False) for x in xs)


@jax.custom_vjp
def _tiles(rows, keys, values, mask, bias) -> jax.Array:
    """Softmax attention per tile: `rows` `[B·G, R·L, K]` (scaled queries), `keys` `[B·G, M,
    K]`, `values` `[B·G, M, Kv]`, `mask` `[B, 1, L|1, M]`, `bias` `[B, 1, 1, M]`; returns
    `[B·G, R·L, Kv]` float32."""
    return _tile_forward(rows, keys, values, mask, bias)[0]


def _tiles_fwd(rows, keys, values, mask, bias):
    out, lse = _tile_forward(rows, keys, values, mask, bias)
    return out, (rows, keys, values, mask, bias, out, lse)


def _tiles_bwd(saved, d_out):
    """The softmax backward per tile, with P = exp(logits - lse) recomputed:
    dV = Pᵀ dO, dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O)), dQ = dS K, dK = dSᵀ Q, d bias = Σ rows dS
    (summed over the G tiles of a batch row). The mask has no cotangent."""
    rows, keys, values, mask, bias, out, lse = saved
    b, g = mask.shape[0], rows.shape[0] // mask.shape[0]
    delta = (d_out * out).sum(-1)  # [B·G, R·L]

    def tile(xs):
        q_tile, k_tile, v_tile, do_tile, delta_tile, lse_tile, i = xs
        row_mask, row_bias = _batch_row(i // g, mask, bias)
        logits = _tile_logits(q_tile, k_tile, row_mask, row_bias)
        p = jnp.exp(logits - lse_tile[:, None])  # [R·L, M]
        f32 = jnp.float32
        dv = jnp.einsum("nm,nk->mk", p, do_tile, preferred_element_type=f32)
        dp = jnp.einsum("nk,mk->nm", do_tile, v_tile.astype(f32), preferred_element_type=f32)
        ds = p * (dp - delta_tile[:, None])
        dq = jnp.einsum("nm,mk->nk", ds, k_tile.astype(f32), preferred_element_type=f32)
        dk = jnp.einsum("nm,nk->mk", ds, q_tile.astype(f32), preferred_element_type=f32)
        return dq.astype(q_tile.dtype), dk.astype(k_tile.dtype), dv.astype(v_tile.dtype), ds.sum(0)

    xs = (rows, keys, values, d_out, delta, lse, jnp.arange(rows.shape[0]))
    dq, dk, dv, d_bias = lax.map(tile, xs)
    d_bias = d_bias.reshape(b, g, -1).sum(1)[:, None, None, :].astype(bias.dtype)
    return dq, dk, dv, None, d_bias


_tiles.defvjp(_tiles_fwd, _tiles_bwd)


def fused(q, keys, values, mask, bias=None) -> jax.Array:
    """`attend` through `jax.nn.dot_product_attention` with the implementation left to JAX
    (`None`), KV heads repeated for grouped queries, rows that see nothing set to zero."""
    g = keys.shape[2]
    expand = q.shape[2] // g  # query heads per KV head
    out = jax.nn.dot_product_attention(
        q,
        keys if expand == 1 else jnp.repeat(keys, expand, axis=2),
        values if expand == 1 else jnp.repeat(values, expand, axis=2),
        bias=None if bias is None else bias.astype(q.dtype),
        mask=mask,
        implementation=None,
    )
    sees = mask.any(-1)[:, 0, :, None, None]  # [B, L|1, 1, 1]
    return jnp.where(sees, out, 0).astype(q.dtype)


def _grouped_queries(q: jax.Array, g: int) -> jax.Array:
    """`[B, L, G, R, K]` queries scaled by 1/sqrt(K), R = H / G query heads per KV head."""
    b, l, h, k = q.shape
    return q.reshape(b, l, g, h // g, k) * jnp.asarray(1 / k**0.5, q.dtype)


def _logits(qg, keys, mask, bias) -> jax.Array:
    """`[B, G, R, L, M]` float32 logits, the bias added and masked keys at -inf."""
    logits = jnp.einsum("blgrk,bmgk->bgrlm", qg, keys, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias[:, :, None]  # [B, 1, 1, 1, M]
    return jnp.where(mask[:, :, None], logits, -jnp.inf)  # [B, 1, 1, L|1, M]


def _finite(top: jax.Array) -> jax.Array:
    """The running maximum with rows that saw nothing (-inf) shifted by 0 instead."""
    return jnp.where(jnp.isfinite(top), top, 0)


def _per_row(x: jax.Array) -> jax.Array:
    """`[B, G, R, L]` -> `[B, L, G, R, 1]`, to scale outputs row by row."""
    return x.transpose(0, 3, 1, 2)[..., None]


def _normalised(out: jax.Array, total: jax.Array) -> jax.Array:
    """`out` `[B, L, G, R, K]` divided by its softmax sum `[B, G, R, L]` (0 stays 0)."""
    return out / _per_row(jnp.where(total > 0, total, 1))
