"""Export round trip: transformers and pj.load_pretrained load what save_pretrained writes."""

import dataclasses

import jax
import numpy as np
import pytest

import prism_jax as pj
from prism_jax.checkpoints import hf
from tests import tiny
from tests.conftest import ATOL_MODEL


@pytest.mark.parametrize("name", sorted(tiny.SPECS))
def test_export_round_trip(name, hf_models, tmp_path, rng):
    import transformers

    model = pj.load_pretrained(hf_models(name)[1])
    directory = hf.save_pretrained(model, tmp_path / name)
    again = pj.load_pretrained(directory)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    arch = tiny.SPECS[name][0]
    torch_model = getattr(transformers, arch).from_pretrained(directory).eval()
    batch = tiny.random_batch(name, rng)
    want = tiny.torch_outputs(torch_model, batch)
    got = pj.infer(model, batch)
    key = "logits" if "logits" in want else "last_hidden_state"
    if key == "last_hidden_state" and want[key] is None:
        return
    rows = np.asarray(batch["attention_mask"]).astype(bool) if name.startswith("gpt2") else ...
    np.testing.assert_allclose(got[key][rows], want[key][rows], atol=ATOL_MODEL, rtol=0)
    if model.tokenizer is not None:
        texts = ["the good tea", "a bad box"]
        np.testing.assert_array_equal(
            again.tokenizer(texts)["input_ids"], model.tokenizer(texts)["input_ids"]
        )


def test_finetuning_and_export_keep_the_generation_ids(hf_models, tmp_path, capsys):
    """A fine-tuned LM still stops: `finetune --out` exports the eos / bos / pad ids (to
    config.json and generation_config.json), and a fresh classifier head keeps them too."""
    import json

    from prism_jax import cli, models

    source = hf_models("llama_lm")[1]
    original = pj.load_pretrained(source)
    assert original.generation.get("eos_token_id") is not None
    out = tmp_path / "tuned"
    argv = ["finetune", "--model", str(source), "--dataset", "wikipedia_leads", "--steps", "1",
            "--batch-size", "2", "--max-length", "16", "--eval-split", "validation",
            "--eval-limit", "2", "--json", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert pj.load_pretrained(out).generation == original.generation
    written = json.loads((out / "generation_config.json").read_text())
    assert written["eos_token_id"] == original.generation["eos_token_id"]
    listed = dataclasses.replace(original, generation={"eos_token_id": [0, 5], "bos_token_id": 1})
    assert models.with_classifier(listed, 3).generation == listed.generation
    again = pj.load_pretrained(hf.save_pretrained(listed, tmp_path / "listed"))
    assert again.generation == {"eos_token_id": [0, 5], "bos_token_id": 1}
