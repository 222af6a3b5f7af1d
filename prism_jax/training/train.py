"""Fine-tuning with optax under any plan: `single`, or `prism` at (N, CR) with gradients through
the `shard_map` and the exchange, so that a model learns to work at a compression rate.

Deterministic for a seed: the batch of step s is a pure function of (seed, s), so a run
resumed from a checkpoint at step s continues exactly as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from prism_jax.checks import as_int
from prism_jax.configs import ModelConfig
from prism_jax.errors import PrismError
from prism_jax.models import Model
from prism_jax.partition import AXIS, place, program, put, shard_inputs
from prism_jax.plan import Plan
from prism_jax.training.checkpoint import Checkpoints


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """AdamW with linear warm-up and cosine decay, global-norm clipping."""

    steps: int
    batch_size: int = 16
    lr: float = 5e-5
    warmup: int = 0
    final_lr: float = 0.1  # the cosine decays to final_lr * lr
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0
    distill: float = 0.0  # weight of KL(exact starting model || trained model), beside the CE
    checkpoint_every: int = 50
    keep: int = 3

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "keep"):
            _check(self, name, lambda v: as_int(v) is not None and v >= 1, "an integer >= 1")
        _check(self, "warmup", lambda v: as_int(v) is not None and v >= 0, "an integer >= 0")
        _check(self, "seed", lambda v: as_int(v) is not None, "an integer")
        _check(self, "lr", lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
        _check(self, "final_lr", lambda v: 0 <= v <= 1, "a fraction of lr in [0, 1]")
        _check(self, "weight_decay", lambda v: math.isfinite(v) and v >= 0, "finite and >= 0")
        _check(self, "clip", lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
        _check(self, "distill", lambda v: math.isfinite(v) and v >= 0, "finite and >= 0")


def _check(cfg: TrainConfig, name: str, ok, what: str) -> None:
    value = getattr(cfg, name)
    try:
        good = bool(ok(value))
    except TypeError:
        good = False
    if not good:
        raise PrismError(f"{name} must be {what}, got {value!r}")


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to lr, then cosine decay to final_lr * lr at the last step."""
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup, max(cfg.steps, cfg.warmup + 1), end_value=cfg.final_lr * cfg.lr
    )


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip),
        optax.adamw(schedule(cfg), weight_decay=cfg.weight_decay),
    )


def run_record(model: Model, examples: dict, cfg: TrainConfig, plan: Plan, mesh, crs=None) -> dict:
    """What a resumed run must share with the one that wrote the checkpoints: every setting
    but the step count (a run may be extended) and checkpointing, the plan and device count,
    and CRC-32 fingerprints of the starting parameters and of the training data."""

    def crc(arrays) -> str:
        value = 0
        for a in arrays:
            value = zlib.crc32(np.ascontiguousarray(np.asarray(a)).tobytes(), value)
        return f"{value:08x}"

    skip = {"steps", "checkpoint_every", "keep"} | ({"distill"} if not cfg.distill else set())
    return {
        **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip},
        "plan": dataclasses.asdict(plan),
        "crs": None if crs is None else [int(c) for c in crs],
        "devices": mesh.shape[AXIS] if mesh is not None else 1,
        "start": crc(jax.tree.leaves(model.params)),
        "data": crc(examples[k] for k in sorted(examples)),
    }


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Examples of step `step`: a stream of per-epoch permutations, cut into batches."""
    start = step * batch_size
    positions = np.arange(start, start + batch_size)
    epochs = {
        int(e): np.random.default_rng([seed, int(e)]).permutation(n)
        for e in np.unique(positions // n)
    }
    return np.array([epochs[int(p // n)][p % n] for p in positions])


def step_cr(crs, seed: int, step: int) -> int:
    """The CR of step `step` in mixed-CR training: each run of len(crs) steps visits every CR
    once, in an order shuffled per run; a pure function of (seed, step) like the batch, so
    that a resumed run draws the same."""
    cycle, i = divmod(step, len(crs))
    return int(crs[np.random.default_rng([seed, cycle, 1]).permutation(len(crs))[i]])


def loss(head: str, logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Cross-entropy of the CLS logits `[B, C]` against `targets` `[B]` (classifier), or of
    every position's logits `[B, T, V]` against the next token `targets` `[B, T]` (LM),
    weighted by `weights`."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return _mean(head, ce, weights)


def distillation(head: str, logits: jax.Array, teacher: jax.Array, weights: jax.Array):
    """KL(teacher || model) of the CLS logits or of every position's logits, weighted like
    `loss`: what pulls a compressed model back to the exact one's predictions (the teacher
    is the starting model, run exactly)."""
    t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher).astype(jnp.float32), axis=-1)
    kl = (jnp.exp(t) * (t - jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))).sum(-1)
    return _mean(head, kl, weights)


def _mean(head: str, per_example: jax.Array, weights: jax.Array) -> jax.Array:
    if head == "classifier":
        return per_example.mean()
    return (per_example * weights).sum() / jnp.maximum(weights.sum(), 1)


def next_token_targets(ids: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`[B, T]` next-token targets and weights (1 where both tokens are valid)."""
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    weights = np.zeros(ids.shape, np.float32)
    weights[:, :-1] = valid[:, 1:] & valid[:, :-1]
    return targets, weights


