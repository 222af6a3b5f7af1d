"""The public API's argument checks: each bad value is a `PrismError` that names the argument,
never a NumPy or JAX error, a silent cast or a clamp.

Integers are Python or NumPy integers (not bools); numbers are Python or NumPy reals (not
bools) that float32 holds: finite, and not so small that float32 rounds them to 0.
"""

from __future__ import annotations

import math
import operator
import os

import numpy as np

from prism_jax.errors import PrismError

FLOAT32 = np.finfo(np.float32)
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def as_int(value) -> int | None:
    """`value` as a Python int if it is an integer (NumPy integers too, bools not), else None."""
    if isinstance(value, bool | np.bool_):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """`value` as a Python int in [low, high] (either bound may be None)."""
    got = as_int(value)
    if got is None or (low is not None and got < low) or (high is not None and got > high):
        raise PrismError(f"{name} must be an integer {_range(low, high)}, got {value!r}")
    return got


def number(name: str, value, low: float, high: float | None = None, *, open_low=False) -> float:
    """`value` as a Python float in [low, high] ((low, high] with `open_low`) that float32
    holds: finite, and a non-zero value not rounded to 0 (`high` None: float32's largest)."""
    bounds = (
        (f"({low:g}, " if open_low else f"[{low:g}, ") + f"{high:g}]" if high else f">= {low:g}"
    )
    high = float(FLOAT32.max) if high is None else high
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )
    got = float(value) if ok else math.nan
    inside = (got > low if open_low else got >= low) and got <= high
    tiny = got != 0 and abs(got) < float(FLOAT32.smallest_subnormal)
    if not inside or tiny:
        where = bounds if bounds.startswith(">=") else f"in {bounds}"
        raise PrismError(f"{name} must be a number {where} that float32 holds, got {value!r}")
    return got


def seed(value) -> int:
    """A sampling seed: an integer that fits 64 bits, signed or not."""
    return integer("seed", value, -(2**63), 2**64 - 1)


def float_dtype(value) -> np.dtype:
    """A floating-point parameter dtype (weights cast to an integer type are garbage)."""
    try:
        dtype = np.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in FLOAT_DTYPES:
        raise PrismError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {value!r}")
    return dtype


def path(name: str, value) -> str:
    """A path (str or os.PathLike), not empty."""
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise PrismError(f"{name} must be a path or a hub id (a non-empty string), got {value!r}")
    return os.fspath(value)


def instance(name: str, value, kind: type, what: str):
    """`value` if it is a `kind`, else a PrismError saying `what` it must be."""
    if not isinstance(value, kind):
        raise PrismError(f"{name} must be {what}, got {type(value).__name__} {value!r:.60}")
    return value


def _range(low, high) -> str:
    if low is not None and high is not None:
        return f"in [{low}, {high}]"
    if low is not None:
        return f">= {low}"
    return f"<= {high}" if high is not None else ""
