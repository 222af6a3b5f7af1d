"""How long one inference takes on N edge devices joined by a link: a model, for the planner
(`planner.py`) and the testbed (experiments/edge_testbed.py, which measures it).

    latency = compute + rounds + transfer + overhead

- compute: one device's time for the whole sequence (`Profile.single_s`, profiled on a node
  at speed 1) x the plan's per-device matmul FLOPs / one device's (`cost.flops_closed_form`),
  divided by the slowest node's speed (every layer waits for its collective, so the slowest
  node sets the pace; `single` runs on the fastest node);
- rounds: what the link's one-way latency costs (`waits`), by the plan's transport: on gloo
  over TCP a transfer starts once the receiver has said it is ready, so each step of a
  collective waits a round trip: depth x (N - 1) round trips for the all-gather (a ring),
  depth x 1 for the all-to-all; the stream waits for no receiver: depth one-way delays for an
  encoder, N - 1 for a causal model (its pipeline's fill, once). Measured in
  experiments/results/collective_probe.md (2.99 and 6.89 round trips a layer for the
  all-gather at N = 4 and 8, 1.00 and 0.99 for the all-to-all, 0.49 and 0.40 for the stream,
  0.01 and 0.07 for the causal stream, 20 ms);
- transfer: (N - 1) x the bytes a device sends per inference (`cost.bytes_closed_form`) x 8 /
  bandwidth (each node's uplink carries its block to every other node; a causal model's
  first node to every later one); on the stream a causal model's busiest uplink carries
  the blocks `stream.routes` gives it (relayed: N = 4 two, N = 8 four), and they travel
  while the next layer is computed: only the last layer's share, and what exceeds the
  compute, adds;
- overhead: depth x `Profile.collective_s`, a collective's own fixed cost (fitted on measured
  N = 2 runs: 11-27 ms a layer for the prism plans on the testbed, `COLLECTIVE_S` the
  paper plan's; 0 by default in a `Profile`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import time
from typing import NamedTuple

from prism_jax import cost
from prism_jax.errors import PrismError
from prism_jax.plan import Plan

_BITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}
# A collective's own cost a layer, fitted on the testbed's N = 2 cells for the paper's plan
# (bert-base 11.5 ms, SmolLM2 13.3 ms; experiments/results/edge_testbed_v2.json): what the
# planner assumes when it is not told.
COLLECTIVE_S = 0.012
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def parse_bandwidth(text) -> float:
    """'10mbit', '50Mbit/s', '1gbit', '500kbit' or a number of bits per second -> bits per
    second (> 0); 'unlimited' -> inf."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and text > 0:
        return float(text)
    value = str(text).strip().lower()
    if value in ("unlimited", "inf"):
        return math.inf
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)(?:bit|bps|b)?(?:/s)?", value)
    if not found or float(found.group(1)) <= 0:
        raise PrismError(
            f"bandwidth {text!r}: a rate > 0 such as 10mbit, 500kbit, 1gbit (or unlimited)"
        )
    return float(found.group(1)) * _BITS[found.group(2)]


def parse_latency(text) -> float:
    """'5ms', '200us', '0.02s', '0' or a number of seconds -> one-way seconds (>= 0)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and 0 <= text < math.inf:
        return float(text)
    value = str(text).strip().lower()
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|ms|us)?", value)
    if not found or (found.group(2) is None and float(found.group(1)) != 0):
        raise PrismError(f"latency {text!r}: a one-way delay >= 0 with a unit: 5ms, 200us, 0")
    return float(found.group(1)) * _SECONDS[found.group(2) or "s"]


@dataclasses.dataclass(frozen=True)
class Link:
    """The network between the nodes: each node's uplink rate and the one-way latency."""

    bandwidth: float  # bits per second (inf: unlimited)
    latency: float = 0.0  # one-way seconds

    @classmethod
    def parse(cls, bandwidth, latency="0") -> Link:
        return cls(parse_bandwidth(bandwidth), parse_latency(latency))


@dataclasses.dataclass(frozen=True)
class Profile:
    """What the nodes compute at: one device's time for the model on the whole sequence at
    speed 1, a collective's fixed cost, and each node's speed relative to that device (empty:
    every node 1)."""

    single_s: float
    collective_s: float = 0.0
    node_speed: tuple[float, ...] = ()

    def __post_init__(self):
        if not self.single_s > 0 or self.collective_s < 0:
            raise PrismError("a profile needs single_s > 0 and collective_s >= 0")
        if any(not s > 0 for s in self.node_speed):
            raise PrismError(f"node speeds must be > 0, got {self.node_speed}")

    @classmethod
    def from_measured(cls, measured: dict, *, latency: float = 0.0) -> Profile:
        """The profile `measure_nodes` measured: node 0's time for the model, each node's
        speed against node 0, and a collective's own cost: the measured all-gather round less
        the 2 (N - 1) one-way delays that `predict` adds for the stated `latency`."""
        nodes = len(measured["node_s"])
        own = max(measured["round_s"] - 2 * (nodes - 1) * latency, 0.0)
        return cls(measured["single_s"], own, tuple(measured["node_speed"]))

    def speeds(self, devices: int) -> tuple[float, ...]:
        """The speeds of the first `devices` nodes (the fastest first when some are chosen)."""
        if not self.node_speed:
            return (1.0,) * devices
        if len(self.node_speed) < devices:
            raise PrismError(
                f"--node-speed names {len(self.node_speed)} nodes, fewer than {devices} devices"
            )
        return tuple(sorted(self.node_speed, reverse=True)[:devices])


