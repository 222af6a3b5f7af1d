"""A tiny Llama GGUF file written with the `gguf` package's own writer, for tests.

The weights come from a tiny random `transformers` Llama; they are stored the way llama.cpp
stores them (q/k rows of each head permuted for its pairwise rotary kernel; F32 norms, a Q8_0
embedding, Q4_1 and Q8_0 projections), so that a converter that forgets the permutation or
reads a block format wrongly fails against `transformers`' own GGUF loader. The vocabulary
is byte-level BPE: the 256 byte symbols, a few merges and two control tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPE = dict(
    vocab_size=None,  # from the vocabulary below
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=48,
    rope_theta=1e5,
    rms_norm_eps=1e-5,
)
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ c", "a t", "Ġc at", "o n", "Ġ on"]


def byte_symbols() -> list[str]:
    """GPT-2's byte -> printable symbol table (the byte-level BPE alphabet), in byte order."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = iter(range(256, 512))
    table = {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}
    return [table[b] for b in range(256)]


def vocabulary() -> tuple[list[str], list[int]]:
    """Tokens and llama.cpp token types (3: control, 1: normal)."""
    tokens = ["<|endoftext|>", "<|im_start|>"] + byte_symbols()
    tokens += ["".join(m.split(" ")) for m in MERGES]
    return tokens, [3, 3] + [1] * (len(tokens) - 2)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's pairwise order (what its converter does)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def build(directory: Path, *, arch: str = "llama", tied: bool = False, name="tiny.gguf", **meta):
    """Write `name` into `directory`; returns its path. `meta` overrides metadata fields by
    the name of the writer's `add_<field>` method (`head_count=3`, `token_types=[...]`),
    leaving the tensors as they are: a file whose metadata disagrees with its tensors."""
    import gguf
    import torch
    import transformers

    tokens, types = vocabulary()
    torch.manual_seed(7)
    config = transformers.LlamaConfig(
        **{**SHAPE, "vocab_size": len(tokens)},
        tie_word_embeddings=tied,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    for k in sd:
        if k.endswith("norm.weight"):
            sd[k] = sd[k] + 0.1 * np.random.default_rng(len(k)).standard_normal(sd[k].shape)
    path = directory / name
    w = gguf.GGUFWriter(path, arch)
    fields = dict(
        block_count=SHAPE["num_hidden_layers"],
        context_length=SHAPE["max_position_embeddings"],
        embedding_length=SHAPE["hidden_size"],
        feed_forward_length=SHAPE["intermediate_size"],
        head_count=SHAPE["num_attention_heads"],
        head_count_kv=SHAPE["num_key_value_heads"],
        rope_freq_base=SHAPE["rope_theta"],
        layer_norm_rms_eps=SHAPE["rms_norm_eps"],
        rope_dimension_count=SHAPE["hidden_size"] // SHAPE["num_attention_heads"],
        tokenizer_model="gpt2",
        tokenizer_pre="smollm",
        token_list=tokens,
        token_types=types,
        token_merges=MERGES,
        bos_token_id=1,
        eos_token_id=0,
        chat_template="{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}",
    )
    for field, value in (fields | meta).items():
        if value is not None:  # None: the field is left out
            getattr(w, f"add_{field}")(value)
    q4, q8, f32 = (gguf.GGMLQuantizationType[t] for t in ("Q4_1", "Q8_0", "F32"))

    def put(name, array, kind):
        array = np.ascontiguousarray(array, np.float32)
        if kind == f32:
            w.add_tensor(name, array)
        else:
            w.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)

    put("token_embd.weight", sd["model.embed_tokens.weight"], q8)
    put("output_norm.weight", sd["model.norm.weight"], f32)
    if not tied:
        put("output.weight", sd["lm_head.weight"], q4)
    heads, kv = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"]
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], f32)
        put(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], heads), q4)
        put(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], kv), q8)
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"], q4)
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], q8)
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], f32)
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], q4)
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], q4)
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
