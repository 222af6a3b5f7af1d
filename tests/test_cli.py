"""The prism-jax command: outputs, --json, and one-line errors with exit code 2."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import prism_jax as pj
from prism_jax import cli
from tests.conftest import FAST_COMPILE


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_infer_text_json_and_compare(hf_models, capsys):
    directory = hf_models("bert_cls")[1]
    code, out, err = run(
        capsys,
        "infer",
        "--model",
        str(directory),
        "--devices",
        "3",
        "--cr",
        "1",
        "--text",
        "the tea was good",
        "--text",
        "bad food",
        "--compare",
        "--json",
    )
    assert code == 0, err
    r = json.loads(out)
    assert r["devices"] == 3 and r["batch"] == 2 and len(r["rows"]) == 2
    assert r["compare"]["cosine_min"] > 1 - 1e-6 and r["compare"]["top1_agreement"] == 1.0
    # closed form at CR = 1: depth x B x L x (D + 1) x 4 bytes, L = ceil(6 / 3)
    assert r["bytes_per_device"] == 3 * 2 * 2 * 36 * 4


def test_infer_gpt2_prints_next_tokens(hf_models, capsys):
    directory = hf_models("gpt2_lm")[1]
    code, out, _ = run(
        capsys,
        "infer",
        "--model",
        str(directory),
        "--devices",
        "2",
        "--cr",
        "2",
        "--text",
        "the cat was very good and the dog",
        "--compare",
    )
    assert code == 0
    assert "next_tokens=" in out and "agreement with the exact model" in out


def test_infer_image(hf_models, tmp_path, capsys):
    directory = hf_models("vit")[1]
    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 16, 3), np.uint8)).save(path)
    code, out, err = run(
        capsys,
        "infer",
        "--model",
        str(directory),
        "--devices",
        "4",
        "--cr",
        "2",
        "--image",
        str(path),
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["tokens"] == 17


@pytest.fixture
def broken(hf_models, tmp_path):
    target = tmp_path / "broken"
    shutil.copytree(hf_models("bert")[1], target)
    return target


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("cr0", "argument --cr: an integer >= 1 expected, got '0'"),
        ("too_many_devices", "8 devices but only 4 tokens"),
        ("too_long", "longer than the model's 64 positions"),
        ("unknown_arch", "unknown architecture"),
        ("missing", "no checkpoint directory"),
        ("corrupt", "corrupt safetensors file"),
        ("mismatch", "checkpoint does not fit its config"),
        ("image_for_bert", "give --text, not --image"),
        ("bad_flag", "argument --cr: an integer >= 1 expected, got 'two'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, message, broken, capsys):
    args = ["infer", "--model", str(broken), "--devices", "2", "--text", "good food"]
    if case == "cr0":
        args += ["--cr", "0"]
    elif case == "too_many_devices":
        args[4] = "8"
    elif case == "too_long":
        args[-1] = " ".join(["good"] * 70)
    elif case == "unknown_arch":
        cfg = json.loads((broken / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps({**cfg, "architectures": ["Foo"]}))
    elif case == "missing":
        args[2] = str(broken / "nope")
    elif case == "corrupt":
        (broken / "model.safetensors").write_bytes(b"\xff" * 20)
    elif case == "mismatch":
        cfg = json.loads((broken / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    elif case == "image_for_bert":
        args[-2:] = ["--image", "x.png"]
    elif case == "bad_flag":
        args += ["--cr", "two"]
    code, _, err = run(capsys, *args)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_console_script_sets_up_devices(hf_models):
    """A fresh process: --devices 5 works because the CLI sets XLA_FLAGS before JAX starts."""
    directory = hf_models("gpt2")[1]
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "XLA_FLAGS": FAST_COMPILE}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "prism_jax.cli",
            "infer",
            "--model",
            str(directory),
            "--devices",
            "5",
            "--cr",
            "2",
            "--text",
            "the good cat and the bad dog",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["devices"] == 5
    helped = subprocess.run(
        [sys.executable, "-m", "prism_jax.cli", "infer", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert helped.returncode == 0 and "--logit-bias" in helped.stdout


def test_eval_reports_accuracy_per_cr(hf_models, tmp_path, capsys):
    """A tiny classifier: CR = 1 equals the exact model's accuracy; savings grow with CR."""
    import prism_jax as pj
    from prism_jax import models
    from prism_jax.checkpoints import hf
    from prism_jax.data import tfds_builders

    model = models.with_classifier(pj.load_pretrained(hf_models("bert")[1]), 2, seed=3)
    directory = hf.save_pretrained(model, tmp_path / "clf")
    code = cli.main(
        [
            "eval",
            "--model",
            str(directory),
            "--limit",
            "12",
            "--max-length",
            "24",
            "--devices",
            "2",
            "--cr",
            "1,4",
            "--json",
        ]
    )
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    cr1, cr4 = r["rows"]
    texts, labels = tfds_builders.texts("fine_food_reviews", "test", 12)
    test = model.tokenizer(texts, max_length=24, pad_to=24)
    assert r["examples"] == 12 and r["metric"] == "accuracy"
    exact = pj.infer(model, test)["logits"]  # logits, not 12 argmaxes, hold the numerics
    got = pj.infer(model, test, mesh=pj.edge_mesh(2), plan=pj.Plan(cr=1))["logits"]
    np.testing.assert_allclose(got, exact, atol=1e-4, rtol=0)
    assert cr1["accuracy"] == float((exact.argmax(-1) == labels).mean())
    assert cr4["comm_reduction"] > cr1["comm_reduction"]
    assert cr4["compute_reduction"] > cr1["compute_reduction"] > 0
    assert cli.main(["eval", "--model", str(hf_models("bert")[1]), "--limit", "4"]) == 2
    assert "no classifier head" in capsys.readouterr().err


