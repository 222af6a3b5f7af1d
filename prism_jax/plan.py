"""The execution `Plan`: how one inference is spread over the edge devices, and what each
device sends (DESIGN.md sections 1, 1a and 1b)."""

from __future__ import annotations

import dataclasses
import math

from prism_jax.checks import as_int
from prism_jax.errors import PrismError

STRATEGIES = ("single", "voltage", "prism")
LOGIT_BIASES = ("log_count", "none")
# What travels per group (DESIGN.md section 1a): attention inputs, or rotated keys and values
# per KV head; `auto` picks the cheaper one that is exact at CR = 1 for the model.
EXCHANGES = ("auto", "hidden", "kv")
# How a device groups its tokens (DESIGN.md section 1b): the paper's fixed runs of CR positions,
# equal-size runs of valid tokens, or k-means in key space started from those.
GROUPINGS = ("segments", "balanced", "kmeans", "tail")
# What the means travel as (DESIGN.md section 1d), whatever the model computes in.
WIRES = ("f32", "bf16", "int8", "int4", "int4h")
# How a layer's exchange travels (the same values every way): the all-gather of DESIGN.md, an
# all-to-all that reaches every device in one step (`exchange.gather`), or the nodes' own
# connections, sent at once and waited for only where needed (`stream.py`).
TRANSPORTS = ("all_gather", "all_to_all", "stream")


