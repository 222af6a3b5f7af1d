"""The plan picks itself (`plan_for`): one device or N' <= N, CR, compressor and wire, from the
link, the nodes and the user's data.

Candidates: one device alone; on N' = 2..N devices, every CR of `CRS` up to a device's tokens,
the paper's segments (float32) and the model's best compressor (`Plan.best`) on every wire of
`WIRES`.
Each is predicted by `latency.predict`. Then, fastest first, candidates are calibrated (the
task metric on the user's data against the exact model) until one is within the accuracy
budget: that one is the choice (one device is exact, so there always is one). A candidate is
not calibrated when one already over the budget dominates it (the same compressor, no more
devices, at least as many groups per token, a wire at least as wide): fewer vectors, narrower
codes and more boundaries are assumed to lose no less. Calibrations are cached on disk by
model, data, device count and plan (not its transport: the same outputs), so a second call
with the same inputs runs none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from pathlib import Path

import jax
import numpy as np

from prism_jax import checks, cost
from prism_jax import latency as latency_model
from prism_jax.errors import PrismError
from prism_jax.plan import TRANSPORTS, Plan

CRS = (2, 4, 8, 16, 32, 64)
# The wires weighed: int4h, not int4 (the same bytes; as accurate or more wherever measured).
WIRES = ("f32", "bf16", "int8", "int4h")
_BITS = {"f32": 32, "bf16": 16, "int8": 8, "int4": 4, "int4h": 4}
# The default calibration set per kind of model, and how much of it (rows of text for a
# language model, examples for a classifier).
DATASETS = {"lm": "wikipedia_leads", "vit": "fashion_mnist_local", "text": "fine_food_reviews"}
LIMITS = {"lm": 8, "vit": 256, "text": 256}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to run the model, its predicted latency and (when calibrated) its loss."""

    devices: int
    plan: Plan
    compressor: str  # single | paper | best
    estimate: latency_model.Estimate
    bytes_per_device: int
    loss: float | None = None  # None: not calibrated
    status: str = "not needed"  # chosen | within budget | over budget | dominated | not needed
    tokens: int = 0  # a device's tokens L (0: not known, the plan's CR says the rate)

    @property
    def rate(self) -> float:
        """Groups a device sends per token it holds: V / L (1 / CR without `tokens`)."""
        if self.tokens:
            return self.plan.segments(self.tokens) / self.tokens
        return 1 / self.plan.cr


@dataclasses.dataclass(frozen=True, kw_only=True)
class Choice(Plan):
    """The planner's plan, with the devices to run it on and every candidate it weighed."""

    devices: int = 1
    metric: str = ""
    exact: float = float("nan")
    calibrations: int = dataclasses.field(default=0, compare=False)  # run, not from the cache
    candidates: tuple[Candidate, ...] = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if c.status == "chosen")


def kind(cfg) -> str:
    """Which default calibration set suits the model: lm, vit or text."""
    if cfg.head == "lm":
        return "lm"
    return "vit" if cfg.family == "vit" else "text"


def candidates(cfg, *, devices: int, seq_len: int, link, profile,
               transports=TRANSPORTS) -> list[Candidate]:  # fmt: skip
    """Every plan the planner weighs, fastest predicted first; each on the fastest of
    `transports` (how it travels changes no output, so only its latency is weighed)."""
    shape = dict(seq_len=seq_len)
    out = [_candidate(cfg, 1, Plan(strategy="single"), "single", link, profile, shape)]
    for n in range(2, devices + 1):
        local = cost.local_len(seq_len, n)
        for cr in (c for c in CRS if c <= local):
            plans = [("paper", Plan(cr=cr))]
            plans += [("best", Plan.best(cr, cfg, wire=wire)) for wire in WIRES]
            for compressor, plan in plans:
                out.append(min(
                    (_candidate(cfg, n, dataclasses.replace(plan, transport=t), compressor,
                                link, profile, shape) for t in transports),
                    key=lambda c: c.estimate.total,
                ))  # fmt: skip
    return sorted(out, key=lambda c: (c.estimate.total, -_BITS[c.plan.wire], c.devices))


def _candidate(cfg, n, plan, compressor, link, profile, shape) -> Candidate:
    estimate = latency_model.predict(cfg, plan, devices=n, link=link, profile=profile, **shape)
    sent = cost.bytes_closed_form(cfg, plan, devices=n, **shape) if n > 1 else 0
    return Candidate(
        n, plan, compressor, estimate, sent, tokens=cost.local_len(shape["seq_len"], n)
    )


