"""The edge testbed's parts: the delay relay's queue, the CPU quota's arithmetic, the latency
model (pure, CI), and a root-only smoke of the relay and the cgroups that runs in seconds."""

import os
import time
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


@pytest.fixture
def testbed(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import testbed_model
    import testbed_net
    import testbed_relay

    return testbed_net, testbed_relay, testbed_model


def test_delay_line_releases_by_time_then_arrival(testbed):
    _, relay, _ = testbed
    line = relay.DelayLine()
    assert line.wait(0.0) is None and line.due(10.0) == []
    line.push(1.005, 1, b"late")
    line.push(1.001, 0, b"first")
    line.push(1.001, 2, b"second")  # same release time: arrival order
    assert line.wait(1.0) == pytest.approx(0.001)
    assert line.due(1.0009) == []  # nothing before its time
    got = line.due(1.002)
    assert [(d, p) for d, p, _ in got] == [(0, b"first"), (2, b"second")]
    assert got[0][2] == pytest.approx(0.001)  # how late it left
    assert line.wait(1.002) == pytest.approx(0.003) and len(line) == 1
    assert [p for _, p, _ in line.due(2.0)] == [b"late"] and line.wait(2.0) is None


def test_packet_destination(testbed):
    _, relay, _ = testbed
    subnet = bytes([10, 213, 0])
    header = bytearray(20)
    header[0] = 0x45  # IPv4, 20-byte header
    header[16:20] = bytes([10, 213, 0, 3])
    assert relay.destination(bytes(header), subnet, 4) == 2
    assert relay.destination(bytes(header), subnet, 2) is None  # no node 2 at N = 2
    header[18] = 1  # another subnet
    assert relay.destination(bytes(header), subnet, 4) is None
    header[16:20], header[0] = bytes([10, 213, 0, 1]), 0x60  # IPv6
    assert relay.destination(bytes(header), subnet, 4) is None
    assert relay.destination(b"\x45\x00", subnet, 4) is None  # too short


def test_quota_shares_the_cores(testbed):
    net, _, _ = testbed
    assert net.PERIOD_US == 100_000
    assert [net.quota_us(n, 2) for n in (1, 2, 4, 8)] == [100_000, 100_000, 50_000, 25_000]
    assert net.quota_us(3, 2) == 66_666
    with pytest.raises(ValueError, match="nodes and cores"):
        net.quota_us(0, 2)


def _row(nodes, plan, latency, *, delay=0.0, rate=10, flops=100, sent=1000):
    single = plan == "single"
    return {"model": "m", "nodes": nodes, "plan": plan, "strategy": plan,
            "latency_s": latency, "layer_flops": flops, "closed_form_bytes_per_node": sent,
            "collectives": 0 if single else 4, "rate_mbit": None if single else rate,
            "delay_ms": None if single else delay}  # fmt: skip


def test_latency_model_fits_overhead_on_two_and_predicts_four(testbed):
    _, _, model = testbed
    # compute 0.5 s, 4 collectives, 1 ms each at 5 ms: (N-1) rounds of the delay each
    assert model.predict(0.5, nodes=4, collectives=4, bytes_per_node=1250, rate_mbit=1,
                         delay_ms=5, overhead_s=0.001) == pytest.approx(
        0.5 + 4 * 3 * 0.005 + 3 * 0.01 + 0.004)  # fmt: skip
    assert model.predict(0.5, nodes=2, collectives=4, bytes_per_node=1, rate_mbit=None,
                         delay_ms=0, overhead_s=0) == 0.5  # fmt: skip
    # N = 2: single 1 s, half the FLOPs; 2 ms overhead per collective on top of the model
    at2 = [_row(2, "single", 1.0), _row(2, "p", 0.5 + 0.0008 + 0.008, flops=50),
           _row(2, "p", 0.5 + 0.0008 + 0.008 + 0.02, flops=50, delay=5)]  # fmt: skip
    at4 = [_row(4, "single", 2.0), _row(4, "p", 1.0, flops=25, delay=5)]
    preds = model.predictions(at2 + at4)
    fitted = [p for p in preds if p["fitted"]]
    assert all(p["overhead_s"] == pytest.approx(0.002) for p in preds)
    assert all(p["error"] == pytest.approx(0.0, abs=1e-9) for p in fitted)
    [four] = [p for p in preds if not p["fitted"]]
    want = 2.0 * 0.25 + 4 * 3 * 0.005 + 3 * 1000 * 8 / 10e6 + 4 * 0.002
    assert four["predicted_s"] == pytest.approx(want)
    assert model.rounds(at2)[0]["rounds_per_collective"] == pytest.approx(1.0)


def test_relay_and_quota_smoke(testbed, tmp_path):
    """As root (skipped otherwise): a cgroup per node with the quota, removed afterwards; the
    relay's link answers a TCP round trip in 2 x the set delay, and changes at run time."""
    net, relay, _ = testbed
    if not net.usable() or not (net.CGROUP / "cpu.cfs_quota_us").exists():
        pytest.skip("needs root, iproute2 and cgroup v1's cpu controller")
    import testbed_probe

    with net.cpu_groups(2, net.quota_us(4, 2)) as groups:
        assert [int((g / "cpu.cfs_quota_us").read_text()) for g in groups] == [50_000] * 2
    assert not any(g.exists() for g in groups)
    files = {k: str(tmp_path / k) for k in ("control", "ack", "ready", "stats")}
    start = time.monotonic()
    with net.relay_network(2, {**files, "rate_mbit": 50, "delay_ms": 5}) as names:
        slow = testbed_probe.probe(names, f"{net.SUBNET}.2", count=5, mbytes=None)
        relay.set_link(Path(files["control"]), Path(files["ack"]), 1, None, 0)
        fast = testbed_probe.probe(names, f"{net.SUBNET}.2", count=5, mbytes=None)
    assert 0.010 <= slow["rtt_median_s"] < 0.012, slow
    assert fast["rtt_median_s"] < 0.002, fast
    assert time.monotonic() - start < 30
    assert not any(f"prism-n{i}" in os.listdir("/var/run/netns") for i in range(2))
