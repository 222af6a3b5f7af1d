"""The testbed's network: node namespaces, tbf-limited uplinks, one process each.

Shared by `edge_testbed.py` and `overlap_probe.py`. Each node is one OS process in its own
Linux network namespace, rate-limited on its uplink with `tc qdisc tbf` whose burst is about
one millisecond of the line rate (`burst_bytes`). The nodes are joined either by a bridge
(`network`) or by the delay relay (`relay_network`, `testbed_relay.py`: one TUN device per
node, every packet held for the one-way delay), each in a namespace of its own, so the host's
network is never touched. A node may run under a CPU quota (`cpu_groups`: a cgroup v1 per
node). Namespaces and cgroups are torn down even when a run fails. Needs root and iproute2
(`usable`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBNET = "10.213.0"  # node i is SUBNET.(i + 1); node 0 hosts the coordinator
BRIDGE_NS = "prism-bridge"
ROUTER_NS = "prism-router"
CGROUP = Path("/sys/fs/cgroup/cpu")  # cgroup v1's cpu controller
PERIOD_US = 10_000  # 10 ms: a throttled node waits at most this long, not 100 ms


def usable() -> bool:
    """Whether this process may build namespaces: root, with `ip` and `tc` on the PATH."""
    return os.geteuid() == 0 and bool(shutil.which("ip")) and bool(shutil.which("tc"))


def burst_bytes(rate_mbit: int) -> int:
    """tbf's bucket: about one millisecond at the line rate, at least one 1,600-byte frame."""
    return max(1600, rate_mbit * 1_000_000 // 8 // 1000)


def quota_us(nodes: int, cores: int, reserve: float = 0.0) -> int:
    """CFS quota per period of one node: the machine's `cores` less `reserve` (for the link's
    emulation, which runs outside the nodes' groups) shared out, at most one core each (N = 2
    on 2 cores: a core; N = 4: half; N = 8: a quarter; reserve 0.2: 0.9, 0.45, 0.225)."""
    if nodes < 1 or cores < 1 or not 0 <= reserve < cores:
        raise ValueError(f"nodes and cores must be >= 1 and reserve in [0, cores), got "
                         f"{nodes}, {cores} and {reserve}")  # fmt: skip
    quota = min(PERIOD_US, round(PERIOD_US * (cores - reserve)) // nodes)
    if quota < 1000:  # the kernel's least cpu.cfs_quota_us
        raise ValueError(f"a reserve of {reserve} cores leaves {nodes} nodes {quota} us each "
                         f"of every {PERIOD_US} us: the least quota is 1000 us")  # fmt: skip
    return quota


STAT_FD = "PRISM_TESTBED_CPU_STAT"  # a node's open cpu.stat of its group (its namespace's
# /sys hides the cgroup file system)


def throttled_s() -> float:
    """Seconds this node's CPU group has been held back by its quota so far (0 outside one)."""
    fd = os.environ.get(STAT_FD)
    if fd is None:
        return 0.0
    fields = dict(line.split() for line in os.pread(int(fd), 4096, 0).decode().splitlines())
    if "throttled_time" not in fields:
        raise RuntimeError("cpu.stat has no throttled_time: the testbed needs cgroup v1's cpu")
    return int(fields["throttled_time"]) / 1e9


@contextlib.contextmanager
def cpu_groups(nodes: int, quota: int):
    """One cgroup (v1, cpu) per node limited to `quota` microseconds per `PERIOD_US`; yields
    their folders (a process joins by writing its pid to `cgroup.procs`). Removed at exit,
    a failed run's included."""
    groups = [CGROUP / f"prism-n{i}" for i in range(nodes)]
    _remove_groups(groups)  # left behind by a run that was killed
    try:
        for g in groups:
            g.mkdir()
            (g / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (g / "cpu.cfs_quota_us").write_text(str(quota))
        yield groups
    finally:
        _remove_groups(groups)


def _remove_groups(groups: list[Path]) -> None:
    for g in groups:
        if not g.exists():
            continue
        for pid in (g / "cgroup.procs").read_text().split():  # a straggler of ours: out first
            with contextlib.suppress(OSError):
                (CGROUP / "cgroup.procs").write_text(pid)
        for _ in range(50):
            try:
                g.rmdir()
                break
            except OSError:  # its last process is still exiting
                time.sleep(0.1)


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


@contextlib.contextmanager
def relay_network(nodes: int, link: dict):
    """N node namespaces joined by the delay relay (`testbed_relay.py`, in a router namespace).
    `link` holds the paths of the relay's control, ack, ready and stats files and the first
    link ({"rate_mbit", "delay_ms"}); the link is changed later with `testbed_relay.set_link`.
    Yields the namespaces; the relay's statistics are in `link["stats"]` afterwards."""
    import testbed_relay

    names = [f"prism-n{i}" for i in range(nodes)]
    host = socket.gethostname()
    _remove([*names, ROUTER_NS])
    for key in ("control", "ack", "ready", "stats"):
        Path(link[key]).unlink(missing_ok=True)
    relay = None
    try:
        sh(f"ip netns add {ROUTER_NS}")
        for i, ns in enumerate(names):
            sh(f"ip netns add {ns}")
            Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)  # see `network`
            Path(f"/etc/netns/{ns}/hosts").write_text(
                f"127.0.0.1 localhost\n{SUBNET}.{i + 1} {host}\n"
            )
        flags = [f"--{k}={link[k]}" for k in ("control", "ack", "ready", "stats")]
        command = ["ip", "netns", "exec", ROUTER_NS, sys.executable, testbed_relay.__file__]
        relay = subprocess.Popen([*command, *flags, f"--nodes={nodes}", f"--subnet={SUBNET}"])
        _wait_for(Path(link["ready"]), relay)
        for i, ns in enumerate(names):
            sh(f"ip -n {ROUTER_NS} link set prtun{i} netns {ns}")
            sh(f"ip -n {ns} link set prtun{i} name eth0")
            sh(f"ip -n {ns} addr add {SUBNET}.{i + 1}/24 dev eth0")
            sh(f"ip -n {ns} link set eth0 up")
            sh(f"ip -n {ns} link set lo up")
            # a layer's message after a pause of compute goes out at the window TCP had, not
            # from a restarted slow start (Linux's default restarts it after an idle RTO)
            sh(f"ip netns exec {ns} sysctl -qw net.ipv4.tcp_slow_start_after_idle=0")
        testbed_relay.set_link(Path(link["control"]), Path(link["ack"]), 0,
                               link["rate_mbit"], link["delay_ms"])  # fmt: skip
        yield names
    finally:
        if relay is not None:
            relay.terminate()
            relay.wait(timeout=30)
        _remove([*names, ROUTER_NS])


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the relay did not start (exit code {proc.poll()})")
        time.sleep(0.05)


def _remove(namespaces: list[str]) -> None:
    for ns in namespaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def run_nodes(script: str, nodes: int, rate: int | None, argv: list[str], timeout: float,
              *, net=None, groups: list[Path] | None = None):  # fmt: skip
    """Run `script --node --rank i ARGV --result FILE` in each of `nodes` namespaces of
    `net` (default `network(nodes, rate)`), one CPU device each, node i in cgroup
    `groups[i]` if given; return what node 0 wrote to FILE (JSON)."""
    result = Path(f"/tmp/prism-testbed-{os.getpid()}.json")
    result.unlink(missing_ok=True)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}:{ROOT / 'experiments'}"}  # fmt: skip
    with contextlib.ExitStack() as opened, net or network(nodes, rate) as names:
        stats = []  # each node's cpu.stat, open for it to read (`throttled_s`)
        for g in groups or []:
            stats.append(os.open(g / "cpu.stat", os.O_RDONLY))
            opened.callback(os.close, stats[-1])
        procs = []
        for i, ns in enumerate(names):
            command = ["ip", "netns", "exec", ns, sys.executable, script, "--node", "--rank"]
            command += [str(i), *argv, "--result", str(result)]
            join = _joiner(groups[i]) if groups else None
            fds = stats[i : i + 1]
            own = {**env, STAT_FD: str(fds[0])} if fds else env
            procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, preexec_fn=join,
                                          stderr=subprocess.PIPE, text=True, pass_fds=fds,
                                          env=own))  # fmt: skip
        try:
            errors = [p.communicate(timeout=timeout + 60)[1] for p in procs]
        finally:
            for p in procs:  # one failed or timed out: the others would wait on it
                if p.poll() is None:
                    p.kill()
                    p.wait()
    if any(p.returncode for p in procs):
        bad = next(i for i, p in enumerate(procs) if p.returncode)
        raise RuntimeError(f"node {bad} failed:\n{errors[bad][-3000:]}")
    rows = json.loads(result.read_text())
    result.unlink()
    return rows


def _joiner(group: Path):
    """preexec_fn: the child joins `group` before it runs anything."""
    return lambda: (group / "cgroup.procs").write_text(str(os.getpid()))
