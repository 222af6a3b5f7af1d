"""Checking HF-style batches before they reach a model."""

from __future__ import annotations

import numpy as np

from prism_jax.configs import ModelConfig
from prism_jax.errors import PrismError


def token_batch(cfg: ModelConfig, batch: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`input_ids` and `attention_mask` `[B, T]` -> (inputs, validity), checked against cfg."""
    if "input_ids" not in batch:
        raise PrismError(f"a {cfg.family} batch needs input_ids; got {sorted(batch)}")
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise PrismError(f"input_ids must be [batch, tokens] with tokens > 0, got {ids.shape}")
    if ids.shape[1] > cfg.max_positions:
        raise PrismError(
            f"sequence of {ids.shape[1]} tokens is longer than the model's "
            f"{cfg.max_positions} positions"
        )
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise PrismError(f"input_ids outside the vocabulary [0, {cfg.vocab_size})")
    mask = batch.get("attention_mask")
    valid = np.ones(ids.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    if valid.shape != ids.shape:
        raise PrismError(f"attention_mask has shape {valid.shape}, input_ids {ids.shape}")
    return {"input_ids": ids.astype(np.int32)}, valid