def test_cpu_is_forced_only_without_an_accelerator(monkeypatch):
    """`prism-jax` holds JAX to the CPU only on a host with no accelerator plugin, and never
    overrides the user's JAX_PLATFORMS."""
    import prism_jax.cli as cli_module

    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored afterwards
    for installed, user, want in [
        (False, None, "cpu"),
        (True, None, None),
        (False, "cuda", "cuda"),
    ]:
        if user is None:
            monkeypatch.delenv("JAX_PLATFORMS", raising=False)
        else:
            monkeypatch.setenv("JAX_PLATFORMS", user)
        monkeypatch.setattr(cli_module, "accelerator_installed", lambda v=installed: v)
        cli_module.emulate_devices(2)
        assert os.environ.get("JAX_PLATFORMS") == want


def test_edge_mesh_emulates_on_the_cpu_when_the_accelerator_has_too_few(monkeypatch):
    import jax

    cpus = jax.devices("cpu")

    class Gpu:
        platform = "gpu"

    real = jax.devices
    monkeypatch.setattr(jax, "devices", lambda backend=None: real(backend) if backend else [Gpu()])
    mesh = pj.edge_mesh(2)
    assert list(mesh.devices) == cpus[:2]


@pytest.mark.parametrize("compressor", ["paper", "prism+"])
def test_eval_and_cost_json_rows_name_the_whole_plan(compressor, hf_models, capsys):
    """A prism+ row is told from a paper row: every JSON row holds every field of its plan."""
    import dataclasses

    from prism_jax.cli.parser import build_parser, plan_of

    bert = str(hf_models("bert_cls")[1])
    common = ["--devices", "2", "--compressor", compressor, "--json"]
    argv = ["eval", "--model", bert, "--limit", "2", "--max-length", "8", "--cr", "1,2"]
    code, out, err = run(capsys, *argv, *common)
    assert code == 0, err
    rows = json.loads(out)["rows"]
    args = build_parser().parse_args([*argv, *common])
    for row, cr in zip(rows, (1, 2), strict=True):
        want = plan_of(args, cr).for_model(pj.load_pretrained(bert).config)
        assert row["plan"] == dataclasses.asdict(want)
    assert rows[1]["plan"]["grouping"] == ("kmeans" if compressor == "prism+" else "segments")
    code, out, err = run(capsys, "cost", "--model", bert, "--seq-len", "8", "--cr", "2", *common)
    assert code == 0, err
    plan = json.loads(out)["plan"]
    assert set(plan) == {f.name for f in dataclasses.fields(pj.Plan)}
    assert (plan["salient"], plan["value_tilt"]) == (
        (1, True) if compressor == "prism+" else (0, False)
    )


def _fresh_process(argv, stdout, tmp_path):
    """`prism-jax argv` in a new process (a real stdout, closed or full) with this checkout."""
    from pathlib import Path

    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "XLA_FLAGS": FAST_COMPILE,
           "PYTHONPATH": str(Path(__file__).parents[1]), "HOME": str(tmp_path)}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "prism_jax.cli", *argv],
        stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, timeout=180,
    )  # fmt: skip


def test_closed_or_full_stdout_is_one_line_or_a_quiet_exit(hf_models, tmp_path):
    """`prism-jax ... | head -c 1` (the reader gone: a quiet exit, as Unix tools make) and
    `prism-jax ... > /dev/full` (one line, exit 2): no traceback either way, streamed or not."""
    from prism_jax import cli

    infer = ["infer", "--model", str(hf_models("bert_cls")[1]), "--devices", "1", "--text",
             "good tea", "--json"]  # fmt: skip
    generate = ["generate", "--model", str(hf_models("llama_lm")[1]), "--devices", "1",
                "--prompt", "good tea", "--max-new-tokens", "3"]  # fmt: skip
    with open("/dev/full", "w") as full:
        done = _fresh_process(infer, full, tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr == "prism-jax infer: error: cannot write: No space left on device\n"
    for argv in (infer, generate):  # generate streams its text as it comes
        read, write = os.pipe()
        os.close(read)  # nobody reads: the first write fails with EPIPE
        try:
            done = _fresh_process(argv, write, tmp_path)
        finally:
            os.close(write)
        assert done.returncode == cli.EXIT_BROKEN_PIPE and done.stderr == "", done.stderr


def test_infer_saves_to_exactly_the_path_given(hf_models, tmp_path, capsys):
    target = tmp_path / "x.dat"
    argv = ["infer", "--model", str(hf_models("bert_cls")[1]), "--devices", "2", "--text", "a"]
    code, out, err = run(capsys, *argv, "--save", str(target), "--json")
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["x.dat"]  # not x.dat.npz
    with np.load(target) as saved:
        assert saved["logits"].shape == (1, 3)  # the tiny classifier has 3 labels


def test_cost_takes_a_gguf_file_as_every_other_command_does(tmp_path, capsys):
    """`cost --model x.gguf` costs the model its metadata describes: as its converted folder."""
    from prism_jax.checkpoints import hf
    from tests import tiny_gguf

    source = tiny_gguf.build(tmp_path)
    hf.convert_gguf(source, tmp_path / "converted")
    shape = ["--seq-len", "12", "--devices", "3", "--cr", "2", "--json"]
    code, out, err = run(capsys, "cost", "--model", str(source), *shape)
    assert code == 0, err
    from_gguf = json.loads(out)
    code, out, err = run(capsys, "cost", "--model", str(tmp_path / "converted"), *shape)
    from_folder = json.loads(out)
    assert from_gguf["model"] == str(source) and from_gguf["bytes_sent"] > 0
    assert {k: v for k, v in from_gguf.items() if k != "model"} == {
        k: v for k, v in from_folder.items() if k != "model"
    }
