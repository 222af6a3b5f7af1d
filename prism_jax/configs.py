"""Typed, frozen configs: one per architecture family, and presets (the execution `Plan` is
in `plan.py`, re-exported here).

Shape vocabulary used across the package (einsum strings and `# [B, L, D]` comments):
B batch, T tokens (padded to N*L), N devices, L local tokens, S segments per device,
D width, H heads, K head dim (D/H), F MLP width, V vocabulary, C classes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from prism_jax.checks import as_int
from prism_jax.errors import PrismError
from prism_jax.plan import EXCHANGES, LOGIT_BIASES, STRATEGIES, Plan

__all__ = ["EXCHANGES", "LOGIT_BIASES", "STRATEGIES", "Plan", "as_int"]  # re-exported

# HF activation name -> the function it is (`layers` implements each once).
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
HEADS = ("base", "classifier", "lm")


# HF config keys that carry no meaning for inference (training knobs, bookkeeping, generation).
_GENERIC_KEYS = frozenset(
    "_name_or_path architectures model_type transformers_version dtype torch_dtype id2label "
    "label2id num_labels problem_type return_dict output_attentions output_hidden_states "
    "use_cache bos_token_id eos_token_id pad_token_id sep_token_id initializer_range "
    "initializer_factor gradient_checkpointing chunk_size_feed_forward is_encoder_decoder "
    "tie_word_embeddings tokenizer_class prefix task_specific_params finetuning_task "
    "classifier_dropout attention_probs_dropout_prob hidden_dropout_prob attn_pdrop "
    "embd_pdrop resid_pdrop summary_activation summary_first_dropout summary_proj_to_labels "
    "summary_type summary_use_proj n_ctx encoder_stride _attn_implementation "
    "_attn_implementation_autoset use_return_dict torchscript pruned_heads output_scores "
    "return_dict_in_generate decoder_start_token_id max_length".split()
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Fields every family shares; `layers.Block` reads only these."""

    family: ClassVar[str]
    norm_first: ClassVar[bool]
    causal: ClassVar[bool]
    rms_norm: ClassVar[bool] = False  # RMSNorm (Llama) instead of LayerNorm
    gated_mlp: ClassVar[bool] = False  # SwiGLU: fc2(act(gate(x)) * fc1(x))

    width: int  # D
    depth: int
    heads: int  # H
    mlp_width: int  # F
    act: str
    ln_eps: float
    max_positions: int
    head: str = "base"  # base | classifier | lm
    num_labels: int = 0  # C
    pooler: bool = False
    qkv_bias: bool = True
    out_bias: bool = True  # the attention output projection's bias
    mlp_bias: bool = True
    kv_heads: int | None = None  # H_kv (grouped-query attention); None: H
    head_dim: int | None = None  # K; None: D / H
    rope_theta: float | None = None  # rotary position embeddings' base; None: no rotary

    def __post_init__(self):
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.head_dim is None:
            if _positive_int(self.heads) and _positive_int(self.width) and self.width % self.heads:
                raise PrismError(f"hidden size {self.width} is not divisible by {self.heads} heads")
            object.__setattr__(self, "head_dim", self.width // max(as_int(self.heads) or 1, 1))
        for name in ("width", "depth", "heads", "kv_heads", "head_dim", "mlp_width"):
            if not _positive_int(getattr(self, name)):
                raise PrismError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not _positive_int(self.max_positions):
            raise PrismError(f"max_positions must be an integer >= 1, got {self.max_positions!r}")
        if not _positive_float(self.ln_eps):
            raise PrismError(f"ln_eps must be a number > 0, got {self.ln_eps!r}")
        if self.heads % self.kv_heads:
            raise PrismError(f"{self.heads} heads are not divisible by {self.kv_heads} KV heads")
        if self.rope_theta is not None and (
            not _positive_float(self.rope_theta) or self.head_dim % 2
        ):
            raise PrismError(
                f"rotary embeddings need a base > 0 and an even head size, got "
                f"rope_theta={self.rope_theta!r}, head_dim={self.head_dim}"
            )
        if self.act not in ACTIVATIONS:
            raise PrismError(
                f"unsupported activation {self.act!r}; supported: {sorted(ACTIVATIONS)}"
            )
        if self.head not in HEADS:
            raise PrismError(f"unknown head {self.head!r}")
        if self.head == "classifier" and self.num_labels < 1:
            raise PrismError("a classifier head needs num_labels >= 1")

    @property
    def kv_width(self) -> int:
        """2*H_kv*K: the values one token's keys and values take together."""
        return 2 * self.kv_heads * self.head_dim


# HF config keys whose values must be positive integers / positive finite numbers when given.
_POSITIVE_INTS = frozenset(
    "vocab_size hidden_size num_hidden_layers num_attention_heads intermediate_size "
    "max_position_embeddings type_vocab_size n_embd n_layer n_head n_positions image_size "
    "patch_size num_channels num_key_value_heads head_dim".split()
)
_POSITIVE_FLOATS = frozenset({"layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps", "rope_theta"})


def _positive_int(v) -> bool:
    return as_int(v) is not None and v >= 1


def _positive_float(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _check_keys(hf: dict, consumed: set[str], rules: dict[str, Any]) -> None:
    """Reject HF config fields this code does not implement, and values it cannot use,
    naming them."""
    unknown = sorted(set(hf) - consumed - set(rules) - _GENERIC_KEYS)
    if unknown:
        raise PrismError(f"unsupported config fields for {hf.get('model_type')}: {unknown}")
    typed = [(k, _positive_int, "an integer >= 1") for k in sorted(_POSITIVE_INTS & set(hf))]
    typed += [(k, _positive_float, "a number > 0") for k in sorted(_POSITIVE_FLOATS & set(hf))]
    for key, ok, what in typed:
        if not ok(hf[key]):
            raise PrismError(f"config.json: {key} must be {what}, got {hf[key]!r}")
    bad = [f"{k}={hf[k]!r}" for k, ok in rules.items() if k in hf and not ok(hf[k])]
    if bad:
        raise PrismError(f"unsupported config values for {hf.get('model_type')}: {bad}")


def _num_labels(hf: dict) -> int:
    return len(hf["id2label"]) if "id2label" in hf else int(hf.get("num_labels", 2))


_NOT_SET = (None, False)


REQUIRED = object()  # an HF_KEYS default: HF's config must name the key
# our field -> (HF key, default) of the encoders' shared fields (BERT, ViT)
_ENCODER_KEYS = {
    "width": ("hidden_size", 768),
    "depth": ("num_hidden_layers", 12),
    "heads": ("num_attention_heads", 12),
    "mlp_width": ("intermediate_size", 3072),
    "act": ("hidden_act", "gelu"),
    "ln_eps": ("layer_norm_eps", 1e-12),
}


def _from_keys(cls, hf: dict, **fields) -> dict:
    """The config fields named by `cls.HF_KEYS`, read from `hf` (defaults where allowed),
    with `fields` on top."""
    out = {}
    for field, (key, default) in cls.HF_KEYS.items():
        if key in hf:
            out[field] = hf[key]
        elif default is REQUIRED:
            raise PrismError(f"config.json lacks {key}")
        else:
            out[field] = default
    return out | fields


def _head_fields(hf: dict, head: str, pooler: bool) -> dict:
    return dict(head=head, pooler=pooler, num_labels=_num_labels(hf) if head == "classifier" else 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig(ModelConfig):
    """BERT: post-LN encoder, word + position + token-type embeddings."""

    family: ClassVar[str] = "bert"
    norm_first: ClassVar[bool] = False
    causal: ClassVar[bool] = False
    HF_KEYS: ClassVar[dict] = {
        "vocab_size": ("vocab_size", REQUIRED),
        **{f: (k, REQUIRED) for f, (k, _) in _ENCODER_KEYS.items() if f not in ("act", "ln_eps")},
        "act": ("hidden_act", "gelu"),
        "ln_eps": ("layer_norm_eps", 1e-12),
        "max_positions": ("max_position_embeddings", 512),
        "type_vocab_size": ("type_vocab_size", 2),
    }
    vocab_size: int
    type_vocab_size: int = 2

    @classmethod
    def from_hf_config(cls, hf: dict, *, head: str, pooler: bool) -> BertConfig:
        _check_keys(
            hf,
            {key for key, _ in cls.HF_KEYS.values()},
            {
                "position_embedding_type": lambda v: v == "absolute",
                "is_decoder": lambda v: v in _NOT_SET,
                "add_cross_attention": lambda v: v in _NOT_SET,
            },
        )
        return cls(**_from_keys(cls, hf, **_head_fields(hf, head, pooler)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config(ModelConfig):
    """GPT-2: pre-LN causal decoder with a final LayerNorm and a tied LM head."""

    family: ClassVar[str] = "gpt2"
    norm_first: ClassVar[bool] = True
    causal: ClassVar[bool] = True
    HF_KEYS: ClassVar[dict] = {
        "vocab_size": ("vocab_size", REQUIRED),
        "width": ("n_embd", 768),
        "depth": ("n_layer", 12),
        "heads": ("n_head", 12),
        "mlp_width": ("n_inner", None),  # None: 4 x width
        "act": ("activation_function", "gelu_new"),
        "ln_eps": ("layer_norm_epsilon", 1e-5),
        "max_positions": ("n_positions", 1024),
    }
    vocab_size: int

    @classmethod
    def from_hf_config(cls, hf: dict, *, head: str, pooler: bool = False) -> GPT2Config:
        _check_keys(
            hf,
            {key for key, _ in cls.HF_KEYS.values()} | {"reorder_and_upcast_attn"},
            {
                "scale_attn_by_inverse_layer_idx": lambda v: v in _NOT_SET,
                "scale_attn_weights": lambda v: v is True,
                "add_cross_attention": lambda v: v in _NOT_SET,
            },
        )
        fields = _from_keys(cls, hf, head=head)
        return cls(**fields | {"mlp_width": fields["mlp_width"] or 4 * fields["width"]})


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig(ModelConfig):
    """ViT: patch embedding + CLS token, pre-LN encoder, final LayerNorm."""

    family: ClassVar[str] = "vit"
    norm_first: ClassVar[bool] = True
    causal: ClassVar[bool] = False
    HF_KEYS: ClassVar[dict] = {
        **_ENCODER_KEYS,
        "image_size": ("image_size", 224),
        "patch_size": ("patch_size", 16),
        "channels": ("num_channels", 3),
        "qkv_bias": ("qkv_bias", True),
    }
    image_size: int
    patch_size: int
    channels: int = 3

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf_config(cls, hf: dict, *, head: str, pooler: bool) -> ViTConfig:
        _check_keys(
            hf,
            {key for key, _ in cls.HF_KEYS.values()},
            {
                "pooler_act": lambda v: v == "tanh",
                "pooler_output_size": lambda v: v in (None, hf.get("hidden_size")),
            },
        )
        fields = _from_keys(cls, hf, **_head_fields(hf, head, pooler))
        image, patch = fields["image_size"], fields["patch_size"]
        if image % patch:
            raise PrismError(f"image_size {image} is not a multiple of patch_size {patch}")
        return cls(**fields, max_positions=(image // patch) ** 2 + 1)


ROPE_TYPES = ("default",)  # rotary variants implemented; others (linear, dynamic, yarn, llama3) not


def _rope_theta(hf: dict) -> float:
    """The rotary base from `rope_parameters` (transformers 5) or the older `rope_theta` and
    `rope_scaling`; a scaling kind we do not implement is refused by name."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise PrismError("config.json: rope_parameters and rope_scaling must be objects")
    for source in (params, scaling):
        kind = source.get("rope_type", source.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise PrismError(f"unsupported rope scaling {kind!r}; implemented: {list(ROPE_TYPES)}")
    unknown = sorted(set(params) - {"rope_type", "type", "rope_theta"})
    if unknown:
        raise PrismError(f"unsupported rope_parameters fields: {unknown}")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if not _positive_float(theta):
        raise PrismError(f"config.json: rope_theta must be a number > 0, got {theta!r}")
    return float(theta)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(ModelConfig):
    """Llama family: pre-RMSNorm causal decoder with rotary keys, grouped-query attention,
    a SwiGLU MLP, optional biases and a tied or untied LM head (DESIGN.md section 1a)."""

    family: ClassVar[str] = "llama"
    norm_first: ClassVar[bool] = True
    causal: ClassVar[bool] = True
    rms_norm: ClassVar[bool] = True
    gated_mlp: ClassVar[bool] = True
    HF_KEYS: ClassVar[dict] = {
        "vocab_size": ("vocab_size", REQUIRED),
        "width": ("hidden_size", REQUIRED),
        "depth": ("num_hidden_layers", REQUIRED),
        "heads": ("num_attention_heads", REQUIRED),
        "kv_heads": ("num_key_value_heads", None),
        "head_dim": ("head_dim", None),
        "mlp_width": ("intermediate_size", REQUIRED),
        "act": ("hidden_act", "silu"),
        "ln_eps": ("rms_norm_eps", 1e-6),
        "max_positions": ("max_position_embeddings", 2048),
        "qkv_bias": ("attention_bias", False),
        "mlp_bias": ("mlp_bias", False),
        "tied": ("tie_word_embeddings", False),
    }
    vocab_size: int
    tied: bool = False  # the LM head is the embedding table

    @classmethod
    def from_hf_config(cls, hf: dict, *, head: str, pooler: bool = False) -> LlamaConfig:
        _check_keys(
            hf,
            {key for key, _ in cls.HF_KEYS.values()} | {"rope_theta", "attention_dropout"},
            {
                "pretraining_tp": lambda v: v == 1,
                "rope_parameters": lambda v: True,  # checked by _rope_theta
                "rope_scaling": lambda v: True,
            },
        )
        fields = _from_keys(cls, hf, head=head)
        for flag in ("qkv_bias", "mlp_bias", "tied"):
            if not isinstance(fields[flag], bool):
                raise PrismError(f"config.json: {cls.HF_KEYS[flag][0]} must be true or false")
        return cls(**fields, out_bias=fields["qkv_bias"], rope_theta=_rope_theta(hf))


def _preset(cls, **kw):
    """A preset at the base size (768 wide, 12 layers, 12 heads, MLP 3072) with `kw` on top."""
    base = dict(width=768, depth=12, heads=12, mlp_width=3072)
    return lambda head="base": cls(head=head, **base, **kw)


# Random-weight presets at the paper's sizes (DESIGN.md section 3; the cost issue).
PRESETS = {
    "bert-base": _preset(BertConfig, vocab_size=30522, act="gelu", ln_eps=1e-12, max_positions=512),
    "gpt2": _preset(GPT2Config, vocab_size=50257, act="gelu_new", ln_eps=1e-5, max_positions=1024),
    "vit-base-patch16-224": _preset(
        ViTConfig, act="gelu", ln_eps=1e-12, max_positions=197, image_size=224, patch_size=16
    ),
    # SmolLM2-135M (DESIGN.md section 4): 30 layers, 576 wide, 9 query / 3 KV heads of 64.
    "smollm2-135m": lambda head="lm": LlamaConfig(
        head=head,
        vocab_size=49152,
        width=576,
        depth=30,
        heads=9,
        kv_heads=3,
        mlp_width=1536,
        act="silu",
        ln_eps=1e-5,
        max_positions=8192,
        qkv_bias=False,
        out_bias=False,
        mlp_bias=False,
        rope_theta=1e5,
        tied=True,
    ),
}
