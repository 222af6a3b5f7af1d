"""The execution `Plan`: how one inference is spread over the edge devices, and what each
device sends (DESIGN.md sections 1, 1a and 1b)."""

from __future__ import annotations

import dataclasses
import math
import operator

from prism_jax.errors import PrismError

STRATEGIES = ("single", "voltage", "prism")
LOGIT_BIASES = ("log_count", "none")
# What travels per group (DESIGN.md section 1a): attention inputs, or rotated keys and values
# per KV head; `auto` picks the cheaper one that is exact at CR = 1 for the model.
EXCHANGES = ("auto", "hidden", "kv")
# How a device groups its tokens (DESIGN.md section 1b): the paper's fixed runs of CR positions,
# equal-size runs of valid tokens, or k-means in key space started from those.
GROUPINGS = ("segments", "balanced", "kmeans")


def as_int(value) -> int | None:
    """`value` as a Python int if it is an integer (NumPy integers too, bools not), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


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
        equal runs of valid tokens) or `kmeans` (Lloyd's iterations in key space from the
        balanced groups); DESIGN.md section 1b.
      kmeans_iters: iterations of `kmeans`.
      salient: how many tokens per device (farthest from the device's mean key) are sent
        exactly, each as its own group, out of the same V (0: none; at most V - 1).
      value_tilt: each group also sends its spread, and the receiver tilts the group's
        value toward the query to first order (hidden exchange).
    """

    strategy: str = "prism"
    cr: int = 1
    logit_bias: str = "log_count"
    exchange: str = "auto"
    grouping: str = "segments"
    kmeans_iters: int = 10
    salient: int = 0
    value_tilt: bool = False

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise PrismError(f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}")
        cr = as_int(self.cr)
        if cr is None or cr < 1:
            raise PrismError(f"compression rate must be an integer >= 1, got {self.cr!r}")
        object.__setattr__(self, "cr", cr)  # a NumPy integer becomes a plain, hashable int
        if self.logit_bias not in LOGIT_BIASES:
            raise PrismError(
                f"unknown logit_bias {self.logit_bias!r}; choose one of {LOGIT_BIASES}"
            )
        if self.exchange not in EXCHANGES:
            raise PrismError(f"unknown exchange {self.exchange!r}; choose one of {EXCHANGES}")
        if self.grouping not in GROUPINGS:
            raise PrismError(f"unknown grouping {self.grouping!r}; choose one of {GROUPINGS}")
        for name, low in (("kmeans_iters", 1), ("salient", 0)):
            value = as_int(getattr(self, name))
            if value is None or value < low:
                raise PrismError(f"{name} must be an integer >= {low}, got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if not isinstance(self.value_tilt, bool):
            raise PrismError(f"value_tilt must be True or False, got {self.value_tilt!r}")

    @classmethod
    def best(cls, cr: int, **kw) -> Plan:
        """The content-aware compressor measured best (DESIGN.md section 1b): k-means groups
        in key space, one salient token sent exactly, the first-order value tilt."""
        return cls(cr=cr, **{"grouping": "kmeans", "salient": 1, "value_tilt": True} | kw)

    @property
    def paper(self) -> bool:
        """Whether what a device sends is the paper's: fixed segments, nothing more."""
        return self.grouping == "segments" and not self.salient and not self.value_tilt

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
        """S = ceil(L / CR), the number of segment means one device sends per layer."""
        return math.ceil(local_len / self.cr)
