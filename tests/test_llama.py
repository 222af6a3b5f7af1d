"""The Llama family (DESIGN.md section 1a): HF parity at CR = 1, K/V exchange equal to the NumPy
reference at CR > 1, hidden and K/V exchange equal where both apply, strict configs, export."""

import json

import numpy as np
import pytest

import prism_jax as pj
from prism_jax.checkpoints import hf
from prism_jax.errors import PrismError
from tests import reference, tiny
from tests.conftest import ATOL_LAYER, ATOL_MODEL

LLAMAS = ("llama_lm", "llama_tied")


def _valid(batch):
    return np.asarray(batch["attention_mask"]).astype(bool)


@pytest.mark.parametrize("name", LLAMAS)
def test_cr1_equals_torch_on_every_device_count(name, hf_models, rng):
    torch_model, directory = hf_models(name)
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch(name, rng, tokens=17)
    valid = _valid(batch)
    want = tiny.torch_outputs(torch_model, batch)["logits"][valid]
    for n in (1, 2, 3, 4, 8):
        mesh = pj.edge_mesh(n) if n > 1 else None
        strategies = ("prism", "voltage") if n == 3 else ("prism",)
        for strategy in strategies:
            out = pj.infer(model, batch, mesh=mesh, plan=pj.Plan(strategy=strategy, cr=1))
            np.testing.assert_allclose(out["logits"][valid], want, atol=ATOL_MODEL, rtol=0)


@pytest.mark.parametrize(
    ("name", "n", "cr", "logit_bias"),
    [
        ("llama_lm", 2, 3, "log_count"),
        ("llama_lm", 4, 2, "none"),
        ("llama_tied", 3, 4, "log_count"),
    ],
)
def test_kv_exchange_matches_numpy_reference(name, n, cr, logit_bias, hf_models, rng):
    torch_model, directory = hf_models(name)
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch(name, rng, tokens=19)
    valid = _valid(batch)
    plan = pj.Plan(cr=cr, logit_bias=logit_bias)
    out = pj.infer(model, batch, mesh=pj.edge_mesh(n), plan=plan)
    want = reference.forward(
        torch_model.config, directory, batch, n=n, cr=cr, logit_bias=logit_bias
    )
    depth = model.config.depth
    for key, atol in (("last_hidden_state", ATOL_LAYER * depth), ("logits", ATOL_MODEL)):
        np.testing.assert_allclose(out[key][valid], want[key][valid], atol=atol, rtol=0)
    exact = pj.infer(model, batch)["logits"]
    assert np.abs(out["logits"] - exact)[valid].max() > 1e-2  # the compression really bites


@pytest.mark.parametrize("name", ["bert_cls", "gpt2_lm", "vit_cls"])
def test_hidden_and_kv_exchange_agree(name, hf_models, rng):
    torch_model, directory = hf_models(name)
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch(name, rng, tokens=15)
    mesh = pj.edge_mesh(3)
    hidden, kv = (
        pj.infer(model, batch, mesh=mesh, plan=pj.Plan(cr=2, exchange=e)) for e in ("hidden", "kv")
    )
    depth = model.config.depth
    np.testing.assert_allclose(
        kv["last_hidden_state"], hidden["last_hidden_state"], atol=ATOL_LAYER * depth, rtol=0
    )
    want = reference.forward(torch_model.config, directory, batch, n=3, cr=2, exchange="kv")
    if name.startswith("gpt2"):  # the reference's K/V path, on GPT-2's valid rows
        valid = _valid(batch)
        np.testing.assert_allclose(
            kv["logits"][valid], want["logits"][valid], atol=ATOL_MODEL, rtol=0
        )
    else:
        np.testing.assert_allclose(kv["logits"], want["logits"], atol=ATOL_MODEL, rtol=0)


def test_default_exchange_is_the_cheaper_exact_one(hf_models):
    for name, want in (("bert", "hidden"), ("gpt2_lm", "hidden"), ("llama_lm", "kv")):
        cfg = pj.load_pretrained(hf_models(name)[1]).config
        assert pj.Plan(cr=4).for_model(cfg).exchange == want
    gqa = pj.PRESETS["smollm2-135m"]()
    assert gqa.kv_width == 2 * 3 * 64 < gqa.width  # 384 values per group against 576


def test_rotary_models_refuse_hidden_exchange(hf_models, rng):
    model = pj.load_pretrained(hf_models("llama_lm")[1])
    batch = tiny.random_batch("llama_lm", rng)
    with pytest.raises(PrismError, match="exchange='kv'"):
        pj.infer(model, batch, mesh=pj.edge_mesh(2), plan=pj.Plan(cr=2, exchange="hidden"))


def _config(hf_models, **changes):
    directory = hf_models("llama_lm")[1]
    config = json.loads((directory / "config.json").read_text())
    return {**config, **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling 'linear'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope scaling 'yarn'"),
        ({"rope_parameters": {"rope_type": "default", "factor": 2}}, "rope_parameters fields"),
        ({"pretraining_tp": 2}, "pretraining_tp=2"),
        ({"num_key_value_heads": 4}, "not divisible by 4 KV heads"),
        ({"sliding_window": 16}, "sliding_window"),
        ({"rope_theta": -1.0, "rope_parameters": None}, "rope_theta must be"),
        ({"attention_bias": "yes"}, "attention_bias must be true or false"),
    ],
)
def test_unsupported_llama_configs_are_named(changes, message, hf_models):
    config = _config(hf_models, **changes)
    with pytest.raises(PrismError, match=message):
        hf.make_config(config, set())


def test_older_rope_theta_spelling_reads_the_same(hf_models):
    new = hf.make_config(_config(hf_models), set())
    old = _config(hf_models, rope_theta=1e4, rope_scaling=None)
    del old["rope_parameters"]
    assert hf.make_config(old, set()) == new and new.rope_theta == 1e4


@pytest.mark.parametrize("name", LLAMAS)
def test_export_round_trips_through_transformers(name, hf_models, rng, tmp_path):
    import torch
    import transformers

    model = pj.load_pretrained(hf_models(name)[1])
    hf.save_pretrained(model, tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    batch = tiny.random_batch(name, rng)
    valid = _valid(batch)
    with torch.no_grad():
        want = again(
            input_ids=torch.tensor(batch["input_ids"]),
            attention_mask=torch.tensor(batch["attention_mask"]),
        ).logits.numpy()
    got = pj.infer(model, batch)["logits"]
    np.testing.assert_allclose(got[valid], want[valid], atol=ATOL_MODEL, rtol=0)
    assert pj.load_pretrained(tmp_path).config == model.config
