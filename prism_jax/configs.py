"""Typed, frozen configs: one per architecture family, the execution `Plan`, and presets.

Shape vocabulary used across the package (einsum strings and `# [B, L, D]` comments):
B batch, T tokens (padded to N*L), N devices, L local tokens, S segments per device,
D width, H heads, K head dim (D/H), F MLP width, V vocabulary, C classes.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, ClassVar

from prism_jax.errors import PrismError

STRATEGIES = ("single", "voltage", "prism")
LOGIT_BIASES = ("log_count", "none")
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


def as_int(value) -> int | None:
    """`value` as a Python int if it is an integer (NumPy integers too, bools not), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """How one inference is spread over the edge devices (DESIGN.md section 1).

    Attributes:
      strategy: `single` (one device, the reference), `voltage` (full attention inputs
        exchanged) or `prism` (segment means exchanged).
      cr: compression rate, the segment length in tokens (prism only).
      logit_bias: `log_count` adds log(c) to a remote mean's logit, `none` adds nothing.
    """

    strategy: str = "prism"
    cr: int = 1
    logit_bias: str = "log_count"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise PrismError(f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}")
        cr = as_int(self.cr)
        if cr is None or cr < 1:
            raise PrismError(f"compression rate must be an integer >= 1, got {self.cr!r}")
        object.__setattr__(self, "cr", cr)  # a NumPy integer becomes a plain, hashable int
        if self.logit_bias not in LOGIT_BIASES:
            raise PrismError(
                f"unknown logit_bias {self.logit_bias!r}; choose one of {LOGIT_BIASES}"
            )

    def segments(self, local_len: int) -> int:
        """S = ceil(L / CR), the number of segment means one device sends per layer."""
        return math.ceil(local_len / self.cr)


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

    def __post_init__(self):
        for name in ("width", "depth", "heads", "mlp_width", "max_positions"):
            if not _positive_int(getattr(self, name)):
                raise PrismError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not _positive_float(self.ln_eps):
            raise PrismError(f"ln_eps must be a number > 0, got {self.ln_eps!r}")
        if self.width % self.heads:
            raise PrismError(f"hidden size {self.width} is not divisible by {self.heads} heads")
        if self.act not in ACTIVATIONS:
            raise PrismError(
                f"unsupported activation {self.act!r}; supported: {sorted(ACTIVATIONS)}"
            )
        if self.head not in HEADS:
            raise PrismError(f"unknown head {self.head!r}")
        if self.head == "classifier" and self.num_labels < 1:
            raise PrismError("a classifier head needs num_labels >= 1")


# HF config keys whose values must be positive integers / positive finite numbers when given.
_POSITIVE_INTS = frozenset(
    "vocab_size hidden_size num_hidden_layers num_attention_heads intermediate_size "
    "max_position_embeddings type_vocab_size n_embd n_layer n_head n_positions image_size "
    "patch_size num_channels".split()
)
_POSITIVE_FLOATS = frozenset({"layer_norm_eps", "layer_norm_epsilon"})


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


# HF architecture name -> (config class, head, pooler: True / False / None = "if weights exist").
ARCHITECTURES: dict[str, tuple[type[ModelConfig], str, bool | None]] = {
    "BertModel": (BertConfig, "base", None),
    "BertForSequenceClassification": (BertConfig, "classifier", True),
    "GPT2Model": (GPT2Config, "base", False),
    "GPT2LMHeadModel": (GPT2Config, "lm", False),
    "ViTModel": (ViTConfig, "base", None),
    "ViTForImageClassification": (ViTConfig, "classifier", False),
}
_BASE_BY_MODEL_TYPE = {"bert": "BertModel", "gpt2": "GPT2Model", "vit": "ViTModel"}


def resolve_architecture(hf: dict) -> tuple[type[ModelConfig], str, bool | None]:
    """The config class, head and pooler rule named by `architectures` / `model_type`."""
    names = hf.get("architectures") or [_BASE_BY_MODEL_TYPE.get(hf.get("model_type"), "")]
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise PrismError(
            f"unknown architecture {names or hf.get('model_type')!r}; "
            f"supported: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[names[0]]


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
}
