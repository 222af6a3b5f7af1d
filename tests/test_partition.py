"""The distributed engine: exact at CR = 1, equal to the NumPy reference of DESIGN.md at CR > 1."""

import numpy as np
import pytest

import prism_jax as pj
from tests import reference, tiny
from tests.conftest import ATOL_LAYER, ATOL_MODEL

HEADED = ("bert_cls", "gpt2_lm", "vit_cls")


def _rows(name, batch, x):
    """Compare GPT-2 on its valid tokens only (HF's padded rows attend to nothing useful)."""
    if name.startswith("gpt2"):
        return x[np.asarray(batch["attention_mask"]).astype(bool)]
    return x


def _close(name, batch, got, want, depth):
    np.testing.assert_allclose(
        _rows(name, batch, got["last_hidden_state"]),
        _rows(name, batch, want["last_hidden_state"]),
        atol=ATOL_LAYER * depth,
        rtol=0,
    )
    if "logits" in want:
        logits = got["logits"] if got["logits"].ndim == 2 else _rows(name, batch, got["logits"])
        ref = want["logits"] if want["logits"].ndim == 2 else _rows(name, batch, want["logits"])
        np.testing.assert_allclose(logits, ref, atol=ATOL_MODEL, rtol=0)


def _torch_want(name, torch_model, batch):
    """transformers' outputs: logits, and the last hidden state where HF exposes ours (a ViT
    classifier's last hidden state precedes the final LayerNorm, so only logits there)."""
    ref = tiny.torch_outputs(torch_model, batch)
    want = {"logits": ref["logits"]}
    if not name.startswith("vit"):
        want["last_hidden_state"] = ref["hidden_states"][-1]
    return want


def _close_to_torch(name, batch, got, want, depth):
    if "last_hidden_state" in want:
        _close(name, batch, got, want, depth)
    else:
        np.testing.assert_allclose(got["logits"], want["logits"], atol=ATOL_MODEL, rtol=0)


@pytest.mark.parametrize("name", HEADED)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_cr1_equals_single_and_torch(name, n, hf_models, rng):
    torch_model, directory = hf_models(name)
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch(name, rng)
    single = pj.infer(model, batch)
    want = _torch_want(name, torch_model, batch)
    mesh = pj.edge_mesh(n)
    for strategy in ("voltage", "prism"):
        out = pj.infer(model, batch, mesh=mesh, plan=pj.Plan(strategy=strategy, cr=1))
        _close(name, batch, out, single, model.config.depth)
        _close_to_torch(name, batch, out, want, model.config.depth)


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit"])
def test_base_models_cr1_on_three_devices(name, hf_models, rng):
    torch_model, directory = hf_models(name)
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch(name, rng, tokens=11)
    want = tiny.torch_outputs(torch_model, batch)
    out = pj.infer(model, batch, mesh=pj.edge_mesh(3), plan=pj.Plan(cr=1))
    _close(name, batch, out, want, model.config.depth)
    if "pooler_output" in want:
        np.testing.assert_allclose(out["pooler_output"], want["pooler_output"], atol=ATOL_MODEL)


@pytest.mark.parametrize(
    ("name", "n", "cr"),
    [
        ("bert_cls", 2, 3),
        ("bert_cls", 3, 2),
        ("gpt2_lm", 2, 4),
        ("gpt2_lm", 3, 2),
        ("vit_cls", 4, 5),
        ("vit_cls", 3, 8),
        ("vit", 2, 3),
    ],
)
@pytest.mark.parametrize("logit_bias", ["log_count", "none"])
def test_prism_matches_numpy_reference(name, n, cr, logit_bias, hf_models, rng):
    torch_model, directory = hf_models(name)
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch(name, rng, batch=3, tokens=17)
    plan = pj.Plan(strategy="prism", cr=cr, logit_bias=logit_bias)
    out = pj.infer(model, batch, mesh=pj.edge_mesh(n), plan=plan)
    want = reference.forward(
        torch_model.config, directory, batch, n=n, cr=cr, logit_bias=logit_bias
    )
    _close(name, batch, out, want, model.config.depth)
    # The approximation must really move the outputs, or this test proves nothing.
    exact = pj.infer(model, batch)
    moved = np.abs(_rows(name, batch, out["last_hidden_state"] - exact["last_hidden_state"]))
    assert moved.max() > 1e-2


def test_logit_bias_variants_differ(hf_models, rng):
    _, directory = hf_models("bert_cls")
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch("bert_cls", rng, tokens=20)
    mesh = pj.edge_mesh(2)
    a, b = (
        pj.infer(model, batch, mesh=mesh, plan=pj.Plan(cr=4, logit_bias=v))["logits"]
        for v in ("log_count", "none")
    )
    assert np.abs(a - b).max() > 1e-3


def test_gpt2_device0_tokens_do_not_depend_on_cr(hf_models, rng):
    _, directory = hf_models("gpt2_lm")
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch("gpt2_lm", rng, batch=2, tokens=24)
    batch["attention_mask"][:] = 1
    mesh = pj.edge_mesh(4)  # L = 6: device 0 holds tokens 0..5
    outs = [pj.infer(model, batch, mesh=mesh, plan=pj.Plan(cr=cr))["logits"] for cr in (1, 2, 3, 6)]
    for o in outs[1:]:
        np.testing.assert_allclose(o[:, :6], outs[0][:, :6], atol=ATOL_MODEL, rtol=0)
        assert np.abs(o[:, 6:] - outs[0][:, 6:]).max() > 1e-3  # later devices do change


@pytest.mark.parametrize("strategy", ["voltage", "prism"])
def test_gpt2_is_causal_across_devices(strategy, hf_models, rng):
    """Changing token j changes no output before j, on any device, at any CR."""
    _, directory = hf_models("gpt2_lm")
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch("gpt2_lm", rng, batch=1, tokens=21)
    batch["attention_mask"][:] = 1
    mesh = pj.edge_mesh(3)
    plan = pj.Plan(strategy=strategy, cr=3)
    base = pj.infer(model, batch, mesh=mesh, plan=plan)["logits"]
    for j in (4, 7, 12, 20):
        changed = {k: v.copy() for k, v in batch.items()}
        changed["input_ids"][0, j] = (changed["input_ids"][0, j] + 1) % 100 + 1
        out = pj.infer(model, changed, mesh=mesh, plan=plan)["logits"]
        np.testing.assert_array_equal(out[:, :j], base[:, :j])
        assert np.abs(out[:, j] - base[:, j]).max() > 0


def test_classifier_reads_cls_on_device0(hf_models, rng):
    """The CLS logits equal the reference even when device 0 holds a single token."""
    torch_model, directory = hf_models("bert_cls")
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch("bert_cls", rng, batch=2, tokens=8)
    out = pj.infer(model, batch, mesh=pj.edge_mesh(8), plan=pj.Plan(cr=1))
    np.testing.assert_allclose(
        out["logits"], tiny.torch_outputs(torch_model, batch)["logits"], atol=ATOL_MODEL
    )


def test_too_many_devices_is_an_error(hf_models, rng):
    _, directory = hf_models("bert")
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch("bert", rng, tokens=5)
    with pytest.raises(pj.PrismError, match="8 devices but only 5 tokens"):
        pj.infer(model, batch, mesh=pj.edge_mesh(8))


def test_edge_mesh_checks_device_count():
    assert pj.edge_mesh(4).shape == {"edge": 4}
    with pytest.raises(pj.PrismError, match="xla_force_host_platform_device_count=9"):
        pj.edge_mesh(9)
