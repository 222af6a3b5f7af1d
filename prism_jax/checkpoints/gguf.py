"""GGUF files (llama.cpp) -> a HF Llama checkpoint, read with the `gguf` package (pure NumPy).

A GGUF file holds a Llama-family model as metadata fields (`llama.*`, `tokenizer.ggml.*`) and
tensors under llama.cpp's names, quantized (Q4_1, Q8_0, ...) or not. `read` dequantizes every
tensor to float32 under HF's names and layouts and turns the metadata into a HF `config.json`
and a `tokenizers` tokenizer, so that the rest of the package (and `transformers`) sees an
ordinary HF checkpoint.

llama.cpp stores the rows of the query and key projections of each head interleaved (its
rotary kernel rotates adjacent pairs, HF's rotates halves): `_unpermute` undoes that.
"""

from __future__ import annotations

import json
import numbers
import os
import re
from pathlib import Path

import numpy as np

from prism_jax.errors import PrismError

ARCHITECTURES = ("llama",)
# llama.cpp tensor name -> HF name ({i}: the layer).
_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    **{
        f"blk.{{i}}.{ours}.{kind}": f"model.layers.{{i}}.{hf}.{kind}"
        for ours, hf in {
            "attn_norm": "input_layernorm",
            "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        }.items()
        for kind in ("weight", "bias")
    },
}
_LAYER = re.compile(r"blk\.(\d+)\.")
# `tokenizer.ggml.pre` of byte-level BPE vocabularies -> whether digits are split one by one
# before the GPT-2 byte-level split (llama.cpp's `smollm`, `starcoder`, ... pre-tokenizers).
_BPE_PRE = {"default": False, "gpt2": False, "smollm": True, "starcoder": True, "refact": True}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise PrismError("reading GGUF files needs the gguf package: pip install gguf") from None
    return gguf


def _reader(path: Path):
    if not path.is_file():
        raise PrismError(f"no GGUF file at {path}")
    try:
        return _gguf().GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise PrismError(
            f"{path} is not a readable GGUF file (truncated or corrupt): {e}"
        ) from None


def _fields(reader) -> dict:
    out = {}
    for name, field in reader.fields.items():
        try:
            out[name] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise PrismError(f"corrupt GGUF field {name}: {e}") from None
    return out


