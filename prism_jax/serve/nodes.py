"""`serve` across nodes (`prism-jax launch --nodes N -- serve ...`): node 0 holds the HTTP
front and publishes each batch it runs through the coordinator's key-value store; the other
nodes follow, running the same batch, so that every node enters the same collectives. The
requests travel through the coordinator (a few hundred bytes of token ids a batch); what the
devices send each other is what the plan says, as for `generate`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import jax

from prism_jax.serve import metrics

POLL_MS = 1000  # how long a follower waits for the next batch before asking again


def _client():
    from jax._src import distributed  # the client of the running jax.distributed cluster

    return distributed.global_state.client


class Nodes:
    """This process's place in a cluster of processes (or none: one process)."""

    def __init__(self):
        self.many = jax.process_count() > 1
        self.rank = jax.process_index()
        self._count = 0

    def publish(self, message: dict) -> None:
        """Node 0: tell the other nodes the next batch (nothing in one process)."""
        if self.many:
            text = json.dumps(message)
            _client().key_value_set(f"prism_jax/serve/{self._count}", text)
            metrics.CLUSTER.labels("batches").inc(len(text.encode()))
            self._count += 1

    def follow(self) -> Iterator[dict]:
        """The other nodes: node 0's batches in order, until it stops serving."""
        while True:
            try:
                text = _client().blocking_key_value_get(f"prism_jax/serve/{self._count}", POLL_MS)
            except Exception as e:  # noqa: BLE001 - the runtime raises bare XlaRuntimeErrors
                if "deadline" not in str(e).lower():  # not the wait's end: the coordinator?
                    time.sleep(POLL_MS / 1000)  # (`cluster.fail_fast` ends a lost node)
                continue
            self._count += 1
            message = json.loads(text)
            if message["kind"] == "stop":
                return
            yield message
