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

from prism_jax.configs import Plan


def segment_means(a: jax.Array, valid: jax.Array, cr: int) -> tuple[jax.Array, jax.Array]:
    """Average consecutive runs of `cr` positions over their valid tokens.

    Args:
      a: `[B, L, D]` attention inputs of the local tokens.
      valid: `[B, L]` bool, False for padding.
      cr: segment length; the last segment is shorter when `cr` does not divide L.

    Returns:
      means `[B, S, D]` (zero for an empty segment) and counts `[B, S]` of valid tokens,
      in `a.dtype`, with S = ceil(L / cr).
    """
    b, l, d = a.shape
    s = -(-l // cr)
    w = jnp.pad(valid, ((0, 0), (0, s * cr - l))).astype(a.dtype).reshape(b, s, cr)
    a = jnp.pad(a, ((0, 0), (0, s * cr - l), (0, 0))).reshape(b, s, cr, d)
    counts = w.sum(-1)  # [B, S]
    sums = (a * w[..., None]).sum(2)  # [B, S, D]
    return sums / jnp.maximum(counts, 1)[..., None], counts


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
    """

    plan: Plan
    axis_name: str | None
    devices: int
    device: jax.Array
    causal: bool
    valid: jax.Array
    local_mask: jax.Array
    global_mask: jax.Array | None

    def positions(self) -> jax.Array:
        """`[L]` global positions of the local tokens: device p owns [p*L, (p+1)*L)."""
        l = self.valid.shape[1]
        return self.device * l + jnp.arange(l)


def _key_mask(key_valid: jax.Array, q_pos: jax.Array, k_pos: jax.Array, causal: bool):
    """`[B, 1, L|1, M]`: valid keys, and for causal models only keys at or before the query."""
    mask = key_valid[:, None, None, :]
    if causal:
        mask = mask & (k_pos[None, :] <= q_pos[:, None])[None, None]
    return mask


def make_exchange(
    plan: Plan, valid: jax.Array, *, causal: bool, axis_name: str | None, devices: int
) -> Exchange:
    """Build a device's `Exchange` from the validity mask of the whole sequence.

    Args:
      plan: the execution plan.
      valid: `[B, T]` bool for all T = N*L positions (request metadata every node holds).
      causal: whether the model is causal.
      axis_name: mesh axis name, or None for the reference path.
      devices: N.
    """
    t = valid.shape[1]
    l = t // devices
    p = lax.axis_index(axis_name) if axis_name else jnp.int32(0)
    q_pos = p * l + jnp.arange(l)  # global positions of the local queries
    local_valid = lax.dynamic_slice_in_dim(valid, p * l, l, axis=1)
    local_mask = _key_mask(local_valid, q_pos, q_pos, causal)
    global_mask = None
    if plan.strategy == "voltage":
        global_mask = _key_mask(valid, q_pos, jnp.arange(t), causal)
    return Exchange(plan, axis_name, devices, p, causal, local_valid, local_mask, global_mask)


def _remote_means(a: jax.Array, ex: Exchange):
    """Gather every device's segment means; keep those of the N-1 other devices.

    Returns means `[B, (N-1)*S, D]`, counts `[B, (N-1)*S]` and the source device of each.
    """
    b, _, d = a.shape
    means, counts = segment_means(a, ex.valid, ex.plan.cr)
    s = means.shape[1]
    packed = jnp.concatenate([means, counts[..., None]], axis=-1)  # [B, S, D+1]
    every = lax.all_gather(packed, ex.axis_name, axis=0)  # [N, B, S, D+1]
    # Rotate so this device's block comes first, then drop it: row r is device (p + r) mod N.
    others = jnp.roll(every, -ex.device, axis=0)[1:]  # [N-1, B, S, D+1]
    source = (ex.device + 1 + jnp.arange(ex.devices - 1)) % ex.devices  # [N-1]
    others = others.transpose(1, 0, 2, 3).reshape(b, (ex.devices - 1) * s, d + 1)
    return others[..., :d], others[..., d], jnp.repeat(source, s)


def keys_and_mask(a: jax.Array, ex: Exchange):
    """What one device's keys and values are computed from, with their mask and logit bias.

    Args:
      a: `[B, L, D]` the layer's attention inputs of the local tokens.
      ex: this device's `Exchange`.

    Returns:
      kv_in `[B, M, D]`, mask `[B, 1, L|1, M]` (bool) and bias `[B, 1, 1, M]` or None, where
      M = L (single), N*L (voltage) or L + (N-1)*S (prism).
    """
    if ex.axis_name is None or ex.plan.strategy == "single":
        return a, ex.local_mask, None
    if ex.plan.strategy == "voltage":
        return lax.all_gather(a, ex.axis_name, axis=1, tiled=True), ex.global_mask, None
    if ex.devices == 1:  # nothing to exchange with
        return a, ex.local_mask, None
    means, counts, source = _remote_means(a, ex)
    seen = counts > 0  # [B, (N-1)*S]: empty segments are masked out
    if ex.causal:  # partition-aware causal mask: only means of earlier devices
        seen = seen & (source < ex.device)[None, :]
    b, l, _ = a.shape
    mask = jnp.concatenate(
        [
            ex.local_mask,
            jnp.broadcast_to(seen[:, None, None, :], (b, 1, ex.local_mask.shape[2], seen.shape[1])),
        ],
        axis=-1,
    )
    bias = None
    if ex.plan.logit_bias == "log_count":
        # One mean stands for c tokens: exp(q.k + log c) = c exp(q.k).
        log_c = jnp.where(seen, jnp.log(jnp.maximum(counts, 1)), 0)
        bias = jnp.concatenate([jnp.zeros((b, l), a.dtype), log_c], axis=-1)[:, None, None, :]
    return jnp.concatenate([a, means], axis=1), mask, bias
