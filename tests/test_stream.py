"""The stream's exchange against a hand-driven peer on loopback: what arrived before a peer's
connection ended counts, a lost peer ends the wait at once in one named error (the cluster
tests run the stream itself, test_cluster.py)."""

import socket
import struct
import threading
import time
import types

import numpy as np
import pytest

import prism_jax as pj
from prism_jax import stream


class _Store:
    """The coordination service's key-value store, as `Stream._connect` uses it."""

    def __init__(self):
        self.values, self.changed = {}, threading.Condition()

    def key_value_set(self, key, value):
        with self.changed:
            self.values[key] = value
            self.changed.notify_all()

    def blocking_key_value_get(self, key, timeout_ms):
        with self.changed:
            assert self.changed.wait_for(lambda: key in self.values, timeout_ms / 1000)
            return self.values[key]


@pytest.fixture
def peer(monkeypatch):
    """Node 0's `Stream` of a 2-node cluster and node 1's two raw sockets: `(stream, to, frm)`,
    `to` carrying node 1's frames to node 0, `frm` node 0's to node 1."""
    from jax._src import distributed

    store = _Store()
    state = types.SimpleNamespace(client=store, coordinator_address="127.0.0.1:1")
    monkeypatch.setattr(distributed, "global_state", state)
    listener = socket.create_server(("127.0.0.1", 0))
    store.key_value_set("prism_jax/stream/1", f"127.0.0.1:{listener.getsockname()[1]}")
    made = {}
    thread = threading.Thread(target=lambda: made.update(s=stream.Stream(0, 2, timeout_s=5)))
    thread.start()
    frm = listener.accept()[0]
    host, port = store.blocking_key_value_get("prism_jax/stream/0", 5000).rsplit(":", 1)
    to = socket.create_connection((host, int(port)))
    to.sendall(struct.pack("!I", 1))
    thread.join(10)
    listener.close()
    monkeypatch.setattr(stream, "_STREAM", made["s"])
    yield made["s"], to, frm
    to.close()
    frm.close()


def _gone(s: stream.Stream) -> None:
    deadline = time.monotonic() + 10
    while 1 not in s.gone:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_block_sent_before_the_peer_ended_counts(peer):
    s, to, _ = peer
    theirs = np.arange(6, dtype=np.float32).reshape(2, 3)
    to.sendall(struct.pack("!QII", 0, 1, theirs.nbytes) + theirs.tobytes())
    to.close()  # node 1 sent its last block and ended
    _gone(s)
    mine = np.ones((2, 3), np.float32)
    every = s.exchange(mine, [1], [1])
    np.testing.assert_array_equal(every, np.stack([mine, theirs]))
    assert stream.lost() is None


def test_a_peer_lost_ends_the_wait_at_once(peer):
    s, to, _ = peer
    threading.Timer(0.2, to.close).start()  # node 1 dies while node 0 waits for its block
    start = time.monotonic()
    with pytest.raises(pj.PrismError) as e:
        s.exchange(np.ones((2, 3), np.float32), [1], [1])
    assert time.monotonic() - start < 4  # not the 5 s timeout
    assert str(e.value) == "node 0: lost node 1 (its stream connection ended: closed)"
    assert stream.lost() == "node 1 (its stream connection ended: closed)"


def test_a_block_that_never_comes(peer):
    s, _, _ = peer
    s.timeout_s = 0.3
    with pytest.raises(pj.PrismError, match=r"^node 0: lost node 1 \(no block within 0.3 s\)$"):
        s.exchange(np.ones(4, np.float32), [1], [1])
