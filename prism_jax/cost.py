"""What an inference costs each device: bytes sent and FLOPs (DESIGN.md section 3).

Closed forms live beside the measurements so that tests can hold one to the other.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from prism_jax import checks, exchange, models
from prism_jax.checkpoints import hf, safetensors
from prism_jax.configs import PRESETS, ModelConfig
from prism_jax.errors import PrismError
from prism_jax.partition import AXIS, edge_mesh, program
from prism_jax.plan import Plan


def local_len(seq_len: int, devices: int) -> int:
    """L = ceil(T / N): tokens per device after padding T up to N*L."""
    return math.ceil(seq_len / devices)


def exchange_width(cfg: ModelConfig, plan: Plan) -> int:
    """Values per token or group that travel: D (`hidden`) or 2*H_kv*K (`kv`)."""
    return cfg.width if plan.for_model(cfg).exchange == "hidden" else cfg.kv_width


def bytes_closed_form(
    cfg: ModelConfig,
    plan: Plan,
    *,
    devices: int,
    seq_len: int,
    batch: int = 1,
    dtype_bytes: int = 4,
) -> int:
    """Bytes one device sends per inference: per layer B*L*W*`dtype_bytes` (voltage: the
    activations as computed) or B*S*`group_bytes` (prism: per group the means on the plan's
    wire, int8's scales, the count and the tilt's statistics), times the depth, with W = D
    (hidden exchange) or 2*H_kv*K (kv exchange, DESIGN.md section 1a); nothing for `single`
    or a single device."""
    checks.instance("plan", plan, Plan, "a prism_jax.Plan")
    devices = checks.integer("devices", devices, 1)
    seq_len = checks.integer("seq_len", seq_len, 1)
    batch = checks.integer("batch", batch, 1)
    dtype_bytes = checks.integer("dtype_bytes", dtype_bytes, 1, 8)
    if plan.strategy == "single" or devices == 1:
        return 0
    l = local_len(seq_len, devices)
    w = exchange_width(cfg, plan)
    if plan.strategy == "voltage":
        return cfg.depth * batch * l * w * dtype_bytes
    return cfg.depth * batch * plan.segments(l) * group_bytes(cfg, plan)


def group_bytes(cfg: ModelConfig, plan: Plan) -> int:
    """Bytes one group sends under prism (DESIGN.md sections 1d and 3): its W means at the
    wire's width (`exchange.wire_width`: int4 and int4h ceil(W / 2) bytes), with the integer
    wires a float32 scale per vector (one for hidden, 2*H_kv for kv), its count (int32) and
    its tilt statistics (float32 each, `tilt_stats`)."""
    w = exchange_width(cfg, plan)
    words = 1 + tilt_stats(cfg, plan)  # 4-byte words: the count, the tilt's statistics
    if plan.wire in exchange.LEVELS:
        words += 1 if plan.for_model(cfg).exchange == "hidden" else 2 * cfg.kv_heads
    size = jnp.dtype(exchange.WIRE_DTYPES[plan.wire]).itemsize
    return exchange.wire_width(w, plan.wire) * size + 4 * words


def tilt_stats(cfg: ModelConfig, plan: Plan) -> int:
    """Float32 statistics each group sends for the value tilt (DESIGN.md section 1b): its
    spread s2, and for rotary keys also its mean position and position variance."""
    if not plan.value_tilt or plan.strategy != "prism":
        return 0
    return 3 if cfg.rope_theta is not None else 1


def flops_closed_form(
    cfg: ModelConfig, plan: Plan, *, devices: int, seq_len: int, batch: int = 1
) -> int:
    """Matmul FLOPs of one device's Transformer layers (no embeddings, heads or elementwise).

    Per layer, with q query rows and m key/value rows (T and T for `single`, L and N*L for
    `voltage`, L and L + (N-1)*S for `prism`), D width, H heads and H_kv KV heads of size K,
    F MLP width: query and output projections 4*q*D*H*K; key and value projections
    4*r*D*H_kv*K for the r rows projected here (m with hidden exchange, q with kv exchange);
    MLP 4*q*D*F (6*q*D*F gated); attention scores and values 4*q*m*H*K. For BERT at N = 2,
    T = 256, CR = 128 this is how the paper's -51.24 % comes about.
    """
    d, f, hk, gk = cfg.width, cfg.mlp_width, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    if plan.strategy == "single" or devices == 1:
        q = m = seq_len
    else:
        q = local_len(seq_len, devices)
        m = q * devices if plan.strategy == "voltage" else q + (devices - 1) * plan.segments(q)
    projected = q if plan.for_model(cfg).exchange == "kv" else m
    per_layer = (
        4 * q * d * hk
        + 4 * projected * d * gk
        + (6 if cfg.gated_mlp else 4) * q * d * f
        + 4 * q * m * hk
    )
    return cfg.depth * batch * per_layer


# --- measured from the program that actually runs ------------------------------------------

_COLLECTIVES = re.compile(
    r'"stablehlo\.(all_gather|all_reduce|all_to_all|reduce_scatter|collective_permute|'
    r'collective_broadcast)"'
)
_SPLIT_COUNT = re.compile(r"split_count = (\d+)")
_SIGNATURE = re.compile(r":\s*\((tensor<[^>]*>(?:,\s*tensor<[^>]*>)*)\)\s*->")
_TENSOR = re.compile(r"tensor<((?:\d+x)*)([a-z]+\d*)>")
_DTYPE_BYTES = {
    "f64": 8,
    "f32": 4,
    "bf16": 2,
    "f16": 2,
    "i64": 8,
    "i32": 4,
    "i16": 2,
    "i8": 1,
    "ui8": 1,
    "i1": 1,
}


def collective_bytes(stablehlo: str) -> tuple[int, list[tuple[str, int]]]:
    """Bytes one device sends each other device through the collectives of a lowered
    (per-device) program: the operand of each collective, in its logical dtype (an
    all-to-all's, one of its `split_count` parts: what each peer gets, as an all-gather's
    block). Returns (total, [(op, bytes)])."""
    ops = []
    for match in _COLLECTIVES.finditer(stablehlo):
        signature = _SIGNATURE.search(stablehlo, match.end())
        size = 0
        for dims, dtype in _TENSOR.findall(signature.group(1)):
            count = math.prod(int(d) for d in dims.split("x") if d)
            size += count * _DTYPE_BYTES[dtype]
        if match.group(1) == "all_to_all":
            size //= int(_SPLIT_COUNT.search(stablehlo, match.end(), signature.start()).group(1))
        ops.append((match.group(1), size))
    return sum(size for _, size in ops), ops


def abstract_inputs(cfg: ModelConfig, *, batch: int, seq_len: int, dtype) -> tuple[dict, tuple]:
    """ShapeDtypeStructs of a batch's model inputs (token axis second) and validity shape."""
    if cfg.family == "vit":
        width = cfg.channels * cfg.patch_size**2
        inputs = {"patches": jax.ShapeDtypeStruct((batch, seq_len, width), dtype)}
    else:
        ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
        inputs = {"input_ids": ids, **({"token_type_ids": ids} if cfg.family == "bert" else {})}
    return inputs, (batch, seq_len)


