"""GGUF conversion against transformers' own GGUF loader (DESIGN.md section 4; the Llama issue)."""

import json

import numpy as np
import pytest

import prism_jax as pj
from prism_jax import cli
from prism_jax.checkpoints import hf
from prism_jax.errors import PrismError
from tests import tiny_gguf
from tests.conftest import ATOL_MODEL

TEXTS = ["the cat sat on the mat", "a cat in the hat at 1234", "<|im_start|>on the"]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return tiny_gguf.build(tmp_path_factory.mktemp("gguf"))


def _hf_logits(directory, batch, gguf_file=None):
    import torch
    import transformers

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    model = transformers.LlamaForCausalLM.from_pretrained(str(directory), **kw).eval()
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(batch["input_ids"]).long(),
            attention_mask=torch.tensor(batch["attention_mask"]).long(),
        ).logits.numpy()


def _batch():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, len(tiny_gguf.vocabulary()[0]), (3, 19))
    mask = np.ones_like(ids)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_converted_directory_and_file_match_transformers_gguf_loader(tiny_file, tmp_path):
    batch = _batch()
    valid = batch["attention_mask"].astype(bool)
    want = _hf_logits(tiny_file.parent, batch, gguf_file=tiny_file.name)
    out = tmp_path / "converted"
    assert cli.main(["convert", str(tiny_file), str(out), "--json"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    # transformers reads the converted directory as an ordinary checkpoint, identically
    np.testing.assert_allclose(_hf_logits(out, batch)[valid], want[valid], atol=ATOL_MODEL)
    for source in (out, tiny_file):  # and so do we, from either
        model = pj.load_pretrained(source)
        for n in (1, 3):
            mesh = pj.edge_mesh(n) if n > 1 else None
            got = pj.infer(model, batch, mesh=mesh, plan=pj.Plan(cr=1))["logits"]
            np.testing.assert_allclose(got[valid], want[valid], atol=ATOL_MODEL, rtol=0)
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2


def test_tokenizer_and_chat_template_match_transformers(tiny_file, tmp_path):
    import transformers

    reference = transformers.AutoTokenizer.from_pretrained(
        str(tiny_file.parent), gguf_file=tiny_file.name
    )
    ours = pj.load_pretrained(tiny_file).tokenizer
    for text in TEXTS:
        assert ours.encode_plain(text) == reference(text)["input_ids"]
    out = tmp_path / "converted"
    hf.convert_gguf(tiny_file, out)
    converted = transformers.AutoTokenizer.from_pretrained(str(out))
    assert [converted(t)["input_ids"] for t in TEXTS] == [reference(t)["input_ids"] for t in TEXTS]
    chat = [{"role": "user", "content": "hi"}]
    assert converted.apply_chat_template(chat, tokenize=False) == "<|im_start|>hi"


def test_tied_gguf_has_no_output_tensor(tmp_path):
    path = tiny_gguf.build(tmp_path, tied=True)
    model = pj.load_pretrained(path)
    assert model.config.tied and model.config.head == "lm"
    batch = _batch()
    valid = batch["attention_mask"].astype(bool)
    want = _hf_logits(path.parent, batch, gguf_file=path.name)
    np.testing.assert_allclose(
        pj.infer(model, batch)["logits"][valid], want[valid], atol=ATOL_MODEL
    )


def test_bad_gguf_files_are_refused(tiny_file, tmp_path, capsys):
    other = tiny_gguf.build(tmp_path, arch="gpt2")
    with pytest.raises(PrismError, match="GGUF architecture 'gpt2' is not supported"):
        pj.load_pretrained(other)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_file.read_bytes()[:-1000])
    not_gguf = tmp_path / "noise.gguf"
    not_gguf.write_bytes(b"\x00" * 4096)
    for path, message in (
        (other, "GGUF architecture 'gpt2'"),
        (truncated, "not a readable GGUF file"),
        (not_gguf, "not a readable GGUF file"),
        (tmp_path / "missing.gguf", "no GGUF file"),
    ):
        capsys.readouterr()
        assert cli.main(["convert", str(path), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out" / "model.safetensors").exists()  # nothing half-written