class Estimate(NamedTuple):
    """A predicted latency, in seconds, by term."""

    compute: float
    rounds: float
    transfer: float
    overhead: float

    @property
    def total(self) -> float:
        return self.compute + self.rounds + self.transfer + self.overhead


def predict(cfg, plan: Plan, *, devices: int, seq_len: int, link: Link, profile: Profile,
            batch: int = 1) -> Estimate:  # fmt: skip
    """The latency of one inference of `plan` on `devices` nodes (the module docstring)."""
    n = 1 if plan.strategy == "single" else devices
    single = Plan(strategy="single")
    share = cost.flops_closed_form(cfg, plan, devices=n, seq_len=seq_len, batch=batch)
    share /= cost.flops_closed_form(cfg, single, devices=1, seq_len=seq_len, batch=batch)
    compute = profile.single_s * share / min(profile.speeds(n))
    if n == 1:
        return Estimate(compute, 0.0, 0.0, 0.0)
    sent = cost.bytes_closed_form(cfg, plan, devices=n, seq_len=seq_len, batch=batch)
    rounds = waits(cfg, plan, n, link.latency)
    transfer = (n - 1) * sent * 8 / link.bandwidth
    if plan.transport == "stream" and cfg.causal:
        # relayed, the busiest uplink carries fewer than N - 1 blocks; sent as computed, a
        # layer's blocks travel while the next is computed, so only the last layer's, and
        # what the uplink cannot keep up with, adds
        from prism_jax.stream import routes

        busiest = max(collections.Counter(routes(n).values()).values())
        transfer = busiest * sent * 8 / link.bandwidth
        transfer = max(transfer - compute, 0.0) + transfer / cfg.depth
    return Estimate(compute, rounds, transfer, cfg.depth * profile.collective_s)


def waits(cfg, plan: Plan, devices: int, latency: float) -> float:
    """Seconds an inference waits on the link's latency: per layer, a round trip for each
    step of the exchange (a ring all-gather's N - 1, an all-to-all's one: its N - 1 transfers
    posted at once); the stream waits for no receiver: one one-way delay a layer for an
    encoder, and for a causal model the N - 1 delays by which the last device runs behind the
    first, once."""
    if plan.transport == "stream":
        return ((devices - 1) if cfg.causal else cfg.depth) * latency
    steps = 1 if plan.transport == "all_to_all" else devices - 1
    return cfg.depth * steps * 2 * latency


def profile_single(model, batch: dict, *, repeats: int = 3) -> float:
    """One device's time for `batch` on this host: the median of `repeats` runs after a
    compiling warm-up."""
    from prism_jax.partition import infer

    plan = Plan(strategy="single")
    infer(model, batch, plan=plan)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        infer(model, batch, plan=plan)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_nodes(model, batch: dict, *, repeats: int = 5, probe_bytes: int = 1 << 20) -> dict:
    """What `plan --profile` measures across the nodes of a running `jax.distributed` cluster
    (every node calls it; every node returns the same dict):

    - `node_s`: each node's time for `batch` on its own device (`profile_single`), `single_s`
      node 0's, and `node_speed` each node's speed against node 0;
    - `round_s`: one all-gather of 4 bytes a node, the median of `repeats` after a warm-up
      (the slowest node's): the link's round trips and the collective's own cost together;
    - `bandwidth`: bits per second that an all-gather of `probe_bytes` a node adds over that,
      (N - 1) x probe_bytes x 8 / the extra seconds (None when it adds none measurable).
    """
    import numpy as np
    from jax.experimental import multihost_utils

    def gathered(values) -> np.ndarray:  # (nodes, len(values))
        return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.float32)))

    def timed(x) -> float:
        multihost_utils.process_allgather(x)  # compiles
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            multihost_utils.process_allgather(x)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    node_s = [float(t) for t in gathered([profile_single(model, batch)]).ravel()]
    small = timed(np.zeros(1, np.float32))
    big = timed(np.zeros(max(probe_bytes // 4, 1), np.float32))
    small, big = (float(v) for v in gathered([small, big]).max(axis=0))
    extra = big - small
    nodes = len(node_s)
    bandwidth = (nodes - 1) * probe_bytes * 8 / extra if extra > 0 else None
    return {"single_s": node_s[0], "node_s": node_s,
            "node_speed": [node_s[0] / t for t in node_s], "round_s": small,
            "bandwidth": bandwidth}  # fmt: skip
