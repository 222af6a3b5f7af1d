"""Llama family (HF `LlamaModel`, `LlamaForCausalLM`): embeddings and the LM head.

Rotary keys and grouped-query attention live in `layers.Attention`; the model exchanges
keys and values (DESIGN.md section 1a), never hidden means.
"""

from __future__ import annotations

import jax
from flax import nnx

from prism_jax.configs import LlamaConfig
from prism_jax.exchange import Exchange, Local
from prism_jax.layers import PLAIN, Encoder, embed_lookup
from prism_jax.models.inputs import lm_batch


class Llama(nnx.Module):
    """Token embeddings, pre-RMSNorm causal decoder, LM head tied to `embed` or not."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(cfg.vocab_size, cfg.width, rngs=rngs)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.lm_head = cfg.head == "lm"
        untied = self.lm_head and not cfg.tied
        self.head = (
            nnx.Linear(cfg.width, cfg.vocab_size, use_bias=False, rngs=rngs) if untied else None
        )

    def __call__(self, inputs: dict[str, jax.Array], ex: Exchange, local: Local, mode=PLAIN):
        """Local tokens in; logits stay with their device (DESIGN.md section 1)."""
        x = self.encoder(embed_lookup(self.embed, inputs["input_ids"]), ex, local, mode)
        tokens = {"last_hidden_state": x}
        if self.lm_head:
            tokens["logits"] = self.logits(x)
        return tokens, {}

    def logits(self, x: jax.Array) -> jax.Array:
        """The LM head on final hidden states `[..., D]` -> `[..., V]` (tied or not)."""
        return x @ self.embed.embedding[...].T if self.head is None else self.head(x)

    def decode(self, ids: jax.Array, positions: jax.Array, caches, index):
        """Next-token logits `[B, V]` for one new token per row, and the updated caches."""
        x = embed_lookup(self.embed, ids[:, None])  # [B, 1, D]
        x, caches = self.encoder.decode(x, caches, index, positions)
        return self.logits(x)[:, 0], caches


prepare = lm_batch
