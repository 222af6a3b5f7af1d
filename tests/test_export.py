"""Export round trip: transformers and pj.load_pretrained load what save_pretrained writes."""

import dataclasses
import json

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


def _run(capsys, *argv):
    from prism_jax import cli

    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    if code == 2:
        assert err.count("\n") == 1 and "Traceback" not in err, err
    return code, err


def test_convert_writes_its_folder_whole_or_not_at_all(tmp_path, capsys, monkeypatch):
    """Another model's tokenizer never survives beside new weights; a failing or killed convert
    leaves the target as it was (absent: no empty folder; present: untouched) and no temporary
    files behind (a killed run's are removed by the next)."""
    from tests import tiny_gguf

    source = tiny_gguf.build(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("another model's tokenizer")
    code, err = _run(capsys, "convert", source, out)
    assert code == 2 and "already holds files" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["tokenizer.json"]
    stale = tmp_path / ".out.partial-999999999-x"  # left by a killed run (no such process)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    assert _run(capsys, "convert", source, out, "--force")[0] == 0
    converted = {p.name for p in out.iterdir()}
    assert "generation_config.json" in converted and "model.safetensors" in converted
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    assert pj.load_pretrained(out).tokenizer.encode_plain("the cat") == (
        pj.load_pretrained(source).tokenizer.encode_plain("the cat")
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.gguf"]
    # a failing convert (metadata that does not fit the tensors) makes no folder
    bad = tiny_gguf.build(tmp_path, name="bad.gguf", head_count=3)
    assert _run(capsys, "convert", bad, tmp_path / "new")[0] == 2

    # a convert interrupted while writing leaves neither the folder nor its temporary files
    def interrupted(tensors, path, metadata=None):
        path.write_bytes(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "save_file", interrupted)
    assert _run(capsys, "convert", source, tmp_path / "new")[0] == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "out", "tiny.gguf"]
    with pytest.raises(KeyboardInterrupt):
        hf.convert_gguf(source, out, replace=True)
    assert {p.name for p in out.iterdir()} == converted  # the old folder, whole


def test_save_pretrained_refuses_a_folder_filled_meanwhile(hf_models, tmp_path):
    """Two writers of one folder: the second is refused at the rename and its result kept."""
    from prism_jax.checkpoints import atomic

    target = tmp_path / "model"
    with pytest.raises(pj.PrismError, match="was filled by another process meanwhile"):
        with atomic.writing(target, replace=False) as temp:
            (temp / "mine").write_text("this run")
            target.mkdir()
            (target / "theirs").write_text("the other run")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    [kept] = tmp_path.glob("model.new-*")
    assert (kept / "mine").read_text() == "this run"
    model = pj.load_pretrained(hf_models("bert_cls")[1])
    with pytest.raises(pj.PrismError, match="already holds files"):
        hf.save_pretrained(model, target)
    assert pj.load_pretrained(hf.save_pretrained(model, target, replace=True)).config == (
        model.config
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", kept.name])


def test_finetune_out_holding_files_is_refused_before_training(hf_models, tmp_path, capsys,
                                                               monkeypatch):  # fmt: skip
    from prism_jax.training import train

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    argv = ["finetune", "--model", hf_models("bert_cls")[1], "--steps", "1", "--batch-size",
            "2", "--max-length", "8", "--eval-limit", "2", "--json", "--out", out]  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr(train, "train", lambda *a, **k: pytest.fail("trained before refusing"))
        code, err = _run(capsys, *argv)
    assert code == 2 and "--out" in err and "already holds files" in err
    assert _run(capsys, *argv, "--force")[0] == 0
    assert pj.load_pretrained(out).config.head == "classifier"
