"""Tasks: the unpadded layout, perplexity, cloze scoring and image classification."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import prism_jax as pj
from prism_jax import models
from prism_jax.checkpoints.preprocess import ImageProcessor
from prism_jax.configs import GPT2Config, ViTConfig
from prism_jax.data import cloze, text, tfds_builders
from prism_jax.evaluation import metrics, tasks
from prism_jax.partition import logprob_program, next_token_logprobs
from tests.conftest import ATOL_MODEL


@pytest.mark.parametrize("devices,cr", [(4, 3), (3, 2)])
def test_unpadded_layout_equals_each_input_alone(hf_models, devices, cr):
    """Relaid rows give what each input gives run alone at its own length."""
    model = models.with_classifier(pj.load_pretrained(hf_models("bert")[1]), 3, seed=1)
    texts, _ = tfds_builders.texts("fine_food_reviews", "test", 5)
    t_pad = 12 * devices
    batch = model.tokenizer(texts, max_length=t_pad, pad_to=t_pad)
    batch["attention_mask"][0, 7:] = 0  # a short one
    mesh, plan = pj.edge_mesh(devices), pj.Plan(cr=cr)
    relaid = pj.infer(model, tasks.unpadded(batch, devices), mesh=mesh, plan=plan)["logits"]
    padded = pj.infer(model, batch, mesh=mesh, plan=plan)["logits"]
    for i, t in enumerate(batch["attention_mask"].sum(1)):
        alone = {k: v[i : i + 1, :t] for k, v in batch.items()}
        want = pj.infer(model, alone, mesh=mesh, plan=plan)["logits"][0]
        np.testing.assert_allclose(relaid[i], want, atol=ATOL_MODEL)
    assert np.abs(padded[0] - relaid[0]).max() > 1e-3  # padding changed the short input


def _lm(vocab=300, seed=0):
    texts, _ = tfds_builders.texts("wikipedia_leads", "train", 60)
    tokenizer = text.train_bpe(texts, vocab, max_length=64)
    cfg = GPT2Config(
        vocab_size=tokenizer.backend.get_vocab_size(),
        width=32,
        depth=2,
        heads=2,
        mlp_width=64,
        act="gelu_new",
        ln_eps=1e-5,
        max_positions=64,
        head="lm",
    )
    m = models.init(cfg, seed=seed)
    return models.Model(cfg, m.graphdef, m.params, tokenizer)


def test_bpe_and_packing():
    model = _lm()
    tok = model.tokenizer
    sample = "The Eiffel Tower is in Paris."
    assert tok.backend.decode(tok.encode_plain(sample)) == sample
    rows = text.pack(tok, ["one two three", "four five"], 4)
    stream = tok.encode_plain("one two three") + [tok.pad_id] + tok.encode_plain("four five")
    assert rows.shape[1] == 4 and rows.ravel().tolist() == (stream + [tok.pad_id])[: rows.size]


def test_perplexity_task():
    model = _lm()
    task = tasks.load(model, "wikipedia_leads", split="validation", limit=6, max_length=64)
    assert task.metric == "perplexity" and task.examples == 6 and not task.higher_is_better
    single = task.score(None, None)
    prism = task.score(pj.edge_mesh(4), pj.Plan(cr=1))
    assert single == pytest.approx(prism, rel=1e-5)
    # at CR = 1 the logit biases coincide (log 1 = 0): `report.grid` scores that case once
    none = task.score(pj.edge_mesh(4), pj.Plan(cr=1, logit_bias="none"))
    assert none == pytest.approx(prism, rel=1e-6)
    # A model with zero embeddings predicts uniformly: perplexity = vocabulary size.
    zero = jax.tree.map(np.zeros_like, model.params)
    uniform = dataclasses.replace(model, params=zero)
    rows = task.train_examples["input_ids"]
    v = model.config.vocab_size
    assert metrics.perplexity(uniform, rows) == pytest.approx(v, rel=1e-5)
    # a ragged last batch (6 rows in 4 + 2) is padded to the same shape and dropped again
    mesh, plan = pj.edge_mesh(2), pj.Plan(cr=2)
    assert metrics.perplexity(model, rows, batch_size=4) == pytest.approx(single, rel=1e-6)
    metrics.perplexity(model, rows, mesh=mesh, plan=plan, batch_size=4)
    fn = logprob_program(model.graphdef, model.config, plan, mesh, picked=False)
    assert fn._cache_size() == 1  # one compiled program for both batches
    assert task.score(None, None, uniform) == pytest.approx(v, rel=1e-5)  # another model


def test_cloze_candidates_and_scores():
    model = _lm()
    q = {
        "context": "Alice went to the market. " * 30,
        "question": "Then XXXXX came home.",
        "options": [f"Name{i}" for i in range(10)],
        "answer": "Name3",
    }
    batch, target = cloze.candidates(q, model.tokenizer, 40)
    ids = batch["input_ids"]
    assert ids.shape == (10, 40) and batch["attention_mask"].sum(1).max() == 40  # left-truncated
    for i, option in enumerate(q["options"]):
        sentence = model.tokenizer.encode_plain(" Then " + option + " came home.")
        n = batch["attention_mask"][i].sum()
        assert ids[i, :n][target[i, :n]].tolist() == sentence
    # the log-softmax on the device equals the one taken from the logits on the host
    logits = pj.infer(model, batch)["logits"].astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    on_device = next_token_logprobs(model, batch)
    assert on_device.shape == (10, 39)
    for mesh, plan in [(None, None), (pj.edge_mesh(4), pj.Plan(cr=1))]:
        got = next_token_logprobs(model, batch, mesh=mesh, plan=plan)
        want = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
        np.testing.assert_allclose(got, want, atol=2e-5)
    # only the scored positions: their hidden states gathered, the head run on those alone
    where, weights = cloze.scored_positions(target, bucket=8)
    assert where.shape[1] % 8 == 0 and weights.sum() == target[:, 1:].sum()
    for mesh, plan in [(None, None), (pj.edge_mesh(4), pj.Plan(cr=1)), (pj.edge_mesh(3), None)]:
        picked = next_token_logprobs(model, batch, mesh=mesh, plan=plan, where=where)
        np.testing.assert_allclose(
            picked, np.take_along_axis(on_device, where, 1), atol=2e-5, rtol=1e-5
        )
    scores = cloze.sequence_scores(picked, weights)
    for row in range(10):
        want = sum(logp[row, j - 1, ids[row, j]] for j in range(1, 40) if target[row, j])
        assert scores[row] == pytest.approx(want, rel=1e-5)


def test_cloze_task_prism_cr1_equals_single():
    model = _lm()
    task = tasks.load(model, "wikipedia_cloze", limit=5, max_length=64)
    assert task.metric == "cloze_accuracy" and task.examples == 5
    assert task.score(None, None) == task.score(pj.edge_mesh(2), pj.Plan(cr=1))


def test_image_classification_task(hf_models):
    cfg = ViTConfig(
        width=16, depth=1, heads=2, mlp_width=32, act="gelu", ln_eps=1e-6, max_positions=197,
        image_size=28, patch_size=2, channels=1, head="classifier", num_labels=10,
    )  # fmt: skip
    m = models.init(cfg, seed=0)
    processor = ImageProcessor(size=(28, 28), mean=(0.5,), std=(0.5,), channels=1)
    model = models.Model(cfg, m.graphdef, m.params, None, processor)
    task = tasks.load(model, "fashion_mnist_local", limit=16)
    assert task.metric == "accuracy" and task.seq_len == 197
    images, labels = tfds_builders.arrays("fashion_mnist_local", "test", 16)
    x = task.train_examples["pixel_values"]
    # the processor's rescale and normalisation, written out: (v / 255 - 0.5) / 0.5
    want_x = (images.astype(np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(x, want_x.transpose(0, 3, 1, 2), atol=1e-6)
    # CR = 1 over 4 devices gives the exact logits, so the same accuracy
    exact = pj.infer(model, {"pixel_values": x})["logits"]
    cr1 = pj.infer(model, {"pixel_values": x}, mesh=pj.edge_mesh(4), plan=pj.Plan(cr=1))["logits"]
    np.testing.assert_allclose(cr1, exact, atol=ATOL_MODEL, rtol=0)
    assert task.score(None, None) == float((exact.argmax(-1) == labels).mean())
    assert task.score(pj.edge_mesh(4), pj.Plan(cr=1)) == task.score(None, None)
    hits = task.correct(pj.edge_mesh(4), pj.Plan(cr=4))  # per example, in order
    np.testing.assert_array_equal(
        hits, pj.infer(model, {"pixel_values": x}, mesh=pj.edge_mesh(4), plan=pj.Plan(cr=4))[
            "logits"].argmax(-1) == labels)  # fmt: skip
    assert task.score(pj.edge_mesh(4), pj.Plan(cr=4)) == hits.mean()
    # colour images of another size go through the image processor
    colour = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    assert tasks.image_pixels(model, colour).shape == (2, 1, 28, 28)
    with pytest.raises(pj.PrismError, match="holds images"):
        bert = models.with_classifier(pj.load_pretrained(hf_models("bert")[1]), 2)
        tasks.load(bert, "fashion_mnist_local")


def test_paired_difference():
    a = np.array([1, 1, 0, 1, 0, 1], bool)
    b = np.array([1, 0, 0, 1, 1, 1], bool)
    points, se = metrics.paired_difference(a, b)
    d = np.array([0, 1, 0, 0, -1, 0], float)
    assert points == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / np.sqrt(6))
    assert metrics.paired_difference(a, a) == (0.0, 0.0)
    for x, y in ((a, b[:5]), (a[:1], b[:1]), (a.reshape(2, 3), b.reshape(2, 3))):
        with pytest.raises(pj.PrismError, match="paired difference"):
            metrics.paired_difference(x, y)


def test_grid_crs_and_markdown(tmp_path):
    from prism_jax.evaluation import report

    assert report.crs_up_to(99) == [1, 2, 4, 8, 16, 32, 64, 99]
    assert report.crs_up_to(64) == [1, 2, 4, 8, 16, 32, 64] and report.crs_up_to(1) == [1]
    row = dict(comm_reduction=0.5, compute_reduction=0.25)
    result = {
        "dataset": "d", "metric": "accuracy", "examples": 3, "seq_len": 8, "exact": 0.5,
        "rows": [
            {"devices": 2, "cr": 1, "logit_bias": "log_count", "value": 0.5, **row},
            {"devices": 2, "cr": 1, "logit_bias": "none", "value": 0.25, **row},
        ],
    }  # fmt: skip
    table = report.markdown(result, "t")
    assert "| 1 | 50.0 | 25.0 | -50.0 / -25.0 % |" in table
    assert report.results_dir(None, True, tmp_path) is None  # a smoke writes nothing
    out = report.results_dir(None, False, tmp_path / "results")
    report.save(out, "t", result, table, lambda png: report.plot([("t", result)], png))
    assert json.loads((out / "t.json").read_text()) == result
    assert (out / "t.md").read_text() == table and (out / "t.png").stat().st_size > 1000


def test_perplexity_per_device():
    """Device 0 of a causal model sees no remote rows: its perplexity is the exact model's at
    any CR, the later devices' is not; together they make the overall perplexity."""
    model = _lm()
    rows = tasks.load(model, "wikipedia_leads", split="validation", limit=3, max_length=48)
    ids = rows.train_examples["input_ids"][:3]
    mesh, plan = pj.edge_mesh(3), pj.Plan(cr=8)
    exact = metrics.perplexity_per_device(metrics.token_logprobs(model, ids), 3)
    logp = metrics.token_logprobs(model, ids, mesh=mesh, plan=plan)
    per = metrics.perplexity_per_device(logp, 3)
    assert logp.shape == (3, ids.shape[1] - 1)
    assert per[0] == pytest.approx(exact[0], rel=1e-5) and per[1:] != pytest.approx(exact[1:])
    counts = [16, 16, ids.shape[1] - 1 - 32]  # queries at positions 0..47 on blocks of 16
    overall = np.exp(sum(c * np.log(p) for c, p in zip(counts, per, strict=True)) / sum(counts))
    assert metrics.perplexity(model, ids, mesh=mesh, plan=plan) == pytest.approx(overall)
