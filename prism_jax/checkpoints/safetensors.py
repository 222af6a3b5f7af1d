"""Safetensors files read without torch or the `safetensors` library, as strictly as that
library reads them: every header entry checked, the byte ranges back to back."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from prism_jax.errors import PrismError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


FLOAT_DTYPES = frozenset(map(np.dtype, (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)))
_MAX_HEADER = 100_000_000  # bytes; the `safetensors` library's own limit


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a safetensors file into NumPy arrays (memory-mapped), checking its layout as the
    `safetensors` library does: a JSON object header, known dtypes, each tensor's byte range
    the size of its shape, the ranges back to back from 0 to the end of the file."""
    path = Path(path)
    try:
        size, header, n = _read_header(path)
    except OSError as e:  # unreadable (permissions), or a directory where the file should be
        raise PrismError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(header, dict):
        raise PrismError(f"corrupt safetensors file {path}: the header is not a JSON object")
    header.pop("__metadata__", None)
    layout = {name: _tensor_layout(path, name, info) for name, info in header.items()}
    end = 0
    for name, (_, _, (start, stop)) in sorted(layout.items(), key=lambda kv: kv[1][2]):
        if start != end:
            raise PrismError(
                f"corrupt safetensors file {path}: tensor {name!r} starts at byte {start}, "
                f"not where the previous one ends ({end})"
            )
        end = stop
    if end != size - 8 - n:
        raise PrismError(
            f"corrupt safetensors file {path}: tensors cover {end} bytes, the file holds "
            f"{size - 8 - n}"
        )
    data = np.memmap(path, np.uint8, mode="r", offset=8 + n) if end else np.empty(0, np.uint8)
    return {
        name: data[start:stop].view(dtype).reshape(shape)
        for name, (dtype, shape, (start, stop)) in layout.items()
    }


def _read_header(path: Path) -> tuple[int, object, int]:
    """(file size, the parsed JSON header, its length in bytes)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PrismError(f"corrupt safetensors file {path}: shorter than its header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise PrismError(f"corrupt safetensors file {path}: header runs past the end")
        try:
            return size, json.loads(f.read(n)), n
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PrismError(f"corrupt safetensors file {path}: bad header ({e})") from None


def _tensor_layout(path: Path, name: str, info) -> tuple[np.dtype, tuple, tuple[int, int]]:
    """(dtype, shape, (start, stop)) of one header entry, or a PrismError naming it."""
    bad = PrismError(f"corrupt safetensors file {path}: tensor {name!r} is malformed")
    if not isinstance(info, dict):
        raise bad
    dtype, shape, offsets = (
        _DTYPES.get(info.get("dtype")),
        info.get("shape"),
        info.get("data_offsets"),
    )
    ints = (list, tuple)
    if (
        dtype is None
        or not isinstance(shape, ints)
        or not all(type(d) is int and d >= 0 for d in shape)
        or not isinstance(offsets, ints)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[1] - offsets[0] != np.dtype(dtype).itemsize * math.prod(shape)
    ):
        raise bad
    return np.dtype(dtype), tuple(shape), tuple(offsets)


def read_checkpoint_tensors(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory: `model.safetensors` or a sharded index."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except OSError as e:
            raise PrismError(f"cannot read {index}: {e.strerror or e}") from None
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise PrismError(f"corrupt safetensors index {index}: {e}") from None
        tensors = {}
        for name in files:
            if not (directory / name).exists():
                raise PrismError(f"checkpoint shard {name} named by {index} is missing")
            tensors.update(read_safetensors(directory / name))
        return tensors
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt*")):
        raise PrismError(f"{directory} has only pickled (PyTorch) weights; convert to safetensors")
    raise PrismError(f"no model.safetensors in {directory}")
