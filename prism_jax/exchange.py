"""The PRISM exchange (DESIGN.md section 1, steps 2-6): pure jnp/lax, no modules.

The one place that decides what a device sends, as one pipeline per layer (`share`):

1. groups: each local token is assigned to a group (`compress.assign`: the paper's segments,
   balanced runs, k-means, salient and sink tokens; voltage: every token alone);
2. payload: each group becomes a row of means, its count and extra statistics
   (`compress.group_means`);
3. wire: the rows are encoded for the wire (`encode`: float32, bfloat16, int8 or packed int4
   with a scale per vector, DESIGN.md 1d, int4h after a Hadamard rotation; counts and statistics
   as exact 4-byte words beside them),
   gathered over the mesh axis (the layer's only collective) and decoded;
4. remote rows: the other N-1 devices' rows, with the mask, logit bias and tilt statistics
   that go with them.

Layers hand `share` what would travel for their local tokens (attention inputs, or keys and
values) and get the remote rows back; off the mesh nothing is exchanged. Static settings
(`Exchange`, hashable: it is part of what a program is compiled for) and one device's arrays
(`Local`, a pytree) travel separately.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from prism_jax import compress, stream
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

WIRE_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "int8": jnp.int8, "int4": jnp.int8,
               "int4h": jnp.int8}  # fmt: skip
# The integer wires' largest code: symmetric, q in [-LEVELS, LEVELS].
LEVELS = {"int8": 127, "int4": 7, "int4h": 7}
PACKED = ("int4", "int4h")  # two codes a byte
ROTATED = ("int4h",)  # each vector turned by `rotate` before it is quantized


def wire_width(width: int, wire: str) -> int:
    """How many elements of the wire's dtype carry `width` means: int4 packs two a byte."""
    return -(-width // 2) if wire in PACKED else width


def rotate(x: jax.Array, vectors: int) -> jax.Array:
    """The int4h wire's turn of each of the `vectors` equal vectors of `x` `[..., W]`: in
    blocks of b, the largest power of two that divides a vector's length, y = x H_b / sqrt(b)
    with H_b the Sylvester Hadamard matrix (H_1 = [1], H_2k = [[H_k, H_k], [H_k, -H_k]]), by
    log2(b) butterflies, in float32. H_b / sqrt(b) is orthonormal and symmetric, so `rotate` is
    its own inverse: the sender turns, the receiver turns back what it dequantized. It spreads
    a vector's outlier channels over the block, so one scale per vector fits every code (the
    QuaRot observation; measured on SmolLM2's keys and values, EXPERIMENTS in the README)."""
    w = x.shape[-1] // vectors
    b = w & -w
    if b == 1:
        return x.astype(jnp.float32)
    y = x.astype(jnp.float32)
    shape = y.shape
    h = 1
    while h < b:  # pairs (i, i + h) inside each run of 2h: (a + c, a - c)
        runs = y.reshape(*shape[:-1], -1, 2, h)
        a, c = runs[..., 0, :], runs[..., 1, :]
        y = jnp.stack([a + c, a - c], axis=-2).reshape(shape)
        h *= 2
    return y * jnp.float32(1 / math.sqrt(b))


def quantize(x: jax.Array, vectors: int, levels: int = 127) -> tuple[jax.Array, jax.Array]:
    """The integer wires (DESIGN.md 1d): `[..., W]` float32 cut into `vectors` equal vectors,
    each sent as q = round(x / s) clipped to [-levels, levels] (half to even) with
    s = max|x| / levels (1 for a zero vector) -> (q `[..., W]` int8, s `[..., vectors]`
    float32). `levels` is 127 for int8, 7 for int4. A vector whose s would be subnormal
    (max|x| < levels * 1.2e-38) travels as a zero vector, and a subnormal x as code 0:
    XLA:CPU flushes subnormals to zero, and x / 0 is no code."""
    blocks = x.reshape(*x.shape[:-1], vectors, -1).astype(jnp.float32)
    scale = jnp.abs(blocks).max(-1, keepdims=True) / levels
    scale = jnp.where(scale >= jnp.finfo(jnp.float32).tiny, scale, 1.0)
    q = jnp.clip(jnp.round(blocks / scale), -levels, levels).astype(jnp.int8)
    return q.reshape(x.shape), scale[..., 0]


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """Inverse of `quantize` as the receiver computes it: q * s, float32."""
    vectors = scale.shape[-1]
    blocks = q.reshape(*q.shape[:-1], vectors, -1).astype(jnp.float32) * scale[..., None]
    return blocks.reshape(q.shape)


def pack4(q: jax.Array) -> jax.Array:
    """`[..., W]` int8 codes in [-8, 7] -> `[..., ceil(W / 2)]` int8, two a byte: code 2i in
    the low nibble, 2i + 1 in the high one (a zero code pads an odd W)."""
    if q.shape[-1] % 2:
        q = jnp.concatenate([q, jnp.zeros_like(q[..., :1])], axis=-1)
    low, high = q[..., 0::2], q[..., 1::2]
    return jnp.bitwise_or(jnp.bitwise_and(low, 0x0F), jnp.left_shift(high, 4))


def unpack4(packed: jax.Array, width: int) -> jax.Array:
    """Inverse of `pack4`: the nibbles sign-extended by arithmetic shifts, `[..., width]`."""
    low = jnp.right_shift(jnp.left_shift(packed, 4), 4)
    high = jnp.right_shift(packed, 4)
    return jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], -1)[..., :width]


