"""`serve` across nodes (`prism-jax launch --nodes N -- serve ...`): node 0 holds the HTTP
front and publishes each batch it runs through the coordinator's key-value store; the other
nodes follow, running the same batch, so that every node enters the same collectives. The
node that decodes (the one holding the last device) publishes each step's token ids there
too, and node 0 streams them as they come. Requests and tokens travel through the coordinator
(token ids as JSON); what the devices send each other is what the plan says, as for
`generate`."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np

from prism_jax.serve import metrics

POLL_MS = 1000  # how long a follower waits for the next batch before asking again
STEP_MS = 100  # how long node 0 waits for the next step's tokens before looking again


def _client():
    from jax._src import distributed  # the client of the running jax.distributed cluster

    return distributed.global_state.client


def _key(batch: int, step: int | None = None) -> str:
    return f"prism_jax/serve/{batch}" + ("" if step is None else f"/step/{step}")


class Nodes:
    """This process's place in a cluster of processes (or none: one process)."""

    def __init__(self):
        self.many = jax.process_count() > 1
        self.rank = jax.process_index()
        self._count = 0  # batches published (node 0) or read (the others)

    def publish(self, message: dict) -> None:
        """Node 0: tell the other nodes the next batch (nothing in one process)."""
        if self.many:
            text = json.dumps(message)
            _client().key_value_set(_key(self._count), text)
            metrics.CLUSTER.labels("batches").inc(len(text.encode()))
            self._count += 1

    def done(self) -> None:
        """Node 0, after a batch: every node has read it (they all ran its collectives), so
        its keys (the batch and its steps) go."""
        if not self.many:
            return
        try:
            _client().key_value_delete(_key(self._count - 1))
        except Exception:  # noqa: BLE001 - a key left behind costs a few bytes, nothing more
            pass

    def follow(self) -> Iterator[dict]:
        """The other nodes: node 0's batches in order, until it stops serving."""
        while True:
            try:
                text = _client().blocking_key_value_get(_key(self._count), POLL_MS)
            except Exception as e:  # noqa: BLE001 - the runtime raises bare XlaRuntimeErrors
                if "deadline" not in str(e).lower():  # not the wait's end: the coordinator?
                    time.sleep(POLL_MS / 1000)  # (`cluster.fail_fast` ends a lost node)
                continue
            self._count += 1
            message = json.loads(text)
            if message["kind"] == "stop":
                return
            yield message

    def step_writer(self) -> Callable[[int, np.ndarray], None]:
        """The decoding node's `on_token`: each step's ids published for node 0 (never
        raising: the batch's collectives must go on)."""
        batch = self._count - 1

        def write(step: int, ids: np.ndarray) -> None:
            try:
                _client().key_value_set(_key(batch, step), json.dumps(ids.tolist()))
            except Exception:  # noqa: BLE001 - node 0 gets the ids at the end anyway
                pass

        return write

    def step_reader(self, on_token: Callable[[int, np.ndarray], None]) -> StepReader:
        """Node 0: a thread passing the decoding node's steps to `on_token` as they come."""
        return StepReader(self._count - 1, on_token)


class StepReader:
    """Reads the steps of one batch until `stop()`; an exception from `on_token` (every row
    ended) ends the reading and is kept in `raised`."""

    def __init__(self, batch: int, on_token):
        self.batch, self.on_token, self.seen, self.raised = batch, on_token, 0, None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                text = _client().blocking_key_value_get(_key(self.batch, self.seen), STEP_MS)
            except Exception as e:  # noqa: BLE001 - not there yet (or the batch ended)
                if "deadline" not in str(e).lower():
                    self._done.wait(STEP_MS / 1000)
                continue
            try:
                self.on_token(self.seen, np.asarray(json.loads(text), np.int32))
            except Exception as e:  # noqa: BLE001 - _Stop: every row has ended
                self.raised = e
                return
            finally:
                self.seen += 1

    def stop(self) -> int:
        """End the reading; the steps read (the caller replays the rest)."""
        self._done.set()
        self._thread.join()
        return self.seen