def lower(
    cfg: ModelConfig,
    plan: Plan,
    *,
    devices: int,
    seq_len: int,
    batch: int = 1,
    dtype="float32",
    straight: bool = True,
):
    """Lower the inference program for abstract weights and inputs (nothing is allocated).
    `straight` (the default, for costs): XLA's cost analysis counts a loop body once, so the
    layers are unrolled and attention is dense (the same FLOPs as the scanned program runs);
    False lowers the program inference runs."""

    dtype = jnp.dtype(dtype)
    model = models.abstract(cfg)
    single = plan.strategy == "single"
    mesh = None if single else edge_mesh(devices)
    t = seq_len if single else local_len(seq_len, devices) * devices

    def placed(s, spec):
        return jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=None if single else NamedSharding(mesh, spec)
        )

    params = jax.tree.map(lambda s: placed(jax.ShapeDtypeStruct(s.shape, dtype), P()), model.params)
    inputs, valid_shape = abstract_inputs(cfg, batch=batch, seq_len=t, dtype=dtype)
    inputs = {k: placed(v, P(None, AXIS)) for k, v in inputs.items()}
    valid = placed(jax.ShapeDtypeStruct(valid_shape, jnp.bool_), P())
    return program(model.graphdef, cfg, plan, mesh, straight=straight).lower(params, inputs, valid)


