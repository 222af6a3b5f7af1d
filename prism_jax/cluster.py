"""Real edge clusters: one OS process per node, joined by `jax.distributed` (gloo over TCP).

Each process owns one CPU device; the `"edge"` mesh spans the processes and `pj.infer` runs
unchanged on it. Failures end in bounded time: forming the cluster has a deadline, a watchdog
ends a node whose run outlasts its timeout, and JAX's heartbeats notice a dead peer.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from prism_jax.errors import PrismError

# Test hook: a node whose rank is named here kills itself once the cluster has formed.
DIE_AFTER_JOIN = "PRISM_JAX_TEST_DIE_AFTER_JOIN"


def initialize(
    rank: int, nodes: int, coordinator: str, *, bind: str = "127.0.0.1", timeout_s: float = 60
) -> None:
    """Join (rank 0: host) the cluster of `nodes` processes at `coordinator` (HOST:PORT).

    The coordinator binds to `bind` (loopback unless told otherwise).
    """
    import jax

    if nodes < 1 or not 0 <= rank < nodes:
        raise PrismError(f"rank must be in [0, {nodes}), got {rank}")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise PrismError(f"coordinator must be HOST:PORT, got {coordinator!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=nodes,
            process_id=rank,
            coordinator_bind_address=f"{bind}:{port}" if rank == 0 else None,
            initialization_timeout=int(timeout_s),
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
    from jax.experimental import multihost_utils

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


def watchdog(rank: int, timeout_s: float) -> threading.Timer:
    """End this process (exit 3) with a clear line if it is still running after `timeout_s`."""

    def expire():
        print(
            f"prism-jax node {rank}: error: no result within {timeout_s:g} s (a peer died or "
            "never joined?)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(3)

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    return timer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nodes: int, command: list[str], *, timeout_s: float, port: int | None = None) -> int:
    """Start `nodes` local node processes running `command`; rank 0's output is shown.

    Returns 0 when every node succeeds; otherwise ends the others and returns 1, naming the
    node that failed first.
    """
    coordinator = f"127.0.0.1:{port or free_port()}"
    procs, logs = [], []
    for rank in range(nodes):
        argv = [
            sys.executable,
            "-m",
            "prism_jax.cli",
            "node",
            "--rank",
            str(rank),
            "--nodes",
            str(nodes),
            "--coordinator",
            coordinator,
            "--timeout",
            str(timeout_s),
            *command,
        ]
        logs.append(tempfile.TemporaryFile("w+"))  # a file, not a pipe: it never fills up
        procs.append(
            subprocess.Popen(
                argv, stdout=None if rank == 0 else subprocess.DEVNULL, stderr=logs[-1], text=True
            )
        )
    deadline = time.monotonic() + timeout_s + 30
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            rank = failed[0]
            _end(procs)
            logs[rank].seek(0)
            last = [line for line in logs[rank].read().splitlines() if "error" in line.lower()]
            reason = last[-1] if last else f"exit code {codes[rank]}"
            print(f"prism-jax launch: error: node {rank} failed: {reason}", file=sys.stderr)
            return 1
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.05)
    _end(procs)
    print(f"prism-jax launch: error: no result within {timeout_s:g} s", file=sys.stderr)
    return 1


def _end(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()
