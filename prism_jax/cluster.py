"""Real edge clusters: one OS process per node, joined by `jax.distributed` (gloo over TCP).

Each process owns one CPU device; the `"edge"` mesh spans the processes and `pj.infer` runs
unchanged on it. Failures end in bounded time: forming the cluster has a deadline, a watchdog
ends a node whose run outlasts its timeout, and JAX's heartbeats notice a dead peer. Before JAX
starts, `handshake` checks the port, the address and every node's rank and node count, which
the runtime would crash on. `pj.infer` and the evaluation run across nodes; generation not yet
(its decode keeps the last device's shard, which other processes do not hold).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from prism_jax import handshake, stream
from prism_jax.errors import PrismError

# Test hook: a node whose rank is named here kills itself once the cluster has formed.
DIE_AFTER_JOIN = "PRISM_JAX_TEST_DIE_AFTER_JOIN"


def initialize(
    rank: int, nodes: int, coordinator: str, *, bind: str = "127.0.0.1", timeout_s: float = 60
) -> None:
    """Join (rank 0: host) the cluster of `nodes` processes at `coordinator` (HOST:PORT).

    The coordinator binds to `bind` (loopback unless told otherwise). Before JAX starts, node
    0 takes the port itself and every other node says hello there with its rank and node
    count: a port in use, an address that is not this machine's, two nodes with one rank or
    nodes told different node counts are each one `PrismError` naming the cause (the runtime
    would crash or wait out the timeout instead).
    """

    if nodes < 1 or not 0 <= rank < nodes:
        raise PrismError(f"rank must be in [0, {nodes}), got {rank}")
    host, port = handshake.coordinator_address(coordinator)
    deadline = time.monotonic() + timeout_s
    late = f"node {rank}: the cluster of {nodes} nodes at {coordinator} did not form within "
    late += f"{timeout_s:g} s"
    if rank == 0:
        try:
            server = handshake.take_port(bind, port)
        except PrismError as e:
            raise PrismError(f"node 0: {e}") from None
        handshake.welcome(server, nodes, deadline, late)
    else:
        handshake.hello((host, port), rank, nodes, deadline, late)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=nodes,
            process_id=rank,
            coordinator_bind_address=f"{bind}:{port}" if rank == 0 else None,
            initialization_timeout=max(int(deadline - time.monotonic()), 1),
            heartbeat_timeout_seconds=int(timeout_s),
        )
    except Exception as e:  # noqa: BLE001 - the runtime raises bare XlaRuntimeErrors
        raise PrismError(
            f"node {rank}: the cluster of {nodes} nodes at {coordinator} did not "
            f"form within {timeout_s:g} s ({type(e).__name__})"
        ) from None
    if jax.device_count() != nodes or jax.local_device_count() != 1:
        raise PrismError(
            f"node {rank}: expected one device per node, {nodes} in all; got "
            f"{jax.local_device_count()} here, {jax.device_count()} in all"
        )
    if os.environ.get(DIE_AFTER_JOIN) == str(rank):
        os.kill(os.getpid(), signal.SIGKILL)


def check_consistent(rank: int, settings: dict) -> None:
    """Every node must run the same command: compare each node's settings with node 0's."""

    text = json.dumps(settings, sort_keys=True).encode()
    if len(text) > 4000:  # long inputs: compare a digest of them
        text = json.dumps({"sha256": hashlib.sha256(text).hexdigest()}).encode()
    row = np.zeros(4096, np.uint8)
    row[: len(text)] = np.frombuffer(text, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(row[None], tiled=True))
    decoded = [json.loads(bytes(r).rstrip(b"\0")) for r in every]
    differ = []
    for other, theirs in enumerate(decoded[1:], start=1):
        keys = sorted(
            k for k in set(theirs) | set(decoded[0]) if theirs.get(k) != decoded[0].get(k)
        )
        if keys:
            differ.append(f"node {other} differs from node 0 in {', '.join(keys)}")
    if differ:
        raise PrismError(f"node {rank}: inconsistent arguments across nodes: {'; '.join(differ)}")


def keep_stdout_for_results():
    """Point file descriptor 1 at stderr, so that what the runtime (gloo, XLA) prints from C++
    cannot mix with the result, and return a text file on the original stdout for the result."""
    sys.stdout.flush()
    original = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(original, "w", closefd=True)


@contextlib.contextmanager
def fail_fast(rank: int, nodes: int, *, beat_s: float = 0.5, stale_s: float = 5.0):
    """While the body runs, a peer that dies ends this node within seconds: one line naming
    it on stderr and exit code 3, instead of a traceback and a wait for the runtime's
    heartbeat timeout. Peers stamp a counter in the coordination service every `beat_s`; one
    whose stamp stands still for `stale_s`, a failed collective, or an exchange of the stream
    (`stream.lost`) that lost its peer, means a lost peer."""
    done = threading.Event()
    thread = threading.Thread(
        target=_watch_peers, args=(rank, nodes, beat_s, stale_s, done), daemon=True
    )
    thread.start()
    try:
        yield
    except PrismError:
        raise
    except Exception as e:  # noqa: BLE001 - the runtime raises bare XlaRuntimeErrors
        if stream.lost() is not None:  # the stream's own error, inside the runtime's
            _lost(rank, stream.lost())
        text = " ".join(str(e).split())
        if "gloo" not in text.lower() and "distributed" not in text.lower():
            raise
        _lost(rank, f"a peer ({type(e).__name__}: {text[:160]})")
    finally:
        done.set()


def _watch_peers(rank: int, nodes: int, beat_s: float, stale_s: float, done) -> None:
    from jax._src import distributed  # the client of the running jax.distributed cluster

    client = distributed.global_state.client
    seen = {r: (None, time.monotonic()) for r in range(nodes) if r != rank}
    count = 0
    while not done.wait(beat_s):
        count += 1
        try:
            client.key_value_set(f"prism_jax/alive/{rank}", str(count), allow_overwrite=True)
            for r, (value, since) in seen.items():
                now = _stamp(client, r)
                if now != value:
                    seen[r] = (now, time.monotonic())
                elif time.monotonic() - since > stale_s and not done.is_set():
                    _lost(rank, f"node {r} (silent for {stale_s:g} s)")
        except Exception:  # noqa: BLE001 - the coordination service itself is gone
            if not done.is_set():
                _lost(rank, "node 0 (the coordinator)")


def _stamp(client, rank: int) -> str | None:
    try:
        return client.key_value_try_get(f"prism_jax/alive/{rank}")
    except Exception as e:  # noqa: BLE001 - NOT_FOUND until the peer's first beat
        if "not_found" in str(e).lower().replace(" ", "_"):
            return None
        raise


def _lost(rank: int, who: str) -> None:
    print(f"prism-jax node {rank}: error: lost {who} during the run", file=sys.stderr, flush=True)
    if rank == 0:  # the coordinator leaves last: its exit would abort the others' runtime
        time.sleep(1.5)
    os._exit(3)  # skip atexit: jax.distributed's shutdown would wait for the dead peer


def watchdog(rank: int, timeout_s: float, *, grace_s: float = 0) -> threading.Timer:
    """End this process (exit 3) with a clear line if it is still running after `timeout_s`
    (and `grace_s` more, for a more precise report of the same deadline to come first)."""

    def expire():
        print(
            f"prism-jax node {rank}: error: no result within {timeout_s:g} s (a peer died or "
            "never joined?)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(3)

    timer = threading.Timer(timeout_s + grace_s, expire)
    timer.daemon = True
    timer.start()
    return timer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    nodes: int,
    command: list[str],
    *,
    timeout_s: float,
    port: int | None = None,
    deadline: bool = True,
) -> int:
    """Start `nodes` local node processes running `command`; rank 0's output is shown.

    Returns 0 when every node succeeds; otherwise ends the others and returns the first failed
    node's exit code where it is a usage error (2) or a lost peer (3: also a node ended by a
    signal), else 1, naming the node. SIGTERM (or Ctrl-C) to the launcher ends every node too.
    """
    if port is not None:
        handshake.take_port(
            "127.0.0.1", port
        ).close()  # in use: one line now, before any node starts
    coordinator = f"127.0.0.1:{port or free_port()}"
    procs, logs = [], []

    def stop(signum, frame):
        _end(procs)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        for rank in range(nodes):
            logs.append(tempfile.TemporaryFile("w+"))  # a file, not a pipe: it never fills up
            procs.append(
                subprocess.Popen(
                    _node_argv(rank, nodes, coordinator, timeout_s, command),
                    stdout=None if rank == 0 else subprocess.DEVNULL,
                    stderr=logs[-1],
                    text=True,
                )
            )
        return _wait(procs, logs, timeout_s if deadline else math.inf)  # inf: a server
    finally:
        _end(procs)
        signal.signal(signal.SIGTERM, previous)


def _node_argv(rank: int, nodes: int, coordinator: str, timeout_s: float, command: list[str]):
    return [
        sys.executable, "-m", "prism_jax.cli", "node", "--rank", str(rank), "--nodes",
        str(nodes), "--coordinator", coordinator, "--timeout", str(timeout_s), *command,
    ]  # fmt: skip


def _wait(procs, logs, timeout_s: float) -> int:
    """Poll the nodes until all succeed, one fails, or the deadline passes."""
    deadline = time.monotonic() + timeout_s + 30
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            rank = min(failed, key=lambda r: (codes[r] > 0, r))  # one killed, if any
            return _report(rank, codes[rank], logs[rank])
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.05)
    print(f"prism-jax launch: error: no result within {timeout_s:g} s", file=sys.stderr)
    return 1


def _report(rank: int, code: int, log) -> int:
    """One line on the failed node; the launcher's exit code: a node ended by a signal is a
    lost node (3), a node's usage error (2) or lost peer (3) is passed on, anything else 1."""
    if code < 0:
        names = {int(s): s.name for s in signal.Signals}
        reason = f"lost: ended by signal {names.get(-code, -code)}"
    else:
        log.seek(0)
        last = [line for line in log.read().splitlines() if "error" in line.lower()]
        reason = last[-1] if last else f"exit code {code}"
    print(f"prism-jax launch: error: node {rank} failed: {reason}", file=sys.stderr)
    return 3 if code < 0 else code if code in (2, 3) else 1


def _end(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()
