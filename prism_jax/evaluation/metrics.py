"""Agreement of distributed inference with the exact model, on real text.

Sentence embeddings are the mean of the last hidden states over valid tokens, L2-normalised
(how all-MiniLM-L6-v2 is used). Texts are sorted by length and padded per batch to a multiple
of `bucket` tokens, so that few shapes are compiled and little padding is added.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from prism_jax import cost
from prism_jax.errors import PrismError
from prism_jax.evaluation import sweep
from prism_jax.models import Model
from prism_jax.partition import infer, next_token_logprobs
from prism_jax.plan import Plan


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`[B, T, D]`, `[B, T]` -> L2-normalised `[B, D]` means over the valid tokens."""
    m = mask[..., None].astype(hidden.dtype)
    pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def text_batches(model: Model, texts: list[str], *, batch_size: int, max_length: int, bucket: int):
    """(indices, batch) pairs: length-sorted, each batch padded to a multiple of `bucket`."""
    lengths = model.tokenizer(texts, max_length=max_length)["attention_mask"].sum(1)
    order = np.argsort(lengths, kind="stable")
    out = []
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        pad_to = min(-(-int(lengths[idx].max()) // bucket) * bucket, max_length)
        out.append(
            (idx, model.tokenizer([texts[i] for i in idx], max_length=max_length, pad_to=pad_to))
        )
    return out


def embed(model: Model, batches, *, mesh=None, plan: Plan | None = None) -> np.ndarray:
    """Sentence embeddings `[n, D]` in the original text order."""
    n = sum(len(idx) for idx, _ in batches)
    out = np.zeros((n, model.config.width), np.float32)
    for idx, batch in batches:
        hidden = infer(model, batch, mesh=mesh, plan=plan)["last_hidden_state"]
        out[idx] = mean_pool(hidden, batch["attention_mask"])
    return out


def agreement_sweep(
    model: Model,
    texts: list[str],
    *,
    devices: int,
    crs: list[int],
    template: Plan | None = None,
    batch_size: int = 8,
    max_length: int = 128,
    bucket: int = 64,
    progress: bool = True,
) -> list[dict]:
    """Cosine of prism sentence embeddings with the exact ones, per CR, at N devices; the
    first row is `voltage` (exact, full exchange), the reference for bytes and time. Each
    prism plan is `template` (logit bias, exchange, compressor; default `Plan()`) at a CR.

    Bytes are measured from each batch's lowered program (its collectives), per inference of
    one batch, averaged over the batches; seconds are a second (compiled) pass over all texts.
    """
    batches = text_batches(
        model, texts, batch_size=batch_size, max_length=max_length, bucket=bucket
    )
    exact = embed(model, batches)
    sizes = [b["input_ids"].shape for _, b in batches]

    def sent(plan: Plan) -> int:
        shape = dict(devices=devices, dtype="float32")
        each = [
            cost.measured_bytes(model.config, plan, seq_len=t, batch=b, **shape) for b, t in sizes
        ]
        return int(np.mean(each))

    def score(mesh, plan: Plan) -> dict:
        start = time.perf_counter()
        embed(model, batches, mesh=mesh, plan=plan)  # compiles each shape once
        first = time.perf_counter() - start
        start = time.perf_counter()
        cos = (embed(model, batches, mesh=mesh, plan=plan) * exact).sum(-1)
        seconds = time.perf_counter() - start
        bytes_sent, voltage = sent(plan), sent(Plan(strategy="voltage"))
        return {
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "bytes_per_device": bytes_sent,
            "bytes_voltage": voltage,
            "comm_reduction": 1 - bytes_sent / voltage,
            "seconds": seconds,
            "compile_seconds": max(first - seconds, 0.0),
        }

    template = template or Plan()
    plans = [Plan(strategy="voltage", exchange=template.exchange)]
    plans += [dataclasses.replace(template, strategy="prism", cr=cr) for cr in crs]
    return sweep.sweep(
        model.config,
        [(devices, plan) for plan in plans],
        score,
        metric="cosine",
        seq_len=max_length,
        progress=progress,
        desc=f"N={devices}",
        measure=False,
    )


def accuracy(model: Model, examples: dict, labels: np.ndarray, **kw) -> float:
    """Top-1 accuracy of a classifier: the mean of `correct` (same arguments)."""
    return float(correct(model, examples, labels, **kw).mean())


def correct(
    model: Model,
    examples: dict,
    labels: np.ndarray,
    *,
    mesh=None,
    plan: Plan | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """`[n]` bool: whether the classifier's top-1 class is each example's label (for paired
    comparisons of two models or plans on the same examples). Every batch runs at one shape
    (the last is padded), so one program serves them all."""
    n = len(labels)
    hits = np.zeros(n, bool)
    for start in range(0, n, batch_size):
        batch = padded_rows(examples, start, batch_size)
        logits = infer(model, batch, mesh=mesh, plan=plan)["logits"][: n - start]
        hits[start : start + len(logits)] = logits.argmax(-1) == labels[start : start + batch_size]
    return hits


def paired_difference(hits: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Accuracy of `hits` minus that of `reference` (`[n]` bools, the same examples) and the
    standard error of that difference, from the per-example differences: far smaller than
    either accuracy's own error when the two mostly agree."""
    if np.shape(hits) != np.shape(reference) or np.ndim(hits) != 1 or len(hits) < 2:
        raise PrismError(f"paired difference: two [n >= 2] arrays, got {np.shape(hits)} and "
                         f"{np.shape(reference)}")  # fmt: skip
    d = np.asarray(hits, np.float64) - np.asarray(reference, np.float64)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def perplexity(
    model: Model, ids: np.ndarray, *, mesh=None, plan: Plan | None = None, batch_size: int = 16
) -> float:
    """exp of the mean next-token cross-entropy over packed rows `[n, T]` (no padding); the
    log-softmax runs on the device(s), every batch at one shape."""
    logp = token_logprobs(model, ids, mesh=mesh, plan=plan, batch_size=batch_size)
    return float(np.exp(-logp.mean())) if logp.size else 1.0


def token_logprobs(
    model: Model, ids: np.ndarray, *, mesh=None, plan: Plan | None = None, batch_size: int = 16
) -> np.ndarray:
    """`[n, T - 1]` float64: log p(token t + 1 | tokens <= t) for packed rows `[n, T]`, the
    query at position t (on the device that holds t)."""
    out = []
    for start in range(0, len(ids), batch_size):
        rows = ids[start : start + batch_size]
        batch = padded_rows({"input_ids": ids}, start, batch_size)
        logp = next_token_logprobs(model, batch, mesh=mesh, plan=plan)[: len(rows)]
        out.append(np.asarray(logp, np.float64))
    return np.concatenate(out) if out else np.zeros((0, max(ids.shape[-1] - 1, 0)))


def perplexity_per_device(logp: np.ndarray, devices: int) -> list[float]:
    """Perplexity of the next-token predictions each of `devices` equal blocks of positions
    makes (`token_logprobs`' `[n, T - 1]`; the query at position t is on device t // L)."""
    length = -(-(logp.shape[-1] + 1) // devices)
    holder = np.arange(logp.shape[-1]) // length
    return [float(np.exp(-logp[:, holder == p].mean())) for p in range(devices)]


def padded_rows(examples: dict, start: int, size: int) -> dict:
    """Rows [start, start + size) of every array, the last batch padded with copies of its
    first row up to `size` (callers drop what follows the real rows)."""
    out = {}
    for k, v in examples.items():
        rows = np.asarray(v[start : start + size])
        missing = size - len(rows) if len(v) > size else 0
        out[k] = np.concatenate([rows, np.repeat(rows[:1], missing, axis=0)]) if missing else rows
    return out
