"""The PRISM exchange (DESIGN.md section 1, steps 2-6): pure jnp/lax, no modules.

The one place that decides what a device sends, as one pipeline per layer (`share`):

1. groups: each local token is assigned to a group (`compress.assign`: the paper's segments,
   balanced runs, k-means, salient and sink tokens; voltage: every token alone);
2. payload: each group becomes a row of means, its count and extra statistics
   (`compress.group_means`);
3. wire: the rows are encoded for the wire (`encode`; float32 in the activations' dtype,
   counts and statistics bit-cast beside them), gathered over the mesh axis (the layer's only
   collective) and decoded;
4. remote rows: the other N-1 devices' rows, with the mask, logit bias and tilt statistics
   that go with them.

Layers hand `share` what would travel for their local tokens (attention inputs, or keys and
values) and get the remote rows back; off the mesh nothing is exchanged. Static settings
(`Exchange`, hashable: it is part of what a program is compiled for) and one device's arrays
(`Local`, a pytree) travel separately.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from prism_jax import compress
from prism_jax.plan import Plan


@dataclasses.dataclass(frozen=True)
class Exchange:
    """What a program is compiled for (static, hashable).

    Attributes:
      plan: the execution plan (its `exchange` resolved for the model).
      axis_name: the mesh axis ("edge"), or None on the single-device reference path.
      devices: N, the size of the mesh axis (1 on the reference path).
      causal: whether the model is causal (GPT-2, Llama).
    """

    plan: Plan
    axis_name: str | None = None
    devices: int = 1
    causal: bool = False

    @property
    def active(self) -> bool:
        """Whether anything travels: a mesh axis, more than one device, not `single`."""
        return self.axis_name is not None and self.devices > 1 and self.plan.strategy != "single"


class Local(NamedTuple):
    """One device's view of the inference (arrays; built inside `shard_map`).

    Attributes:
      device: p, this device's index along the axis (a scalar; 0 on the reference path).
      valid: `[B, L]` validity of the local tokens.
      index: `[L]` global index of the local tokens: device p owns [p*L, (p+1)*L).
      positions: `[B|1, L]` the positions the model embeds: the batch's own (HF's
        `position_ids`, left-padded prompts), else the global index.
      valid_all: `[B, T]` validity of every position (request metadata every node holds).
    """

    device: jax.Array
    valid: jax.Array
    index: jax.Array
    positions: jax.Array
    valid_all: jax.Array


def local_view(ex: Exchange, valid: jax.Array, position_ids: jax.Array | None = None) -> Local:
    """This device's `Local` from the `[B, T]` validity of all T = N*L positions and, when the
    batch gives them, its local tokens' `position_ids` `[B, L]`."""
    l = valid.shape[1] // ex.devices
    p = lax.axis_index(ex.axis_name) if ex.axis_name else jnp.int32(0)
    index = p * l + jnp.arange(l)
    local_valid = lax.dynamic_slice_in_dim(valid, p * l, l, axis=1)
    positions = index[None] if position_ids is None else position_ids
    return Local(p, local_valid, index, positions, valid)


def segment_means(a: jax.Array, valid: jax.Array, cr: int) -> tuple[jax.Array, jax.Array]:
    """Average consecutive runs of `cr` positions over their valid tokens (the paper's
    segments; `compress.assign` with `grouping="segments"`).

    Args:
      a: `[B, L, D]` attention inputs of the local tokens.
      valid: `[B, L]` bool, False for padding.
      cr: segment length; the last segment is shorter when `cr` does not divide L, and a `cr`
        beyond L makes one segment of all L positions.

    Returns:
      means `[B, S, D]` in `a.dtype` (summed in float32; zero for an empty segment) and
      counts `[B, S]` int32 of valid tokens, with S = ceil(L / cr).
    """
    l = a.shape[1]
    plan = Plan(cr=cr)
    means, counts, _ = compress.group_means(
        a, compress.assign(plan, valid, None, l), plan.segments(l)
    )
    return means, counts


# --- the wire ------------------------------------------------------------------------------


def encode(means: jax.Array, counts: jax.Array, stats: jax.Array | None = None) -> jax.Array:
    """`[B, V, W]` means, int32 counts `[B, V]` and optional float32 `stats` `[B, V, k]` ->
    one `[B, V, W + (1 + k)*w]` row per group in the means' dtype: the counts and stats
    bit-cast into 4-byte words (w = 4 / itemsize columns each), so that one collective carries
    them all and they arrive exact whatever the dtype (bf16 holds integers exactly only to
    256)."""
    words = counts[..., None]
    if stats is not None:
        words = jnp.concatenate([words, lax.bitcast_convert_type(stats, jnp.int32)], axis=-1)
    bits = lax.bitcast_convert_type(words, means.dtype)  # [B, V, 1+k] (4 bytes) or [..., 2]
    return jnp.concatenate([means, bits.reshape(*words.shape[:-1], -1)], axis=-1)


def decode(rows: jax.Array, width: int):
    """Inverse of `encode`: (means `[..., W]`, int32 counts `[...]`, float32 stats `[..., k]`
    or None when none were sent)."""
    per_word = 4 // rows.dtype.itemsize
    bits = rows[..., width:]
    bits = bits.reshape(*bits.shape[:-1], -1, per_word)
    words = lax.bitcast_convert_type(bits if per_word > 1 else bits[..., 0], jnp.int32)
    stats = lax.bitcast_convert_type(words[..., 1:], jnp.float32) if words.shape[-1] > 1 else None
    return rows[..., :width], words[..., 0], stats


