"""Generation across edge devices (DESIGN.md section 1a): a partitioned prefill, then decoding
from a compressed cache on the device that owns the end of the sequence.

Prompts are left-padded (as `transformers` pads for generation, positions counted from each
row's first valid token) to N*L tokens, so that every row ends on the last device. The prefill
is the ordinary partitioned forward with the plan; each attention layer keeps what the last
query row saw: `[own K/V | remote K/V means]`. With a causal mask those means never change
afterwards, so the last device decodes alone: zero bytes per new token, and a cache whose
remote part is CR times smaller than the exact one. One compiled decode step (the cache
preallocated, written with `dynamic_update_slice`) serves every token.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from prism_jax import checks, cost, exchange, partition
from prism_jax.configs import ModelConfig
from prism_jax.errors import PrismError
from prism_jax.layers import KVCache, Mode
from prism_jax.models import Model
from prism_jax.models.inputs import attention_mask, ids_field
from prism_jax.partition import AXIS, place, put, spread
from prism_jax.plan import Plan


@dataclasses.dataclass(frozen=True)
class Generation:
    """What one `run` produced and what it cost.

    Attributes:
      ids: `[B, max_new_tokens]` new token ids, the pad id after a row's end of sequence.
      prefill_seconds: wall time of the partitioned prefill up to the first new token
        (compile included on a program's first use).
      step_seconds: wall time of each decode step (the first one compiles).
      steps: tokens produced per row (at most max_new_tokens; fewer when every row ended).
      prefill_bytes: bytes each device sent in the prefill (the closed form, equal to the
        compiled program's; none during decoding).
      cache_bytes: bytes of the decode cache (prompt part and generated tokens): keys,
        values and, with the value tilt, its per-slot statistics and matrices M_h, read
        from the cache's own arrays (masks and biases aside).
      exact_cache_bytes: the keys and values of an exact cache of the whole prompt.
    """

    ids: np.ndarray
    prefill_seconds: float
    step_seconds: list[float]
    steps: int
    prefill_bytes: int
    cache_bytes: int
    exact_cache_bytes: int

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput per row: 1 / the median step time, the compiling first step
        left out (0 when fewer than two steps ran)."""
        warm = self.step_seconds[1:]
        return 1 / float(np.median(warm)) if warm else 0.0


def left_pad(
    batch: dict, cfg: ModelConfig, devices: int, max_new_tokens: int, pad_to: int = 0
) -> dict:
    """Prompts (right- or left-padded) -> left-padded to N*L tokens (at least `pad_to`) with
    `position_ids` counted from each row's first valid token; checks that prompt plus new
    tokens fit the context."""
    ids = ids_field(batch, "input_ids", cfg.vocab_size)
    valid = attention_mask(batch, ids.shape)
    lengths = valid.sum(1)
    if (lengths == 0).any():
        raise PrismError("every prompt needs at least one token")
    longest = int(lengths.max())
    if longest + max_new_tokens > cfg.max_positions:
        raise PrismError(
            f"a prompt of {longest} tokens plus {max_new_tokens} new tokens is longer than the "
            f"model's context of {cfg.max_positions} positions"
        )
    t = -(-max(longest, pad_to) // devices) * devices
    out_ids = np.zeros((len(ids), t), np.int32)
    out_mask = np.zeros((len(ids), t), np.int32)
    positions = np.zeros((len(ids), t), np.int32)
    for i, n in enumerate(lengths):
        out_ids[i, t - n :] = ids[i][valid[i]]
        out_mask[i, t - n :] = 1
        positions[i, t - n :] = np.arange(n)
    return {"input_ids": out_ids, "attention_mask": out_mask, "position_ids": positions}


def _sown(value) -> KVCache:
    """The stacked KVCache the encoder sowed (Flax keeps sown values in a tuple, in a
    Variable)."""
    value = value.get_value() if hasattr(value, "get_value") else value
    return value[0] if isinstance(value, tuple) and not isinstance(value, KVCache) else value


@functools.cache
def prefill_program(graphdef, cfg: ModelConfig, plan: Plan, mesh: Mesh | None):
    """`(params, inputs, valid) -> (last logits [B, V], KVCache [depth, ...])` of the device
    that owns the end of the sequence (every device's, stacked on a leading axis, with a
    mesh: the caller keeps the last)."""

    def per_device(params, inputs, valid, *, ex):
        local = exchange.local_view(ex, valid, inputs.get("position_ids"))
        module = nnx.merge(graphdef, params)
        (tokens, _), kept = nnx.capture(module, nnx.Intermediate)(
            inputs, ex, local, Mode(keep_cache=True)
        )
        out = tokens["logits"][:, -1], _sown(kept["encoder"]["caches"])  # [B, V], the caches
        return out if ex.axis_name is None else jax.tree.map(lambda x: x[None], out)

    return spread(per_device, cfg, plan, mesh, out_specs=P(AXIS))


def _shard_on(device, x: jax.Array) -> jax.Array:
    """The block of a stacked per-device output that lives on `device` (stays there)."""
    return next(s.data for s in x.addressable_shards if s.device == device)[0]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How each next token is chosen, in `transformers`' order: logits divided by the
    temperature, then the top_k most likely tokens, then of those the nucleus: the most likely
    tokens whose probabilities, most likely first, reach top_p (a token is kept when the
    tokens more likely than it hold less than top_p; ties with the last one kept too).
    Temperature 0 is greedy (top_k and top_p change nothing)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def filtered(self, logits: jax.Array) -> jax.Array:
        """`[B, V]` float32 logits over the temperature, the tokens left out at -inf. The
        top_k tokens are ranked on the raw logits (dividing by a temperature > 0 keeps the
        order, and float32 would tie them at a huge one), and the best logit is subtracted
        first, so that a tiny temperature leaves 0 for the best token, not inf."""
        logits = logits.astype(jnp.float32)
        scaled = (logits - logits.max(-1, keepdims=True)) / self.temperature
        if self.top_k is not None:
            kth = jax.lax.top_k(logits, self.top_k)[0][:, -1:]
            scaled = jnp.where(logits < kth, -jnp.inf, scaled)
        if self.top_p is not None and self.top_p < 1:
            ordered = -jnp.sort(-scaled, axis=-1)  # most likely first
            probs = jax.nn.softmax(ordered, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # held by the more likely tokens
            kept = jnp.where(before < self.top_p, ordered, jnp.inf)  # the first always
            scaled = jnp.where(scaled < kept.min(-1, keepdims=True), -jnp.inf, scaled)
        return scaled

    def choose(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """Next token per row `[B]` int32 from `[B, V]` logits."""
        if self.temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, self.filtered(logits), axis=-1).astype(jnp.int32)


TRACES = {"decode": 0}  # how often the decode step was traced (tests assert it once per shape)


@functools.cache
def decode_program(graphdef, sampling: Sampling):
    """One compiled decode step `(params, caches, ids, positions, index, key) -> (next ids,
    caches)`: the same program for every token (`index`, the cache slot, is traced)."""

    def step(params, caches, ids, positions, index, key):
        TRACES["decode"] += 1
        module = nnx.merge(graphdef, params)
        logits, caches = module.decode(ids, positions, caches, index)
        return sampling.choose(logits, key), caches

    return jax.jit(step, donate_argnums=(1,))


def _grow(cache: KVCache, extra: int) -> KVCache:
    """Room for `extra` generated tokens at the end of the layers' caches (stacked on a
    leading layer axis, `[depth, B, C, ...]`; not yet visible)."""
    return jax.vmap(lambda layer: layer.grown(extra))(cache)


def _end_ids(model: Model, eos) -> set[int]:
    """The token ids that end a row: `eos` True takes the model's own."""
    if eos is True:
        value = model.generation.get("eos_token_id")
        return set(value if isinstance(value, list) else [] if value is None else [value])
    if eos is False or eos is None:
        return set()
    vocab = model.config.vocab_size
    many = eos if isinstance(eos, list | tuple) else [eos]
    if not many:
        raise PrismError("eos must be True, False, a token id or a non-empty list of ids, got []")
    return {checks.integer("eos", i, 0, vocab - 1) for i in many}


def _key(seed) -> jax.Array:
    """A threefry key from a 64-bit seed, both halves used (`jax.random.key` keeps 32 bits
    without x64; seeds below 2^32 give its very keys)."""
    s = checks.seed(seed) % 2**64
    return jax.random.wrap_key_data(np.array([s >> 32, s & 0xFFFFFFFF], np.uint32))


def _sampling(model: Model, max_new_tokens, temperature, top_k, top_p) -> Sampling:
    """The arguments of `run` checked (each bad one a PrismError naming it) -> `Sampling`."""
    if model.config.head != "lm" or not model.config.causal:
        raise PrismError("generation needs a causal LM (GPT-2 or Llama with an LM head)")
    checks.integer("max_new_tokens", max_new_tokens, 1)
    temperature = checks.number("temperature", temperature, 0.0)
    if top_k is not None:
        top_k = checks.integer("top_k", top_k, 1, model.config.vocab_size)
    if top_p is not None:
        top_p = checks.number("top_p", top_p, 0.0, 1.0, open_low=True)
    return Sampling(temperature, top_k, top_p)


@dataclasses.dataclass
class _Prefilled:
    """What the prefill hands the decode loop: the first new tokens, the caches and params on
    the decoding device, and the prompt's layout."""

    ids: np.ndarray  # [B] the first new token of each row
    caches: KVCache  # [depth, B, C, ...] on the decoding device
    params: object  # the model's params on the decoding device
    valid: np.ndarray  # [B, T] the left-padded prompt's validity
    devices: int
    seconds: float


def _prefill(model, prompt: dict, plan: Plan, mesh, sampling: Sampling, key) -> _Prefilled:
    """The partitioned prefill (or one device's, without a mesh) up to the first new token."""
    inputs, valid = model.prepare(prompt)
    tic = time.perf_counter()
    if mesh is None:
        fn = prefill_program(model.graphdef, model.config, plan, None)
        logits, caches = fn(model.params, inputs, valid)
        params = model.params
    else:
        fn = prefill_program(model.graphdef, model.config, plan, mesh)
        inputs = {k: put(v, mesh, P(None, AXIS)) for k, v in inputs.items()}
        stacked = fn(place(model, mesh), inputs, put(valid, mesh, P()))
        last = mesh.devices.flat[-1]  # the device that owns the end of the sequence
        devices = mesh.shape[AXIS]
        if last.process_index != jax.process_index():  # another process decodes (a cluster)
            return _Prefilled(None, None, None, valid, devices, time.perf_counter() - tic)
        logits, caches = jax.tree.map(functools.partial(_shard_on, last), stacked)
        params = place(model, last)  # the decoding device's copy, kept for the next call
    ids = np.asarray(sampling.choose(logits, jax.random.fold_in(key, 0)))
    devices = 1 if mesh is None else mesh.shape[AXIS]
    return _Prefilled(ids, caches, params, valid, devices, time.perf_counter() - tic)


def _shared(mesh, got, b: int, max_new_tokens: int):
    """In a cluster of processes, what the decoding process produced -> every process: (ids,
    step seconds, steps, cache bytes), broadcast from the process that owns the mesh's last
    device (`got` there; None elsewhere). One process: `got` itself."""
    if mesh is None or jax.process_count() == 1:
        return got
    owner = mesh.devices.flat[-1].process_index == jax.process_index()
    if owner:
        ids, seconds, steps, cache = got
        median = float(np.median(seconds)) if seconds else 0.0
        sent = (ids, np.int32(steps), np.int32(cache), np.float32(median), np.int32(len(seconds)))
    else:
        sent = (np.zeros((b, max_new_tokens), np.int32), np.int32(0), np.int32(0),
                np.float32(0), np.int32(0))  # fmt: skip
    ids, steps, cache, median, count = multihost_utils.broadcast_one_to_all(sent, is_source=owner)
    seconds = [float(median)] * int(count)  # the owner's median step, for tokens_per_second
    return np.asarray(ids), seconds, int(steps), int(cache)


def _decode(model, first: _Prefilled, sampling, key, max_new_tokens, ends, on_token):
    """Decode on one device from the compressed cache until every row ended or
    `max_new_tokens` were produced -> (ids [B, max_new_tokens], step seconds, steps, caches)."""
    prompt_slots = first.caches.keys.shape[2]
    caches = _grow(first.caches, max_new_tokens)
    step = decode_program(model.graphdef, sampling)
    pad = model.generation.get("pad_token_id")
    pad = pad if pad is not None else next(iter(sorted(ends)), 0)
    b = len(first.ids)
    out = np.full((b, max_new_tokens), pad, np.int32)
    done = np.zeros(b, bool)
    positions = first.valid.sum(1).astype(np.int32)  # the next token's position in each row
    ids, step_seconds, steps = first.ids, [], 0
    for i in range(max_new_tokens):
        out[~done, i] = ids[~done]
        steps += 1
        if on_token is not None:
            on_token(i, out[:, i])
        done |= np.isin(ids, list(ends))
        if done.all() or i == max_new_tokens - 1:
            break
        tic = time.perf_counter()
        ids, caches = step(
            first.params, caches, jnp.asarray(ids), jnp.asarray(positions + i), prompt_slots + i,
            jax.random.fold_in(key, i + 1),
        )  # fmt: skip
        ids = np.asarray(ids)
        step_seconds.append(time.perf_counter() - tic)
    return out, step_seconds, steps, caches


def run(
    model: Model,
    batch: dict,
    *,
    mesh: Mesh | None = None,
    plan: Plan | None = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos=True,
    on_token: Callable[[int, np.ndarray], None] | None = None,
    pad_to: int = 0,
) -> Generation:
    """Generate with a partitioned prefill and a decode from the compressed cache.

    At CR = 1 (and with voltage) every row's tokens are the exact model's, whatever its batch
    mates. At CR > 1 they depend on the batch: prompts are left-padded to the longest, so a
    row's tokens sit at other positions of the devices (and in other groups) than they would
    alone. Generate one prompt per call where that matters.

    Args:
      model: a causal LM (GPT-2, Llama).
      batch: `input_ids` and optionally `attention_mask` (any padding side).
      mesh, plan: as for `infer`; no mesh (or `single`) runs everything on one device.
      max_new_tokens: tokens to generate per row.
      temperature: 0 for greedy decoding, else sampling at this temperature.
      top_k: sample among the k most likely tokens only.
      top_p: sample among the most likely tokens that together hold this probability
        (nucleus sampling), after top_k.
      seed: sampling seed (the same seed gives the same tokens), 64 bits.
      eos: True stops a row at the model's end-of-sequence id(s), a token id or a list of ids
        at those, False never; a stopped row is padded with the model's pad id.
      on_token: called as `on_token(step, ids [B])` after every step (streaming).
      pad_to: left-pad the prompts to at least this many tokens (`serve` buckets lengths so
        that compilations stay few; at CR > 1 the padding moves tokens between devices).
    """
    plan, mesh = partition.checked(model, plan, mesh)
    sampling = _sampling(model, max_new_tokens, temperature, top_k, top_p)
    key = _key(seed)
    ends = _end_ids(model, eos)
    # One device has no remote tokens: every plan is the exact model there (and a mesh of one
    # device would carry its axis type into the decode's arrays).
    if mesh is not None and (plan.strategy == "single" or mesh.size == 1):
        mesh = None
    devices = 1 if mesh is None else mesh.shape[AXIS]
    prompt = left_pad(batch, model.config, devices, max_new_tokens, pad_to)
    first = _prefill(model, prompt, plan, mesh, sampling, key)
    b, t = first.valid.shape
    got = None
    if first.caches is not None:  # this process holds the decoding device
        ids, step_seconds, steps, caches = _decode(
            model, first, sampling, key, max_new_tokens, ends, on_token
        )
        got = ids, step_seconds, steps, _cache_bytes(caches)
    ids, step_seconds, steps, cache_bytes = _shared(mesh, got, b, max_new_tokens)
    itemsize = jnp.dtype(cost.param_dtype(model)).itemsize
    return Generation(
        ids=ids,
        prefill_seconds=first.seconds,
        step_seconds=step_seconds,
        steps=steps,
        prefill_bytes=cost.bytes_closed_form(
            model.config,
            plan,
            devices=first.devices,
            seq_len=t,
            batch=b,
            dtype_bytes=itemsize,
        ),  # fmt: skip
        cache_bytes=cache_bytes,
        exact_cache_bytes=_exact_cache_bytes(model.config, b, t + max_new_tokens, itemsize),
    )


def _cache_bytes(cache: KVCache) -> int:
    """Keys, values and the value tilt's statistics and matrices M_h of every layer, read
    from the cache's own arrays (masks and biases aside)."""
    kept = (cache.keys, cache.values, cache.stats, cache.tilt)
    return sum(x.nbytes for x in kept if x is not None)


def _exact_cache_bytes(cfg: ModelConfig, batch: int, slots: int, itemsize: int) -> int:
    """Keys and values of every layer of an exact cache of `slots` tokens."""
    return cfg.depth * batch * slots * cfg.kv_width * itemsize


def generate(model: Model, batch: dict, *, mesh=None, plan=None, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, eos=True) -> np.ndarray:  # fmt: skip
    """New token ids `[B, max_new_tokens]` (DESIGN.md section 2; padded after end of
    sequence). See `run` for the arguments and for what the generation cost."""
    return run(
        model, batch, mesh=mesh, plan=plan, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos=eos,
    ).ids  # fmt: skip
