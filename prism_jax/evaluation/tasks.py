"""A model, a dataset and its metric: what `prism-jax eval` sweeps and `finetune` trains on.

Classification (text or images with labels) scores accuracy; unlabelled text under an LM head
scores perplexity on packed rows; cloze sets (ours, or TFDS's `cbt`) score cloze accuracy.
Every dataset comes through `datasets` (TFDS).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from prism_jax.data import cloze, text, tfds_builders
from prism_jax.data import images as images_lib
from prism_jax.errors import PrismError
from prism_jax.evaluation import metrics
from prism_jax.models import Model
from prism_jax.partition import AXIS, next_token_logprobs

LAYOUTS = ("padded", "unpadded")


@dataclasses.dataclass
class Task:
    """What one (mesh, plan) scores on this model and dataset."""

    dataset: str
    metric: str  # accuracy | perplexity | cloze_accuracy
    examples: int
    seq_len: int  # T the programs run at (for the measured cost)
    # (mesh, plan, model=the one loaded with) -> float; pass a fine-tuned model that shares
    # the tokenizer or image processor to score it on the same prepared examples
    score: Callable
    train_examples: dict | None = None  # HF batch + labels, for fine-tuning
    higher_is_better: bool = True
    # classification: (mesh, plan, model=...) -> `[examples]` bool, each example right or not
    # (`score` is its mean), for paired comparisons on the same examples
    correct: Callable | None = None


def unpadded(batch: dict, devices: int) -> dict:
    """Relay right-padded BERT rows so that each input is split over the devices at its own
    length t: device p holds tokens [p*c, (p+1)*c), c = ceil(t / N), followed by its own
    padding, with `position_ids` keeping every token's true position. The same computation as
    running each input alone at length t (tested), at one fixed shape for the whole batch."""
    valid = np.asarray(batch["attention_mask"]).astype(bool)
    b, t_pad = valid.shape
    if t_pad % devices:
        raise PrismError(f"the padded length {t_pad} is not a multiple of {devices} devices")
    local = t_pad // devices
    out = {k: np.zeros_like(np.asarray(v)) for k, v in batch.items()}
    out["position_ids"] = np.zeros((b, t_pad), np.int32)
    for i, t in enumerate(valid.sum(1)):
        c = -(-int(t) // devices)
        for p in range(devices):
            src = np.arange(p * c, min((p + 1) * c, int(t)))
            dst = p * local + np.arange(len(src))
            for k, v in batch.items():
                out[k][i, dst] = np.asarray(v)[i, src]
            out["position_ids"][i, dst] = src
    return out


def _classification(model, dataset, split, limit, max_length, layout, data_dir) -> Task:
    if model.config.head != "classifier":
        raise PrismError(f"{dataset} is a classification set; the model has no classifier head")
    records = tfds_builders.records(dataset, split, limit, data_dir)
    if not records:
        raise PrismError(f"{dataset} {split} is empty")
    first = records[0]
    labels = np.asarray([r["label"] for r in records], np.int32)
    if any(k in first for k in tfds_builders.IMAGE_KEYS):
        if model.config.family != "vit":
            raise PrismError(f"{dataset} holds images; the model is a {model.config.family}")
        key = next(k for k in tfds_builders.IMAGE_KEYS if k in first)
        images = np.stack([np.asarray(r[key]) for r in records])
        examples = {"pixel_values": image_pixels(model, images)}
        seq_len = model.config.max_positions
        relay = None
    else:
        if model.tokenizer is None:
            raise PrismError(f"{dataset} holds text; the model has no tokenizer")
        strings, _ = tfds_builders.texts(dataset, split, limit, data_dir)
        max_length = max_length or min(256, model.tokenizer.max_length)  # the paper's 256
        examples = model.tokenizer(strings, max_length=max_length, pad_to=max_length)
        seq_len = max_length
        relay = unpadded if layout == "unpadded" else None
    if labels.max() >= model.config.num_labels:
        raise PrismError(
            f"{dataset} has labels up to {labels.max()}; the classifier has "
            f"{model.config.num_labels} classes"
        )

    def correct(mesh, plan, model=model):
        batch = examples
        if relay is not None and mesh is not None and plan.strategy != "single":
            batch = relay(examples, mesh.shape[AXIS])
        return metrics.correct(model, batch, labels, mesh=mesh, plan=plan)

    def score(mesh, plan, model=model):
        return float(correct(mesh, plan, model).mean())

    train = {**examples, "labels": labels}
    return Task(dataset, "accuracy", len(labels), seq_len, score, train, correct=correct)


def image_pixels(model: Model, images: np.ndarray) -> np.ndarray:
    """uint8 `[n, H, W, C]` -> the model's `pixel_values` (`data.images.pixel_values`)."""
    if model.image_processor is None:
        raise PrismError("the model has no image processor (preprocessor_config.json)")
    return images_lib.pixel_values(images, model.image_processor)