def _unpermute(w: np.ndarray, heads: int, head_dim: int, name: str, field: str) -> np.ndarray:
    """llama.cpp's per-head row order of a q/k projection (pairs interleaved) -> HF's (halves);
    a PrismError when the metadata's heads do not fit the tensor's rows."""
    if w.shape[0] != heads * head_dim:
        raise PrismError(
            f"GGUF metadata disagrees with tensor {name}: {field} = {heads} heads of size "
            f"{head_dim} need {heads * head_dim} rows, the tensor has {w.shape[0]}"
        )
    return w.reshape(heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config(fields: dict, tensor_names: set[str]) -> dict:
    """The HF `config.json` of a llama-architecture GGUF file's metadata."""
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise PrismError(
            f"GGUF architecture {arch!r} is not supported; supported: {list(ARCHITECTURES)}"
        )

    def get(key, default=None):
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise PrismError(f"the GGUF file lacks {arch}.{key}")
        return value

    def count(key, default=None) -> int:  # a size or count: an integer >= 1
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise PrismError(f"GGUF field {arch}.{key} must be an integer >= 1, got {value!r}")
        return int(value)

    scaling = fields.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "default") or "rope_freqs.weight" in tensor_names:
        raise PrismError(f"unsupported rope scaling {scaling!r} in the GGUF file")
    heads, width = count("attention.head_count"), count("embedding_length")
    head_dim = count("attention.key_length", get("rope.dimension_count", width // heads))
    vocab = fields.get(f"{arch}.vocab_size") or len(fields.get("tokenizer.ggml.tokens", ()))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": width,
        "intermediate_size": count("feed_forward_length"),
        "num_hidden_layers": count("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": count("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": count("context_length"),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    for key in ("bos", "eos", "padding"):
        token = fields.get(f"tokenizer.ggml.{key}_token_id")
        if token is not None:
            config[f"{'pad' if key == 'padding' else key}_token_id"] = int(token)
    return config


def tensors(reader, config: dict) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32 under its HF name; q/k rows in HF's order."""
    gguf = _gguf()
    out, unknown = {}, []
    for t in reader.tensors:
        layer = _LAYER.match(t.name)
        template = _LAYER.sub("blk.{i}.", t.name, count=1) if layer else t.name
        hf = _TENSORS.get(template)
        if hf is None:
            unknown.append(t.name)
            continue
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        except (NotImplementedError, ValueError) as e:
            raise PrismError(f"cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from None
        for kind, heads in (("q", "num_attention_heads"), ("k", "num_key_value_heads")):
            if template.endswith((f"attn_{kind}.weight", f"attn_{kind}.bias")):
                field = "llama.attention.head_count" + ("_kv" if kind == "k" else "")
                w = _unpermute(w, config[heads], config["head_dim"], t.name, field)
        out[hf.format(i=layer.group(1)) if layer else hf] = w
    if unknown:
        raise PrismError(f"GGUF tensors this converter does not know: {unknown[:8]}")
    return out


def tokenizer(fields: dict):
    """A `tokenizers.Tokenizer` from a byte-level BPE GGUF vocabulary (tokens, merges, special
    tokens), or (None, reason) when the vocabulary is of a kind not converted here."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    kind, pre = fields.get("tokenizer.ggml.model"), fields.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _BPE_PRE:
        return None, f"tokenizer model {kind!r} with pre-tokenizer {pre!r} is not converted"
    if "tokenizer.ggml.tokens" not in fields:
        raise PrismError("the GGUF file lacks tokenizer.ggml.tokens")
    tokens = list(fields["tokenizer.ggml.tokens"])
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = _merges(fields.get("tokenizer.ggml.merges", ()), vocab)
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    split = [pre_tokenizers.Digits(individual_digits=True)] if _BPE_PRE[pre] else []
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        split + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    backend.decoder = decoders.ByteLevel()
    types = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
    if len(types) != len(tokens):
        raise PrismError(
            f"GGUF field tokenizer.ggml.token_type has {len(types)} entries for "
            f"{len(tokens)} tokens (tokenizer.ggml.tokens)"
        )
    special = [
        tokenizers.AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types, strict=True)
        if kind == 3  # llama.cpp's CONTROL tokens
    ]
    backend.add_special_tokens(special)
    return backend, None


def _merges(merges, vocab: dict) -> list[tuple[str, str]]:
    """BPE merges "a b" as pairs, each checked (the tokenizers library panics or raises on a
    pair, or a merged token, that is not in the vocabulary)."""
    out = []
    for i, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else []
        if len(pair) != 2 or not all(pair):
            raise PrismError(
                f"GGUF field tokenizer.ggml.merges: merge {i} {merge!r} is not two tokens "
                "separated by one space"
            )
        unknown = [t for t in (*pair, "".join(pair)) if t not in vocab]
        if unknown:
            raise PrismError(
                f"GGUF field tokenizer.ggml.merges: merge {i} {merge!r} names {unknown[0]!r}, "
                "which is not in the vocabulary (tokenizer.ggml.tokens)"
            )
        out.append((pair[0], pair[1]))
    return out


def tokenizer_config(fields: dict, config: dict) -> dict:
    """HF `tokenizer_config.json`: special tokens by name, the chat template, the length."""
    tokens = fields.get("tokenizer.ggml.tokens", ())
    out = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("pad", "pad_token")):
        token = config.get(f"{key}_token_id")
        if token is not None and 0 <= token < len(tokens):
            out[name] = tokens[token]
    unknown = fields.get("tokenizer.ggml.unknown_token_id")
    if unknown is not None and 0 <= unknown < len(tokens):
        out["unk_token"] = tokens[unknown]
    if "tokenizer.chat_template" in fields:
        out["chat_template"] = fields["tokenizer.chat_template"]
    return out


def read_config(path: str | os.PathLike) -> dict:
    """The HF `config.json` of a GGUF file, from its metadata alone (no tensor is read)."""
    reader = _reader(Path(path))
    return hf_config(_fields(reader), {t.name for t in reader.tensors})


def read(path: str | os.PathLike) -> dict:
    """Everything a HF checkpoint directory would hold, from one GGUF file.

    Returns:
      `config` (config.json), `tensors` (HF names, float32), `tokenizer` (a
      `tokenizers.Tokenizer` or None), `tokenizer_note` (why there is none),
      `tokenizer_config` and `generation_config` (dicts).
    """
    reader = _reader(Path(path))
    fields = _fields(reader)
    config = hf_config(fields, {t.name for t in reader.tensors})
    backend, note = tokenizer(fields)
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    generation = {k: config[k] for k in ids if k in config}
    return {
        "config": config,
        "tensors": tensors(reader, config),
        "tokenizer": backend,
        "tokenizer_note": note,
        "tokenizer_config": tokenizer_config(fields, config),
        "generation_config": generation,
    }


def write_directory(contents: dict, directory: Path, save_tensors) -> None:
    """Write what `read` returned into the (existing) `directory`, as a HF checkpoint
    (`save_tensors(tensors, path)` writes the safetensors file)."""
    (directory / "config.json").write_text(json.dumps(contents["config"], indent=2))
    save_tensors(contents["tensors"], directory / "model.safetensors")
    (directory / "generation_config.json").write_text(
        json.dumps(contents["generation_config"], indent=2)
    )
    if contents["tokenizer"] is not None:
        contents["tokenizer"].save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(
            json.dumps(contents["tokenizer_config"], indent=2)
        )