@dataclasses.dataclass
class Run:
    """What `train` returns: the trained model and the loss after each step."""

    model: Model
    losses: list[float]
    resumed_from: int | None
    evals: list[dict] = dataclasses.field(default_factory=list)


def train(
    model: Model,
    examples: dict,
    cfg: TrainConfig,
    *,
    plan: Plan | None = None,
    mesh=None,
    checkpoint_dir=None,
    restart: bool = False,
    progress: bool = True,
    on_checkpoint=None,
    evaluate=None,
    crs=None,
) -> Run:
    """Fine-tune `model` on `examples` under `plan`.

    Args:
      model: a model with a classifier or LM head.
      examples: an HF-style batch of the whole training set (`input_ids`, ..., padded to one
        length, or `pixel_values`), plus `labels` `[n]` for classifiers.
      cfg: optimisation settings.
      plan, mesh: the execution plan; `prism` with a mesh trains through the exchange.
      checkpoint_dir: where orbax keeps the last `cfg.keep` states; an existing run resumes.
      restart: delete the directory's checkpoints and start over.
      progress: show a progress bar with loss and throughput.
      on_checkpoint: called with the step number after each checkpoint is written.
      evaluate: called with the model at the end of each epoch and of training; returns a
        dict of metrics, kept in `Run.evals` and shown beside the progress bar.
      crs: mixed-CR training (prism only): each step runs at a CR drawn from these
        (`step_cr`) instead of `plan.cr`, so that one model learns every CR.
    """
    plan = plan or Plan(strategy="single")
    mesh = mesh if plan.strategy != "single" else None  # `single` runs on one device
    if crs is not None:
        crs = [_positive_cr(c) for c in crs]
        if plan.strategy != "prism" or mesh is None or not crs:
            raise PrismError("mixed compression rates need the prism strategy on a mesh")
    labels = np.asarray(examples.get("labels", np.zeros(1, np.int32)), np.int32)
    hf = {k: np.asarray(v) for k, v in examples.items() if k != "labels"}
    n = len(next(iter(hf.values())))
    step_fn = _stepper(model, cfg, plan, mesh, crs)
    ckpt = Checkpoints(checkpoint_dir, keep=cfg.keep) if checkpoint_dir else None
    try:
        state, teacher = _initial_state(model, cfg, mesh)
        start = 0
        if ckpt:
            record = run_record(model, examples, cfg, plan, mesh, crs)
            start, state = _resume(ckpt, record, state, restart, steps=cfg.steps)
        losses, evals = [], []
        bar = tqdm(
            range(start, cfg.steps), desc="fine-tuning", disable=not progress, initial=start,
            total=cfg.steps,
        )  # fmt: skip
        for step in bar:
            idx = batch_indices(n, cfg.batch_size, cfg.seed, step)
            tic = time.perf_counter()
            state, value = _step(step_fn, step, state, teacher, ckpt,
                                 _step_inputs(model, hf, labels, idx, mesh))  # fmt: skip
            losses.append(value)
            bar.set_postfix(
                loss=f"{losses[-1]:.4f}", ex_per_s=f"{len(idx) / (time.perf_counter() - tic):.1f}"
            )
            if ckpt and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                ckpt.save(step + 1, state)
                if on_checkpoint:
                    on_checkpoint(step + 1)
            epoch_end = (step + 1) * cfg.batch_size // n > step * cfg.batch_size // n
            if evaluate and (epoch_end or step + 1 == cfg.steps):
                evals.append({"step": step + 1, **evaluate(_host_model(model, state))})
                if progress:
                    bar.write(_metrics_line(evals[-1]), file=sys.stderr)
    finally:
        if ckpt:
            ckpt.close()
    return Run(_host_model(model, state), losses, start or None, evals)


