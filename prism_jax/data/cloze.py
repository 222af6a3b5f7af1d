"""A CBT-style cloze test built from held-out text, and a language model's answers to it.

Construction (after the Children's Book Test, Hill et al. 2016), from a list of documents:
  1. Split the documents, in order, into sentences (a full stop, ? or ! followed by a space
     and a capital letter or quote); keep sentences of at least 4 words.
  2. Slide a window of 21 consecutive sentences over them, `stride` sentences at a time:
     20 sentences of context, the 21st the question.
  3. The answer: a word of the question sentence (letters only, at least 3 of them, not a stop
     word) that also occurs in the context, drawn with a seeded generator. Its first
     occurrence in the question becomes `XXXXX`.
  4. Nine distractors: distinct words of the context of the same kind (capitalised like a
     name, or lower case like a common word), under the same rules, drawn with the same
     generator. Windows with fewer than nine are skipped. Options are sorted.
A model answers by scoring each completed question sentence after the context (summed
log-probabilities of the sentence's tokens) and picking the highest; chance is 10 %.
"""

from __future__ import annotations

import re

import numpy as np

CONTEXT, CANDIDATES, BLANK = 20, 10, "XXXXX"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_WORD = re.compile(r"\b[A-Za-z]{3,}\b")
STOP = frozenset(
    "the and for are but not you all any can had her was one our out has him his how its may "
    "new now old see two who did get let say she too use with that this from they been have "
    "were which their there what when will would about also into than them then these those "
    "some such only other more most over after before while where being each many both".split()
)


def sentences(texts: list[str]) -> list[str]:
    out = []
    for text in texts:
        for s in _SENTENCE_END.split(" ".join(text.split())):
            if len(s.split()) >= 4:
                out.append(s)
    return out


def _words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text) if w.lower() not in STOP]


def build(texts: list[str], *, stride: int = 5, seed: int = 0) -> list[dict]:
    """Cloze questions in TFDS `cbt`'s fields: context, question, options, answer."""
    rng = np.random.default_rng(seed)
    sents = sentences(texts)
    out = []
    for start in range(0, len(sents) - CONTEXT, stride):
        context = " ".join(sents[start : start + CONTEXT])
        question = sents[start + CONTEXT]
        in_context = set(_words(context))
        choices = sorted({w for w in _words(question) if w in in_context})
        if not choices:
            continue
        answer = choices[rng.integers(len(choices))]
        kind = answer[0].isupper()
        pool = sorted({w for w in in_context if w[0].isupper() == kind and w != answer})
        if len(pool) < CANDIDATES - 1:
            continue
        distractors = [pool[i] for i in rng.choice(len(pool), CANDIDATES - 1, replace=False)]
        blanked = re.sub(rf"\b{answer}\b", BLANK, question, count=1)
        out.append(
            {
                "context": context,
                "question": blanked,
                "options": sorted([answer, *distractors]),
                "answer": answer,
            }
        )
    return out


def candidates(question: dict, tokenizer, max_length: int) -> tuple[dict, np.ndarray]:
    """The ten completed sequences of one question, left-truncated and right-padded to
    `max_length` tokens (one shape for every question: one compiled program; padding at the
    end changes nothing for a causal model), and a `[10, T]` mask of the question sentence's
    tokens (those scored)."""
    context = tokenizer.encode_plain(question["context"])
    rows, scored = [], []
    for option in question["options"]:
        sentence = tokenizer.encode_plain(" " + question["question"].replace(BLANK, option))
        ids = (context + sentence)[-max_length:]
        rows.append(ids)
        scored.append(min(len(sentence), len(ids)))
    ids = np.zeros((len(rows), max_length), np.int32)
    mask = np.zeros((len(rows), max_length), np.int32)
    target = np.zeros((len(rows), max_length), bool)
    for i, (row, k) in enumerate(zip(rows, scored, strict=False)):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
        target[i, len(row) - k : len(row)] = True
    return {"input_ids": ids, "attention_mask": mask}, target


def scored_positions(target: np.ndarray, bucket: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The positions whose next token is a `target` token, per row: `[B, S]` indices and
    `[B, S]` weights (1 for a real one, 0 for filling), S the longest row's count rounded up
    to `bucket` (so that few shapes are compiled)."""
    cols = [np.nonzero(row[1:])[0] for row in target]
    s = max(1, -(-max(len(c) for c in cols) // bucket) * bucket)
    where = np.zeros((len(cols), s), np.int32)
    weights = np.zeros((len(cols), s), np.float64)
    for i, c in enumerate(cols):
        where[i, : len(c)], weights[i, : len(c)] = c, 1.0
    return where, weights


def sequence_scores(logprobs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Summed log-probabilities of each row's target tokens, `[B]`, from the log-probabilities
    at `scored_positions` and their weights."""
    return (logprobs.astype(np.float64) * weights).sum(1)
