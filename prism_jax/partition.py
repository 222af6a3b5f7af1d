"""Position-wise partitioning: the mesh, placing arrays, and the one `jax.shard_map` site.

Device p of the `"edge"` axis owns global positions [p*L, (p+1)*L). Inputs are padded at the
end to N*L tokens; the padding is masked (validity False) and dropped from the outputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from prism_jax import checks, exchange, stream
from prism_jax.checks import as_int
from prism_jax.configs import ModelConfig
from prism_jax.errors import PrismError
from prism_jax.layers import PLAIN, Mode
from prism_jax.models import Model
from prism_jax.plan import Plan

AXIS = "edge"


def edge_mesh(n: int) -> Mesh:
    """A 1-D mesh of the first `n` JAX devices, axis `"edge"` (Explicit): the default
    backend's, or the CPU's when an accelerator host has fewer than `n`.

    On CPU, emulate devices with `XLA_FLAGS=--xla_force_host_platform_device_count=N`
    set before JAX starts (the CLI does this itself).
    """
    available = jax.devices()
    count = as_int(n)
    if count is not None and count > len(available) and available[0].platform != "cpu":
        available = jax.devices("cpu")  # an accelerator host emulating more edge devices
    if count is None or count < 1:
        raise PrismError(f"the number of devices must be an integer >= 1, got {n!r}")
    n = count
    if n > len(available):
        raise PrismError(
            f"asked for {n} devices but JAX sees {len(available)}; on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts"
        )
    return jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Explicit,), devices=available[:n])


def forward(graphdef, params, inputs, valid, ex: exchange.Exchange, mode: Mode = PLAIN):
    """One device's forward pass: merge the module, take its view of the inference, run it."""
    local = exchange.local_view(ex, valid, inputs.get("position_ids"))
    return nnx.merge(graphdef, params)(inputs, ex, local, mode)


def spread(per_device, cfg: ModelConfig, plan: Plan, mesh: Mesh | None, *, out_specs):
    """The one `jax.jit(jax.shard_map(...))` site: `per_device(params, inputs, valid, *, ex)`,
    one device's work, compiled for the reference path (no mesh) or over `mesh` with the
    params replicated, the inputs split along the token axis and the validity of every
    position replicated. The plan's `exchange` is resolved for the model first
    (`Plan.for_model`)."""
    plan = plan.for_model(cfg)
    if mesh is None:
        ex = exchange.Exchange(plan, None, 1, cfg.causal)
        return jax.jit(functools.partial(per_device, ex=ex))
    if plan.strategy == "single":  # split over a mesh, each device would see only its tokens
        raise PrismError("strategy 'single' runs on one device: call it without a mesh")
    ex = exchange.Exchange(plan, AXIS, mesh.shape[AXIS], cfg.causal)
    if plan.transport == "stream" and ex.active:
        stream.connect(mesh)  # every node builds its program here: they meet
    return jax.jit(
        jax.shard_map(
            functools.partial(per_device, ex=ex),
            mesh=mesh,
            in_specs=(P(), P(None, AXIS), P()),
            out_specs=out_specs,
        )
    )


@functools.cache
def program(graphdef, cfg: ModelConfig, plan: Plan, mesh: Mesh | None, *, straight=False):
    """The compiled inference program `(params, inputs, valid) -> (tokens, cls)`.

    Without a mesh: the single-device reference. With one: per-device outputs come back as
    tokens `[B, N*L, ...]` and cls rows `[N, B, ...]`. `straight` traces it without loops,
    for `cost` (`layers.Mode.unrolled`).
    """
    mode = Mode(unrolled=straight)

    def per_device(params, inputs, valid, *, ex):
        tokens, cls = forward(graphdef, params, inputs, valid, ex, mode)
        if ex.axis_name is not None:  # one CLS row per device, stacked
            cls = jax.tree.map(lambda x: x[None], cls)
        return tokens, cls

    return spread(per_device, cfg, plan, mesh, out_specs=(P(None, AXIS), P(AXIS)))


def place(model: Model, where: Mesh | jax.Device):
    """The model's params replicated on every device of a mesh, or on one device (cached per
    mesh or device for these very arrays: params replaced, or a weight updated in place, are
    placed anew)."""
    leaves = jax.tree.leaves(model.params)
    source, placed = model.placed.get(where, ((), None))
    if len(source) != len(leaves) or any(a is not b for a, b in zip(source, leaves, strict=True)):
        if isinstance(where, Mesh):
            placed = jax.tree.map(lambda x: put(x, where, P()), model.params)
        else:
            placed = jax.device_put(model.params, where)
        model.placed[where] = (tuple(leaves), placed)  # the leaves kept: their ids stay unique
    return placed


