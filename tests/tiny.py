"""Tiny random Hugging Face checkpoints, built offline with transformers + torch.

Shapes are deliberately not the defaults: odd head counts, widths that are not powers of
two, non-default activations, a ViT without q/k/v biases. Weights are drawn wider than HF's
default (initializer_range 0.15) so that attention is peaked and compression really moves
the outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = (
    "the a of and to in is was it for on with as at by this that good great bad food "
    "taste tea coffee dog cat sweet salt order box price love hate buy again not very"
).split()

SPECS = {
    "bert": (
        "BertModel",
        dict(
            vocab_size=101,
            hidden_size=30,
            num_hidden_layers=2,
            num_attention_heads=3,
            intermediate_size=37,
            max_position_embeddings=64,
            type_vocab_size=3,
        ),
    ),
    "bert_cls": (
        "BertForSequenceClassification",
        dict(
            vocab_size=101,
            hidden_size=35,
            num_hidden_layers=3,
            num_attention_heads=5,
            intermediate_size=41,
            max_position_embeddings=64,
            hidden_act="gelu_new",
            num_labels=3,
        ),
    ),
    "gpt2": (
        "GPT2Model",
        dict(
            vocab_size=97,
            n_embd=30,
            n_layer=2,
            n_head=5,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "gpt2_lm": (
        "GPT2LMHeadModel",
        dict(
            vocab_size=101,
            n_embd=36,
            n_layer=3,
            n_head=3,
            n_inner=50,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            activation_function="gelu",
        ),
    ),
    # Llama: grouped-query attention with a head size that is not D / H, RoPE base 1e4, untied
    # head; and multi-query attention with biases, base 1e5, a tied head.
    "llama_lm": (
        "LlamaForCausalLM",
        dict(
            vocab_size=101,
            hidden_size=42,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=10,
            intermediate_size=37,
            max_position_embeddings=64,
            rope_theta=1e4,
            rms_norm_eps=1e-5,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "llama_tied": (
        "LlamaForCausalLM",
        dict(
            vocab_size=97,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            intermediate_size=30,
            max_position_embeddings=64,
            rope_theta=1e5,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "vit": (
        "ViTModel",
        dict(
            image_size=12,
            patch_size=3,
            num_channels=3,
            hidden_size=30,
            num_hidden_layers=2,
            num_attention_heads=3,
            intermediate_size=37,
        ),
    ),
    "vit_cls": (
        "ViTForImageClassification",
        dict(
            image_size=14,
            patch_size=2,
            num_channels=1,
            hidden_size=24,
            num_hidden_layers=2,
            num_attention_heads=3,
            intermediate_size=40,
            qkv_bias=False,
            num_labels=5,
        ),
    ),
}


def build(name: str, directory: Path):
    """Build, save and return `(torch_model, directory)` for one of SPECS."""
    import torch
    import transformers

    arch, kwargs = SPECS[name]
    torch.manual_seed(sum(map(ord, name)))
    family = {
        "Bert": "BertConfig",
        "GPT2": "GPT2Config",
        "ViT": "ViTConfig",
        "Llama": "LlamaConfig",
    }
    config_cls = next(getattr(transformers, c) for p, c in family.items() if arch.startswith(p))
    config = config_cls(initializer_range=0.15, **kwargs)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # norms and biases away from their (1, 0) init, too
        for key, p in model.named_parameters():
            norm = "LayerNorm" in key or "ln_" in key or "layernorm" in key
            if norm or key.endswith(("bias", "norm.weight")):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    if arch.startswith(("Bert", "GPT2", "Llama")):
        _save_tokenizer(directory, bert=arch.startswith("Bert"))
    if name == "vit":
        (directory / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "do_resize": True,
                    "size": {"height": 12, "width": 12},
                    "do_rescale": True,
                    "rescale_factor": 1 / 255,
                    "do_normalize": True,
                    "image_mean": [0.5] * 3,
                    "image_std": [0.5] * 3,
                }
            )
        )
    return model, directory


def _save_tokenizer(directory: Path, bert: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(special + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
        )
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))


def torch_outputs(model, batch: dict) -> dict[str, np.ndarray]:
    """The HF model's outputs on a NumPy batch, as NumPy."""
    import torch

    args = {k: torch.tensor(np.asarray(v)) for k, v in batch.items()}
    with torch.no_grad():
        out = model(**args, output_hidden_states=True)
    result = {"hidden_states": [h.numpy() for h in out.hidden_states]}
    if getattr(out, "last_hidden_state", None) is not None:
        result["last_hidden_state"] = out.last_hidden_state.numpy()
    else:  # task models expose hidden states only; ViT's last one precedes the final LN
        result["last_hidden_state"] = None
    for key in ("logits", "pooler_output"):
        if getattr(out, key, None) is not None:
            result[key] = getattr(out, key).numpy()
    return result


def random_batch(name: str, rng: np.random.Generator, batch: int = 3, tokens: int = 13):
    """A batch in HF layout: right-padded with mixed lengths; token types for BERT."""
    arch, kw = SPECS[name]
    if arch.startswith("ViT"):
        c, s = kw["num_channels"], kw["image_size"]
        return {"pixel_values": rng.standard_normal((batch, c, s, s)).astype(np.float32)}
    ids = rng.integers(5, kw["vocab_size"], (batch, tokens))
    mask = np.ones_like(ids)
    for i in range(1, batch):
        mask[i, max(1, tokens - 3 * i) :] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if arch.startswith("Bert"):
        types = np.zeros_like(ids)
        types[:, tokens // 2 :] = 1
        out["token_type_ids"] = types
    return out
