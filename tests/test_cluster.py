"""Real multi-process clusters on loopback: same outputs as emulated devices; bounded failures."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import prism_jax as pj
from prism_jax import cli, cluster
from tests.conftest import ATOL_MODEL, FAST_COMPILE

TEXT = "the tea was good and the food was very good but the box was bad again"


def _launch(nodes, timeout, *command, **env):
    """`prism-jax launch --nodes N --timeout S -- COMMAND` in a fresh process."""
    argv = [
        sys.executable,
        "-m",
        "prism_jax.cli",
        "launch",
        "--nodes",
        str(nodes),
        "--timeout",
        str(timeout),
        "--",
        *map(str, command),
    ]
    return subprocess.run(argv, capture_output=True, text=True, env=_env(**env), timeout=180)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device per node
    return {**env, "HF_HUB_OFFLINE": "1", "XLA_FLAGS": FAST_COMPILE, **extra}


@pytest.mark.parametrize(
    ("name", "nodes", "strategy", "cr"),
    [
        ("bert_cls", 3, "prism", 3),
        pytest.param("gpt2_lm", 4, "prism", 2, marks=pytest.mark.slow),  # 4 processes, 2 cores
        ("gpt2_lm", 2, "voltage", 1),
    ],
)
def test_cluster_matches_emulated_devices(name, nodes, strategy, cr, hf_models, tmp_path):
    directory = hf_models(name)[1]
    saved = tmp_path / "out.npz"
    done = _launch(
        nodes,
        90,
        "infer",
        "--model",
        directory,
        "--strategy",
        strategy,
        "--cr",
        cr,
        "--text",
        TEXT,
        "--save",
        saved,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"on {nodes} devices" in done.stdout  # node 0 printed the result
    model = pj.load_pretrained(directory)
    want = pj.infer(
        model,
        model.tokenizer([TEXT]),
        mesh=pj.edge_mesh(nodes),
        plan=pj.Plan(strategy=strategy, cr=cr),
    )
    with np.load(saved, allow_pickle=False) as got:
        assert set(got.files) == set(want)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=ATOL_MODEL, rtol=0)


def _nodes(directory, nodes, ranks, timeout, crs=None, **env):
    """Start the given ranks of a cluster on loopback, each running `infer` (rank r at crs[r])."""
    port = cluster.free_port()
    crs = crs or [2] * nodes
    return [
        subprocess.Popen(
            f"{sys.executable} -m prism_jax.cli node --rank {r} --nodes {nodes} --coordinator "
            f"127.0.0.1:{port} --timeout {timeout} infer --model {directory} --cr {crs[r]}".split()
            + ["--text", TEXT],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(**env),
        )
        for r in ranks
    ]


def test_node_that_never_starts(hf_models):
    start = time.monotonic()
    procs = _nodes(hf_models("gpt2_lm")[1], 3, [0, 1], timeout=10)  # rank 2 never comes
    errors = [p.communicate(timeout=90)[1] for p in procs]
    assert time.monotonic() - start < 60
    for p, err in zip(procs, errors, strict=True):
        assert p.returncode != 0
        assert "did not form within 10 s" in err or "no result within 10 s" in err, err[-500:]


def test_node_killed_mid_run(hf_models):
    """Survivors name the lost peer in one line and exit 3 well before their timeout."""
    start = time.monotonic()
    procs = _nodes(
        hf_models("gpt2_lm")[1], 3, [0, 1, 2], timeout=60, **{cluster.DIE_AFTER_JOIN: "1"}
    )
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert procs[1].returncode == -9  # the node that was killed
    assert time.monotonic() - start < 40  # the watchdog would take 60 s
    for rank in (0, 2):  # the survivors
        assert procs[rank].returncode == 3, errors[rank][-500:]
        assert errors[rank].strip().splitlines() == [
            f"prism-jax node {rank}: error: lost node 1 (silent for 5 s) during the run"
        ]


def test_launch_json_stdout_is_only_the_result(hf_models):
    done = _launch(2, 60, "infer", "--model", hf_models("gpt2_lm")[1], "--text", TEXT, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["devices"] == 2  # nothing but the JSON document


def test_launch_passes_on_a_nodes_usage_error(hf_models):
    done = _launch(2, 60, "infer", "--model", hf_models("gpt2_lm")[1], "--text", "x " * 80)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()  # whichever node reports first
    assert re.fullmatch(
        r"prism-jax launch: error: node [01] failed: prism-jax node: error: sequence of 80 "
        r"tokens is longer than the model's 64 positions",
        line,
    )


def test_sigterm_to_launch_ends_its_nodes(hf_models):
    argv = [sys.executable, "-m", "prism_jax.cli", "launch", "--nodes", "2", "--timeout", "60",
            "--", "infer", "--model", str(hf_models("gpt2_lm")[1]), "--text", TEXT]  # fmt: skip
    launcher = subprocess.Popen(argv, env=_env())
    deadline = time.monotonic() + 30
    children = []
    while time.monotonic() < deadline and len(children) < 2:
        children = _children(launcher.pid)
        time.sleep(0.1)
    assert len(children) == 2
    launcher.terminate()
    assert launcher.wait(timeout=30) == 128 + 15
    time.sleep(0.5)
    assert not [c for c in children if os.path.exists(f"/proc/{c}")]


def _children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    return [int(c) for c in open(path).read().split()] if os.path.exists(path) else []


def test_launch_reports_the_failed_node(hf_models, capsys):
    directory = hf_models("gpt2_lm")[1]
    done = _launch(
        2, 20, "infer", "--model", directory, "--text", TEXT, **{cluster.DIE_AFTER_JOIN: "1"}
    )
    assert done.returncode == 1
    assert "node 1 failed" in done.stderr


def test_inconsistent_arguments_are_named(hf_models):
    procs = _nodes(hf_models("gpt2_lm")[1], 2, [0, 1], timeout=30, crs=[2, 4])
    errors = [p.communicate(timeout=90)[1] for p in procs]
    assert all(p.returncode == 2 for p in procs)
    assert "node 1 differs from node 0 in cr" in errors[0]


def test_node_usage_errors(capsys, hf_models):
    assert cli.main(["launch", "--nodes", "2", "--", "demo"]) == 2
    assert "infer ... or cost" in capsys.readouterr().err
    directory = str(hf_models("bert")[1])
    assert (
        cli.main(
            [
                "launch",
                "--nodes",
                "2",
                "infer",
                "--model",
                directory,
                "--devices",
                "3",
                "--text",
                "x",
            ]
        )
        == 2
    )
    assert "--devices 3 differs from --nodes 2" in capsys.readouterr().err
