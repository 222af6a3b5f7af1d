"""The serving engine: one model, placed and compiled once, answering jobs from a bounded queue.

A worker thread takes the jobs that wait together and runs them as one batch through the
project's own code (`generation.run` for text, `pj.infer` for embeddings). Jobs are batched
only with jobs of the same key: the same padded prompt length (its bucket); sampled text with
the same temperature and top_p and no seed; a seeded job alone (a sampled row's random numbers
depend on the batch's shape, so a seed gives what `pj.generate` gives that prompt alone).
Prompt lengths are bucketed to powers of two for exact plans (`Plan.lossless`: CR = 1 on the
float32 wire, voltage, single: padding changes no answer) and to the plan's own
padding (a multiple of N) otherwise, so that at CR > 1 each prompt lands on the devices and
groups it would alone.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import secrets
import threading
import time

import jax.numpy as jnp
import numpy as np

import prism_jax as pj
from prism_jax import cost, generation
from prism_jax.errors import PrismError
from prism_jax.evaluation import metrics as pooled
from prism_jax.serve import metrics, nodes

MIN_NEW_TOKENS = 16  # the smallest decode-length bucket


class QueueFull(Exception):
    """The bounded queue holds as many jobs as it may."""


class _Stop(Exception):
    """Raised from `on_token` to end a batch whose every row is answered (or abandoned)."""


@dataclasses.dataclass(eq=False)
class Job:
    """One row to answer: a prompt to continue (`kind` "text") or a text to embed ("embed").
    The worker puts events on `events` (in the server's event loop): ("text", delta),
    ("done", finish_reason, completion_tokens), ("embedding", vector), ("error", status,
    message)."""

    kind: str
    ids: list[int]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    max_tokens: int = 0
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None  # None: any (a sampled job without one shares batches)
    stop: tuple[str, ...] = ()
    warm: bool = False  # the start-up's warm-up: two tokens whatever they are (eos included)
    cancelled: bool = False  # the client went away
    finished: bool = False
    made: list[int] = dataclasses.field(default_factory=list)
    sent: str = ""
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the server's loop is closed (stopping): nobody waits for it
            pass


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Engine:
    """The model, mesh and plan of one `serve`, and the worker that answers its jobs."""

    def __init__(self, model, plan, devices: int, *, max_batch: int, max_queue: int, window: float):
        self.model, self.plan, self.devices = model, plan, devices
        self.mesh = pj.edge_mesh(devices)
        self.max_batch, self.max_queue, self.window = max_batch, max_queue, window
        cfg = model.config
        self.causal = cfg.head == "lm" and cfg.causal
        self.exact = plan.lossless or devices == 1
        self.ends = generation._end_ids(model, True)
        self._waiting: collections.deque[Job] = collections.deque()
        self._admitted = 0  # jobs waiting or running
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="prism-serve", daemon=True)
        self.nodes = nodes.Nodes()  # across processes: node 0 publishes, the others follow

    # -- admission ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            for job in self._waiting:
                job.cancelled = True
            self._lock.notify_all()
        self._thread.join(timeout=30)

    def submit(self, jobs: list[Job]) -> None:
        """Queue `jobs` together, or raise QueueFull when they do not fit."""
        with self._lock:
            if self._admitted + len(jobs) > self.max_queue:
                raise QueueFull(f"the queue holds {self.max_queue} jobs; try again later")
            self._admitted += len(jobs)
            metrics.ACTIVE.set(self._admitted)
            self._waiting.extend(jobs)
            metrics.QUEUE.set(len(self._waiting))
            self._lock.notify_all()

    def release(self, job: Job) -> None:
        """`job` answered or abandoned: its slot is free (once)."""
        with self._lock:
            if not job.finished:
                job.finished = True
                self._admitted -= 1
                metrics.ACTIVE.set(self._admitted)

    def bucket(self, n: int) -> int:
        """The padded prompt length of an `n`-token prompt (see the module's docstring)."""
        padded = -(-_pow2(n) // self.devices) * self.devices
        if self.exact and padded <= self.model.config.max_positions:
            return padded
        return -(-n // self.devices) * self.devices  # as `generation.left_pad` pads it alone

    # -- the worker --------------------------------------------------------------------------

    def follow(self) -> None:
        """A node other than 0: run each batch node 0 publishes, until it stops serving."""
        last = self.mesh.devices.flat[-1].process_index == self.nodes.rank
        for message in self.nodes.follow():
            decodes = last and message["kind"] == "text"
            try:
                compute(self, message, self.nodes.step_writer() if decodes else None)
            except PrismError:  # node 0 met the same error and answered it
                pass

    def _key(self, job: Job):
        """Jobs batch together only when their keys are equal: greedy ones of a bucket, sampled
        ones of a bucket with the same temperature and top_p and no seed; a seeded one alone."""
        sampled = job.kind == "text" and job.temperature > 0
        how = (job.temperature, job.top_p) if sampled and job.seed is None else None
        return job.kind, self.bucket(len(job.ids)), id(job) if sampled and how is None else how

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job and the waiting jobs with its key (None: stopping)."""
        with self._lock:
            while not self._waiting and not self._stopping:
                self._lock.wait()
            if self._stopping:
                return None
        time.sleep(self.window)  # let requests that arrive together meet
        with self._lock:
            first = self._waiting[0]
            key = self._key(first)
            batch = [j for j in self._waiting if self._key(j) == key][: self.max_batch]
            taken = set(batch)
            self._waiting = collections.deque(
                j for j in self._waiting if j not in taken and not j.finished
            )
            metrics.QUEUE.set(len(self._waiting))
        return [j for j in batch if not j.finished]

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            if not batch:
                continue
            metrics.BATCH.observe(len(batch))  # before any of its jobs is answered
            try:
                if batch[0].kind == "embed":
                    self._embed(batch)
                else:
                    self._generate(batch)
            except PrismError as e:
                self._fail(batch, 400, str(e))
            except Exception as e:  # noqa: BLE001 - one failed batch must not end the server
                text = f"{type(e).__name__}: {' '.join(str(e).split())}"
                if self.nodes.many and "gloo" in text.lower():  # a peer is gone (`fail_fast`
                    self._fail(batch, 503, f"a node of the cluster was lost: {text}")  # ends us)
                else:
                    self._fail(batch, 500, text)
        self.nodes.publish({"kind": "stop"})  # the other nodes end too

    def _fail(self, batch: list[Job], status: int, message: str) -> None:
        for job in batch:
            if not job.finished:
                self.release(job)
                job.emit("error", status, message)

    def _rows(self, batch: list[Job], size: int) -> dict:
        """Right-padded `input_ids`/`attention_mask` of the batch, filled up to `size` rows with
        copies of the first (batch sizes are bucketed to powers of two too)."""
        rows = [j.ids for j in batch] + [batch[0].ids] * (size - len(batch))
        t = max(len(r) for r in rows)
        ids = np.zeros((size, t), np.int32)
        mask = np.zeros((size, t), np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        return {"input_ids": ids, "attention_mask": mask}

    def _sent(self, t: int, b: int) -> None:
        """Count the bytes each device sent for a batch of `b` rows of `t` tokens (the closed
        form, equal to the compiled program's collectives)."""
        t = -(-t // self.devices) * self.devices
        sent = cost.bytes_closed_form(
            self.model.config, self.plan, devices=self.devices, seq_len=t, batch=b,
            dtype_bytes=jnp.dtype(cost.param_dtype(self.model)).itemsize,
        )  # fmt: skip
        metrics.BYTES.inc(sent)

    def _generate(self, batch: list[Job]) -> None:
        cfg = self.model.config
        size = _pow2(len(batch))
        pad_to = self.bucket(max(len(j.ids) for j in batch))
        longest = max(len(j.ids) for j in batch)
        new = min(max(_pow2(max(j.max_tokens for j in batch)), MIN_NEW_TOKENS),
                  cfg.max_positions - longest)  # fmt: skip
        first = batch[0]
        top_p = first.top_p if first.top_p is not None and first.top_p < 1 else None
        tic = time.perf_counter()

        def on_token(step: int, ids: np.ndarray) -> None:
            for job, token in zip(batch, ids, strict=False):
                self._advance(job, int(token), step)
            if all(j.finished for j in batch) or self._stopping:
                raise _Stop

        self._sent(pad_to, size)
        rows = self._rows(batch, size)
        seed = first.seed if first.seed is not None else secrets.randbits(63)
        message = {"kind": "text", **{k: v.tolist() for k, v in rows.items()}, "new": new,
                   "temperature": first.temperature, "top_p": top_p, "pad_to": pad_to,
                   "seed": seed}  # fmt: skip
        self.nodes.publish(message)
        try:
            if not self.nodes.many:
                compute(self, message, on_token)
            else:  # node 0 does not decode: it streams the steps the decoding node publishes
                reader = self.nodes.step_reader(on_token)
                try:
                    done = compute(self, message)
                finally:
                    seen = reader.stop()
                    self.nodes.done()
                metrics.CLUSTER.labels("tokens").inc(done.ids.nbytes + 16)  # + steps, timing
                if reader.raised is not None:
                    raise reader.raised
                for step in range(seen, done.steps):  # what the reader had not seen yet
                    on_token(step, done.ids[:, step])
        except _Stop:
            pass
        for job in batch:
            self._finish(job, "length")
        made = sum(len(j.made) for j in batch)
        metrics.TOKENS_PER_SECOND.set(made / max(time.perf_counter() - tic, 1e-9))

    def _advance(self, job: Job, token: int, step: int) -> None:
        """One new token of `job`'s row: its text delta, or its end (eos, a stop string,
        max_tokens, or the client gone)."""
        if job.finished:
            return
        if job.cancelled:
            self.release(job)
            return
        if step == 0:
            metrics.FIRST_TOKEN.observe(time.perf_counter() - job.started)
        metrics.TOKENS.inc()  # counted before the job's end is told
        if token in self.ends and not job.warm:
            job.made.append(token)
            self._finish(job, "stop")
            return
        job.made.append(token)
        text = self.model.tokenizer.decode(job.made)
        for s in job.stop:
            if s in text:
                self._flush(job, text[: text.index(s)])
                self._finish(job, "stop")
                return
        if len(job.made) >= job.max_tokens:
            self._flush(job, text)
            self._finish(job, "length")
            return
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return
        held = max((len(s) - 1 for s in job.stop), default=0)  # what may start a stop string
        self._flush(job, text[: len(text) - held] if held else text)

    def _flush(self, job: Job, text: str) -> None:
        if len(text) > len(job.sent) and text.startswith(job.sent):
            job.emit("text", text[len(job.sent) :])
            job.sent = text

    def _finish(self, job: Job, reason: str) -> None:
        if job.finished:
            return
        if reason == "length" and job.made:  # the held-back end of the text
            self._flush(job, self.model.tokenizer.decode(job.made))
        self.release(job)  # before the client hears of it: the counts agree with the answer
        job.emit("done", reason, len(job.made))

    def _embed(self, batch: list[Job]) -> None:
        size = _pow2(len(batch))
        pad_to = self.bucket(max(len(j.ids) for j in batch))
        rows = self._rows(batch, size)
        t = rows["input_ids"].shape[1]
        if pad_to > t:  # right-pad to the bucket
            rows = {k: np.pad(v, ((0, 0), (0, pad_to - t))) for k, v in rows.items()}
        self._sent(rows["input_ids"].shape[1], size)
        message = {"kind": "embed", **{k: v.tolist() for k, v in rows.items()}}
        self.nodes.publish(message)
        try:
            out = compute(self, message)
        finally:
            self.nodes.done()
        vectors = pooled.mean_pool(out["last_hidden_state"], rows["attention_mask"])
        for job, vector in zip(batch, vectors, strict=False):
            self.release(job)
            job.emit("embedding", vector.tolist())


def compute(engine: Engine, message: dict, on_token=None):
    """What every node runs for one batch (`message`, as node 0 publishes it): the project's
    `generation.run` for text (its `Generation`), `pj.infer` for embeddings (its outputs)."""
    rows = {k: np.asarray(message[k], np.int32) for k in ("input_ids", "attention_mask")}
    if message["kind"] == "embed":
        rows["token_type_ids"] = np.zeros_like(rows["input_ids"])
        return pj.infer(engine.model, rows, mesh=engine.mesh, plan=engine.plan)
    return generation.run(
        engine.model, rows, mesh=engine.mesh, plan=engine.plan,
        max_new_tokens=message["new"], temperature=message["temperature"],
        top_p=message["top_p"], seed=message["seed"], on_token=on_token,
        pad_to=message["pad_to"],
    )  # fmt: skip
