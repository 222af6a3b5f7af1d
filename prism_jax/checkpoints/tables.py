"""The HF <-> prism_jax weight tables, one per family (STYLE.md "Weights").

Each family is a small declarative table: HF module name -> (our module path, kind), for the
top level and for one layer (`{i}`). The kind says how `.weight` / `.bias` map onto our
parameters, both ways (`_Transform`). `entries` unrolls a table for a config; `hf.convert`
loads through it and `hf.state_dict` saves through it. `ARCHITECTURES` maps HF's
architecture names onto our config classes and heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from prism_jax.configs import BertConfig, GPT2Config, LlamaConfig, ModelConfig, ViTConfig
from prism_jax.errors import PrismError


@dataclasses.dataclass(frozen=True)
class _Transform:
    """How one tensor moves between HF's layout and ours, both ways."""

    load: Callable  # HF array -> ours
    save: Callable  # (ours, config) -> HF array; q/k/v pieces are joined by `state_dict`


_SAME = _Transform(lambda w: w, lambda w, cfg: w)
_TRANSPOSE = _Transform(np.transpose, lambda w, cfg: w.T)  # nn.Linear: [out, in]
_PATCH = _Transform(
    lambda w: w.reshape(w.shape[0], -1).T,  # Conv2d [D, C, p, p] -> [C*p*p, D]
    lambda w, cfg: w.T.reshape(cfg.width, cfg.channels, cfg.patch_size, cfg.patch_size),
)


def _qkv(j: int) -> _Transform:  # GPT-2's c_attn packs q, k, v on its last axis
    return _Transform(lambda w: np.split(w, 3, axis=-1)[j], lambda w, cfg: w)


# kind -> [(HF suffix, our suffix, transform)]
_KINDS = {
    "linear": [(".weight", ".kernel", _TRANSPOSE), (".bias", ".bias", _SAME)],
    "conv1d": [(".weight", ".kernel", _SAME), (".bias", ".bias", _SAME)],  # GPT-2: [in, out]
    "ln": [(".weight", ".scale", _SAME), (".bias", ".bias", _SAME)],
    "rms": [(".weight", ".scale", _SAME)],
    "embed": [(".weight", ".embedding", _SAME)],
    # ViT CLS [1, 1, D] <-> [D]; positions [1, 1+P, D] <-> [1+P, D]
    "token": [("", "", _Transform(lambda w: w.reshape(w.shape[-1:]), lambda w, c: w[None, None]))],
    "table": [("", "", _Transform(lambda w: w[0], lambda w, cfg: w[None]))],
    "patch": [(".weight", ".kernel", _PATCH), (".bias", ".bias", _SAME)],
    "qkv": [
        (s, f".{n}.{p}", _qkv(j))
        for s, p in ((".weight", "kernel"), (".bias", "bias"))
        for j, n in enumerate("qkv")
    ],  # fmt: skip
}

# family -> (base prefix, top-level table, per-layer table, head table (never prefixed), ignored)
TABLES = {
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
    "llama": (
        "model.",
        {"embed_tokens": ("embed", "embed"), "norm": ("encoder.ln_f", "rms")},
        {
            "input_layernorm": ("ln1", "rms"),
            "self_attn.q_proj": ("attn.q", "linear"),
            "self_attn.k_proj": ("attn.k", "linear"),
            "self_attn.v_proj": ("attn.v", "linear"),
            "self_attn.o_proj": ("attn.o", "linear"),
            "post_attention_layernorm": ("ln2", "rms"),
            "mlp.gate_proj": ("mlp.gate", "linear"),
            "mlp.up_proj": ("mlp.fc1", "linear"),
            "mlp.down_proj": ("mlp.fc2", "linear"),
        },
        {"lm_head": ("head", "linear")},  # untied heads only; a tied one is checked below
        [r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq"],
    ),
}
_LAYER_PREFIX = {
    "bert": "encoder.layer.{i}.",
    "gpt2": "h.{i}.",
    "vit": "encoder.layer.{i}.",
    "llama": "layers.{i}.",
}
TIED_TABLE = {"gpt2": "wte.embedding", "llama": "embed.embedding"}  # LM heads tied to these


def base_prefix(cfg: ModelConfig, keys: set[str] | None = None) -> str:
    """The HF prefix of base-model keys (`bert.`, ...): present in task checkpoints; a base
    model saved on its own has none. With `keys`, whatever the checkpoint uses."""
    prefix = TABLES[cfg.family][0]
    if keys is None:
        return prefix if cfg.head != "base" else ""
    return prefix if any(k.startswith(prefix) for k in keys) else ""


def entries(cfg: ModelConfig, prefix: str):
    """(HF key, our dotted path, transform) for every tensor the family's tables name."""
    _, top, layer, heads, _ = TABLES[cfg.family]
    tables = [(prefix, top, ""), ("", heads, "")]
    tables += [
        (prefix + _LAYER_PREFIX[cfg.family].format(i=i), layer, f"encoder.blocks.{i}.")
        for i in range(cfg.depth)
    ]
    for hf_prefix, table, ours in tables:
        for hf_name, (our_name, kind) in table.items():
            for hf_suffix, our_suffix, transform in _KINDS[kind]:
                yield hf_prefix + hf_name + hf_suffix, ours + our_name + our_suffix, transform


# HF architecture name -> (config class, head, pooler: True / False / None = "if weights exist").
ARCHITECTURES: dict[str, tuple[type[ModelConfig], str, bool | None]] = {
    "BertModel": (BertConfig, "base", None),
    "BertForSequenceClassification": (BertConfig, "classifier", True),
    "GPT2Model": (GPT2Config, "base", False),
    "GPT2LMHeadModel": (GPT2Config, "lm", False),
    "ViTModel": (ViTConfig, "base", None),
    "ViTForImageClassification": (ViTConfig, "classifier", False),
    "LlamaModel": (LlamaConfig, "base", False),
    "LlamaForCausalLM": (LlamaConfig, "lm", False),
}
_BASE_BY_MODEL_TYPE = {
    "bert": "BertModel",
    "gpt2": "GPT2Model",
    "vit": "ViTModel",
    "llama": "LlamaModel",
}


def resolve_architecture(hf: dict) -> tuple[type[ModelConfig], str, bool | None]:
    """The config class, head and pooler rule named by `architectures` / `model_type`."""
    names = hf.get("architectures") or [_BASE_BY_MODEL_TYPE.get(hf.get("model_type"), "")]
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise PrismError(
            f"unknown architecture {names or hf.get('model_type')!r}; "
            f"supported: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[names[0]]