def _stepper(model: Model, cfg: TrainConfig, plan: Plan, mesh, crs):
    """`step_fn(step, *args)`: the compiled training step at the step's CR (`plan.cr`, or a
    draw from `crs` for mixed-CR training), each CR's compiled once."""
    compiled = {}

    def step_fn(step, *args):
        cr = plan.cr if crs is None else step_cr(crs, cfg.seed, step)
        if cr not in compiled:
            at_cr = dataclasses.replace(plan, cr=cr)
            compiled[cr] = _step_function(model.graphdef, model.config, cfg, at_cr, mesh)
        return compiled[cr](*args)

    return step_fn


def _initial_state(model: Model, cfg: TrainConfig, mesh):
    """The train state at step 0 (`{"params", "opt"}`, all of it on the mesh if any, the step
    count too, as a restore puts it) and the distillation teacher (the starting params)."""
    params = place(model, mesh) if mesh is not None else model.params
    state = {"params": params, "opt": optimizer(cfg).init(params)}
    if mesh is not None:
        state = jax.tree.map(lambda x: put(x, mesh, P()), state)
    return state, params if cfg.distill else None


def _step(step_fn, step: int, state, teacher, ckpt, batch):
    """One optimizer step -> (the new state, its loss); a step that is not finite stops
    training with the last good state kept (never stepped or saved into)."""
    params, opt_state, value, finite = step_fn(step, state["params"], state["opt"], teacher, *batch)
    if not finite:
        raise PrismError(_not_finite(step + 1, float(value), ckpt))
    return {"params": params, "opt": opt_state}, float(value)


def _positive_cr(value) -> int:
    cr = as_int(value)
    if cr is None or cr < 1:
        raise PrismError(f"every mixed compression rate must be an integer >= 1, got {value!r}")
    return cr


def gradients(graphdef, model_cfg: ModelConfig, cfg: TrainConfig, plan: Plan, mesh):
    """`(params, teacher, inputs, valid, targets, weights) -> (loss, grads)` of one batch
    (not jitted; `_step_function` traces it into the step). `teacher`: the starting
    parameters, run exactly (`voltage` on a mesh) for `cfg.distill`, else None."""
    head = model_cfg.head
    if head not in ("classifier", "lm"):
        raise PrismError("fine-tuning needs a classifier or LM head")
    forward = program(graphdef, model_cfg, plan, mesh)
    exact = None  # the teacher's program: exact on the mesh (`voltage`), else the same one
    if cfg.distill:
        exact = program(graphdef, model_cfg, Plan(strategy="voltage"), mesh) if mesh else forward

    def outputs(fn, params, inputs, valid):
        tokens, cls = fn(params, inputs, valid)
        if mesh is not None:  # one CLS row per device: replicate them, read device 0's
            cls = {k: jax.reshard(v, NamedSharding(mesh, P()))[0] for k, v in cls.items()}
        return (cls if head == "classifier" else tokens)["logits"]

    def value_and_grad(params, teacher, inputs, valid, targets, weights):
        if cfg.distill:
            reference = outputs(exact, teacher, inputs, valid)

        def objective(p):
            got = outputs(forward, p, inputs, valid)
            value = loss(head, got, targets, weights)
            if cfg.distill:
                value += cfg.distill * distillation(head, got, reference, weights)
            return value

        return jax.value_and_grad(objective)(params)

    return value_and_grad


