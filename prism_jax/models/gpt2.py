"""GPT-2 (HF `GPT2Model`, `GPT2LMHeadModel`): embeddings and the tied LM head."""

from __future__ import annotations

import jax
from flax import nnx

from prism_jax.configs import GPT2Config
from prism_jax.exchange import Exchange, Local
from prism_jax.layers import PLAIN, Encoder, embed_lookup
from prism_jax.models.inputs import lm_batch


class GPT2(nnx.Module):
    """Token + position embeddings, pre-LN causal decoder, LM head tied to `wte`."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.wte = nnx.Embed(cfg.vocab_size, cfg.width, rngs=rngs)
        self.wpe = nnx.Embed(cfg.max_positions, cfg.width, rngs=rngs)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.lm_head = cfg.head == "lm"

    def __call__(self, inputs: dict[str, jax.Array], ex: Exchange, local: Local, mode=PLAIN):
        """Local tokens in; logits stay with their device (DESIGN.md section 1)."""
        x = embed_lookup(self.wte, inputs["input_ids"]) + embed_lookup(self.wpe, local.positions)
        x = self.encoder(x, ex, local, mode)  # [B, L, D]
        tokens = {"last_hidden_state": x}
        if self.lm_head:
            tokens["logits"] = self.logits(x)
        return tokens, {}

    def logits(self, x: jax.Array) -> jax.Array:
        """The LM head on final hidden states `[..., D]` -> `[..., V]` (tied to `wte`)."""
        return x @ self.wte.embedding[...].T

    def decode(self, ids: jax.Array, positions: jax.Array, caches, index):
        """Next-token logits `[B, V]` for one new token per row, and the updated caches."""
        x = embed_lookup(self.wte, ids[:, None]) + embed_lookup(self.wpe, positions[:, None])
        x, caches = self.encoder.decode(x, caches, index, positions)
        return self.logits(x)[:, 0], caches


prepare = lm_batch
