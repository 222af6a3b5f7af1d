"""Single-device parity with transformers for all six HF classes (tiny random models)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prism_jax as pj
from tests import tiny
from tests.conftest import ATOL_LAYER, ATOL_MODEL


def _valid_rows(batch, x):
    """Positions that carry tokens (GPT-2 padded rows are not compared: HF leaves them
    attending to nothing in particular)."""
    mask = batch.get("attention_mask")
    return x if mask is None else x[np.asarray(mask).astype(bool)]


@pytest.mark.parametrize("name", sorted(tiny.SPECS))
def test_single_device_matches_transformers(name, hf_models, rng):
    torch_model, directory = hf_models(name)
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch(name, rng)
    ref = tiny.torch_outputs(torch_model, batch)
    out = pj.infer(model, batch)
    depth = model.config.depth
    want = ref["last_hidden_state"]
    if want is None and model.config.family != "vit":
        want = ref["hidden_states"][-1]
    if want is not None:
        rows = (lambda x: _valid_rows(batch, x)) if model.config.causal else (lambda x: x)
        np.testing.assert_allclose(
            rows(out["last_hidden_state"]), rows(want), atol=ATOL_LAYER * depth, rtol=0
        )
    for key in ("logits", "pooler_output"):
        if key in ref:
            got = out[key]
            if key == "logits" and model.config.head == "lm":
                got, ref[key] = _valid_rows(batch, got), _valid_rows(batch, ref[key])
            np.testing.assert_allclose(got, ref[key], atol=ATOL_MODEL, rtol=0)
        elif key == "logits":  # no head, no logits
            assert key not in out


def test_heads_present_as_checkpoints_say(hf_models):
    assert pj.load_pretrained(hf_models("bert")[1]).config.pooler
    cls = pj.load_pretrained(hf_models("bert_cls")[1]).config
    assert (cls.head, cls.num_labels) == ("classifier", 3)
    assert pj.load_pretrained(hf_models("gpt2_lm")[1]).config.head == "lm"
    vit = pj.load_pretrained(hf_models("vit_cls")[1]).config
    assert (vit.head, vit.pooler, vit.qkv_bias) == ("classifier", False, False)


def test_padding_does_not_change_valid_tokens(hf_models, rng):
    """A sequence padded further gives the same outputs on its tokens (padding is masked)."""
    _, directory = hf_models("bert_cls")
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch("bert_cls", rng, batch=1, tokens=9)
    padded = {k: np.pad(v, ((0, 0), (0, 6))) for k, v in batch.items()}
    a, b = pj.infer(model, batch), pj.infer(model, padded)
    np.testing.assert_allclose(
        b["last_hidden_state"][:, :9], a["last_hidden_state"], atol=ATOL_MODEL, rtol=0
    )
    np.testing.assert_allclose(b["logits"], a["logits"], atol=ATOL_MODEL, rtol=0)


def test_gelu_is_the_exact_gelu_of_pytorch():
    """`layers.gelu` (the erf form, as PyTorch writes it) is the exact GELU to float32
    rounding across the range activations take: no farther from float64 than PyTorch's own
    GELU or jax.nn.gelu(approximate=False) (the erfc form), and within 1.5e-6 of it."""
    import torch
    from scipy.special import erf

    from prism_jax import layers

    x = np.linspace(-12, 12, 100_001, dtype=np.float32)
    truth = 0.5 * x.astype(np.float64) * (1 + erf(x.astype(np.float64) / np.sqrt(2)))

    def error(got):
        return np.abs(np.asarray(got, np.float64) - truth).max()

    ours = error(layers.gelu(jnp.asarray(x)))
    torch_error = error(torch.nn.functional.gelu(torch.from_numpy(x)).numpy())
    jax_error = error(jax.nn.gelu(jnp.asarray(x), approximate=False))
    assert ours <= max(torch_error, jax_error) and ours < 1.5e-6, (ours, torch_error, jax_error)