@functools.cache
def _step_function(graphdef, model_cfg: ModelConfig, cfg: TrainConfig, plan: Plan, mesh):
    """The jitted training step `(params, opt_state, teacher, inputs, valid, targets,
    weights) -> (params, opt_state, loss, finite)`; `finite` is False when the loss or the
    update is not. Cached, so that a resumed or repeated run in the same process compiles
    nothing again."""
    value_and_grad = gradients(graphdef, model_cfg, cfg, plan, mesh)
    opt = optimizer(cfg)

    def step_fn(params, opt_state, teacher, *batch):
        value, grads = value_and_grad(params, teacher, *batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        finite = jnp.isfinite(value) & jnp.isfinite(optax.tree.norm(updates))
        return optax.apply_updates(params, updates), opt_state, value, finite

    return jax.jit(step_fn)


def _step_inputs(model: Model, hf: dict, labels: np.ndarray, idx: np.ndarray, mesh):
    """(inputs, valid, targets, weights) of the examples `idx`, placed on the mesh if any."""
    inputs, valid = model.prepare({k: v[idx] for k, v in hf.items()})
    if model.config.head == "classifier":
        targets, weights = labels[idx], np.ones(len(idx), np.float32)
    else:
        targets, weights = next_token_targets(inputs["input_ids"], valid)
    if mesh is None:
        return inputs, valid, targets, weights
    if model.config.head == "classifier":
        targets, weights = put(targets, mesh, P()), put(weights, mesh, P())
    else:
        per_token, _ = shard_inputs({"t": targets, "w": weights}, valid, mesh)
        targets, weights = per_token["t"], per_token["w"]
    return *shard_inputs(inputs, valid, mesh), targets, weights


def _resume(ckpt: Checkpoints, record: dict, state, restart: bool, *, steps: int):
    """(first step, state): the latest checkpoint of this run, or step 0 for a new one. A
    run may be extended, not shortened: checkpoints past `steps` are refused (else the model
    returned would have trained longer than asked)."""
    if restart:
        ckpt.clear()
    latest = ckpt.latest_step()
    if latest is None:
        ckpt.record_run(record)
        return 0, state
    ckpt.check_run(record)
    if latest > steps:
        raise PrismError(
            f"{ckpt.directory} holds this run's checkpoints up to step {latest}, past steps="
            f"{steps}; ask for steps >= {latest}, use another directory, or start over with "
            "restart=True (--restart)"
        )
    return ckpt.restore(state)


def _host_model(model: Model, state) -> Model:
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state["params"])  # host copy
    return Model(
        model.config, model.graphdef, params, model.tokenizer, model.image_processor,
        model.generation,
    )  # fmt: skip


def _metrics_line(metrics: dict) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )


def _not_finite(step: int, value: float, ckpt: Checkpoints | None) -> str:
    kept = (
        f"the last good checkpoint (step {ckpt.latest_step()}) is kept in {ckpt.directory}"
        if ckpt and ckpt.latest_step() is not None
        else "no checkpoint was written"
    )
    return (
        f"training stopped at step {step}: the loss or its gradient is not finite (loss "
        f"{value}); {kept}; try a lower learning rate"
    )
