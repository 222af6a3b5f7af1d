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
    """

    strategy: str = "prism"
    cr: int = 1
    logit_bias: str = "log_count"
    exchange: str = "auto"

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
