"""Hugging Face checkpoints -> prism_jax params, strictly (no torch).

Each family is a small declarative table: HF module name -> (our module path, kind), for
the top level and for one layer (`{i}`). The kind says how `.weight` / `.bias` map onto
our parameters. Every HF tensor is consumed or listed as ignored, every parameter is
filled, every shape is checked; a mismatch raises `PrismError` naming the keys.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from prism_jax import models, preprocess
from prism_jax.configs import ModelConfig, resolve_architecture
from prism_jax.errors import PrismError

# kind -> [(HF suffix, our suffix, transform)]
_KINDS = {
    "linear": [(".weight", ".kernel", np.transpose), (".bias", ".bias", None)],  # [out, in]
    "conv1d": [(".weight", ".kernel", None), (".bias", ".bias", None)],  # GPT-2: [in, out]
    "ln": [(".weight", ".scale", None), (".bias", ".bias", None)],
    "embed": [(".weight", ".embedding", None)],
    "token": [("", "", lambda w: w.reshape(w.shape[-1:]))],  # ViT CLS [1, 1, D] -> [D]
    "table": [("", "", lambda w: w[0])],  # ViT positions [1, 1+P, D] -> [1+P, D]
    "patch": [
        (".weight", ".kernel", lambda w: w.reshape(w.shape[0], -1).T),
        (".bias", ".bias", None),
    ],
    "qkv": [
        (".weight", f".{n}.kernel", lambda w, j=j: np.split(w, 3, axis=-1)[j])
        for j, n in enumerate("qkv")
    ]
    + [
        (".bias", f".{n}.bias", lambda w, j=j: np.split(w, 3, axis=-1)[j])
        for j, n in enumerate("qkv")
    ],
}

# family -> (base prefix, top-level table, per-layer table, head table (never prefixed), ignored)
_TABLES = {
    "bert": (
        "bert.",
        {
            "embeddings.word_embeddings": ("word", "embed"),
            "embeddings.position_embeddings": ("pos", "embed"),
            "embeddings.token_type_embeddings": ("type", "embed"),
            "embeddings.LayerNorm": ("ln_embed", "ln"),
            "pooler.dense": ("pooler", "linear"),
        },
        {
            "attention.self.query": ("attn.q", "linear"),
            "attention.self.key": ("attn.k", "linear"),
            "attention.self.value": ("attn.v", "linear"),
            "attention.output.dense": ("attn.o", "linear"),
            "attention.output.LayerNorm": ("ln1", "ln"),
            "intermediate.dense": ("mlp.fc1", "linear"),
            "output.dense": ("mlp.fc2", "linear"),
            "output.LayerNorm": ("ln2", "ln"),
        },
        {"classifier": ("head", "linear")},
        [r"embeddings\.position_ids"],
    ),
    "gpt2": (
        "transformer.",
        {"wte": ("wte", "embed"), "wpe": ("wpe", "embed"), "ln_f": ("encoder.ln_f", "ln")},
        {
            "ln_1": ("ln1", "ln"),
            "attn.c_attn": ("attn", "qkv"),
            "attn.c_proj": ("attn.o", "conv1d"),
            "ln_2": ("ln2", "ln"),
            "mlp.c_fc": ("mlp.fc1", "conv1d"),
            "mlp.c_proj": ("mlp.fc2", "conv1d"),
        },
        {},
        [r"h\.\d+\.attn\.(masked_)?bias"],
    ),
    "vit": (
        "vit.",
        {
            "embeddings.cls_token": ("cls", "token"),
            "embeddings.position_embeddings": ("pos", "table"),
            "embeddings.patch_embeddings.projection": ("patch", "patch"),
            "layernorm": ("encoder.ln_f", "ln"),
            "pooler.dense": ("pooler", "linear"),
        },
        {
            "layernorm_before": ("ln1", "ln"),
            "attention.attention.query": ("attn.q", "linear"),
            "attention.attention.key": ("attn.k", "linear"),
            "attention.attention.value": ("attn.v", "linear"),
            "attention.output.dense": ("attn.o", "linear"),
            "layernorm_after": ("ln2", "ln"),
            "intermediate.dense": ("mlp.fc1", "linear"),
            "output.dense": ("mlp.fc2", "linear"),
        },
        {"classifier": ("head", "linear")},
        [],
    ),
}
_LAYER_PREFIX = {"bert": "encoder.layer.{i}.", "gpt2": "h.{i}.", "vit": "encoder.layer.{i}."}

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


_FLOAT_DTYPES = frozenset(map(np.dtype, (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)))
_MAX_HEADER = 100_000_000  # bytes; the `safetensors` library's own limit


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a safetensors file into NumPy arrays (memory-mapped), checking its layout as the
    `safetensors` library does: a JSON object header, known dtypes, each tensor's byte range
    the size of its shape, the ranges back to back from 0 to the end of the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PrismError(f"corrupt safetensors file {path}: shorter than its header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise PrismError(f"corrupt safetensors file {path}: header runs past the end")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PrismError(f"corrupt safetensors file {path}: bad header ({e})") from None
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


def base_prefix(cfg: ModelConfig, keys: set[str] | None = None) -> str:
    """The HF prefix of base-model keys (`bert.`, ...): present in task checkpoints; a base
    model saved on its own has none. With `keys`, whatever the checkpoint uses."""
    prefix = _TABLES[cfg.family][0]
    if keys is None:
        return prefix if cfg.head != "base" else ""
    return prefix if any(k.startswith(prefix) for k in keys) else ""


def entries(cfg: ModelConfig, prefix: str):
    """(HF key, our dotted path, transform, kind) for every tensor the family's tables name."""
    _, top, layer, heads, _ = _TABLES[cfg.family]
    tables = [(prefix, top, ""), ("", heads, "")]
    tables += [
        (prefix + _LAYER_PREFIX[cfg.family].format(i=i), layer, f"encoder.blocks.{i}.")
        for i in range(cfg.depth)
    ]
    for hf_prefix, table, ours in tables:
        for hf_name, (our_name, kind) in table.items():
            for hf_suffix, our_suffix, fn in _KINDS[kind]:
                yield hf_prefix + hf_name + hf_suffix, ours + our_name + our_suffix, fn, kind