# The fields that say how a device compresses what it sends (prism only).
COMPRESSOR = ("cr", "grouping", "kmeans_iters", "salient", "value_tilt", "sink", "wire", "groups")


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise PrismError(f"unknown {name} {value!r}; choose one of {allowed}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """How one inference is spread over the edge devices (DESIGN.md section 1).

    Attributes:
      strategy: `single` (one device, the reference), `voltage` (full attention inputs
        exchanged) or `prism` (segment means exchanged).
      cr: compression rate, the segment length in tokens (prism only).
      logit_bias: `log_count` adds log(c) to a remote mean's logit, `none` adds nothing.
      exchange: `hidden` sends means of attention inputs, `kv` means of the (rotated) keys
        and of the values per KV head; `auto` resolves per model (`for_model`).
      grouping: `segments` (the paper: fixed runs of CR positions), `balanced` (V = ceil(L/CR)
        equal runs of valid tokens), `kmeans` (Lloyd's iterations in key space from the
        balanced groups; DESIGN.md section 1b) or `tail` (runs finest at the device's last
        valid token, geometrically coarser backward: `compress.tail`).
      kmeans_iters: iterations of `kmeans` (at most 1000).
      salient: 1 sends the token farthest from the device's mean key exactly, as its own
        group, out of the same V (when V >= 2); 0: none. Not with `segments`.
      value_tilt: each group also sends its spread, and the receiver tilts the group's
        value toward the query to first order (hidden exchange).
      sink: the first `sink` valid tokens of each row (the attention sink of a language
        model) travel exactly, each a group of one, out of the V groups of the device that
        holds them (at most V - 1 of them: DESIGN.md section 1c). Not with `segments`.
      wire: what the means travel as, whatever the model computes in (DESIGN.md section 1d):
        `f32`, `bf16`, `int8` (symmetric, a float32 scale per vector: per KV head and K or
        V with the kv exchange, the whole vector for hidden), `int4` (the same rule with
        codes in [-7, 7], packed two a byte), or `int4h` (int4 after a Hadamard rotation of
        each vector, `exchange.rotate`; the receiver turns it back). Counts and the tilt's
        statistics travel exact (4-byte words) on every wire.
      groups: V, the groups a device sends per layer (at most its L tokens), in place of
        ceil(L / CR): a byte budget filled exactly rather than in whole CRs (0: from `cr`;
        with cr = 1 and not with `segments`).
      transport: how a layer's exchange reaches the other devices, the same values every
        way: `all_gather` (DESIGN.md; on gloo, JAX's CPU collectives, a ring of N - 1 steps,
        each a round trip), `all_to_all` (one step), or `stream` (the nodes' own TCP
        connections: sent as soon as computed, a causal model's only forward; one process per
        device, `stream.py`). The runtime's choice, not the compressor's: no output changes.
    """

    strategy: str = "prism"
    cr: int = 1
    logit_bias: str = "log_count"
    exchange: str = "auto"
    grouping: str = "segments"
    kmeans_iters: int = 10
    salient: int = 0
    value_tilt: bool = False
    sink: int = 0
    wire: str = "f32"
    groups: int = 0
    transport: str = "all_gather"

    def __post_init__(self):
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("logit_bias", self.logit_bias, LOGIT_BIASES)
        _choice("exchange", self.exchange, EXCHANGES)
        _choice("grouping", self.grouping, GROUPINGS)
        _choice("wire", self.wire, WIRES)
        _choice("transport", self.transport, TRANSPORTS)
        for name, low, high in (
            ("cr", 1, None),
            ("kmeans_iters", 1, 1000),
            ("salient", 0, 1),
            ("sink", 0, 2**20),
            ("groups", 0, 2**20),
        ):
            value = as_int(getattr(self, name))
            if value is None or value < low or (high is not None and value > high):
                within = f">= {low}" if high is None else f"in [{low}, {high}]"
                what = "compression rate" if name == "cr" else name
                raise PrismError(f"{what} must be an integer {within}, got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)  # a NumPy integer becomes a plain, hashable int
        if not isinstance(self.value_tilt, bool):
            raise PrismError(f"value_tilt must be True or False, got {self.value_tilt!r}")
        for name in ("salient", "sink"):
            if self.grouping == "segments" and getattr(self, name):
                raise PrismError(
                    f"grouping='segments' (the paper's fixed runs of CR positions) has no room "
                    f"for exact tokens: use grouping='balanced' or 'kmeans' with {name}"
                )
        if self.strategy != "prism":  # nothing is compressed: compressor settings would not apply
            changed = [
                f.name
                for f in dataclasses.fields(self)
                if f.name in COMPRESSOR and getattr(self, f.name) != f.default
            ]
            if changed:
                raise PrismError(
                    f"{', '.join(changed)} set, but compressor settings apply only to "
                    f"strategy='prism', not {self.strategy!r}"
                )
        if self.strategy == "single" and self.transport != "all_gather":
            raise PrismError("transport: strategy='single' runs on one device, nothing travels")
        if self.groups and self.grouping == "segments":
            raise PrismError(
                "groups: the paper's segments are fixed runs of CR positions; give groups with "
                "grouping='balanced', 'kmeans' or 'tail'"
            )
        if self.groups and self.cr != 1:
            raise PrismError(
                f"cr={self.cr} and groups={self.groups}: give one of them (groups sets V itself)"
            )

    @classmethod
    def best(cls, cr: int, model=None, **kw) -> Plan:
        """The compressor measured best for `model` (a `Model` or `ModelConfig`; None: an
        encoder's). Encoders (DESIGN.md section 1b): k-means groups in key space, one salient
        token sent exactly, the first-order value tilt. Causal language models (section 1c,
        experiments/results/table_sink.md): the first 4 tokens (the attention sink) exact,
        groups finest at each device's last token (`tail`), the value tilt. `kw` overrides."""
        cfg = getattr(model, "config", model)
        if cfg is not None and cfg.causal:
            return cls(cr=cr, **{"grouping": "tail", "sink": 4, "value_tilt": True} | kw)
        return cls(cr=cr, **{"grouping": "kmeans", "salient": 1, "value_tilt": True} | kw)

    @property
    def lossless(self) -> bool:
        """Whether every device sees the others' tokens as computed (single, voltage, or prism
        at CR = 1 without `groups` on the float32 wire): where its tokens sit, and so padding,
        changes no answer."""
        return self.strategy != "prism" or (self.cr == 1 and not self.groups and self.wire == "f32")

    @property
    def paper(self) -> bool:
        """Whether what a device sends is the paper's: fixed segments, nothing more."""
        return self.grouping == "segments" and not self.value_tilt

    def for_model(self, cfg) -> Plan:
        """This plan with `exchange` resolved for `cfg` (a `configs.ModelConfig`): rotary
        models always exchange K/V (a mean of inputs has no position to rotate by); the others,
        by default, the cheaper of D and 2*H_kv*K values per group (both exact at CR = 1)."""
        if cfg.rope_theta is not None:
            if self.exchange == "hidden" and self.strategy != "single":
                raise PrismError(
                    "exchange='hidden' does not apply to rotary models (a key depends on its "
                    "position); they exchange keys and values: exchange='kv'"
                )
            return dataclasses.replace(self, exchange="kv")
        if self.exchange != "auto":
            return self
        cheaper = "kv" if cfg.kv_width < cfg.width else "hidden"
        return dataclasses.replace(self, exchange=cheaper)

    def segments(self, local_len: int) -> int:
        """V, the number of groups one device sends per layer: ceil(L / CR), or `groups` (at
        most L) when it is set."""
        if self.groups:
            return min(self.groups, local_len)
        return math.ceil(local_len / self.cr)