def _as_words(x: jax.Array, dtype) -> jax.Array:
    """`[..., n]` 4-byte values (int32 or float32) bit-cast to `[..., n * 4 / itemsize]` of
    `dtype`: they travel exact whatever the wire."""
    bits = lax.bitcast_convert_type(x, dtype)  # [..., n] (4-byte dtype) or [..., n, 4 / size]
    return bits.reshape(*x.shape[:-1], -1)


def _from_words(bits: jax.Array, kind) -> jax.Array:
    """Inverse of `_as_words`: `[..., n * 4 / itemsize]` -> `[..., n]` of `kind`."""
    per_word = 4 // bits.dtype.itemsize
    if per_word == 1:
        return lax.bitcast_convert_type(bits, kind)
    return lax.bitcast_convert_type(bits.reshape(*bits.shape[:-1], -1, per_word), kind)


def encode(means, counts, stats=None, *, wire: str = "f32", vectors: int = 1) -> jax.Array:
    """`[B, V, W]` means, int32 counts `[B, V]` and optional float32 `stats` `[B, V, k]` ->
    one row per group in the wire's dtype, so that one collective carries it all: the means
    (float32, bfloat16, int8, or int4 packed two a byte, the integer wires with a float32
    scale for each of their `vectors`), then the scales, the count and the stats as exact
    4-byte words."""
    dtype = WIRE_DTYPES[wire]
    words = [counts[..., None].astype(jnp.int32)]
    if stats is not None:
        words.append(lax.bitcast_convert_type(stats.astype(jnp.float32), jnp.int32))
    if wire in LEVELS:
        means = rotate(means, vectors) if wire in ROTATED else means
        means, scales = quantize(means, vectors, LEVELS[wire])
        means = pack4(means) if wire in PACKED else means
        words.insert(0, lax.bitcast_convert_type(scales, jnp.int32))
    parts = [means.astype(dtype), _as_words(jnp.concatenate(words, axis=-1), dtype)]
    return jnp.concatenate(parts, axis=-1)


def decode(rows: jax.Array, width: int, *, wire: str = "f32", vectors: int = 1):
    """Inverse of `encode`: (means `[..., W]` float32, int32 counts `[...]`, float32 stats
    `[..., k]` or None when none were sent)."""
    carried = wire_width(width, wire)
    words = _from_words(rows[..., carried:], jnp.int32)
    means = rows[..., :carried]
    if wire in LEVELS:
        means = unpack4(means, width) if wire in PACKED else means
        scales = lax.bitcast_convert_type(words[..., :vectors], jnp.float32)
        means, words = dequantize(means, scales), words[..., vectors:]
        means = rotate(means, vectors) if wire in ROTATED else means
    stats = lax.bitcast_convert_type(words[..., 1:], jnp.float32) if words.shape[-1] > 1 else None
    return means.astype(jnp.float32), words[..., 0], stats


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


def share(
    ex: Exchange,
    local: Local,
    x: jax.Array,
    *,
    keys=None,
    inputs=None,
    positions=None,
    vectors: int = 1,
) -> Remote:
    """One layer's exchange: what this device receives for the `[B, L, W]` rows `x` that would
    travel for its local tokens (attention inputs, W = D; or keys and values, W = 2*H_kv*K).

    Args:
      ex, local: this device's `Exchange` and `Local`.
      x: `[B, L, W]` what travels for the local tokens.
      keys: `[B, L, Kd]` the local keys, for salient tokens and k-means (DESIGN.md 1b).
      inputs: `[B, L, D]` the local attention inputs, for the value tilt's spread.
      positions: `[B|1, L]` the local tokens' positions, for the value tilt of rotary keys.
      vectors: how many vectors a row of `x` holds, each scaled on its own by the int8 wire
        (1 for attention inputs; 2*H_kv for keys and values: one per KV head, K and V apart).

    Returns:
      `Remote`, its rows in `x.dtype`.
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
        x, groups, v, inputs=inputs if tilt else None, positions=positions if tilt else None,
        dtype=jnp.float32,
    )  # fmt: skip
    sent = encode(means, counts, stats, wire=plan.wire, vectors=vectors)
    rows, source = _gather_others(ex, local, sent)
    rows, counts, stats = decode(rows, w, wire=plan.wire, vectors=vectors)
    rows = rows.astype(x.dtype)
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


def gather(rows: jax.Array, ex: Exchange, local: Local) -> jax.Array:
    """Every device's `[B, V, C]` rows, `[B, N, V, C]` in device order, as the plan's
    `transport` moves them: an `all_gather`; an `all_to_all` of the rows repeated once per
    device (the same bytes leave each device; gloo, JAX's CPU collectives, runs its
    all-gather as a ring of N - 1 steps, each a round trip on the link, and its all-to-all
    as one step with every transfer posted at once: experiments/results/
    collective_probe.md); or the `stream` (a causal model's later devices' rows are zero
    there: nobody sends them, the mask hides them)."""
    transport = ex.plan.transport
    if transport == "all_gather":
        return lax.all_gather(rows, ex.axis_name, axis=1)
    if transport == "stream":
        return stream.gather(rows, local.device, ex.devices, ex.causal)
    b, v, c = rows.shape
    repeated = jnp.broadcast_to(rows[:, None], (b, ex.devices, v, c))
    return lax.all_to_all(repeated, ex.axis_name, split_axis=1, concat_axis=1, tiled=True)


def _gather_others(ex: Exchange, local: Local, rows: jax.Array):
    """Gather `[B, V, C]` rows over the axis (the layer's only exchange, `gather`) and keep
    the other devices': `[B, (N-1)*V, C]`, and the source device of each row `[(N-1)*V]`."""
    b, v, c = rows.shape
    every = gather(rows, ex, local)  # [B, N, V, C]
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
