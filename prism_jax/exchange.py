"""The PRISM exchange (DESIGN.md section 1, steps 2-6): pure jnp/lax, no modules.

`Exchange` is what one device knows about the inference besides its own activations: the
plan, the mesh axis, its index, and the masks that do not change from layer to layer.
`keys_and_mask` is called once per layer by `layers.Attention` and holds the layer's only
collective: the `all_gather` of the full inputs (voltage) or of segment means (prism).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from prism_jax import compress
from prism_jax.errors import PrismError
from prism_jax.plan import Plan


def segment_means(a: jax.Array, valid: jax.Array, cr: int) -> tuple[jax.Array, jax.Array]:
    """Average consecutive runs of `cr` positions over their valid tokens.

    Args:
      a: `[B, L, D]` attention inputs of the local tokens.
      valid: `[B, L]` bool, False for padding.
      cr: segment length; the last segment is shorter when `cr` does not divide L, and a `cr`
        beyond L makes one segment of all L positions (nothing is allocated for the excess).

    Returns:
      means `[B, S, D]` in `a.dtype` (summed in float32; zero for an empty segment) and
      counts `[B, S]` int32 of valid tokens, with S = ceil(L / cr).
    """
    b, l, d = a.shape
    cr = min(cr, l)
    s = -(-l // cr)
    pad = s * cr - l  # < cr <= L
    keep = jnp.pad(valid, ((0, 0), (0, pad))).reshape(b, s, cr)
    x = jnp.pad(a, ((0, 0), (0, pad), (0, 0))).reshape(b, s, cr, d)
    counts = keep.sum(-1, dtype=jnp.int32)  # [B, S]
    # Select, not multiply: a NaN or inf in a padded row must not reach its segment's sum.
    sums = jnp.where(keep[..., None], x, 0).sum(2, dtype=jnp.float32)  # [B, S, D]
    return (sums / jnp.maximum(counts, 1)[..., None]).astype(a.dtype), counts


def pack_counts(means: jax.Array, counts: jax.Array, stats: jax.Array | None = None) -> jax.Array:
    """`[B, S, D]` means, int32 counts `[B, S]` and optional float32 `stats` `[B, S, k]` ->
    one `[B, S, D + (1 + k)*w]` payload in the means' dtype: the counts and stats bit-cast
    into 4-byte words (w = 4 / itemsize columns each), so that one collective carries them all
    and they arrive exact whatever the dtype (bf16 holds integers exactly only to 256)."""
    words = counts[..., None]
    if stats is not None:
        words = jnp.concatenate([words, lax.bitcast_convert_type(stats, jnp.int32)], axis=-1)
    bits = lax.bitcast_convert_type(words, means.dtype)  # [B, S, 1+k] (4 bytes) or [..., 2]
    return jnp.concatenate([means, bits.reshape(*words.shape[:-1], -1)], axis=-1)


def unpack_counts(packed: jax.Array, width: int):
    """Inverse of `pack_counts`: (means `[..., D]`, int32 counts `[...]`, float32 stats
    `[..., k]` or None when none were packed)."""
    per_word = 4 // packed.dtype.itemsize
    bits = packed[..., width:]
    bits = bits.reshape(*bits.shape[:-1], -1, per_word)
    words = lax.bitcast_convert_type(bits if per_word > 1 else bits[..., 0], jnp.int32)
    stats = lax.bitcast_convert_type(words[..., 1:], jnp.float32) if words.shape[-1] > 1 else None
    return packed[..., :width], words[..., 0], stats


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One device's view of an inference (built inside `shard_map`, or once for `single`).

    Attributes:
      plan: the execution plan.
      axis_name: the mesh axis ("edge"), or None on the single-device reference path.
      devices: N, the size of the mesh axis (1 on the reference path).
      device: p, this device's index along the axis (a traced scalar).
      causal: whether the model is causal (GPT-2).
      valid: `[B, L]` validity of the local tokens.
      local_mask: `[B, 1, L|1, L]` which local keys each local query may see.
      global_mask: `[B, 1, L|1, N*L]` which of all keys each local query may see (voltage).
      position_ids: `[B, L]` positions of the local tokens when the batch gives its own
        (HF's `position_ids`); None: the global index.
      keep_cache: whether each attention layer keeps what its last query saw (a prefill for
        generation).
      straight: trace a program without loops (layers unrolled, dense attention) for XLA's
        cost analysis, which counts a loop body once (`cost.measure`).
    """

    plan: Plan
    axis_name: str | None
    devices: int
    device: jax.Array
    causal: bool
    valid: jax.Array
    local_mask: jax.Array
    global_mask: jax.Array | None
    position_ids: jax.Array | None = None
    keep_cache: bool = False
    straight: bool = False

    def positions(self) -> jax.Array:
        """`[L]` global positions of the local tokens: device p owns [p*L, (p+1)*L)."""
        l = self.valid.shape[1]
        return self.device * l + jnp.arange(l)

    def token_positions(self) -> jax.Array:
        """`[B|1, L]` the positions the model embeds: the batch's own, else the global index."""
        return self.positions()[None] if self.position_ids is None else self.position_ids


def _key_mask(key_valid: jax.Array, q_pos: jax.Array, k_pos: jax.Array, causal: bool):
    """`[B, 1, L|1, M]`: valid keys, and for causal models only keys at or before the query."""
    mask = key_valid[:, None, None, :]
    if causal:
        mask = mask & (k_pos[None, :] <= q_pos[:, None])[None, None]
    return mask


