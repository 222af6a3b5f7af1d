"""Checking HF-style batches before they reach a model: every bad field is a PrismError that
names it, never a NumPy error or a silent clamp, cast or NaN."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from prism_jax.configs import ModelConfig
from prism_jax.errors import PrismError


def field(batch, name: str, *, kinds: str, ndim: int) -> np.ndarray:
    """`batch[name]` as a rectangular NumPy array of `ndim` dims, at least one row, whose dtype
    kind is one of `kinds` (`b` bool, `i`/`u` integers, `f` floats)."""
    if not isinstance(batch, Mapping):
        raise PrismError(
            f"a batch is a dict of HF names (input_ids, ...), got {type(batch).__name__}"
        )
    if name not in batch:
        raise PrismError(f"the batch needs {name}; got {sorted(batch)}")
    try:
        x = np.asarray(batch[name])
    except ValueError:
        raise PrismError(f"{name} must be a rectangular array (ragged rows?)") from None
    if x.dtype == object or x.dtype.kind not in kinds:
        allowed = {"b": "bool", "i": "integers", "u": "integers", "f": "floats"}
        want = " or ".join(dict.fromkeys(allowed[k] for k in kinds))
        raise PrismError(f"{name} must hold {want}, got dtype {x.dtype}")
    if x.ndim != ndim or x.shape[0] == 0 or (ndim > 1 and 0 in x.shape[1:]):
        raise PrismError(f"{name} must be a non-empty {ndim}-d array, got shape {list(x.shape)}")
    return x


def ids_field(batch, name: str, upper: int, like: tuple[int, ...] | None = None) -> np.ndarray:
    """An integer `[B, T]` field with values in [0, upper), int32."""
    x = field(batch, name, kinds="iu", ndim=2)
    if like is not None and x.shape != like:
        raise PrismError(f"{name} has shape {list(x.shape)}, input_ids {list(like)}")
    if x.min() < 0 or x.max() >= upper:
        raise PrismError(f"{name} outside [0, {upper}): found {x.min()}..{x.max()}")
    return x.astype(np.int32)


def known_fields(batch, allowed: tuple[str, ...]) -> None:
    """Refuse a batch field the family does not take (a misspelt `attention_masks` would
    otherwise leave every token valid)."""
    if not isinstance(batch, Mapping):
        raise PrismError(
            f"a batch is a dict of HF names (input_ids, ...), got {type(batch).__name__}"
        )
    unknown = sorted(set(batch) - set(allowed), key=str)
    if unknown:
        raise PrismError(
            f"the batch has {unknown}, which this model does not take; it takes {list(allowed)}"
        )


def attention_mask(batch, shape: tuple[int, ...]) -> np.ndarray:
    """The `[B, T]` validity from `attention_mask` (0/1 in any numeric dtype), all valid if
    absent."""
    if batch.get("attention_mask") is None:
        return np.ones(shape, bool)
    mask = field(batch, "attention_mask", kinds="biuf", ndim=2)
    if mask.shape != shape:
        raise PrismError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(shape)}")
    if not np.isin(mask, (0, 1)).all():  # NaN included: it is neither
        raise PrismError("attention_mask must hold only 0 and 1")
    empty = np.flatnonzero(~mask.astype(bool).any(1))
    if empty.size:
        raise PrismError(f"attention_mask row {empty[0]} has no valid token (all zeros)")
    return mask.astype(bool)


TEXT_FIELDS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def token_batch(cfg: ModelConfig, batch: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`input_ids` and `attention_mask` `[B, T]` -> (inputs, validity), checked against cfg."""
    known_fields(batch, TEXT_FIELDS)
    ids = ids_field(batch, "input_ids", cfg.vocab_size)
    if ids.shape[1] > cfg.max_positions:
        raise PrismError(
            f"sequence of {ids.shape[1]} tokens is longer than the model's "
            f"{cfg.max_positions} positions"
        )
    return {"input_ids": ids}, attention_mask(batch, ids.shape)


def lm_batch(cfg: ModelConfig, batch: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A causal LM's batch: `token_batch` and HF's optional `position_ids` (left-padded
    prompts for generation number their tokens from the first valid one)."""
    inputs, valid = token_batch(cfg, batch)
    if batch.get("position_ids") is not None:
        inputs["position_ids"] = ids_field(batch, "position_ids", cfg.max_positions, valid.shape)
    if batch.get("token_type_ids") is not None:  # tokenizers write zeros; an LM has no types
        ids_field(batch, "token_type_ids", 1, valid.shape)
    return inputs, valid
