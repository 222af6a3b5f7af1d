"""The testbed's network: node namespaces on a bridge, tbf-limited uplinks, one process each.

Shared by `edge_testbed.py` and `overlap_probe.py`. Each node is one OS process in its own
Linux network namespace, joined to the others by a bridge (in a namespace of its own, so the
host's network is never touched) and rate-limited on its uplink with `tc qdisc tbf` whose
burst is about one millisecond of the line rate (`burst_bytes`). Namespaces are torn down
even when a run fails. Needs root and iproute2 (`usable`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBNET = "10.213.0"  # node i is SUBNET.(i + 1); node 0 hosts the coordinator
BRIDGE_NS = "prism-bridge"


def usable() -> bool:
    """Whether this process may build namespaces: root, with `ip` and `tc` on the PATH."""
    return os.geteuid() == 0 and bool(shutil.which("ip")) and bool(shutil.which("tc"))


def burst_bytes(rate_mbit: int) -> int:
    """tbf's bucket: about one millisecond at the line rate, at least one 1,600-byte frame."""
    return max(1600, rate_mbit * 1_000_000 // 8 // 1000)


def sh(command: str) -> None:
    """Run one iproute2 command line (words split on spaces), failing loudly."""
    subprocess.run(command.split(), check=True, capture_output=True)


@contextlib.contextmanager
def network(nodes: int, rate_mbit: int | None):
    """N node namespaces on a bridge; each uplink limited to `rate_mbit` (None: no limit)."""
    names = [f"prism-n{i}" for i in range(nodes)]
    host = socket.gethostname()
    _remove([*names, BRIDGE_NS])  # left behind by a run that was killed
    try:
        sh(f"ip netns add {BRIDGE_NS}")
        sh(f"ip -n {BRIDGE_NS} link add br0 type bridge")
        sh(f"ip -n {BRIDGE_NS} link set br0 up")
        for i, ns in enumerate(names):
            sh(f"ip netns add {ns}")
            # gloo finds its own address by resolving the hostname: inside the namespace it
            # must resolve to the node's address (`ip netns exec` mounts /etc/netns/NS/hosts).
            Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{ns}/hosts").write_text(
                f"127.0.0.1 localhost\n{SUBNET}.{i + 1} {host}\n"
            )
            sh(f"ip -n {ns} link add eth0 type veth peer name p{i} netns {BRIDGE_NS}")
            sh(f"ip -n {BRIDGE_NS} link set p{i} master br0 up")
            sh(f"ip -n {ns} addr add {SUBNET}.{i + 1}/24 dev eth0")
            sh(f"ip -n {ns} link set eth0 up")
            sh(f"ip -n {ns} link set lo up")
            if rate_mbit:
                sh(
                    f"ip netns exec {ns} tc qdisc add dev eth0 root tbf rate {rate_mbit}mbit "
                    f"burst {burst_bytes(rate_mbit)} latency 100ms"
                )
        yield names
    finally:
        _remove([*names, BRIDGE_NS])


def _remove(namespaces: list[str]) -> None:
    for ns in namespaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def run_nodes(script: str, nodes: int, rate: int | None, argv: list[str], timeout: float):
    """Run `script --node --rank i ARGV --result FILE` in each of `nodes` namespaces of
    `network(nodes, rate)`, one CPU device each; return what node 0 wrote to FILE (JSON)."""
    result = Path(f"/tmp/prism-testbed-{os.getpid()}.json")
    result.unlink(missing_ok=True)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}:{ROOT / 'experiments'}"}  # fmt: skip
    with network(nodes, rate) as names:
        procs = []
        for i, ns in enumerate(names):
            command = ["ip", "netns", "exec", ns, sys.executable, script, "--node", "--rank"]
            command += [str(i), *argv, "--result", str(result)]
            procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True, env=env))  # fmt: skip
        errors = [p.communicate(timeout=timeout + 60)[1] for p in procs]
    if any(p.returncode for p in procs):
        bad = next(i for i, p in enumerate(procs) if p.returncode)
        raise RuntimeError(f"node {bad} failed:\n{errors[bad][-3000:]}")
    rows = json.loads(result.read_text())
    result.unlink()
    return rows
