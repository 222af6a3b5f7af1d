"""Language-model text: a byte-level BPE tokenizer trained with `tokenizers`, and packing of
documents into fixed-length training sequences."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from prism_jax.checkpoints.preprocess import Tokenizer

EOS = "<|endoftext|>"


def train_bpe(texts: list[str], vocab_size: int, *, max_length: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE (no prefix space, `<|endoftext|>` as the only special
    token, also used for padding) trained on `texts`."""

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, backend.token_to_id(EOS), max_length)


def pack(tokenizer: Tokenizer, texts: list[str], length: int) -> np.ndarray:
    """Documents joined by `<|endoftext|>` and cut into `[n, length]` int32 rows (the tail that
    does not fill a row is dropped)."""
    eos = tokenizer.pad_id
    stream = []
    for encoding in tokenizer.backend.encode_batch(texts, add_special_tokens=False):
        stream.extend(encoding.ids)
        stream.append(eos)
    n = len(stream) // length
    return np.asarray(stream[: n * length], np.int32).reshape(n, length)
