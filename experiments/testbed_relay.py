"""The testbed's link: a userspace relay that holds every IP packet for the one-way delay.

This kernel has no `netem` qdisc, so the delay is added here. The relay (one process, run in
the router namespace by `testbed_net.relay_network`) opens one TUN device per node; each is
moved into its node's namespace as that node's `eth0` (the node's address, a tbf qdisc on it
for the rate, its `tx_bytes` the bytes the node put on the wire). Every packet the relay reads
from node i's device is written to the device of its destination node after `delay` seconds,
counted from when tbf let it leave: serialisation at the rate, then the propagation delay, as
on a real link. Packets wait in a heap of release times (`DelayLine`), never in a sleep each.

The link is set while the relay runs (`set_link`: node 0 writes the wish to a control file,
the relay applies the rate with `tc` and the delay, then acknowledges), so a cluster compiles
each program once and is timed under every link. At exit the relay writes its statistics
(packets, how late each left against its release time, its CPU seconds) to `--stats`.
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import json
import os
import resource
import select
import signal
import struct
import subprocess
import time
from pathlib import Path

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
POLL_S = 0.02  # how often the control file is looked at


class DelayLine:
    """Packets held until their release time, released in that order (ties: arrival order)."""

    def __init__(self):
        self._heap: list[tuple[float, int, int, bytes]] = []
        self._arrivals = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, release: float, dest: int, packet: bytes) -> None:
        heapq.heappush(self._heap, (release, self._arrivals, dest, packet))
        self._arrivals += 1

    def wait(self, now: float) -> float | None:
        """Seconds until the next release (0 when one is due), None when nothing waits."""
        return max(0.0, self._heap[0][0] - now) if self._heap else None

    def due(self, now: float) -> list[tuple[int, bytes, float]]:
        """(dest, packet, seconds late) of every packet whose release time has come."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            release, _, dest, packet = heapq.heappop(self._heap)
            out.append((dest, packet, now - release))
        return out


def destination(packet: bytes, subnet: bytes, nodes: int) -> int | None:
    """The node an IPv4 packet is addressed to (node i is SUBNET.(i + 1)); None otherwise."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[16:19] != subnet:
        return None
    node = packet[19] - 1
    return node if 0 <= node < nodes else None


def open_tun(name: str) -> int:
    """A TUN device `name` (IP packets, no packet-info header), non-blocking; its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def set_link(control: Path, ack: Path, seq: int, rate_mbit: int | None, delay_ms: float) -> None:
    """Ask the relay for a link (rate, one-way delay) and wait until it is applied."""
    tmp = control.with_suffix(".tmp")
    tmp.write_text(json.dumps({"seq": seq, "rate_mbit": rate_mbit, "delay_ms": delay_ms}))
    tmp.rename(control)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if json.loads(ack.read_text())["seq"] == seq:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(POLL_S / 2)
    raise RuntimeError(f"the relay did not apply link {seq} within 30 s")


def apply_rate(namespaces: list[str], rate_mbit: int | None, burst: int | None) -> None:
    """tbf at `rate_mbit` on each node's eth0 (None: no qdisc of ours, no limit)."""
    for ns in namespaces:
        base = ["ip", "netns", "exec", ns, "tc", "qdisc"]
        if rate_mbit:
            limit = f"rate {rate_mbit}mbit burst {burst} latency 100ms".split()
            subprocess.run([*base, "replace", "dev", "eth0", "root", "tbf", *limit], check=True)
        else:
            subprocess.run([*base, "del", "dev", "eth0", "root"], capture_output=True)


class Relay:
    def __init__(self, args):
        self.args = args
        self.fds = [open_tun(f"prtun{i}") for i in range(args.nodes)]
        self.subnet = bytes(int(x) for x in args.subnet.split("."))
        self.line, self.delay, self.mtime = DelayLine(), 0.0, None
        self.periods, self.wish, self.sched = [], None, None
        self.reset()

    def reset(self) -> None:
        """Statistics of one link period (from one `set_link` to the next)."""
        self.stats = {"packets": 0, "bytes": 0, "dropped": 0, "late_max_s": 0.0,
                      "late_sum_s": 0.0, "late_over_200us": 0, "held_max": 0}  # fmt: skip

    def control(self) -> None:
        try:
            mtime = os.stat(self.args.control).st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self.mtime:
            return
        self.mtime = mtime
        wish = json.loads(Path(self.args.control).read_text())
        rate = wish["rate_mbit"]
        burst = max(1600, rate * 1_000_000 // 8 // 1000) if rate else None  # testbed_net's
        apply_rate([f"prism-n{i}" for i in range(self.args.nodes)], rate, burst)
        self.delay = wish["delay_ms"] / 1000
        self.close_period()
        self.wish = wish
        tmp = Path(self.args.ack).with_suffix(".tmp")
        tmp.write_text(json.dumps({"seq": wish["seq"]}))
        tmp.rename(self.args.ack)

    def receive(self, fd: int, now: float) -> None:
        for _ in range(64):  # at most this many a turn, so no device starves the others
            try:
                packet = os.read(fd, 65536)
            except BlockingIOError:
                return
            dest = destination(packet, self.subnet, self.args.nodes)
            if dest is None:
                self.stats["dropped"] += 1
                continue
            self.line.push(now + self.delay, dest, packet)

    def release(self) -> None:
        for dest, packet, late in self.line.due(time.monotonic()):
            os.write(self.fds[dest], packet)
            s = self.stats
            s["packets"], s["bytes"] = s["packets"] + 1, s["bytes"] + len(packet)
            s["late_max_s"], s["late_sum_s"] = max(s["late_max_s"], late), s["late_sum_s"] + late
            s["late_over_200us"] += late > 2e-4

    def serve(self) -> None:
        Path(self.args.ready).write_text("ready")
        polled = 0.0
        while True:
            now = time.monotonic()
            if now - polled >= POLL_S:
                self.control()
                polled = now
            wait = self.line.wait(now)
            # select takes microseconds (epoll rounds its timeout up to whole milliseconds)
            readable, _, _ = select.select(
                self.fds, [], [], POLL_S if wait is None else min(POLL_S, wait)
            )
            now = time.monotonic()
            for fd in readable:
                self.receive(fd, now)
            self.stats["held_max"] = max(self.stats["held_max"], len(self.line))
            self.release()

    def close_period(self) -> None:
        if self.wish is not None:
            s = self.stats
            s["late_mean_s"] = s.pop("late_sum_s") / max(1, s["packets"])
            self.periods.append({"rate_mbit": self.wish["rate_mbit"],
                                 "delay_ms": self.wish["delay_ms"], **s})  # fmt: skip
        self.reset()

    def write_stats(self) -> None:
        self.close_period()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime
        record = {"cpu_s": cpu, "sched": self.sched, "periods": self.periods}
        Path(self.args.stats).write_text(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--control", "--ack", "--ready", "--stats", "--subnet"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--nodes", type=int, required=True)
    args = parser.parse_args()
    relay = Relay(args)
    try:  # forwarding on time matters more than the nodes' compute: a real-time thread
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        relay.sched = "SCHED_FIFO 10"
    except OSError:
        os.nice(-10)
        relay.sched = "nice -10"
    signal.signal(signal.SIGTERM, lambda *_: (relay.write_stats(), os._exit(0)))
    relay.serve()


if __name__ == "__main__":
    main()