def compiled_flops(compiled) -> float:
    """FLOPs of a compiled program, from XLA's cost analysis (a loop body counted once)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older JAX: one dict per program
        analysis = analysis[0]
    return float(analysis["flops"])


@dataclasses.dataclass(frozen=True)
class CostReport:
    """Per-device cost of one inference, measured from the compiled program.

    Attributes:
      bytes_sent: bytes one device sends (collective operands of the lowered program).
      bytes_closed_form: the same from DESIGN.md section 3's closed form.
      bytes_voltage: bytes_sent of `voltage` at the same N (the full-exchange baseline).
      flops: FLOPs of one device's program (XLA cost analysis).
      flops_single: FLOPs of `single` on the whole sequence.
      flops_matmul, flops_matmul_single: the matmul closed forms of the same two.
    """

    model: str
    strategy: str
    cr: int
    logit_bias: str
    exchange: str
    devices: int
    seq_len: int
    batch: int
    dtype: str
    bytes_sent: int
    bytes_closed_form: int
    bytes_voltage: int
    flops: float
    flops_single: float
    flops_matmul: int
    flops_matmul_single: int

    @property
    def comm_reduction(self) -> float:
        """1 - bytes / voltage bytes (0 when nothing is exchanged at all)."""
        return 1 - self.bytes_sent / self.bytes_voltage if self.bytes_voltage else 0.0

    @property
    def compute_reduction(self) -> float:
        """1 - per-device FLOPs / FLOPs of one device running the whole sequence."""
        return 1 - self.flops / self.flops_single

    @property
    def matmul_reduction(self) -> float:
        """The same reduction from the matmul closed form."""
        return 1 - self.flops_matmul / self.flops_matmul_single

    def as_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "comm_reduction": self.comm_reduction,
            "compute_reduction": self.compute_reduction,
            "matmul_reduction": self.matmul_reduction,
        }


def param_dtype(model) -> str:
    """A `Model`'s parameter dtype (its first floating leaf), else float32."""
    if isinstance(model, models.Model):
        for leaf in jax.tree.leaves(model.params):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                return jnp.dtype(leaf.dtype).name
    return "float32"


def resolve_config(model) -> tuple[str, ModelConfig]:
    """A preset name, checkpoint directory, `Model` or `ModelConfig` -> (name, config)."""

    if isinstance(model, ModelConfig):
        return model.family, model
    if hasattr(model, "config") and isinstance(model.config, ModelConfig):
        return model.config.family, model.config
    if str(model) in PRESETS:
        return str(model), PRESETS[str(model)]()
    directory = Path(checks.path("model", model))
    if not directory.is_dir():
        raise PrismError(
            f"{model} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory"
        )
    config = hf.read_config(directory)
    return str(model), hf.make_config(config, set(safetensors.read_checkpoint_tensors(directory)))


def measure(
    model,
    plan: Plan,
    *,
    devices: int,
    seq_len: int | None = None,
    batch: int = 1,
    dtype: str | None = None,
) -> CostReport:
    """Bytes and FLOPs per device for one inference, from the compiled programs.

    Args:
      model: a preset name (`bert-base`, `gpt2`, `vit-base-patch16-224`), a checkpoint
        directory, a `Model` or a `ModelConfig`. Weights are never needed: the program is
        lowered for abstract arrays.
      plan: the plan to cost.
      devices: N.
      seq_len: T; a ViT's is fixed by its image and patch size (1 + P).
      batch: B.
      dtype: `float32` or `bfloat16`, for weights and activations; None: a `Model`'s own
        parameter dtype, else float32.
    """
    checks.instance("plan", plan, Plan, "a prism_jax.Plan, e.g. pj.Plan(cr=8)")
    name, cfg = resolve_config(model)
    if cfg.family == "vit":
        if seq_len not in (None, cfg.max_positions):
            raise PrismError(f"a ViT sees {cfg.max_positions} tokens, not {seq_len!r}")
        seq_len = cfg.max_positions
    if checks.as_int(seq_len) is None or not 1 <= seq_len <= cfg.max_positions:
        raise PrismError(f"--seq-len must be in [1, {cfg.max_positions}], got {seq_len!r}")
    devices = checks.integer("devices", devices, 1)
    if devices > seq_len:
        raise PrismError(f"{devices} devices but only {seq_len} tokens")
    batch = checks.integer("batch", batch, 1)
    if dtype is None:
        dtype = param_dtype(model)
    if dtype not in ("float32", "bfloat16"):
        raise PrismError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    shape = dict(devices=devices, seq_len=seq_len, batch=batch, dtype=dtype)
    sent, flops = _program_counts(cfg, plan, flops=True, **shape)
    dtype_bytes = 2 if dtype == "bfloat16" else 4
    return CostReport(
        model=name,
        strategy=plan.strategy,
        cr=plan.cr,
        logit_bias=plan.logit_bias,
        exchange=plan.for_model(cfg).exchange,
        devices=devices,
        seq_len=seq_len,
        batch=batch,
        dtype=dtype,
        bytes_sent=sent,
        bytes_closed_form=bytes_closed_form(
            cfg, plan, devices=devices, seq_len=seq_len, batch=batch, dtype_bytes=dtype_bytes
        ),
        bytes_voltage=_voltage_bytes(cfg, **shape),
        flops=flops,
        flops_single=_single_flops(cfg, seq_len=seq_len, batch=batch, dtype=dtype),
        flops_matmul=flops_closed_form(cfg, plan, devices=devices, seq_len=seq_len, batch=batch),
        flops_matmul_single=flops_closed_form(
            cfg, Plan(strategy="single"), devices=1, seq_len=seq_len, batch=batch
        ),
    )


