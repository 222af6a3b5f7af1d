"""What one device sends per layer: groups of its valid tokens and their means (DESIGN.md
section 1 step 2, the paper's segments; section 1b, content-aware groups). Pure jnp/lax.

Every function works on one device's local tokens, batched: `x` `[B, L, W]` is what travels
(attention inputs, or keys and values), `valid` `[B, L]`, `keys` `[B, L, Kd]` the keys the
grouping looks at (all heads concatenated). Groups are numbered 0..V-1 per row; -1 is no
group (padding). Group statistics are summed in float32.

The value tilt with K/V exchange (beyond DESIGN.md 1b.4, which derives it for attention-input
means). For a group g of n tokens, to first order in k_j - mean k,
sum_j exp(q~.k_j) v_j = n exp(q~.mean k) (mean v + q~ C), C = mean_j (k_j - mean k)(v_j - mean v)^T.
Without rotary keys k = a W_k + b_k and v = a W_v + b_v, so with the isotropic spread s2 of the
inputs a, C = s2 W_k^T W_v = s2 M_h: exactly 1b.4's term, whichever exchange carries the means.
Rotary keys are k_j = R(p_j)(a_j W_k): taking the rotation independent of the content,
C = s2 E_g[R] M_h, and the receiver adds s2 (E_g[R]^T q~) M_h. E_g[R] is not sent: each group
sends its mean position and position variance, and the receiver takes the positions as
Gaussian, so that frequency w of the rotation averages to angle w * mean, damped by
exp(-w^2 var / 2) (high frequencies of a wide group vanish, low ones stay). A rotary group
thus sends three float32 statistics (s2, mean position, position variance), bit-cast into the
payload beside its count; `layers.mean_rotation` and `layers.Attention._tilted` apply it.
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


TAIL_SLACK = 1e-5  # n^(j/G) is taken 1e-5 larger, so that float32's exp/log floor alike


def tail(valid: jax.Array, groups: jax.Array) -> jax.Array:
    """`[B, L]` group of each valid token, finest at the device's last valid token and
    geometrically coarser backward (`grouping="tail"`): the one that follows a boundary, whose
    next device attends to it, most in detail. With n valid tokens and G groups (per row), the
    j-th group from the end ends at distance C_j from the end, where

        f_j = floor(n^(j/G) * (1 + 1e-5)),  C_0 = 0,  C_j = max(C_(j-1) + 1, f_j),  C_G = n,

    i.e. boundaries evenly spaced in log-distance from the last token, each group at least one
    token (n = 64, G = 8: sizes 1, 1, 2, 4, 5, 9, 16, 26 from the end). While n >= G no group
    is empty; with n < G each token goes alone and the first G - n groups stay empty. Group
    ids count from the device's first token (balanced order); padding is -1.
    """
    valid = valid.astype(bool)
    n = valid.sum(1, keepdims=True, dtype=jnp.int32)  # [B, 1]
    g = jnp.broadcast_to(jnp.asarray(groups, jnp.int32), n.shape)
    d = n - jnp.cumsum(valid, axis=1, dtype=jnp.int32)  # distance from the last valid token
    j = jnp.arange(1, valid.shape[1] + 1, dtype=jnp.int32)[None]  # boundaries j = 1..L
    power = jnp.exp(jnp.log(jnp.maximum(n, 1).astype(jnp.float32)) * j / g)
    f = jnp.floor(power * (1 + TAIL_SLACK)).astype(jnp.int32)
    bound = lax.cummax(f - j, axis=1) + j  # C_j = max_(i <= j) (f_i + j - i)
    # the token at distance d is in group #{j < G : C_j <= d} from the end
    from_end = ((bound[:, None, :] <= d[:, :, None]) & (j < g)[:, None, :]).sum(-1)
    return jnp.where(valid, g - 1 - from_end, -1)


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


def assign(
    plan: Plan,
    valid: jax.Array,
    keys: jax.Array | None,
    local_len: int,
    sink: jax.Array | None = None,
) -> jax.Array:
    """Which of the V = ceil(L / CR) groups each local token joins: `[B, L]` group ids, -1
    for padding. `segments` (the paper): fixed runs of CR positions. Otherwise, per row
    (DESIGN.md sections 1b and 1c): the device's sink tokens (`sink` `[B, L]`, the row's
    first `plan.sink` valid tokens that it holds), at most V - 1 of them, earliest first, are
    groups of one; with V' groups left, the farthest token from the rest's mean key is one
    more when `plan.salient` and V' >= 2; the others fill the remaining groups balanced
    (then k-means). With V = 1 the device sends its one mean.

    Group ids: exact tokens first (sink, then salient, in position order), then the rest's
    groups in balanced order; ids past a row's groups stay empty.
    """
    v = plan.segments(local_len)
    if plan.grouping == "segments":
        return jnp.where(valid, jnp.arange(local_len) // min(plan.cr, local_len), -1)
    ids = jnp.full(valid.shape, -1, jnp.int32)
    exact = jnp.zeros((valid.shape[0], 1), jnp.int32)  # [B, 1] groups of one so far
    rest = valid
    if sink is not None:
        order = jnp.cumsum(sink, axis=1, dtype=jnp.int32) - 1  # rank among the sink tokens
        sent = sink & valid & (order < v - 1)
        ids = jnp.where(sent, order, ids)
        exact = sent.sum(1, keepdims=True, dtype=jnp.int32)
        rest = rest & ~sent
    if plan.salient:
        chosen = salient(keys, rest, 1) & (v - exact >= 2)  # only when V' >= 2 groups are left
        ids = jnp.where(chosen, exact, ids)
        exact = exact + chosen.sum(1, keepdims=True, dtype=jnp.int32)
        rest = rest & ~chosen
    groups = (tail if plan.grouping == "tail" else balanced)(rest, v - exact)
    if plan.grouping == "kmeans":
        groups = kmeans(keys, groups, v, plan.kmeans_iters)
    return jnp.where(groups >= 0, groups + exact, ids)


def sink_tokens(valid_all: jax.Array, count: int) -> jax.Array:
    """`[B, T]` bool: the first `count` valid tokens of each row (DESIGN.md section 1c)."""
    rank = jnp.cumsum(valid_all, axis=1, dtype=jnp.int32) - 1
    return valid_all & (rank < count)


def group_means(
    x: jax.Array,
    groups: jax.Array,
    count: int,
    *,
    inputs: jax.Array | None = None,
    positions: jax.Array | None = None,
    dtype=None,
):
    """Means of `x` over each group, the groups' token counts and, given the attention
    `inputs` `[B, L, D]`, the statistics of the value tilt (DESIGN.md section 1b.4): each
    group's isotropic spread s2 = max(0, mean ||a||^2 - ||mean a||^2) / D and, given the
    tokens' `positions` `[B|1, L]` (rotary keys), the mean position and its variance.

    Returns:
      means `[B, V, W]` in `dtype` (default `x.dtype`; zero for an empty group), counts
      `[B, V]` int32, and
      tilt statistics `[B, V, 1 | 3]` float32 (s2 [, mean position, position variance]),
      zero for an empty group, or None without `inputs`.
    """
    b, l = groups.shape
    # Group g of row r sums into bucket r*V + g, padding into one bucket past the end: each
    # token is added once (O(L*W), not a one-hot product over V).
    buckets = jnp.where(groups >= 0, groups + count * jnp.arange(b)[:, None], b * count)
    counts = jnp.zeros(b * count + 1, jnp.int32).at[buckets.reshape(-1)].add(1)
    counts = counts[:-1].reshape(b, count)
    per = jnp.maximum(counts, 1).astype(jnp.float32)[..., None]

    def mean_of(values):  # [B, L, W] -> [B, V, W], float32
        # Select, not multiply: a NaN or inf in a padded row must not reach a group's sum.
        picked = jnp.where(groups[..., None] >= 0, values.astype(jnp.float32), 0)
        flat = picked.reshape(b * l, -1)
        sums = jax.ops.segment_sum(flat, buckets.reshape(-1), num_segments=b * count + 1)
        return sums[:-1].reshape(b, count, -1) / per

    means = mean_of(x).astype(x.dtype if dtype is None else dtype)
    if inputs is None:
        return means, counts, None
    a = inputs.astype(jnp.float32)
    square = mean_of((a**2).sum(-1, keepdims=True))[..., 0]  # mean ||a||^2
    stats = [jnp.maximum(square - (mean_of(a) ** 2).sum(-1), 0) / a.shape[-1]]
    if positions is not None:  # two passes: positions reach thousands, their spread is small
        at = jnp.broadcast_to(positions, groups.shape).astype(jnp.float32)[..., None]
        centre = mean_of(at)  # [B, V, 1]
        offset = at - jnp.take_along_axis(centre, jnp.maximum(groups, 0)[..., None], axis=1)
        stats += [centre[..., 0], mean_of(offset**2)[..., 0]]
    stats = jnp.stack(stats, axis=-1)  # [B, V, 1 | 3]
    return means, counts, jnp.where(counts[..., None] > 0, stats, 0)
