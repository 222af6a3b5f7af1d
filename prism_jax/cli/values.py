"""Argument types of the `prism-jax` command line: each refuses a bad value at parse time (one
line, exit code 2), before any model or data is loaded."""

from __future__ import annotations

import argparse
import math

from prism_jax import handshake
from prism_jax.errors import PrismError


def _number(kind, text: str, what: str, ok) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} expected, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{what} expected, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, "an integer >= 1", lambda v: v >= 1)


def nonnegative_int(text: str) -> int:
    return _number(int, text, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(float, text, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)


def probability(text: str) -> float:
    return _number(float, text, "a number in (0, 1]", lambda v: 0 < v <= 1)


def seed(text: str) -> int:
    """A random seed: what both JAX's keys and NumPy's generators take."""
    return _number(int, text, "an integer in [0, 2**63 - 1]", lambda v: 0 <= v < 2**63)


def port(text: str) -> int:
    return _number(int, text, "a port in [1, 65535]", lambda v: 1 <= v <= 65535)


def coordinator(text: str) -> str:
    """`HOST:PORT` with the port in [1, 65535] (node 0 listens there)."""
    try:
        handshake.coordinator_address(text)
    except PrismError:
        raise argparse.ArgumentTypeError(
            f"HOST:PORT with a port in [1, 65535] expected, got {text!r}"
        ) from None
    return text


def compression_rates(text: str) -> list[int]:
    """`1,2,4` -> [1, 2, 4]; empty items, non-integers and values < 1 are refused."""
    items = text.split(",")
    if not all(item.strip() for item in items):
        raise argparse.ArgumentTypeError(f"a comma-separated list of integers >= 1, got {text!r}")
    return [positive_int(item) for item in items]


def utf8_text(text: str) -> str:
    """Command-line text that is valid UTF-8 (undecodable bytes reach Python as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("text is not valid UTF-8") from None
    return text


def nonnegative_float(text: str) -> float:
    return _number(float, text, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)


FLOAT32_MAX = 3.4028234663852886e38


def float32_weight(text: str) -> float:
    """A loss weight >= 0 that float32 holds (a larger one is inf in the float32 loss, which
    then stops training with a hint about the learning rate)."""
    return _number(
        float, text, "a number in [0, 3.4e38] (float32)", lambda v: 0 <= v <= FLOAT32_MAX
    )