SHALLOW = 5  # deeper models are counted from programs of 2 and 3 layers (`by_depth`)


def by_depth(cfg: ModelConfig, count: Callable[[ModelConfig], tuple]) -> tuple:
    """`count(cfg)`, a tuple of counts of a straight program, taken from shallower copies of
    the model when it has more than SHALLOW layers: its layers are alike, so each adds the
    same bytes and FLOPs and count(L) = count(2) + (L - 2) * (count(3) - count(2)). The time
    to lower and compile for a cost then no longer grows with depth. Tested against the whole
    program: bytes equal, FLOPs within 1e-6 (widths >= 64; at toy widths XLA fuses post-norm
    BERT's residual stream across unrolled layers and counts earlier layers again in later
    ones, work the scanned program never does, so the whole program counts more)."""
    if cfg.depth <= SHALLOW:
        return count(cfg)
    two, three = (count(dataclasses.replace(cfg, depth=d)) for d in (2, 3))
    return tuple(a + (cfg.depth - 2) * (b - a) for a, b in zip(two, three, strict=True))


def _program_counts(cfg: ModelConfig, plan: Plan, *, flops: bool, **shape) -> tuple[int, float]:
    """(bytes one device sends, its FLOPs, or 0 without `flops`) of the straight program,
    each depth `by_depth` needs lowered once (and compiled only for the FLOPs). The stream's
    blocks leave by a host callback, no collective: it is counted as the all-gather that sends
    the same block to each peer (and does the same work)."""
    if plan.transport == "stream":
        plan = dataclasses.replace(plan, transport="all_gather")

    def count(c: ModelConfig) -> tuple[int, float]:
        lowered = lower(c, plan, **shape)
        sent = collective_bytes(lowered.as_text())[0]
        return sent, compiled_flops(lowered.compile()) if flops else 0.0

    sent, ops = by_depth(cfg, count)
    return int(sent), ops


@functools.cache
def measured_bytes(
    cfg: ModelConfig, plan: Plan, *, devices: int, seq_len: int, batch: int = 1, dtype="float32"
) -> int:
    """Bytes one device sends per inference, read from the collectives of the lowered program
    (lowered only, not compiled; cached per shape)."""
    if plan.strategy == "single" or devices == 1:
        return 0
    shape = dict(devices=devices, seq_len=seq_len, batch=batch, dtype=dtype)
    return _program_counts(cfg, plan, flops=False, **shape)[0]


def measured_flops(
    cfg: ModelConfig, plan: Plan, *, devices: int, seq_len: int, batch: int = 1, dtype="float32"
) -> float:
    """FLOPs of one device's compiled program for one inference (XLA's cost analysis)."""
    shape = dict(devices=devices, seq_len=seq_len, batch=batch, dtype=dtype)
    return _program_counts(cfg, plan, flops=True, **shape)[1]


def _voltage_bytes(cfg: ModelConfig, **shape) -> int:
    return measured_bytes(cfg, Plan(strategy="voltage"), **shape)


@functools.cache
def _single_flops(cfg: ModelConfig, **shape) -> float:
    return measured_flops(cfg, Plan(strategy="single"), devices=1, **shape)
