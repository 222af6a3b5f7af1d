"""BERT (HF `BertModel`, `BertForSequenceClassification`): embeddings and heads."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from prism_jax.configs import BertConfig
from prism_jax.exchange import Exchange, Local
from prism_jax.layers import PLAIN, Encoder, cls_layers, cls_outputs, embed_lookup, layer_norm
from prism_jax.models.inputs import ids_field, token_batch


class Bert(nnx.Module):
    """Word + position + token-type embeddings, post-LN encoder, pooler, classifier."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        d = cfg.width
        self.word = nnx.Embed(cfg.vocab_size, d, rngs=rngs)
        self.pos = nnx.Embed(cfg.max_positions, d, rngs=rngs)
        self.type = nnx.Embed(cfg.type_vocab_size, d, rngs=rngs)
        self.ln_embed = layer_norm(d, cfg.ln_eps, rngs)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.pooler, self.head = cls_layers(cfg, rngs)

    def __call__(self, inputs: dict[str, jax.Array], ex: Exchange, local: Local, mode=PLAIN):
        """Local tokens in, `(per-token outputs, outputs read from the CLS row)` out."""
        x = (
            embed_lookup(self.word, inputs["input_ids"])
            + embed_lookup(self.pos, local.positions)
            + embed_lookup(self.type, inputs["token_type_ids"])
        )  # [B, L, D]
        x = self.encoder(self.ln_embed(x), ex, local, mode)
        cls = cls_outputs(x, self.pooler, self.head, classify_pooled=True)
        return {"last_hidden_state": x}, cls


def prepare(cfg: BertConfig, batch: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """HF batch -> (inputs with the token axis second, validity `[B, T]`)."""
    inputs, valid = token_batch(cfg, batch)
    shape = valid.shape
    if batch.get("token_type_ids") is None:
        inputs["token_type_ids"] = np.zeros(shape, np.int32)
    else:
        inputs["token_type_ids"] = ids_field(batch, "token_type_ids", cfg.type_vocab_size, shape)
    if batch.get("position_ids") is not None:
        inputs["position_ids"] = ids_field(batch, "position_ids", cfg.max_positions, shape)
    return inputs, valid
