"""ViT (HF `ViTModel`, `ViTForImageClassification`): patch embedding, CLS token, heads.

Token 0 is the CLS token, tokens 1..P the patches in row-major order. Patchifying is a
reshape done before partitioning; each device embeds only its own tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prism_jax.configs import ViTConfig
from prism_jax.errors import PrismError
from prism_jax.exchange import Exchange, Local
from prism_jax.layers import PLAIN, Encoder, cls_layers, cls_outputs
from prism_jax.models.inputs import field, known_fields


class ViT(nnx.Module):
    """Patch projection + CLS + positions, pre-LN encoder with final LN, pooler, classifier."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        d = cfg.width
        self.patch = nnx.Linear(cfg.channels * cfg.patch_size**2, d, rngs=rngs)
        self.cls = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d,)))
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.patches + 1, d)))
        self.encoder = Encoder(cfg, rngs=rngs)
        self.pooler, self.head = cls_layers(cfg, rngs)

    def __call__(self, inputs: dict[str, jax.Array], ex: Exchange, local: Local, mode=PLAIN):
        positions = local.index  # [L]
        x = self.patch(inputs["patches"].astype(self.patch.kernel.dtype))  # [B, L, D], param dtype
        x = jnp.where((positions == 0)[None, :, None], self.cls[...], x)
        x = x + jnp.take(self.pos[...], positions, axis=0, mode="clip")[None]
        x = self.encoder(x, ex, local, mode)
        cls = cls_outputs(x, self.pooler, self.head, classify_pooled=False)
        return {"last_hidden_state": x}, cls


def patchify(pixels: np.ndarray, patch: int) -> np.ndarray:
    """`[B, C, H, W]` -> `[B, P, C*p*p]`, patches row-major, each flattened as (C, p, p)."""
    b, c, h, w = pixels.shape
    x = pixels.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def prepare(cfg: ViTConfig, batch: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`pixel_values` `[B, C, H, W]` -> (`patches` `[B, 1+P, C*p*p]` with a CLS slot, validity)."""
    known_fields(batch, ("pixel_values",))
    pixels = field(batch, "pixel_values", kinds="iuf", ndim=4).astype(np.float32)
    want = (cfg.channels, cfg.image_size, cfg.image_size)
    if pixels.shape[1:] != want:
        raise PrismError(
            f"pixel_values must be [batch, {', '.join(map(str, want))}], got {list(pixels.shape)}"
        )
    if not np.isfinite(pixels).all():
        bad = np.argwhere(~np.isfinite(pixels))[0].tolist()
        raise PrismError(f"pixel_values hold NaN or inf (first at index {bad})")
    patches = patchify(pixels, cfg.patch_size)
    patches = np.concatenate([np.zeros_like(patches[:, :1]), patches], axis=1)
    return {"patches": patches}, np.ones(patches.shape[:2], bool)
