"""Strict checkpoint loading: every error names what is wrong; formats the hub publishes load."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import prism_jax as pj
from prism_jax.checkpoints.safetensors import read_safetensors


@pytest.fixture
def bert_dir(hf_models, tmp_path):
    """A private copy of the tiny BERT checkpoint, free to corrupt."""
    target = tmp_path / "bert"
    shutil.copytree(hf_models("bert")[1], target)
    return target


def _edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _edit_tensors(directory, fn):
    path = directory / "model.safetensors"
    tensors = dict(load_file(path))
    fn(tensors)
    save_file(tensors, path)


def test_unused_tensor_is_named(bert_dir):
    _edit_tensors(bert_dir, lambda t: t.update({"encoder.layer.0.extra.weight": np.zeros(3)}))
    with pytest.raises(pj.PrismError, match=r"unused tensors \[encoder\.layer\.0\.extra\.weight"):
        pj.load_pretrained(bert_dir)


def test_missing_parameter_is_named(bert_dir):
    _edit_tensors(bert_dir, lambda t: t.pop("encoder.layer.1.output.dense.bias"))
    with pytest.raises(pj.PrismError, match=r"missing parameters \[encoder\.blocks\.1\.mlp\.fc2"):
        pj.load_pretrained(bert_dir)


def test_shape_mismatch_is_named(bert_dir):
    _edit_config(bert_dir, intermediate_size=40)
    with pytest.raises(pj.PrismError, match=r"shape mismatches \[.*intermediate\.dense\.weight"):
        pj.load_pretrained(bert_dir)


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("bert", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ("bert", {"is_decoder": True}, "is_decoder"),
        ("bert", {"hidden_act": "mish"}, "unsupported activation 'mish'"),
        ("bert", {"rotary_dim": 8}, r"unsupported config fields for bert: \['rotary_dim'\]"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("vit", {"pooler_act": "relu"}, "pooler_act"),
        ("bert", {"architectures": ["BertForMaskedLM"]}, "unknown architecture"),
        ("bert", {"architectures": None, "model_type": "t5"}, "unknown architecture"),
    ],
)
def test_unsupported_config_is_rejected(name, change, message, hf_models, tmp_path):
    directory = tmp_path / name
    shutil.copytree(hf_models(name)[1], directory)
    _edit_config(directory, **change)
    with pytest.raises(pj.PrismError, match=message):
        pj.load_pretrained(directory)


def test_missing_and_corrupt_files(bert_dir, tmp_path):
    with pytest.raises(pj.PrismError, match="no checkpoint directory at /nonexistent/x"):
        pj.load_pretrained("/nonexistent/x")
    (bert_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(pj.PrismError, match="corrupt safetensors file"):
        pj.load_pretrained(bert_dir)
    (bert_dir / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(pj.PrismError, match="shorter than its header"):
        pj.load_pretrained(bert_dir)
    (bert_dir / "model.safetensors").unlink()
    with pytest.raises(pj.PrismError, match="no model.safetensors"):
        pj.load_pretrained(bert_dir)
    (bert_dir / "config.json").write_text("{")
    with pytest.raises(pj.PrismError, match="corrupt config.json"):
        pj.load_pretrained(bert_dir)
    (bert_dir / "config.json").unlink()
    with pytest.raises(pj.PrismError, match="no config.json"):
        pj.load_pretrained(bert_dir)


def test_truncated_tensor_data(bert_dir):
    path = bert_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(pj.PrismError, match="corrupt safetensors file .*: tensors cover"):
        pj.load_pretrained(bert_dir)


def test_pickled_weights_are_refused(bert_dir):
    (bert_dir / "model.safetensors").rename(bert_dir / "pytorch_model.bin")
    with pytest.raises(pj.PrismError, match="only pickled"):
        pj.load_pretrained(bert_dir)


def test_hub_id_offline_fails_in_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(pj.PrismError, match="could not be fetched as a hub id") as e:
        pj.load_pretrained("prism-jax-tests/no-such-model")
    assert "\n" not in str(e.value)


def test_sharded_index_and_bf16(hf_models, tmp_path):
    src = hf_models("gpt2_lm")[1]
    directory = tmp_path / "sharded"
    shutil.copytree(src, directory)
    tensors = dict(load_file(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, keys in halves.items():
        save_file({k: tensors[k].astype(ml_dtypes.bfloat16) for k in keys}, directory / file)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, keys in halves.items() for k in keys}})
    )
    sharded = pj.load_pretrained(directory)
    plain = pj.load_pretrained(src)
    got = np.asarray(sharded.params["wte"]["embedding"][...])
    want = np.asarray(plain.params["wte"]["embedding"][...])
    np.testing.assert_array_equal(got, want.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_read_safetensors_matches_the_library(hf_models):
    path = hf_models("vit")[1] / "model.safetensors"
    ours, lib = read_safetensors(path), load_file(path)
    assert ours.keys() == lib.keys()
    for k in lib:
        np.testing.assert_array_equal(ours[k], lib[k])


def test_preprocessors_are_loaded(hf_models):
    bert = pj.load_pretrained(hf_models("bert")[1])
    batch = bert.tokenizer(["good food", "the tea was not very good"])
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"][0].sum() == 4
    vit = pj.load_pretrained(hf_models("vit")[1])
    assert vit.image_processor.size == (12, 12) and vit.tokenizer is None


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


_GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "F16", "shape": [1, 2], "data_offsets": [8, 12]}}  # fmt: skip
_TAMPERED = {
    "overlapping offsets": {**_GOOD, "b": {"dtype": "F16", "shape": [2], "data_offsets": [4, 8]}},
    "gap between tensors": {**_GOOD, "b": {"dtype": "F16", "shape": [2], "data_offsets": [10, 14]}},
    "data past the last tensor": {"a": _GOOD["a"]},
    "unknown dtype": {**_GOOD, "a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}},
    "size differs from shape": {
        **_GOOD,
        "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]},
    },
    "negative dim": {**_GOOD, "a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
    "offsets reversed": {**_GOOD, "a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}},
    "not an object": [1, 2],
}


@pytest.mark.parametrize("case", sorted(_TAMPERED))
def test_safetensors_reader_rejects_what_the_library_rejects(case, tmp_path):
    from safetensors import SafetensorError

    path = tmp_path / "x.safetensors"
    path.write_bytes(_safetensors_bytes(_TAMPERED[case], bytes(range(12))))
    with pytest.raises((SafetensorError, ValueError, TypeError)):
        load_file(path)  # the reference refuses it ...
    with pytest.raises(pj.PrismError, match="corrupt safetensors file"):
        read_safetensors(path)  # ... and so do we, in one line


def test_safetensors_reader_reads_what_the_library_reads(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(_safetensors_bytes({**_GOOD, "__metadata__": {"k": "v"}}, bytes(range(12))))
    want, got = load_file(path), read_safetensors(path)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype
        np.testing.assert_array_equal(got[k], want[k])


_BIAS = r"encoder\.layer\.0\.output\.dense\.bias"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda w: w.astype(np.int64), rf"not floating point \[{_BIAS}: int64"),
        (lambda w: np.where(np.arange(w.size) == 3, np.nan, w), rf"NaN or inf \[{_BIAS}"),
        (lambda w: np.full_like(w, np.inf), rf"NaN or inf \[{_BIAS}"),
    ],
)
def test_weights_must_be_finite_floats(bert_dir, edit, message):
    key = "encoder.layer.0.output.dense.bias"
    _edit_tensors(bert_dir, lambda t: t.update({key: edit(t[key])}))
    with pytest.raises(pj.PrismError, match=message):
        pj.load_pretrained(bert_dir)