def make_exchange(
    plan: Plan,
    valid: jax.Array,
    *,
    causal: bool,
    axis_name: str | None,
    devices: int,
    straight: bool = False,
) -> Exchange:
    """Build a device's `Exchange` from the validity mask of the whole sequence.

    Args:
      plan: the execution plan.
      valid: `[B, T]` bool for all T = N*L positions (request metadata every node holds).
      causal: whether the model is causal.
      axis_name: mesh axis name, or None for the reference path.
      devices: N.
      straight: see `Exchange.straight`.
    """
    if axis_name is not None and plan.strategy == "single":
        raise PrismError("strategy 'single' runs on one device: call it without a mesh axis")
    t = valid.shape[1]
    l = t // devices
    p = lax.axis_index(axis_name) if axis_name else jnp.int32(0)
    q_pos = p * l + jnp.arange(l)  # global positions of the local queries
    local_valid = lax.dynamic_slice_in_dim(valid, p * l, l, axis=1)
    local_mask = _key_mask(local_valid, q_pos, q_pos, causal)
    global_mask = None
    if plan.strategy == "voltage":
        global_mask = _key_mask(valid, q_pos, jnp.arange(t), causal)
    return Exchange(
        plan, axis_name, devices, p, causal, local_valid, local_mask, global_mask, straight=straight
    )


def _local_groups(x: jax.Array, ex: Exchange, keys, inputs, positions):
    """This device's group means `[B, V, W]`, int32 counts `[B, V]` and tilt statistics
    `[B, V, k]` (or None): the paper's segments, or the content-aware groups of DESIGN.md
    section 1b."""
    plan = ex.plan
    if plan.paper:
        means, counts = segment_means(x, ex.valid, plan.cr)
        return means, counts, None
    l = x.shape[1]
    if plan.grouping == "segments" and plan.salient == 0:  # the paper's segments, tilted
        groups = jnp.where(ex.valid, jnp.arange(l) // min(plan.cr, l), -1)
    else:
        groups = compress.assign(plan, ex.valid, keys, l)
    if not plan.value_tilt:
        return compress.group_means(x, groups, plan.segments(l))
    return compress.group_means(x, groups, plan.segments(l), inputs=inputs, positions=positions)


def _remote_means(x: jax.Array, ex: Exchange, keys, inputs, positions):
    """Gather every device's group means; keep those of the N-1 other devices.

    Returns means `[B, (N-1)*V, W]`, int32 counts `[B, (N-1)*V]`, tilt statistics (or None)
    and the source device of each.
    """
    b, _, w = x.shape
    means, counts, stats = _local_groups(x, ex, keys, inputs, positions)
    v = means.shape[1]
    every = lax.all_gather(pack_counts(means, counts, stats), ex.axis_name, axis=0)
    # Rotate so this device's block comes first, then drop it: row r is device (p + r) mod N.
    others = jnp.roll(every, -ex.device, axis=0)[1:]  # [N-1, B, V, ...]
    source = (ex.device + 1 + jnp.arange(ex.devices - 1)) % ex.devices  # [N-1]
    others = others.transpose(1, 0, 2, 3).reshape(b, (ex.devices - 1) * v, -1)
    means, counts, stats = unpack_counts(others, w)
    return means, counts, stats, jnp.repeat(source, v)


def keys_and_mask(x: jax.Array, ex: Exchange, *, keys=None, inputs=None, positions=None):
    """What one device's keys and values are computed from, with their mask and logit bias.

    Args:
      x: `[B, L, W]` what travels for the local tokens: attention inputs (W = D) or keys and
        values (W = 2*H_kv*K).
      ex: this device's `Exchange`.
      keys: `[B, L, Kd]` the local keys, for salient tokens and k-means (DESIGN.md 1b).
      inputs: `[B, L, D]` the local attention inputs, for the value tilt's spread.
      positions: `[B|1, L]` the local tokens' positions, for the value tilt of rotary keys.

    Returns:
      rows `[B, M, W]`, mask `[B, 1, L|1, M]` (bool), bias `[B, 1, 1, M]` or None, and the
      tilt statistics of each row `[B, M, k]` float32 (`compress.group_means`; zero for local
      rows) or None, where M = L (single), N*L (voltage) or L + (N-1)*V (prism).
    """
    if ex.axis_name is None:
        return x, ex.local_mask, None, None
    if ex.plan.strategy == "voltage":
        return lax.all_gather(x, ex.axis_name, axis=1, tiled=True), ex.global_mask, None, None
    if ex.devices == 1:  # nothing to exchange with
        return x, ex.local_mask, None, None
    means, counts, stats, source = _remote_means(x, ex, keys, inputs, positions)
    seen = counts > 0  # [B, (N-1)*V]: empty groups are masked out
    if ex.causal:  # partition-aware causal mask: only means of earlier devices
        seen = seen & (source < ex.device)[None, :]
    b, l, _ = x.shape
    mask = jnp.concatenate(
        [
            ex.local_mask,
            jnp.broadcast_to(seen[:, None, None, :], (b, 1, ex.local_mask.shape[2], seen.shape[1])),
        ],
        axis=-1,
    )
    bias = None
    if ex.plan.logit_bias == "log_count":
        # One mean stands for c tokens: exp(q.k + log c) = c exp(q.k). In float32 whatever the
        # activations' dtype: attention adds it to float32 logits.
        log_c = jnp.where(seen, jnp.log(jnp.maximum(counts, 1).astype(jnp.float32)), 0)
        bias = jnp.concatenate([jnp.zeros((b, l), jnp.float32), log_c], axis=-1)
        bias = bias[:, None, None, :]
    if stats is not None:
        stats = jnp.concatenate([jnp.zeros((b, l, stats.shape[-1]), jnp.float32), stats], axis=1)
    return jnp.concatenate([x, means], axis=1), mask, bias, stats