# --- the pipeline --------------------------------------------------------------------------


class Remote(NamedTuple):
    """What a device attends to besides its own tokens, and how.

    Attributes:
      rows: `[B, M, W]` the other devices' rows (M = 0 when nothing is exchanged): their
        tokens (voltage) or group means (prism), in what travels' layout.
      mask: `[B, 1, L|1, L + M]` bool, which of [local | remote] keys each local query sees.
      bias: `[B, 1, 1, L + M]` float32 logit bias (log count of a remote mean), or None.
      stats: `[B, L + M, k]` float32 tilt statistics (zero for local rows), or None.
    """

    rows: jax.Array
    mask: jax.Array
    bias: jax.Array | None
    stats: jax.Array | None


def share(ex: Exchange, local: Local, x: jax.Array, *, keys=None, inputs=None, positions=None):
    """One layer's exchange: what this device receives for the `[B, L, W]` rows `x` that would
    travel for its local tokens (attention inputs, W = D; or keys and values, W = 2*H_kv*K).

    Args:
      ex, local: this device's `Exchange` and `Local`.
      x: `[B, L, W]` what travels for the local tokens.
      keys: `[B, L, Kd]` the local keys, for salient tokens and k-means (DESIGN.md 1b).
      inputs: `[B, L, D]` the local attention inputs, for the value tilt's spread.
      positions: `[B|1, L]` the local tokens' positions, for the value tilt of rotary keys.

    Returns:
      `Remote`.
    """
    b, l, w = x.shape
    local_mask = _key_mask(local.valid, local.index, local.index, ex.causal)
    if not ex.active:
        return Remote(x[:, :0], local_mask, None, None)
    if ex.plan.strategy == "voltage":  # every token is its own group; validity is known to all
        rows, source = _gather_others(ex, local, x)
        seen = _others(ex, local, local.valid_all.reshape(b, ex.devices, l)).reshape(b, -1)
        return Remote(rows, _with_remote(ex, local, local_mask, seen, source), None, None)
    plan = ex.plan
    v = plan.segments(l)
    sink = None
    if plan.sink:
        every = compress.sink_tokens(local.valid_all, plan.sink)
        sink = lax.dynamic_slice_in_dim(every, local.device * l, l, axis=1)
    groups = compress.assign(plan, local.valid, keys, l, sink)
    tilt = plan.value_tilt
    means, counts, stats = compress.group_means(
        x, groups, v, inputs=inputs if tilt else None, positions=positions if tilt else None
    )
    rows, source = _gather_others(ex, local, encode(means, counts, stats))
    rows, counts, stats = decode(rows, w)
    seen = counts > 0  # [B, (N-1)*V]: empty groups are masked out
    mask = _with_remote(ex, local, local_mask, seen, source)
    bias = None
    if plan.logit_bias == "log_count":
        # One mean stands for c tokens: exp(q.k + log c) = c exp(q.k). In float32 whatever the
        # activations' dtype: attention adds it to float32 logits.
        log_c = jnp.where(seen, jnp.log(jnp.maximum(counts, 1).astype(jnp.float32)), 0)
        bias = jnp.concatenate([jnp.zeros((b, l), jnp.float32), log_c], axis=-1)[:, None, None]
    if stats is not None:
        stats = jnp.concatenate([jnp.zeros((b, l, stats.shape[-1]), jnp.float32), stats], axis=1)
    return Remote(rows, mask, bias, stats)


def _others(ex: Exchange, local: Local, every: jax.Array) -> jax.Array:
    """`[B, N, ...]` one block per device -> `[B, N-1, ...]` the other devices' blocks, in the
    order (p + 1, ..., p + N - 1) mod N."""
    return jnp.roll(every, -local.device, axis=1)[:, 1:]


def _gather_others(ex: Exchange, local: Local, rows: jax.Array):
    """All-gather `[B, V, C]` rows over the axis (the layer's only collective) and keep the
    other devices': `[B, (N-1)*V, C]`, and the source device of each row `[(N-1)*V]`."""
    b, v, c = rows.shape
    every = lax.all_gather(rows, ex.axis_name, axis=1)  # [B, N, V, C]
    others = _others(ex, local, every).reshape(b, (ex.devices - 1) * v, c)
    source = (local.device + 1 + jnp.arange(ex.devices - 1)) % ex.devices
    return others, jnp.repeat(source, v)


def _with_remote(ex: Exchange, local: Local, local_mask, seen, source) -> jax.Array:
    """`[B, 1, L|1, L + M]`: the local mask, then the remote rows that are `seen` `[B, M]`; for
    causal models the partition-aware mask keeps only rows of earlier devices."""
    if ex.causal:
        seen = seen & (source < local.device)[None, :]
    b, m = seen.shape
    remote = jnp.broadcast_to(seen[:, None, None, :], (b, 1, local_mask.shape[2], m))
    return jnp.concatenate([local_mask, remote], axis=-1)


def _key_mask(key_valid: jax.Array, q_pos: jax.Array, k_pos: jax.Array, causal: bool):
    """`[B, 1, L|1, M]`: valid keys, and for causal models only keys at or before the query."""
    mask = key_valid[:, None, None, :]
    if causal:
        mask = mask & (k_pos[None, :] <= q_pos[:, None])[None, None]
    return mask
