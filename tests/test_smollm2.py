"""SmolLM2-135M-Instruct (real Q4_1 weights, offline) against transformers' own GGUF loader."""

import numpy as np
import pytest

import prism_jax as pj
from prism_jax.data import sources
from tests.conftest import ATOL_LAYER

# Real weights through transformers' own GGUF loader (40 s to load): out of CI for time (`make
# slow`); the tiny GGUF files of test_gguf.py and the tiny Llamas check the same paths in CI.
pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
    "Photosynthesis is the process by which green plants and some other organisms use "
    "sunlight to synthesize foods from carbon dioxide and water.",
]


@pytest.fixture(scope="module")
def smollm2():
    return pj.load_pretrained(sources.smollm2_gguf())


@pytest.fixture(scope="module")
def reference():
    import transformers

    path = sources.smollm2_gguf()
    kw = dict(gguf_file=path.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kw)
    model = transformers.LlamaForCausalLM.from_pretrained(str(path.parent), **kw).eval()
    return tokenizer, model


def test_tokenizer_matches_transformers(smollm2, reference):
    tokenizer, _ = reference
    for text in PROMPTS:
        assert smollm2.tokenizer.encode_plain(text) == tokenizer(text)["input_ids"]


def test_logits_match_transformers_gguf_loader(smollm2, reference):
    import torch

    batch = smollm2.tokenizer(PROMPTS)
    valid = batch["attention_mask"].astype(bool)
    with torch.no_grad():
        want = reference[1](
            input_ids=torch.tensor(batch["input_ids"]).long(),
            attention_mask=torch.tensor(batch["attention_mask"]).long(),
        ).logits.numpy()[valid]
    atol = ATOL_LAYER * smollm2.config.depth  # 30 layers of float32 rounding
    # N = 3 (K/V exchange at CR = 1); one device is the same code without the axis
    got = pj.infer(smollm2, batch, mesh=pj.edge_mesh(3), plan=pj.Plan(cr=1))["logits"][valid]
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    config = smollm2.config
    assert (config.depth, config.width, config.heads, config.kv_heads) == (30, 576, 9, 3)
    assert config.tied and config.rope_theta == 1e5


def test_greedy_generation_equals_transformers_for_32_tokens(smollm2, reference):
    import torch

    from prism_jax import generation

    prompts = [smollm2.tokenizer.chat("Name three colours."), PROMPTS[0]]
    batch = smollm2.tokenizer(prompts)  # ragged: right-padded here, left-padded for generation
    got = pj.generate(smollm2, batch, mesh=pj.edge_mesh(2), plan=pj.Plan(cr=1),
                      max_new_tokens=32, eos=False)  # fmt: skip
    left = generation.left_pad(batch, smollm2.config, 1, 32)
    with torch.no_grad():
        want = (
            reference[1]
            .generate(
                input_ids=torch.tensor(left["input_ids"]).long(),
                attention_mask=torch.tensor(left["attention_mask"]).long(),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=2,
            )[:, left["input_ids"].shape[1] :]
            .numpy()
        )
    np.testing.assert_array_equal(got, want)
    assert "red" in smollm2.tokenizer.decode(got[0]).lower()
