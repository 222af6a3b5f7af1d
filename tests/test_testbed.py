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
    assert net.PERIOD_US == 10_000
    assert [net.quota_us(n, 2) for n in (1, 2, 4, 8)] == [10_000, 10_000, 5_000, 2_500]
    assert net.quota_us(3, 2) == 6_666
    # a fifth of a core left for the link's relay: 0.9, 0.45, 0.225 of a core a node
    assert [net.quota_us(n, 2, 0.2) for n in (2, 4, 8)] == [9_000, 4_500, 2_250]
    with pytest.raises(ValueError, match="nodes and cores"):
        net.quota_us(0, 2)
    with pytest.raises(ValueError, match="reserve"):
        net.quota_us(4, 2, 2.0)
    assert net.quota_us(8, 2, 1.2) == 1_000  # the kernel's least quota, and no less:
    with pytest.raises(ValueError, match="least quota is 1000 us"):
        net.quota_us(8, 2, 1.9)
    assert net.quota_us(2, 2, 0.37) == 8_150  # rounded, not cut: 1.63 cores / 2


def _row(nodes, plan, latency=0.0, *, delay=0.0):
    single = plan == "single"
    return {"model": "tiny", "seq_len": 32, "nodes": nodes, "plan": plan, "strategy": plan,
            "latency_s": latency, "rate_mbit": None if single else 10,
            "delay_ms": None if single else delay}  # fmt: skip


def test_latency_model_fits_overhead_on_two_and_predicts_four(testbed, monkeypatch):
    """The collective cost is fitted on N = 2 (the fitted cells then have no error) and the
    N = 4 prediction is compute share x one device's time + depth x 3 round trips + 3 x
    bytes / rate + the fitted cost, from the closed forms."""
    _, _, model = testbed
    import edge_testbed

    import prism_jax as pj
    from prism_jax import cost

    cfg = edge_testbed.config_of("tiny")
    rows = [_row(2, "single", 1.0), _row(2, "paper:4"), _row(2, "paper:4", delay=5),
            _row(4, "single", 2.0), _row(4, "paper:4", 1.0, delay=5)]  # fmt: skip
    for r in rows[1:3]:  # measured = the model + 2 ms a collective
        r["latency_s"] = model.estimate(rows, r, cfg, 0.002)[1]
    preds = model.predictions(rows, edge_testbed.config_of)
    assert all(p["overhead_s"] == pytest.approx(0.002) for p in preds)
    assert all(p["error"] == pytest.approx(0.0, abs=1e-9) for p in preds if p["fitted"])
    [four] = [p for p in preds if not p["fitted"]]
    plan, single = pj.Plan(cr=4), pj.Plan(strategy="single")
    share = cost.flops_closed_form(cfg, plan, devices=4, seq_len=32)
    share /= cost.flops_closed_form(cfg, single, devices=1, seq_len=32)
    sent = cost.bytes_closed_form(cfg, plan, devices=4, seq_len=32)
    want = 2.0 * share + cfg.depth * 3 * 2 * 0.005 + 3 * sent * 8 / 10e6 + cfg.depth * 0.002
    assert four["predicted_s"] == pytest.approx(want) and four["error"] == pytest.approx(want - 1)
    for r in rows:
        r["collectives"] = cfg.depth
    # one-way delays a collective at N = 2: a round trip
    assert model.rounds(rows[:3])[0]["rounds_per_collective"] == pytest.approx(2.0)


def test_relay_and_quota_smoke(testbed, tmp_path):
    """As root (skipped otherwise): a cgroup per node with the quota, removed afterwards; the
    relay's link answers a TCP round trip in 2 x the set delay, and changes at run time."""
    net, relay, _ = testbed
    if not net.usable() or not (net.CGROUP / "cpu.cfs_quota_us").exists():
        pytest.skip("needs root, iproute2 and cgroup v1's cpu controller")
    import testbed_probe

    with net.cpu_groups(2, net.quota_us(4, 2)) as groups:
        assert [int((g / "cpu.cfs_quota_us").read_text()) for g in groups] == [5_000] * 2
        assert all(int((g / "cpu.cfs_period_us").read_text()) == 10_000 for g in groups)
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


def test_plan_specs(testbed):
    """`make_plan`: what each testbed spec runs; `fill:CR:WIRE` the most groups of the causal
    best (one sink token) within `paper:CR`'s bytes at the cell's N and T."""
    import prism_jax as pj
    from prism_jax import cost

    *_, model = testbed
    cfg = pj.PRESETS["smollm2-135m"]()
    assert model.make_plan("single", cfg) == pj.Plan(strategy="single")
    assert model.make_plan("paper:16", cfg) == pj.Plan(cr=16)
    assert model.make_plan("best:4:int8", cfg) == pj.Plan.best(4, cfg, wire="int8")
    got = model.make_plan("fill:16:int4h", cfg, devices=4, seq_len=512)
    assert (got.wire, got.sink, got.grouping, got.cr) == ("int4h", 1, "tail", 1)
    shape = dict(devices=4, seq_len=512)
    paper = cost.bytes_closed_form(cfg, pj.Plan(cr=16), **shape)
    assert (
        cost.bytes_closed_form(cfg, got, **shape)
        <= paper
        < cost.bytes_closed_form(
            cfg, pj.Plan(**{**got.__dict__, "groups": got.groups + 1}), **shape
        )
    )
    flat = model.make_plan("fill:16:int4h:notilt", cfg, devices=4, seq_len=512)
    assert not flat.value_tilt and got.value_tilt
    assert flat.groups > got.groups  # the tilt's words buy groups
    assert cost.bytes_closed_form(cfg, flat, **shape) <= paper
    assert model.make_plan("best:4:int8:notilt", cfg) == pj.Plan(
        **{**pj.Plan.best(4, cfg, wire="int8").__dict__, "value_tilt": False}
    )
