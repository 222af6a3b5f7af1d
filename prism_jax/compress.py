"""What one device sends per layer: groups of its valid tokens and their means (DESIGN.md
section 1 step 2, the paper's segments; section 1b, content-aware groups). Pure jnp/lax.

Every function works on one device's local tokens, batched: `x` `[B, L, W]` is what travels
(attention inputs, or keys and values), `valid` `[B, L]`, `keys` `[B, L, Kd]` the keys the
grouping looks at (all heads concatenated). Groups are numbered 0..V-1 per row; -1 is no
group (padding). Group statistics are summed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from prism_jax.plan import Plan


def balanced(valid: jax.Array, groups: int) -> jax.Array:
    """`[B, L]` group of each valid token: its rank r among the n valid tokens, in position
    order, gives floor(r * V / n); none is empty while n >= V, padding is -1."""
    rank = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
    n = valid.sum(1, keepdims=True, dtype=jnp.int32)
    return jnp.where(valid, rank * groups // jnp.maximum(n, 1), -1)


def salient(keys: jax.Array, valid: jax.Array, count: int) -> jax.Array:
    """`[B, L]` bool: the `count` valid tokens whose keys are farthest from the mean key of
    the valid tokens (exact ties: the earliest position first)."""
    k = keys.astype(jnp.float32)
    n = jnp.maximum(valid.sum(1, dtype=jnp.float32), 1)[:, None, None]
    mean = jnp.where(valid[..., None], k, 0).sum(1, keepdims=True) / n
    dev = jnp.where(valid, ((k - mean) ** 2).sum(-1), -jnp.inf)  # [B, L]
    _, top = lax.top_k(dev, count)  # equal values: the lower index first
    chosen = jnp.zeros(valid.shape, bool).at[jnp.arange(len(valid))[:, None], top].set(True)
    return chosen & valid


def kmeans(keys: jax.Array, groups: jax.Array, count: int, iters: int) -> jax.Array:
    """Lloyd's iterations in key space from the assignment `groups` (`[B, L]`, -1 for tokens
    that take no part): centroid = mean key of each non-empty group, then each token to the
    nearest centroid (squared Euclidean; ties: the lowest group). A group that empties stays
    empty."""
    k = keys.astype(jnp.float32)
    ids = jnp.arange(count)

    def step(_, g):
        onehot = (g[..., None] == ids).astype(jnp.float32)  # [B, L, V]
        sizes = onehot.sum(1)  # [B, V]
        centroids = jnp.einsum("blv,blk->bvk", onehot, k) / jnp.maximum(sizes, 1)[..., None]
        dist = ((k[:, :, None, :] - centroids[:, None]) ** 2).sum(-1)  # [B, L, V]
        dist = jnp.where(sizes[:, None, :] > 0, dist, jnp.inf)
        return jnp.where(g >= 0, jnp.argmin(dist, axis=-1).astype(g.dtype), -1)

    return lax.fori_loop(0, iters, step, groups)


def assign(plan: Plan, valid: jax.Array, keys: jax.Array | None, local_len: int):
    """The groups of DESIGN.md section 1b for V = ceil(L / CR): `[B, L]` group ids, -1 for
    padding. Salient tokens take groups 0..s-1 (one each), the rest V - s balanced groups
    (then k-means when asked). With V = 1 the device sends its one mean."""
    v = plan.segments(local_len)
    s = min(plan.salient, v - 1)
    rest = valid
    ids = jnp.full(valid.shape, -1, jnp.int32)
    if s:
        chosen = salient(keys, valid, s)
        order = jnp.cumsum(chosen, axis=1, dtype=jnp.int32) - 1  # 0..s-1 by position
        ids = jnp.where(chosen, order, ids)
        rest = valid & ~chosen
    groups = balanced(rest, v - s)
    if plan.grouping == "kmeans":
        groups = kmeans(keys, groups, v - s, plan.kmeans_iters)
    return jnp.where(groups >= 0, groups + s, ids)


def group_means(
    x: jax.Array,
    groups: jax.Array,
    count: int,
    *,
    inputs: jax.Array | None = None,
):
    """Means of `x` over each group, the groups' token counts and, given the attention
    `inputs` `[B, L, D]`, each group's isotropic spread s2 = max(0, mean ||a||^2 - ||mean a||^2)
    / D (DESIGN.md section 1b.4).

    Returns:
      means `[B, V, W]` in `x.dtype` (zero for an empty group), counts `[B, V]` int32, and
      spread `[B, V]` float32 or None.
    """
    onehot = groups[..., None] == jnp.arange(count)  # [B, L, V]
    counts = onehot.sum(1, dtype=jnp.int32)
    per = jnp.maximum(counts, 1).astype(jnp.float32)[..., None]
    # Select, not multiply: a NaN or inf in a padded row must not reach a group's sum.
    weights = onehot.astype(jnp.float32)

    def mean_of(values):
        picked = jnp.where(groups[..., None] >= 0, values.astype(jnp.float32), 0)
        return jnp.einsum("blv,blw->bvw", weights, picked) / per

    means = mean_of(x).astype(x.dtype)
    if inputs is None:
        return means, counts, None
    a = inputs.astype(jnp.float32)
    square = mean_of((a**2).sum(-1, keepdims=True))[..., 0]  # mean ||a||^2
    centre = mean_of(a)
    spread = jnp.maximum(square - (centre**2).sum(-1), 0) / a.shape[-1]
    return means, counts, jnp.where(counts > 0, spread, 0)
