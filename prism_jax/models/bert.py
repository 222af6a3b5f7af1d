"""BERT (HF `BertModel`, `BertForSequenceClassification`): embeddings and heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prism_jax.configs import BertConfig
from prism_jax.exchange import Exchange
from prism_jax.layers import Encoder, embed_lookup, layer_norm
from prism_jax.models.batch import ids_field, token_batch


class Bert(nnx.Module):
    """Word + position + token-type embeddings, post-LN encoder, pooler, classifier."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        d = cfg.width
        self.word = nnx.Embed(cfg.vocab_size, d, rngs=rngs)
        self.pos = nnx.Embed(cfg.max_positions, d, rngs=rngs)
        self.type = nnx.Embed(cfg.type_vocab_size, d, rngs=rngs)
        self.ln_embed = layer_norm(d, cfg.ln_eps, rngs)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.pooler = nnx.Linear(d, d, rngs=rngs) if cfg.pooler else None
        self.head = nnx.Linear(d, cfg.num_labels, rngs=rngs) if cfg.head == "classifier" else None

    def __call__(self, inputs: dict[str, jax.Array], ex: Exchange):
        """Local tokens in, `(per-token outputs, outputs read from the CLS row)` out."""
        # HF's optional position_ids (a relaid batch, `tasks.unpadded`); else the global index.
        pos = inputs["position_ids"] if "position_ids" in inputs else ex.positions()[None]
        x = (
            embed_lookup(self.word, inputs["input_ids"])
            + embed_lookup(self.pos, pos)
            + embed_lookup(self.type, inputs["token_type_ids"])
        )  # [B, L, D]
        x = self.encoder(self.ln_embed(x), ex)
        cls = {}
        if self.pooler is not None:
            cls["pooler_output"] = jnp.tanh(self.pooler(x[:, 0]))  # [B, D]
        if self.head is not None:
            cls["logits"] = self.head(cls["pooler_output"])  # [B, C]
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
