"""Every bad input a user can give: one line on stderr and exit code 2 (CLI), or a PrismError
naming the field (Python API). Table-driven: a case is a name, how to build its argv from the
fixtures, and the line's expected text."""

import dataclasses
import json
import shutil
import struct
import zlib

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

import prism_jax as pj
from prism_jax import cli
from tests import tiny, tiny_gguf
from tests.conftest import FAST_COMPILE


@pytest.fixture
def dirs(hf_models, tmp_path):
    """Private copies of tiny checkpoints (free to corrupt) and a scratch folder."""
    out = {"tmp": tmp_path}
    for name in ("bert_cls", "vit", "gpt2_lm", "llama_lm"):
        out[name] = tmp_path / name
        shutil.copytree(hf_models(name)[1], out[name])
    return out


def _config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return directory


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(path):
    """A valid PNG header announcing 20,000 x 20,000 pixels (400 M), with almost no data."""
    header = struct.pack(">IIBBBBB", 20_000, 20_000, 1, 0, 0, 0, 0)
    body = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + _png_chunk(b"IEND", b""))
    return path


def _truncated_png(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    return path


def _nan_weight(directory):
    path = directory / "model.safetensors"
    tensors = dict(load_file(path))
    key = "bert.encoder.layer.1.attention.self.key.weight"
    tensors[key] = np.where(np.eye(*tensors[key].shape) > 0, np.nan, tensors[key])
    save_file(tensors, path)
    return directory


def _trained_checkpoint(d):
    """A checkpoint directory of one real step whose run.json is then corrupted."""
    ck = d["tmp"] / "ck"
    assert cli.main([*_finetune(d), "--checkpoint-dir", str(ck)]) == 0
    (ck / "run.json").write_text("{not json")
    return ck


def _finetune(d):
    return ["finetune", "--model", str(d["bert_cls"]), "--steps", "1", "--batch-size", "2",
            "--max-length", "8", "--eval-limit", "2", "--json"]  # fmt: skip


def _infer(d, *extra, model="bert_cls"):
    return ["infer", "--model", str(d[model]), "--devices", "2", "--text", "good tea", *extra]


def _truncated_gguf(d):
    path = tiny_gguf.build(d["tmp"])
    path.write_bytes(path.read_bytes()[:5000])
    return path


def _write(directory, name, **values):
    (directory / name).write_text(json.dumps(values))
    return directory


def _generate(d, model):
    return ["generate", "--model", str(model), "--devices", "2", "--prompt", "good tea",
            "--max-new-tokens", "2"]  # fmt: skip


def _gguf(d, **meta):
    return tiny_gguf.build(d["tmp"], **meta)


_NESTED_LOOPS = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"


def _chat(d, template):
    """The tiny Llama with `template` as its chat template."""
    path = d["llama_lm"] / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": template}))
    return d["llama_lm"]


def _prepared(d):
    """`d`, once the fine-tuning data set is prepared (TFDS reports that on stderr)."""
    from prism_jax.data import tfds_builders

    tfds_builders.texts("fine_food_reviews", "train", 1)
    return d


def _folder_for(path):
    """`path` made a directory (no permissions bits needed: the tests run as root)."""
    if path.exists():
        path.unlink()
    path.mkdir(parents=True)
    return path


def _vit(d, image):
    return ["infer", "--model", str(d["vit"]), "--devices", "2", "--image", str(image)]


CASES = {
    # inputs
    "non-UTF-8 text": (
        lambda d: ["infer", "--model", str(d["bert_cls"]), "--text", "caf\udce9"],
        "argument --text: text is not valid UTF-8",
    ),
    "truncated PNG": (lambda d: _vit(d, _truncated_png(d["tmp"] / "t.png")), "cannot read image"),
    "decompression-bomb PNG": (
        lambda d: _vit(d, _bomb_png(d["tmp"] / "bomb.png")),
        "(a decompression bomb?)",
    ),
    "max-length 0": (lambda d: _infer(d, "--max-length", "0"), "argument --max-length"),
    "max-length -2": (lambda d: _infer(d, "--max-length", "-2"), "argument --max-length"),
    "save into a missing folder": (
        lambda d: _infer(d, "--save", str(d["tmp"] / "no" / "out.npz")),
        "no directory",
    ),
    "save onto a folder": (
        lambda d: (d["tmp"] / "x.npz").mkdir() or _infer(d, "--save", str(d["tmp"] / "x.npz")),
        "is a directory",
    ),
    # checkpoints and configs
    "corrupt tokenizer.json": (
        lambda d: (d["bert_cls"] / "tokenizer.json").write_text("{broken") and _infer(d),
        "corrupt tokenizer in",
    ),
    "num_attention_heads 0": (
        lambda d: _config(d["bert_cls"], num_attention_heads=0) and _infer(d),
        "config.json: num_attention_heads must be an integer >= 1, got 0",
    ),
    "max_position_embeddings 0": (
        lambda d: _config(d["bert_cls"], max_position_embeddings=0) and _infer(d),
        "config.json: max_position_embeddings must be an integer >= 1, got 0",
    ),
    "vocab_size null": (
        lambda d: _config(d["bert_cls"], vocab_size=None) and _infer(d),
        "config.json: vocab_size must be an integer >= 1, got None",
    ),
    "layer_norm_eps a string": (
        lambda d: _config(d["bert_cls"], layer_norm_eps="tiny") and _infer(d),
        "config.json: layer_norm_eps must be a number > 0, got 'tiny'",
    ),
    "NaN weight": (
        lambda d: _nan_weight(d["bert_cls"]) and _infer(d),
        "tensors with NaN or inf [bert.encoder.layer.1.attention.self.key.weight]",
    ),
    # Llama and GGUF
    "prompt longer than the context": (
        lambda d: _infer(d, "--text", " ".join(["good tea"] * 40), model="llama_lm"),
        "longer than the model's 64 positions",
    ),
    "unsupported rope_scaling": (
        lambda d: (
            _config(d["llama_lm"], rope_scaling={"rope_type": "yarn", "factor": 4.0})
            and _infer(d, model="llama_lm")
        ),
        "unsupported rope scaling 'yarn'",
    ),
    "hidden exchange on a rotary model": (
        lambda d: _infer(d, "--cr", "2", "--exchange", "hidden", model="llama_lm"),
        "exchange='kv'",
    ),
    "GGUF of another architecture": (
        lambda d: ["infer", "--model", str(tiny_gguf.build(d["tmp"], arch="gpt2")), "--text", "a"],
        "GGUF architecture 'gpt2' is not supported",
    ),
    "truncated GGUF": (
        lambda d: ["infer", "--model", str(_truncated_gguf(d)), "--text", "a"],
        "not a readable GGUF file",
    ),
    "convert a file that is not .gguf": (
        lambda d: ["convert", str(d["bert_cls"] / "config.json"), str(d["tmp"] / "o")],
        "is not a .gguf file",
    ),
    # fine-tuning
    "checkpoint-dir is a file": (
        lambda d: [*_finetune(d), "--checkpoint-dir", str(d["bert_cls"] / "config.json")],
        "is a file, not a directory",
    ),
    "checkpoint-dir not writable": (
        lambda d: [*_finetune(d), "--checkpoint-dir", str(d["bert_cls"] / "config.json" / "x")],
        "is not writable",
    ),
    "corrupt run.json": (
        lambda d: [*_finetune(d), "--checkpoint-dir", str(_trained_checkpoint(d))],
        "run.json is unreadable",
    ),
    "checkpoint-every 0": (
        lambda d: [*_finetune(d), "--checkpoint-every", "0"],
        "argument --checkpoint-every",
    ),
    "checkpoint-every -3": (
        lambda d: [*_finetune(d), "--checkpoint-every", "-3"],
        "argument --checkpoint-every",
    ),
    "warmup -1": (lambda d: [*_finetune(d), "--warmup", "-1"], "argument --warmup"),
    "lr nan": (lambda d: [*_finetune(d), "--lr", "nan"], "argument --lr"),
    "mixed cr 0": (lambda d: [*_finetune(d), "--mixed-cr", "1,0"], "argument --mixed-cr"),
    "distill -1": (lambda d: [*_finetune(d), "--distill", "-1"], "argument --distill"),
    "distill from a fresh head": (
        lambda d: [*_finetune(d)[:2], str(d["gpt2_lm"]), *_finetune(d)[3:], "--distill", "1"],
        "--distill needs a model that already does the task",
    ),
    "mixed cr without prism": (
        lambda d: [*_finetune(d), "--mixed-cr", "1,4"],
        "--mixed-cr trains under prism",
    ),
    "out onto the source model": (
        lambda d: [*_finetune(d), "--out", str(d["bert_cls"])],
        "is the model being fine-tuned",
    ),
    "out onto a file": (
        lambda d: [*_finetune(d), "--out", str(d["bert_cls"] / "config.json")],
        "is a file, not a directory",
    ),
    # compression rates
    "cr empty": (lambda d: ["eval", "--model", str(d["bert_cls"]), "--cr", ""], "argument --cr"),
    "cr commas": (lambda d: ["eval", "--model", str(d["bert_cls"]), "--cr", ",,"], "argument --cr"),
    "cr 0 in a list": (
        lambda d: ["eval", "--model", str(d["bert_cls"]), "--cr", "1,0"],
        "argument --cr",
    ),
    # clusters
    "timeout 0": (lambda d: ["launch", "--nodes", "2", "--timeout", "0"], "argument --timeout"),
    "timeout -5": (lambda d: ["launch", "--nodes", "2", "--timeout", "-5"], "argument --timeout"),
    "timeout nan": (
        lambda d: [
            "node",
            "--rank",
            "0",
            "--nodes",
            "2",
            "--coordinator",
            "h:1",
            "--timeout",
            "nan",
        ],
        "argument --timeout",
    ),  # fmt: skip
    "port 0": (lambda d: ["launch", "--nodes", "2", "--port", "0"], "argument --port"),
    "port 70000": (lambda d: ["launch", "--nodes", "2", "--port", "70000"], "argument --port"),
    "launch nodes 0": (lambda d: ["launch", "--nodes", "0", "--", "infer"], "argument --nodes"),
    "devices 0": (lambda d: _infer(d, "--devices", "0"), "argument --devices"),
    "coordinator port 0": (lambda d: _node("h:0"), "argument --coordinator"),
    "coordinator port 70000": (lambda d: _node("h:70000"), "argument --coordinator"),
    "coordinator without a port": (lambda d: _node("h"), "argument --coordinator"),
    "coordinator without a host": (lambda d: _node(":29500"), "argument --coordinator"),
    "launch port in use": (
        lambda d: ["launch", "--nodes", "2", "--port", str(_busy_port(d)), "--", *_infer(d)],
        "is already in use",
    ),
    "launch finetune": (
        lambda d: ["launch", "--nodes", "2", *_finetune(d)],
        "finetune does not run across nodes; give the command to run after the options: "
        "infer ..., cost ..., eval ..., generate ..., serve ... or plan --profile ...",
    ),
    # generation ids: tampered generation_config.json, ids outside the vocabulary
    "generation_config eos a string": (
        lambda d: _generate(
            d, _write(d["llama_lm"], "generation_config.json", eos_token_id="zero")
        ),
        "generation_config.json: eos_token_id must be a token id in [0, 101) (or a list of "
        "them), got 'zero'",
    ),
    "generation_config pad -5": (
        lambda d: _generate(d, _write(d["llama_lm"], "generation_config.json", pad_token_id=-5)),
        "generation_config.json: pad_token_id must be a token id in [0, 101), got -5",
    ),
    "generation_config eos list with a bool": (
        lambda d: _generate(
            d, _write(d["llama_lm"], "generation_config.json", eos_token_id=[0, True])
        ),
        "eos_token_id must be a token id in [0, 101) (or a list of them), got [0, True]",
    ),
    "config eos past the vocabulary": (
        lambda d: _generate(d, _config(d["llama_lm"], eos_token_id=99999)),
        "config.json: eos_token_id must be a token id in [0, 101)",
    ),
    "config pad past the vocabulary": (
        lambda d: _generate(d, _config(d["llama_lm"], pad_token_id=1000000)),
        "config.json: pad_token_id must be a token id in [0, 101), got 1000000",
    ),
    "GGUF eos past the vocabulary": (
        lambda d: _generate(d, tiny_gguf.build(d["tmp"], eos_token_id=99999)),
        "tiny.gguf: eos_token_id must be a token id in [0, 268)",
    ),
    "convert a GGUF whose pad is past the vocabulary": (
        lambda d: [
            "convert",
            str(tiny_gguf.build(d["tmp"], pad_token_id=300)),
            str(d["tmp"] / "o"),
        ],
        "tiny.gguf: pad_token_id must be a token id in [0, 268), got 300",
    ),
    # GGUF metadata that disagrees with its tensors, in convert, infer and generate
    "GGUF head count 3 at width 64": (
        lambda d: ["convert", str(_gguf(d, head_count=3)), str(d["tmp"] / "o")],
        "GGUF metadata disagrees with tensor blk.0.attn_q.weight: llama.attention.head_count "
        "= 3 heads of size 16 need 48 rows, the tensor has 64",
    ),
    "GGUF head count 0": (
        lambda d: ["infer", "--model", str(_gguf(d, head_count=0)), "--text", "a"],
        "GGUF field llama.attention.head_count must be an integer >= 1, got 0",
    ),
    "GGUF KV head count 3": (
        lambda d: _generate(d, _gguf(d, head_count_kv=3)),
        "tensor blk.0.attn_k.weight: llama.attention.head_count_kv = 3 heads",
    ),
    "GGUF short token-type list": (
        lambda d: _generate(d, _gguf(d, token_types=[3, 3, 1])),
        "GGUF field tokenizer.ggml.token_type has 3 entries for 268 tokens",
    ),
    "GGUF malformed merge": (
        lambda d: ["convert", str(_gguf(d, token_merges=["h e", "the"])), str(d["tmp"] / "o")],
        "tokenizer.ggml.merges: merge 1 'the' is not two tokens separated by one space",
    ),
    "GGUF merge of unknown tokens": (
        lambda d: ["infer", "--model", str(_gguf(d, token_merges=["zz qq"])), "--text", "a"],
        "merge 0 'zz qq' names 'zz', which is not in the vocabulary",
    ),
    "GGUF merge into an unknown token": (
        lambda d: _generate(d, _gguf(d, token_merges=["h t"])),
        "merge 0 'h t' names 'ht', which is not in the vocabulary",
    ),
    # a directory where a file should be (unreadable files: `test_unreadable_files_...`)
    "config.json is a directory": (
        lambda d: _folder_for(d["bert_cls"] / "config.json") and _infer(d),
        "config.json: Is a directory",
    ),
    "model.safetensors is a directory": (
        lambda d: _folder_for(d["bert_cls"] / "model.safetensors") and _infer(d),
        "model.safetensors: Is a directory",
    ),
    "checkpoint lock is a directory": (
        lambda d: [
            *_finetune(_prepared(d)),
            "--checkpoint-dir",
            str(_folder_for(d["tmp"] / "ck" / ".lock").parent),
        ],  # fmt: skip
        "cannot open the lock file",
    ),
    # seeds: what JAX's keys and NumPy's generators both take
    "generate seed beyond 64 bits": (
        lambda d: [*_generate(d, d["llama_lm"]), "--seed", str(2**64 + 1)],
        "argument --seed: an integer in [0, 2**63 - 1] expected",
    ),
    "finetune seed 2**63": (
        lambda d: [*_finetune(d), "--seed", str(2**63)],
        "argument --seed: an integer in [0, 2**63 - 1] expected",
    ),
    "finetune seed -1": (lambda d: [*_finetune(d), "--seed", "-1"], "argument --seed"),
    # the stream transport needs one process per device
    "infer --transport stream on one machine": (
        lambda d: _infer(d, "--transport", "stream", "--cr", "2"),
        "--transport stream runs on a cluster of one process per device",
    ),
    "launch single with --transport stream": (  # refused before any node starts
        lambda d: [
            "launch",
            "--nodes",
            "2",
            "--",
            *_infer(d, "--strategy", "single", "--transport", "stream"),
        ],
        "prism-jax launch: error: transport: strategy='single' runs on one device",
    ),
    "node eval with a sink on segments": (  # refused before it waits for the other node
        lambda d: [
            *_node("127.0.0.1:1"),
            "--timeout",
            "5",
            "--",
            "eval",
            "--model",
            str(d["bert_cls"]),
            "--cr",
            "1,4",
            "--sink",
            "2",
        ],
        "prism-jax node: error: grouping='segments' (the paper's fixed runs of CR positions) "
        "has no room for exact tokens",
    ),
    "single with --transport all_to_all": (
        lambda d: _infer(d, "--strategy", "single", "--transport", "all_to_all"),
        "transport: strategy='single' runs on one device",
    ),
    # saving, distillation, prompts
    "save to an empty name": (lambda d: _infer(d, "--save", ""), "give a file name to write to"),
    "distill 1e308 (inf in float32)": (
        lambda d: [*_finetune(d), "--distill", "1e308"],
        "argument --distill: a number in [0, 3.4e38] (float32) expected, got '1e308'",
    ),
    "an empty prompt": (
        lambda d: [*_generate(d, d["llama_lm"]), "--prompt", ""],
        "prompt 2 is empty: there is no token to continue",
    ),
    "a chat template that renders nothing": (
        lambda d: [*_generate(d, _chat(d, "{% if false %}x{% endif %}")), "--chat"],
        "prompt 1 is empty (as the chat template renders it)",
    ),
    "a chat template of nested range(99999) loops": (
        lambda d: [*_generate(d, _chat(d, _NESTED_LOOPS)), "--chat"],
        "the chat template failed: it loops over more than 100,000 range items",
    ),
    # replacing an output folder never deletes what is read
    "convert --force into the GGUF's own folder": (
        lambda d: ["convert", str(_gguf(d)), str(d["tmp"]), "--force"],
        "tiny.gguf: replacing it would delete that",
    ),
    "finetune --out --force onto the folder above the model": (
        lambda d: [*_finetune(d), "--out", str(d["tmp"]), "--force"],
        "bert_cls: replacing it would delete that",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_bad_input_is_one_line_and_exit_2(case, dirs, capsys):
    build, message = CASES[case]
    argv = build(dirs)
    capsys.readouterr()  # what building the case printed
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err


# --- the Python API: PrismError naming the field ------------------------------------------

BATCH_CASES = {
    "a list, not a dict": (lambda b: [b["input_ids"]], "a batch is a dict"),
    "ragged rows": (lambda b: {"input_ids": [[5, 6, 7], [5]]}, "input_ids must be a rectangular"),
    "string ids": (lambda b: {"input_ids": [["5", "6"]]}, "input_ids must hold integers"),
    "float ids": (lambda b: {"input_ids": b["input_ids"] + 0.5}, "input_ids must hold integers"),
    "no rows": (lambda b: {"input_ids": b["input_ids"][:0]}, "input_ids must be a non-empty"),
    "token types out of range": (
        lambda b: {**b, "token_type_ids": np.full_like(b["input_ids"], 7)},
        "token_type_ids outside [0, 2)",
    ),
    "NaN attention mask": (
        lambda b: {**b, "attention_mask": np.full(b["input_ids"].shape, np.nan)},
        "attention_mask must hold only 0 and 1",
    ),
    "ids past the vocabulary": (
        lambda b: {**b, "input_ids": b["input_ids"] + 1000},
        "input_ids outside [0, 101)",
    ),
}


@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_python_bad_batch_names_the_field(case, hf_models, rng):
    model = pj.load_pretrained(hf_models("bert_cls")[1])
    edit, message = BATCH_CASES[case]
    batch = edit(tiny.random_batch("bert_cls", rng, tokens=6))
    with pytest.raises(pj.PrismError, match=message.replace("[", r"\[").replace(")", r"\)")):
        pj.infer(model, batch, mesh=pj.edge_mesh(2), plan=pj.Plan(cr=2))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_python_non_finite_pixels_are_refused(bad, hf_models, rng):
    model = pj.load_pretrained(hf_models("vit")[1])
    batch = tiny.random_batch("vit", rng, batch=2)
    batch["pixel_values"][1, 0, 3, 4] = bad
    with pytest.raises(pj.PrismError, match=r"pixel_values hold NaN or inf \(first at index "):
        pj.infer(model, batch)


def test_numpy_integers_are_accepted(hf_models, rng):
    model = pj.load_pretrained(hf_models("bert_cls")[1])
    batch = tiny.random_batch("bert_cls", rng, tokens=8)
    plan = pj.Plan(cr=np.int64(4))
    assert plan.cr == 4 and type(plan.cr) is int and plan == pj.Plan(cr=4)
    mesh = pj.edge_mesh(np.int64(2))
    got = pj.infer(model, batch, mesh=mesh, plan=plan)["logits"]
    np.testing.assert_array_equal(
        got, pj.infer(model, batch, mesh=mesh, plan=pj.Plan(cr=4))["logits"]
    )
    for bad in (2.0, True, "2"):
        with pytest.raises(pj.PrismError, match="compression rate must be an integer"):
            pj.Plan(cr=bad)
        with pytest.raises(pj.PrismError, match="number of devices must be an integer"):
            pj.edge_mesh(bad)
    assert jax.device_count() == 8


def test_damaged_checkpoint_is_one_line_in_a_fresh_process(dirs, capsys):
    """A checkpoint whose tensor files are gone: the one line, and no late tracebacks of
    orbax's event loop at exit (they only show in a real process)."""
    import subprocess
    import sys
    from pathlib import Path

    ck = dirs["tmp"] / "ck"
    assert cli.main([*_finetune(dirs), "--checkpoint-dir", str(ck)]) == 0
    capsys.readouterr()
    data = [p for p in (ck / "1").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data
    for p in data:
        p.unlink()
    done = subprocess.run(
        [sys.executable, "-m", "prism_jax.cli", *_finetune(dirs), "--checkpoint-dir", str(ck)],
        capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
             "PYTHONPATH": str(Path(__file__).parents[1]),
             "TFDS_DATA_DIR": str(Path(__import__("os").environ["TFDS_DATA_DIR"])),
             "XLA_FLAGS": FAST_COMPILE},
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "checkpoint at step 1" in done.stderr and "is corrupt or partial" in done.stderr


# --- the Python API's arguments: one PrismError naming the argument (checks.py) --------------


def _lm_call(**kw):
    """generate on the tiny GPT-2 with one argument changed."""

    def call(m, b):
        args = {"max_new_tokens": 2} | kw
        return pj.generate(m["gpt2_lm"], b["gpt2_lm"], **args)

    return call


def _other_axis_mesh():
    return jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])


API_CASES = {
    "plan a string": (
        lambda m, b: pj.infer(m["bert_cls"], b["bert_cls"], plan="prism"),
        "plan must be a prism_jax.Plan",
    ),
    "plan a dict": (
        lambda m, b: pj.infer(m["bert_cls"], b["bert_cls"], plan={"cr": 2}),
        "plan must be a prism_jax.Plan",
    ),
    "mesh an int": (
        lambda m, b: pj.infer(m["bert_cls"], b["bert_cls"], mesh=4),
        "mesh must be a mesh",
    ),
    "mesh of another axis": (
        lambda m, b: pj.infer(m["bert_cls"], b["bert_cls"], mesh=_other_axis_mesh()),
        "mesh must have the one axis 'edge'",
    ),
    "model a path": (
        lambda m, b: pj.infer("bert", b["bert_cls"]),
        "model must be a prism_jax.Model",
    ),
    "load None": (lambda m, b: pj.load_pretrained(None), "name must be a path"),
    "load 42": (lambda m, b: pj.load_pretrained(42), "name must be a path"),
    "load as int8": (
        lambda m, b: pj.load_pretrained(m["dir"], dtype="int8"),
        "dtype must be one of",
    ),
    "load as int32": (
        lambda m, b: pj.load_pretrained(m["dir"], dtype=np.int32),
        "dtype must be one of",
    ),
    "load as bool": (lambda m, b: pj.load_pretrained(m["dir"], dtype=bool), "dtype must be one of"),
    "temperature a word": (_lm_call(temperature="hot"), "temperature must be a number"),
    "temperature None": (_lm_call(temperature=None), "temperature must be a number"),
    "temperature past float32": (_lm_call(temperature=1e39), "temperature must be a number"),
    "temperature 0 in float32": (_lm_call(temperature=1e-46), "temperature must be a number"),
    "seed a word": (_lm_call(seed="a"), "seed must be an integer"),
    "seed a fraction": (_lm_call(seed=1.5), "seed must be an integer"),
    "seed past 64 bits": (_lm_call(seed=2**64), "seed must be an integer"),
    "eos a word": (_lm_call(eos="x"), "eos must be an integer"),
    "eos past the vocabulary": (_lm_call(eos=10**12), "eos must be an integer in"),
    "eos an empty list": (_lm_call(eos=[]), "a non-empty list of ids"),
    "top_k True": (_lm_call(top_k=True, temperature=1.0), "top_k must be an integer"),
    "top_p True": (_lm_call(top_p=True, temperature=1.0), "top_p must be a number"),
    "max_new_tokens a float": (_lm_call(max_new_tokens=2.0), "max_new_tokens must be an integer"),
    "cost batch 0": (
        lambda m, b: pj.measure_cost("bert-base", pj.Plan(), devices=2, seq_len=8, batch=0),
        "batch must be an integer >= 1",
    ),
    "cost batch -1": (
        lambda m, b: pj.measure_cost("bert-base", pj.Plan(), devices=2, seq_len=8, batch=-1),
        "batch must be an integer >= 1",
    ),
    "cost seq_len a fraction": (
        lambda m, b: pj.measure_cost("bert-base", pj.Plan(), devices=2, seq_len=16.5),
        "--seq-len must be in",
    ),
    "cost plan None": (
        lambda m, b: pj.measure_cost("bert-base", None, devices=2, seq_len=8),
        "plan must be a prism_jax.Plan",
    ),
    "cost model None": (
        lambda m, b: pj.measure_cost(None, pj.Plan(), devices=2, seq_len=8),
        "model must be a path",
    ),
    "closed form, 0 devices": (
        lambda m, b: pj.cost.bytes_closed_form(
            m["bert_cls"].config, pj.Plan(), devices=0, seq_len=8
        ),
        "devices must be an integer >= 1",
    ),
    "closed form, -2 devices": (
        lambda m, b: pj.cost.bytes_closed_form(
            m["bert_cls"].config, pj.Plan(), devices=-2, seq_len=8
        ),
        "devices must be an integer >= 1",
    ),
    "a misspelt batch key": (
        lambda m, b: pj.infer(
            m["bert_cls"], {**b["bert_cls"], "attention_masks": b["bert_cls"]["attention_mask"]}
        ),
        "the batch has \\['attention_masks'\\]",
    ),
    "pixels for BERT": (
        lambda m, b: pj.infer(
            m["bert_cls"], {**b["bert_cls"], "pixel_values": np.zeros((1, 3, 4, 4))}
        ),
        "the batch has \\['pixel_values'\\]",
    ),
    "a row with no valid token": (
        lambda m, b: pj.infer(
            m["bert_cls"],
            {**b["bert_cls"], "attention_mask": np.array([[1, 1, 1, 1, 1, 1], [0] * 6])},
        ),
        "attention_mask row 1 has no valid token",
    ),
    "voltage with a CR": (
        lambda m, b: pj.Plan(strategy="voltage", cr=8),
        "cr set, but compressor settings apply only to strategy='prism'",
    ),
    "single with a grouping": (
        lambda m, b: pj.Plan(strategy="single", grouping="kmeans"),
        "grouping set, but compressor",
    ),
    "salient 100": (
        lambda m, b: pj.Plan(grouping="balanced", salient=100),
        r"salient must be an integer in \[0, 1\]",
    ),
    "segments with a salient token": (
        lambda m, b: pj.Plan(salient=1),
        "grouping='segments' .* no room for exact tokens",
    ),
}


@pytest.fixture
def api(hf_models, rng):
    """(models by name, a batch for each, and a checkpoint directory) for API_CASES."""
    names = ("bert_cls", "gpt2_lm")
    m = {n: pj.load_pretrained(hf_models(n)[1]) for n in names}
    m["dir"] = hf_models("bert_cls")[1]
    b = {n: tiny.random_batch(n, rng, batch=2, tokens=6) for n in names}
    return m, b


@pytest.mark.parametrize("case", list(API_CASES))
def test_python_bad_argument_names_it(case, api):
    call, message = API_CASES[case]
    with pytest.raises(pj.PrismError, match=message):
        call(*api)


def test_numpy_numbers_and_id_lists_are_taken_by_generate(api):
    m, b = api
    model, batch = m["gpt2_lm"], b["gpt2_lm"]
    plain = pj.generate(model, batch, max_new_tokens=2, temperature=1.0, top_k=5, top_p=0.5)
    numpy = pj.generate(
        model, batch, max_new_tokens=np.int64(2), temperature=np.float32(1.0),
        top_k=np.int64(5), top_p=np.float32(0.5), seed=np.uint64(0),
    )  # fmt: skip
    np.testing.assert_array_equal(numpy, plain)
    first = pj.generate(model, batch, max_new_tokens=1, eos=False)[:, 0]
    stopped = pj.generate(model, batch, max_new_tokens=3, eos=[int(first[0]), int(first[1])])
    assert stopped.shape == (2, 3)
    pad = model.generation.get("pad_token_id", int(min(first)))
    assert (stopped[:, 1:] == pad).all()  # both rows ended on their first token


def _node(coordinator: str) -> list[str]:
    return ["node", "--rank", "0", "--nodes", "2", "--coordinator", coordinator]


def _busy_port(d) -> int:
    """A port another program listens on (for as long as the test's `d` lives)."""
    import socket

    d["busy"] = socket.socket()
    d["busy"].bind(("127.0.0.1", 0))
    d["busy"].listen()
    return d["busy"].getsockname()[1]


@pytest.mark.parametrize(
    "name", ["config.json", "tokenizer_config.json", "model.safetensors", ".lock"]
)
def test_unreadable_files_are_one_line(name, dirs, monkeypatch, capsys):
    """A file we may not read (or a lock file of another user): one line naming it. Root reads
    everything, so the refusal is simulated where Python opens the file."""
    import builtins
    import io
    import os

    real = builtins.open

    def guarded(file, *args, **kw):
        if isinstance(file, (str, os.PathLike)) and os.path.basename(file) == name:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real(file, *args, **kw)

    _prepared(dirs)
    capsys.readouterr()  # what preparing the data printed, when this worker did it first
    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)
    code = cli.main([*_finetune(dirs), "--checkpoint-dir", str(dirs["tmp"] / "ck")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{name}: Permission denied" in err or f"{name} (Permission denied)" in err, err


def test_a_chat_template_that_runs_long_is_stopped(hf_models, monkeypatch):
    """Loops that no `range` budget sees (over a long string) are stopped by the time bound."""
    from prism_jax.checkpoints import preprocess

    tok = pj.load_pretrained(hf_models("llama_lm")[1]).tokenizer
    monkeypatch.setattr(preprocess, "CHAT_SECONDS", 0.5)
    long = "{% for a in 'x' * 100000 %}{% for b in 'y' * 100000 %}{% endfor %}{% endfor %}"
    tok = dataclasses.replace(tok, chat_template=long)
    with pytest.raises(
        pj.PrismError, match=r"the chat template failed: it ran for more than 0.5 s"
    ):
        tok.chat("hi")
    assert (
        dataclasses.replace(tok, chat_template="<{{ messages[0].content }}>").chat("hi") == "<hi>"
    )


def _serve_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--port", "0"], "a port in [1, 65535]"),
        (["--port", "http"], "a port in [1, 65535]"),
        (["--cr", "0"], "--cr"),
        (["--max-queue", "0"], "--max-queue"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--compressor", "best"], "--compressor"),
    ],
)
def test_serve_bad_flags_are_one_line(dirs, capsys, argv, says):
    code = cli.main(["serve", "--model", str(dirs["llama_lm"]), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and says in err, err


def test_serve_without_a_model_or_with_a_missing_one_is_one_line(dirs, capsys):
    assert cli.main(["serve", "--port", str(_serve_port())]) == 2
    assert "--model" in capsys.readouterr().err
    missing = str(dirs["tmp"] / "nothing")
    assert cli.main(["serve", "--model", missing, "--port", str(_serve_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prism-jax serve: error:") and err.count("\n") == 1, err


def test_serve_on_a_port_in_use_is_one_line_before_loading(dirs, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        missing = str(dirs["tmp"] / "nothing")  # the port is checked before the model is read
        assert cli.main(["serve", "--model", missing, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 1, err


def test_serve_a_plan_the_model_refuses_is_one_line_at_start_up(dirs, capsys):
    argv = ["serve", "--model", str(dirs["llama_lm"]), "--port", str(_serve_port()),
            "--devices", "2", "--exchange", "hidden"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "hidden" in err and err.count("\n") == 1, err