def put(x, mesh: Mesh, spec: P) -> jax.Array:
    """Place a host or local array on the mesh, each process filling its own devices from its
    own copy: nothing crosses the network, also when the mesh spans several processes."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])


def shard_inputs(inputs: dict, valid: np.ndarray, mesh: Mesh):
    """Pad the token axis to N*L and place: inputs split over `"edge"`, validity replicated."""
    n = mesh.shape[AXIS]
    t = valid.shape[1]
    if n > t:
        raise PrismError(f"{n} devices but only {t} tokens: each device needs at least one")
    pad = -(-t // n) * n - t

    def pad_tokens(x):
        return np.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

    inputs = {k: put(pad_tokens(v), mesh, P(None, AXIS)) for k, v in inputs.items()}
    return inputs, put(pad_tokens(valid), mesh, P())


def checked(model, plan, mesh) -> tuple[Plan, Mesh | None]:
    """The public API's `model`, `plan` and `mesh` arguments checked (a `Model`, a `Plan` or
    None for `Plan()`, None or a mesh with an "edge" axis); returns (plan, mesh)."""
    checks.instance("model", model, Model, "a prism_jax.Model (pj.load_pretrained)")
    plan = Plan() if plan is None else plan
    checks.instance("plan", plan, Plan, "a prism_jax.Plan, e.g. pj.Plan(cr=8)")
    if mesh is not None:
        checks.instance("mesh", mesh, Mesh, "a mesh from pj.edge_mesh(n), or None")
        if mesh.axis_names != (AXIS,):
            raise PrismError(f"mesh must have the one axis {AXIS!r}, got {mesh.axis_names}")
    return plan, mesh


def infer(model: Model, batch: dict, *, mesh: Mesh | None = None, plan: Plan | None = None):
    """Run one inference (DESIGN.md section 2).

    Args:
      model: from `load_pretrained` (or `models.init`).
      batch: HF names and layouts: `input_ids`, `attention_mask`, `token_type_ids` (BERT),
        `pixel_values` `[B, C, H, W]` (ViT).
      mesh: an `edge_mesh(n)`; None runs the single-device reference.
      plan: strategy, CR and logit bias; defaults to `Plan()` (prism at CR = 1). The
        `single` strategy, or no mesh, runs the reference on one device.

    Returns:
      NumPy arrays, gathered to the host: `last_hidden_state` `[B, T, D]` in token
      order, padding dropped; `logits` when the checkpoint has a head (`[B, C]` classifier,
      `[B, T, V]` LM); `pooler_output` when it has a pooler.
    """
    plan, mesh = checked(model, plan, mesh)
    inputs, valid = model.prepare(batch)
    if mesh is None or plan.strategy == "single":
        tokens, cls = program(model.graphdef, model.config, plan, None)(model.params, inputs, valid)
        return jax.tree.map(np.asarray, {**tokens, **cls})
    t = valid.shape[1]
    inputs, valid = shard_inputs(inputs, valid, mesh)
    fn = program(model.graphdef, model.config, plan, mesh)
    tokens, cls = fn(place(model, mesh), inputs, valid)
    # The caller gathers: token outputs in order without the padding, cls rows from device 0.
    tokens = {k: to_host(v)[:, :t] for k, v in tokens.items()}
    return {**tokens, **{k: to_host(v)[0] for k, v in cls.items()}}


@functools.cache
def logprob_program(graphdef, cfg: ModelConfig, plan: Plan, mesh: Mesh | None, *, picked: bool):
    """The log-probabilities of next tokens under an LM head, computed inside the program: the
    `[B, T, V]` logits never leave the device(s).

    `picked=False`: `(params, inputs, valid, targets) -> [B, T]`, every position on the device
    that holds it. `picked=True`: `(params, inputs, valid, where, targets) -> [B, S]`, only the
    S positions `where` `[B, S]`; their final hidden states are gathered (`[B, S, D]`) and the
    head runs on those alone (XLA drops the unused full-sequence head)."""
    forward = program(graphdef, cfg, plan, mesh)

    def logprobs(logits, targets):
        logits = logits.astype(jnp.float32)
        chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return chosen - jax.nn.logsumexp(logits, axis=-1)

    def every(params, inputs, valid, targets):
        return logprobs(forward(params, inputs, valid)[0]["logits"], targets)

    def at(params, inputs, valid, where, targets):
        hidden = forward(params, inputs, valid)[0]["last_hidden_state"]
        if mesh is not None:
            hidden = jax.sharding.reshard(hidden, NamedSharding(mesh, P()))
        hidden = jnp.take_along_axis(hidden, where[..., None], axis=1)  # [B, S, D]
        return logprobs(nnx.merge(graphdef, params).logits(hidden), targets)

    return jax.jit(at if picked else every)


def next_token_logprobs(
    model: Model,
    batch: dict,
    *,
    mesh: Mesh | None = None,
    plan: Plan | None = None,
    where: np.ndarray | None = None,
) -> np.ndarray:
    """log p(`input_ids[:, t+1]` | tokens up to t) of a causal LM, float32, the log-softmax
    taken on the device(s) so that only `[B, T]` or less comes back to the host.

    Args:
      where: `[B, S]` positions t to score (each < T - 1); None scores every t: `[B, T-1]`.
    """
    plan, mesh = checked(model, plan, mesh)
    if model.config.head != "lm":
        raise PrismError("next-token log-probabilities need an LM head")
    inputs, valid = model.prepare(batch)
    ids = np.asarray(batch["input_ids"], np.int32)
    t = valid.shape[1]
    on_mesh = mesh is not None and plan.strategy != "single"
    fn = logprob_program(
        model.graphdef, model.config, plan, mesh if on_mesh else None, picked=where is not None
    )
    params = place(model, mesh) if on_mesh else model.params
    if where is not None:
        where = np.asarray(where, np.int32)
        targets = np.take_along_axis(ids, where + 1, axis=1)
        if on_mesh:
            inputs, valid = shard_inputs(inputs, valid, mesh)
            where, targets = put(where, mesh, P()), put(targets, mesh, P())
        return to_host(fn(params, inputs, valid, where, targets))
    targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
    if on_mesh:
        inputs, valid = shard_inputs({**inputs, "targets": targets}, valid, mesh)
        targets = inputs.pop("targets")
    return to_host(fn(params, inputs, valid, targets))[:, : t - 1]


def to_host(x: jax.Array) -> np.ndarray:
    """A whole array on the host, gathered from other processes when the mesh spans them."""
    if x.is_fully_addressable:
        return np.asarray(x)

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