def convert(cfg: ModelConfig, tensors: dict[str, np.ndarray], dtype=np.float32) -> models.Model:
    """HF tensors -> a `Model` with every parameter filled; raises naming any mismatch."""
    model = models.abstract(cfg)
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(model.params)}
    ignored = [re.compile(p) for p in _TABLES[cfg.family][4]]
    values, consumed, mismatched, not_float, not_finite = {}, set(), [], [], []
    for hf_key, ours, fn, _ in entries(cfg, base_prefix(cfg, set(tensors))):
        if hf_key not in tensors or ours not in flat:
            continue
        consumed.add(hf_key)
        if tensors[hf_key].dtype not in _FLOAT_DTYPES:  # never cast integers into weights
            not_float.append(f"{hf_key}: {tensors[hf_key].dtype}")
            values[ours] = None  # present, unusable: reported below
            continue
        w = np.asarray(tensors[hf_key], np.float32)
        if not np.isfinite(w).all():
            not_finite.append(hf_key)
        w = fn(w) if fn is not None else w
        want = flat[ours].get_value().shape
        if w.shape != want:
            mismatched.append(f"{hf_key}: {list(w.shape)} != {list(want)}")
        values[ours] = w
    if cfg.family == "gpt2":
        consumed |= _check_tied_head(tensors, values)
    unused = sorted(k for k in set(tensors) - consumed if not any(p.fullmatch(k) for p in ignored))
    missing = sorted(set(flat) - set(values))
    problems = [
        (label, items)
        for label, items in (
            ("unused tensors", unused),
            ("missing parameters", missing),
            ("shape mismatches", mismatched),
            ("tensors that are not floating point", not_float),
            ("tensors with NaN or inf", not_finite),
        )
        if items
    ]
    if problems:
        raise PrismError(
            "checkpoint does not fit its config: "
            + "; ".join(f"{label} {_shorten(items)}" for label, items in problems)
        )
    state = nnx.from_flat_state(
        [
            (p, v.replace(jnp.asarray(values[".".join(map(str, p))], dtype)))
            for p, v in nnx.to_flat_state(model.params)
        ]
    )
    return models.Model(cfg, model.graphdef, state)


def _check_tied_head(tensors: dict, values: dict) -> set[str]:
    """GPT-2's LM head is tied to `wte`: a stored copy must equal it."""
    heads = {k for k in tensors if k == "lm_head.weight"}
    for k in heads:
        if "wte.embedding" in values and not np.array_equal(tensors[k], values["wte.embedding"]):
            raise PrismError("lm_head.weight differs from wte: untied LM heads are not supported")
    return heads


def _shorten(items: list[str], limit: int = 12) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + "]" + more


def read_config(directory: Path) -> dict:
    """`config.json` of a checkpoint directory, as a dict."""
    path = directory / "config.json"
    if not path.exists():
        raise PrismError(f"no config.json in {directory}")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrismError(f"corrupt config.json in {directory}: {e}") from None
    if not isinstance(hf, dict):
        raise PrismError(f"corrupt config.json in {directory}: not a JSON object")
    return hf


def make_config(hf: dict, keys: set[str]) -> ModelConfig:
    """Check an HF config; the head comes from `architectures`, a base model's pooler from
    whether its weights are in the checkpoint."""
    cls, head, pooler = resolve_architecture(hf)
    if pooler is None:
        pooler = any(k.endswith("pooler.dense.weight") for k in keys)
    try:
        return cls.from_hf_config(hf, head=head, pooler=pooler)
    except (KeyError, TypeError) as e:
        raise PrismError(f"config.json lacks or mistypes a field: {e}") from None


def resolve_directory(name: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a hub id fetched through `huggingface_hub`'s cache."""
    path = Path(name)
    if path.is_dir():
        return path
    if path.exists():
        raise PrismError(f"{path} is a file; give the checkpoint directory")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(name)):
        raise PrismError(f"no checkpoint directory at {name}")
    import huggingface_hub  # only hub ids need it

    try:
        return Path(
            huggingface_hub.snapshot_download(
                str(name), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]
            )
        )
    except Exception as e:  # offline, unknown repo, network: all end the same way for a user
        raise PrismError(
            f"no checkpoint directory at {name}, and it could not be fetched as a hub id "
            f"(offline, or not in the local cache: {type(e).__name__})"
        ) from None


def load_pretrained(name: str | os.PathLike, *, dtype=np.float32) -> models.Model:
    """Load a HF checkpoint (BERT, GPT-2 or ViT; with or without a task head).

    Args:
      name: a directory with `config.json` and `model.safetensors` (or a sharded index),
        or a hub id, resolved through `huggingface_hub`'s cache (fails clearly offline).
      dtype: parameter dtype.

    Returns:
      A `Model`, with the directory's tokenizer or image processor when present.
    """

    directory = resolve_directory(name)
    hf = read_config(directory)
    resolve_architecture(hf)  # an unknown architecture is named before any tensor is read
    tensors = read_checkpoint_tensors(directory)
    model = convert(make_config(hf, set(tensors)), tensors, dtype)
    return models.Model(
        model.config,
        model.graphdef,
        model.params,
        tokenizer=preprocess.load_tokenizer(directory),
        image_processor=preprocess.load_image_processor(directory),
    )