def fill(cfg, plan: Plan, budget: int, *, devices: int, seq_len: int, batch: int = 1) -> Plan:
    """`plan` (prism, not `segments`) with the most groups a device can send within `budget`
    bytes per inference: `Plan(groups=V, cr=1)`, a byte budget filled exactly rather than in
    whole CRs (every token alone, groups=0, when they all fit)."""
    if plan.strategy != "prism" or plan.grouping == "segments":
        raise PrismError("fill needs a prism plan whose grouping is not 'segments'")
    budget = checks.integer("budget", budget, 0)
    devices = checks.integer("devices", devices, 2)
    seq_len = checks.integer("seq_len", seq_len, devices)
    local = cost.local_len(seq_len, devices)
    one = dataclasses.replace(plan, cr=1, groups=1)
    each = cost.bytes_closed_form(cfg, one, devices=devices, seq_len=seq_len, batch=batch)
    v = min(int(budget) // each, local) if each else local
    if v < 1:
        raise PrismError(f"a budget of {budget} bytes holds no group ({each} bytes each)")
    return dataclasses.replace(plan, cr=1, groups=0 if v >= local else v)


def _dominated(c: Candidate, failed: list[Candidate]) -> bool:
    """Whether a candidate over the budget compresses no more than `c` does: the same
    compressor, no more devices, at least as many groups per token, a wire as wide."""
    return any(
        f.compressor == c.compressor
        and f.devices <= c.devices
        and f.rate >= c.rate
        and _BITS[f.plan.wire] >= _BITS[c.plan.wire]
        for f in failed
    )


def choose(cands: list[Candidate], loss_of, budget: float, progress=None) -> list[Candidate]:
    """Calibrate fastest first (`loss_of(candidate)`) until one is within `budget`; returns
    the candidates with their loss and status, the first within budget `chosen`."""
    out, failed, done = [], [], False
    for c in cands:
        if done:
            out.append(c)
            continue
        if _dominated(c, failed):
            out.append(dataclasses.replace(c, status="dominated"))
            continue
        loss = 0.0 if c.compressor == "single" else float(loss_of(c))
        if progress is not None:
            progress.update(1)
        within = loss <= budget
        done = within
        c = dataclasses.replace(c, loss=loss, status="chosen" if within else "over budget")
        failed += [] if within else [c]
        out.append(c)
    return out


class Calibration:
    """Losses of plans on one model and dataset, cached in a JSON file."""

    def __init__(self, model, task, *, dataset: str, limit: int, cache_dir=None):
        self.model, self.task = model, task
        self.path = Path(cache_dir or _default_cache()) / "calibration.json"
        self.base = {"model": _fingerprint(model), "dataset": dataset, "limit": limit,
                     "seq_len": task.seq_len, "examples": task.examples}  # fmt: skip
        self.entries = self._read()
        self.runs = 0  # calibrations actually computed (not read from the cache)
        self.exact = self.score(1, Plan(strategy="single"))

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: calibrate again

    def score(self, devices: int, plan: Plan) -> float:
        # how it travels changes no output: calibrated (and cached) on the all-gather, which
        # emulated devices run
        plan = dataclasses.replace(plan, transport="all_gather")
        fields = dataclasses.asdict(plan)
        del fields["transport"]
        key = {**self.base, "devices": devices, "plan": fields}
        key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        if key not in self.entries:
            from prism_jax.partition import edge_mesh

            mesh = edge_mesh(devices) if devices > 1 else None
            self.entries[key] = float(self.task.score(mesh, plan))
            self.runs += 1
            self._write()
        return self.entries[key]

    def _write(self) -> None:
        """Atomically (a reader never sees half a file; the last writer wins)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        temp.write_text(json.dumps(self.entries, sort_keys=True))
        os.replace(temp, self.path)

    def loss(self, c: Candidate) -> float:
        """The metric's loss against the exact model: the perplexity's relative rise, or the
        points of accuracy lost."""
        got = self.score(c.devices, c.plan)
        if self.task.metric == "perplexity":
            return got / self.exact - 1
        return self.exact - got if self.task.higher_is_better else got - self.exact


def _default_cache() -> Path:
    root = os.environ.get("PRISM_JAX_CACHE") or Path.home() / ".cache" / "prism-jax"
    return Path(root)


def _fingerprint(model) -> str:
    """CRC-32 of the parameters and the config: a changed model is a new calibration."""
    value = zlib.crc32(repr(model.config).encode())
    for leaf in jax.tree.leaves(model.params):
        value = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes(), value)
    return f"{value:08x}"


def example_batch(cfg, seq_len: int) -> dict:
    """One input of `seq_len` tokens (or one image) to time the model on."""
    if cfg.family == "vit":
        return {"pixel_values": np.zeros((1, 3, cfg.image_size, cfg.image_size), np.float32)}
    ids = np.random.default_rng(0).integers(1, cfg.vocab_size, (1, seq_len))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def plan_for(
    model,
    *,
    devices: int,
    bandwidth,
    latency="0",
    node_speed=None,
    max_loss: float = 0.01,
    max_ppl_rise: float = 0.10,
    dataset: str | None = None,
    limit: int | None = None,
    seq_len: int | None = None,
    profile: latency_model.Profile | None = None,
    collective_s: float = latency_model.COLLECTIVE_S,
    transports=TRANSPORTS,
    cache_dir=None,
    progress=None,
) -> Choice:
    """The fastest plan for `model` on at most `devices` nodes joined by a link of `bandwidth`
    (e.g. "10mbit") and one-way `latency` (e.g. "5ms") whose loss on `dataset` (default: the
    model's own kind of data, `DATASETS`) is within the budget: `max_loss` points of accuracy
    (0.01 = 1 point) or, for a language model, `max_ppl_rise` relative perplexity (0.10 =
    +10 %). `node_speed`: each node's speed relative to this host (default all 1); `profile`:
    a `latency.Profile` instead of timing the model here; `collective_s`: a collective's own
    cost a layer (default: the testbed's, `latency.COLLECTIVE_S`); `transports`: how the
    exchange may travel (`Plan.transport`; leave out "stream" where the devices share one
    process). `progress`: a tqdm-like bar.
    Returns a `Choice`: a `Plan` that also says its `devices` and the `candidates` weighed.
    """
    from prism_jax.evaluation import tasks

    n = checks.integer("devices", devices, 1)
    link = latency_model.Link.parse(bandwidth, latency)
    _fraction(max_loss, "max_loss", 1)
    _fraction(max_ppl_rise, "max_ppl_rise", 100)
    cfg = model.config
    k = kind(cfg)
    dataset = dataset or DATASETS[k]
    limit = checks.integer("limit", limit, 1) if limit is not None else LIMITS[k]
    if seq_len is not None:
        checks.integer("seq_len", seq_len, 1)
    task = tasks.load(model, dataset, limit=limit, max_length=seq_len or default_length(cfg))
    t = task.seq_len
    if profile is None:
        speeds = tuple(node_speed) if node_speed else ()
        latency_model.Profile(1.0, node_speed=speeds).speeds(n)  # checked before the timing
        single = latency_model.profile_single(model, example_batch(cfg, t))
        profile = latency_model.Profile(single, collective_s, speeds)
    calib = Calibration(model, task, dataset=dataset, limit=limit, cache_dir=cache_dir)
    budget = max_ppl_rise if task.metric == "perplexity" else max_loss
    if not transports or any(t not in TRANSPORTS for t in transports):
        raise PrismError(f"transports must name some of {TRANSPORTS}, got {transports!r}")
    cands = candidates(cfg, devices=n, seq_len=t, link=link, profile=profile,
                       transports=tuple(transports))  # fmt: skip
    weighed = tuple(choose(cands, calib.loss, budget, progress))
    best = next(c for c in weighed if c.status == "chosen")
    return Choice(**_fields(best.plan), devices=best.devices, metric=task.metric,
                  exact=calib.exact, calibrations=calib.runs, candidates=weighed)  # fmt: skip


def default_length(cfg) -> int | None:
    """Text: 256 tokens, or the model's positions when fewer; images: None (the model's own)."""
    return None if kind(cfg) == "vit" else min(256, cfg.max_positions)


def _fields(plan: Plan) -> dict:
    return {f.name: getattr(plan, f.name) for f in dataclasses.fields(Plan)}


def _fraction(value, name: str, high: float) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < high
    if not ok:
        raise PrismError(f"{name} must be a share in [0, {high}) (0.01 = 1 %), got {value!r}")
