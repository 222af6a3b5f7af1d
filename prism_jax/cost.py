"""What an inference costs each device: bytes sent and FLOPs (DESIGN.md section 3).

Closed forms live beside the measurements so that tests can hold one to the other.
"""

from __future__ import annotations

import math

from prism_jax.configs import ModelConfig, Plan


def local_len(seq_len: int, devices: int) -> int:
    """L = ceil(T / N): tokens per device after padding T up to N*L."""
    return math.ceil(seq_len / devices)


def bytes_closed_form(
    cfg: ModelConfig,
    plan: Plan,
    *,
    devices: int,
    seq_len: int,
    batch: int = 1,
    dtype_bytes: int = 4,
) -> int:
    """Bytes one device sends per inference: per layer B*L*D (voltage) or B*S*(D+1) (prism:
    means plus counts), times the depth; nothing for `single` or a single device."""
    if plan.strategy == "single" or devices == 1:
        return 0
    l = local_len(seq_len, devices)
    width = cfg.width if plan.strategy == "voltage" else cfg.width + 1
    rows = l if plan.strategy == "voltage" else plan.segments(l)
    return cfg.depth * batch * rows * width * dtype_bytes