def _perplexity(model, dataset, split, limit, max_length, data_dir) -> Task:
    if model.tokenizer is None:
        raise PrismError("perplexity needs the model's tokenizer")
    strings, _ = tfds_builders.texts(dataset, split, None, data_dir)
    length = max_length or model.config.max_positions
    rows = text.pack(model.tokenizer, strings, length)[:limit]
    if not len(rows):
        raise PrismError(f"{dataset} {split} fills no row of {length} tokens")

    def score(mesh, plan, model=model):
        return metrics.perplexity(model, rows, mesh=mesh, plan=plan)

    return Task(dataset, "perplexity", len(rows), length, score, {"input_ids": rows}, False)


def _cloze(model, dataset, split, limit, max_length, data_dir) -> Task:
    if model.tokenizer is None:
        raise PrismError("the cloze test needs the model's tokenizer")
    records = tfds_builders.records(dataset, split, limit, data_dir)

    def as_str(v):
        return v.decode() if isinstance(v, bytes) else str(v)

    questions = [
        {
            "context": as_str(r["context"]),
            "question": as_str(r["question"]),
            "options": [as_str(o) for o in r["options"]],
            "answer": as_str(r["answer"]),
        }
        for r in records
    ]
    length = max_length or model.config.max_positions
    batches = [cloze.candidates(q, model.tokenizer, length) for q in questions]

    def score(mesh, plan, model=model):
        correct = 0
        for q, (batch, target) in zip(questions, batches, strict=True):
            where, weights = cloze.scored_positions(target)
            logp = next_token_logprobs(model, batch, mesh=mesh, plan=plan, where=where)
            best = q["options"][int(cloze.sequence_scores(logp, weights).argmax())]
            correct += best == q["answer"]
        return correct / len(questions)

    return Task(dataset, "cloze_accuracy", len(questions), length, score)


def load(
    model: Model,
    dataset: str,
    *,
    split: str = "test",
    limit: int | None = None,
    max_length: int | None = None,
    layout: str = "padded",
    data_dir=None,
) -> Task:
    """The task of `model` on `dataset` (a local TFDS builder or a TFDS catalogue name)."""
    if layout not in LAYOUTS:
        raise PrismError(f"unknown layout {layout!r}; choose {LAYOUTS}")
    if limit is not None and limit < 1:
        raise PrismError("--limit must be >= 1")
    first = tfds_builders.records(dataset, split, 1, data_dir)
    if first and "options" in first[0]:
        return _cloze(model, dataset, split, limit, max_length, data_dir)
    if first and "label" not in first[0]:
        if model.config.head != "lm":
            raise PrismError(f"{dataset} is unlabelled text; perplexity needs an LM head")
        return _perplexity(model, dataset, split, limit, max_length, data_dir)
    return _classification(model, dataset, split, limit, max_length, layout, data_dir)
