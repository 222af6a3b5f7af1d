"""Real multi-process clusters on loopback: same outputs as emulated devices; bounded failures."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import prism_jax as pj
from prism_jax import cli, cluster, handshake, stream
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
    ("name", "nodes", "strategy", "cr", "transport"),
    [
        ("bert_cls", 3, "prism", 3, "all_gather"),
        pytest.param("gpt2_lm", 4, "prism", 2, "all_gather", marks=pytest.mark.slow),
        ("gpt2_lm", 2, "voltage", 1, "all_gather"),
        ("gpt2_lm", 4, "prism", 2, "stream"),  # causal: forward only, two blocks relayed
        ("bert_cls", 2, "prism", 3, "stream"),  # an encoder: both ways
    ],
)
def test_cluster_matches_emulated_devices(name, nodes, strategy, cr, transport, hf_models,
                                          tmp_path):  # fmt: skip
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
        "--transport",
        transport,
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
    for rank, cause in enumerate(["no word from node 2", "node 0 still waits for other nodes"]):
        assert procs[rank].returncode == 2, errors[rank][-500:]
        [line] = errors[rank].strip().splitlines()
        assert line.startswith(f"prism-jax node: error: node {rank}: the cluster of 3 nodes at ")
        assert line.endswith(f" did not form within 10 s ({cause})")


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


def test_node_killed_mid_stream(hf_models):
    """A node that dies inside the stream's exchange: the others, waiting for its block, end
    at once (not at the stream's 600 s timeout, nor with a traceback and a runtime abort)."""
    start = time.monotonic()
    port = cluster.free_port()
    procs = [
        subprocess.Popen(
            f"{sys.executable} -m prism_jax.cli node --rank {r} --nodes 3 --coordinator "
            f"127.0.0.1:{port} --timeout 60 infer --model {hf_models('bert_cls')[1]} --cr 3 "
            "--transport stream".split()
            + ["--text", TEXT],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(**{stream.DIE_MID_RUN: "1"}),
        )
        for r in range(3)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert procs[1].returncode == -9  # the node that was killed, at its second exchange
    assert time.monotonic() - start < 40  # the watchdog would take 60 s
    for rank in (0, 2):  # the survivors: an encoder waits for every other node's block
        assert procs[rank].returncode == 3, errors[rank][-500:]
        said = [line for line in errors[rank].splitlines() if not line.startswith("[Gloo]")]
        assert said == [
            f"prism-jax node {rank}: error: lost node 1 (its stream connection ended: closed) "
            "during the run"
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
    assert done.returncode == 3  # a lost node, as a survivor reports it
    assert done.stderr.strip().splitlines() == [
        "prism-jax launch: error: node 1 failed: lost: ended by signal SIGKILL"
    ]


def test_inconsistent_arguments_are_named(hf_models):
    procs = _nodes(hf_models("gpt2_lm")[1], 2, [0, 1], timeout=30, crs=[2, 4])
    errors = [p.communicate(timeout=90)[1] for p in procs]
    assert all(p.returncode == 2 for p in procs)
    assert "node 1 differs from node 0 in cr" in errors[0]


def test_node_usage_errors(capsys, hf_models):
    assert cli.main(["launch", "--nodes", "2", "--", "demo"]) == 2
    assert "demo does not run across nodes" in capsys.readouterr().err
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


def _node(directory, rank, nodes, port, *options, timeout=20):
    """One `prism-jax node` running a small `infer`, its stderr piped."""
    argv = [sys.executable, "-m", "prism_jax.cli", "node", "--rank", str(rank), "--nodes",
            str(nodes), "--coordinator", f"127.0.0.1:{port}", "--timeout", str(timeout),
            *options, "infer", "--model", str(directory), "--text", TEXT]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_env())  # fmt: skip


def _one_line(proc) -> str:
    """The node's only line on stderr; it ended with exit code 2 (before JAX started)."""
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 2, err[-2000:]
    [line] = err.strip().splitlines()
    return line


def test_coordinator_port_in_use_is_one_line(hf_models):
    """The runtime crashed (SIGSEGV) on a taken port; node 0 now takes it first."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _one_line(_node(hf_models("gpt2_lm")[1], 0, 2, port))
    assert line == (
        f"prism-jax node: error: node 0: port {port} on 127.0.0.1 is already in use (by "
        "another program, or another node started with rank 0)"
    )


def test_bind_address_of_another_machine_is_one_line(hf_models):
    node = _node(hf_models("gpt2_lm")[1], 0, 2, cluster.free_port(), "--bind", "192.0.2.1")
    assert _one_line(node) == (
        "prism-jax node: error: node 0: bind address 192.0.2.1 is not an address of this machine"
    )


@pytest.mark.parametrize(
    ("ranks", "nodes", "cause"),
    [
        ([0, 1], [2, 3], "node 1 was started with 3 nodes, node 0 with 2: give every node the "
                         "same --nodes"),
        ([0, 1, 1], [3, 3, 3], "two nodes were started with rank 1: give each node its own "
                               "--rank"),
    ],
)  # fmt: skip
def test_nodes_that_disagree_name_the_cause(ranks, nodes, cause, hf_models):
    """Mismatched --nodes aborted one node and blamed a lost peer on the other; one rank
    twice crashed. The handshake before JAX starts tells every node the cause."""
    port = cluster.free_port()
    directory = hf_models("gpt2_lm")[1]
    procs = [_node(directory, r, n, port) for r, n in zip(ranks, nodes, strict=True)]
    for rank, proc in zip(ranks, procs, strict=True):
        assert _one_line(proc) == f"prism-jax node: error: node {rank}: {cause}"


def test_a_node_at_a_port_that_is_no_node_0_is_refused():
    """A node arriving at a cluster that formed without it (the runtime's server answers)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def answer():
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"\x00\x00\x12\x04 not a handshake\n")

        threading.Thread(target=answer, daemon=True).start()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(pj.PrismError, match="answers, but not as a prism-jax node 0"):
            cluster.initialize(1, 2, address, timeout_s=10)
    with pytest.raises(pj.PrismError, match="coordinator host 'nohost.invalid' is not a host"):
        cluster.initialize(1, 2, "nohost.invalid:29500", timeout_s=10)


def test_launch_eval_matches_emulated_devices(hf_models, capsys):
    argv = ["eval", "--model", str(hf_models("bert_cls")[1]), "--limit", "4",
            "--max-length", "12", "--cr", "4", "--json"]  # fmt: skip
    done = _launch(2, 90, *argv)
    assert done.returncode == 0, done.stderr[-2000:]
    assert cli.main([*argv, "--devices", "2"]) == 0
    want = json.loads(capsys.readouterr().out)
    assert json.loads(done.stdout) == want
    assert [row["cr"] for row in want["rows"]] == [4] and want["devices"] == 2


def test_launch_generate_matches_emulated_devices(hf_models, capsys):
    """Across real processes the prefill is partitioned and the last node decodes; node 0
    prints the tokens it was sent, equal to the emulated devices' (a sink plan at CR = 3,
    sampled with one seed)."""
    argv = ["generate", "--model", str(hf_models("llama_lm")[1]), "--prompt", "a b c d e f g",
            "--max-new-tokens", "5", "--cr", "3", "--grouping", "tail", "--sink", "2",
            "--temperature", "1.0", "--seed", "7", "--json"]  # fmt: skip
    done = _launch(2, 90, *argv)
    assert done.returncode == 0, done.stderr[-2000:]
    assert cli.main([*argv, "--devices", "2"]) == 0
    want = json.loads(capsys.readouterr().out)
    got = json.loads(done.stdout)
    assert got["ids"] == want["ids"] and got["texts"] == want["texts"]
    assert got["new_tokens"] == want["new_tokens"] >= 2  # decoded, not only the prefill's
    assert got["prefill_bytes_per_device"] == want["prefill_bytes_per_device"] > 0
    assert got["cache_bytes"] == want["cache_bytes"] > 0


def test_handshake_takes_a_node_started_again():
    """A node that died during the hello and was started again is no second node of its rank."""
    server = handshake.take_port("127.0.0.1", 0)
    address = server.getsockname()[:2]
    deadline = time.monotonic() + 20
    with ThreadPoolExecutor(3) as pool:
        formed = pool.submit(handshake.welcome, server, 3, deadline, "late")
        with socket.create_connection(address) as dead:
            dead.sendall(b'{"prism_jax_node": 1, "rank": 1, "nodes": 3}\n')
            time.sleep(0.2)  # it dies waiting for the answer
        joined = [pool.submit(handshake.hello, address, r, 3, deadline, "late") for r in (1, 2)]
        for done in [*joined, formed]:
            assert done.result(timeout=30) is None
