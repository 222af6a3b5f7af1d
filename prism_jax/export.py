"""A model as a Hugging Face checkpoint directory: config.json, model.safetensors in the hub's
key layout (the conversion tables of `hf.py`, run backwards), tokenizer and image-processor
files. Both `pj.load_pretrained` and `transformers` load what this writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from prism_jax import hf
from prism_jax.configs import ARCHITECTURES, ModelConfig
from prism_jax.models import Model


def hf_config(cfg: ModelConfig) -> dict:
    """The HF `config.json` of a model config."""
    arch = next(
        name
        for name, (cls, head, _) in ARCHITECTURES.items()
        if cls is type(cfg) and head == cfg.head
    )
    out = {"architectures": [arch], "model_type": cfg.family}
    if cfg.family == "gpt2":
        out.update(
            vocab_size=cfg.vocab_size,
            n_embd=cfg.width,
            n_layer=cfg.depth,
            n_head=cfg.heads,
            n_inner=cfg.mlp_width,
            activation_function=cfg.act,
            layer_norm_epsilon=cfg.ln_eps,
            n_positions=cfg.max_positions,
            tie_word_embeddings=True,
        )
        return out
    out.update(
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_width,
        hidden_act=cfg.act,
        layer_norm_eps=cfg.ln_eps,
    )
    if cfg.family == "bert":
        out.update(
            vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.max_positions,
            type_vocab_size=cfg.type_vocab_size,
            position_embedding_type="absolute",
        )
    else:
        out.update(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            num_channels=cfg.channels,
            qkv_bias=cfg.qkv_bias,
        )
    if cfg.head == "classifier":
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    return out


def _inverse(kind: str, fn, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Undo one entry's transform of `hf._KINDS` (q/k/v pieces are concatenated later)."""
    if fn is None or kind == "qkv":
        return w
    if fn is np.transpose:
        return w.T
    if kind == "token":
        return w.reshape(1, 1, -1)
    if kind == "table":
        return w[None]
    if kind == "patch":
        return w.T.reshape(cfg.width, cfg.channels, cfg.patch_size, cfg.patch_size)
    raise ValueError(f"no inverse for {kind}")


def state_dict(model: Model) -> dict[str, np.ndarray]:
    """The model's parameters under HF keys and layouts (float32)."""
    cfg = model.config
    flat = {
        ".".join(map(str, p)): np.asarray(v.get_value(), np.float32)
        for p, v in nnx.to_flat_state(model.params)
    }
    pieces: dict[str, list[np.ndarray]] = {}
    for hf_key, ours, fn, kind in hf.entries(cfg, hf.base_prefix(cfg)):
        if ours in flat:
            pieces.setdefault(hf_key, []).append(_inverse(kind, fn, flat[ours], cfg))
    return {
        k: np.ascontiguousarray(v[0] if len(v) == 1 else np.concatenate(v, axis=-1))
        for k, v in pieces.items()
    }


def save_pretrained(model: Model, directory: str | Path) -> Path:
    """Write `model` as an HF checkpoint directory; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config(model.config), indent=2))
    save_file(state_dict(model), directory / "model.safetensors", metadata={"format": "pt"})
    if model.tokenizer is not None:
        tok = model.tokenizer
        tok.backend.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "pad_token": tok.backend.id_to_token(tok.pad_id),
                    "model_max_length": tok.max_length,
                },
                indent=2,
            )
        )
    if model.image_processor is not None:
        p = model.image_processor
        (directory / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "image_processor_type": "ViTImageProcessor",
                    "do_resize": True,
                    "size": {"height": p.size[0], "width": p.size[1]},
                    "resample": p.resample,
                    "do_rescale": p.rescale is not None,
                    "rescale_factor": p.rescale or 1.0,
                    "do_normalize": p.mean is not None,
                    "image_mean": list(p.mean or (0.5,) * p.channels),
                    "image_std": list(p.std or (0.5,) * p.channels),
                },
                indent=2,
            )
        )
    return directory
