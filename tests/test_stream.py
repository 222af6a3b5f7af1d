"""The stream's exchange against a hand-driven peer on loopback: what arrived before a peer's
connection ended counts, a lost peer ends the wait at once in one named error (the cluster
tests run the stream itself, test_cluster.py)."""

import queue
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
    to.sendall(struct.pack("!QIIQ", 0, 1, theirs.nbytes, 0) + theirs.tobytes())
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


@pytest.mark.parametrize("devices", [4, 5, 8])
def test_routes_lighten_the_busiest_uplink(devices):
    """Every later device gets each block once, from its source or from a device between that
    has it from the source directly; no uplink carries more blocks a layer than it must
    (N = 4: two, not device 0's three)."""
    via = stream.routes(devices)
    assert set(via) == {(s, d) for d in range(devices) for s in range(d)}
    load = [0] * devices
    for (s, d), v in via.items():
        assert v == s or (s < v < d and via[s, v] == s)
        load[v] += 1
    assert max(load) < devices - 1 and max(load) == {4: 2, 5: 3, 8: 4}[devices]
    assert stream.routes(3) == {(0, 1): 0, (0, 2): 0, (1, 2): 1}  # no uplink to lighten
    assert set(stream.routes(65).values()) == set(range(64))  # past the mask: direct


@pytest.fixture
def four(monkeypatch):
    """Four `Stream`s in this process, joined over loopback through a stand-in store."""
    from jax._src import distributed

    state = types.SimpleNamespace(client=_Store(), coordinator_address="127.0.0.1:1")
    monkeypatch.setattr(distributed, "global_state", state)
    nodes = {}
    threads = [threading.Thread(target=lambda r=r: nodes.update({r: stream.Stream(r, 4,
               timeout_s=5)})) for r in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return [nodes[r] for r in range(4)]


def _causal_round(nodes, rounds=2):
    """Every node's causal exchange at once, as the program calls it; what each got."""
    via, got = stream.routes(4), {}

    def run(p):
        for i in range(rounds):
            block = np.full((2, 3), 10 * i + p, np.float32)
            got[p, i] = stream.exchange_as(nodes[p], block, p, 4, via)

    threads = [threading.Thread(target=run, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return got


def test_relayed_blocks_arrive_whole_and_in_their_exchange(four):
    sent = [0] * 4
    for p, node in enumerate(four):  # frames this node's uplink carries, its relays included
        for box in node.outboxes.values():
            put = box.put
            box.put = lambda frame, put=put, p=p: (sent.__setitem__(p, sent[p] + 1), put(frame))
    got = _causal_round(four)
    for (p, i), every in got.items():
        want = np.zeros((4, 2, 3), np.float32)
        want[: p + 1] = (10 * i + np.arange(p + 1))[:, None, None]  # its own and the earlier
        np.testing.assert_array_equal(every, want)
    assert sent == [4, 4, 4, 0]  # two blocks a layer on each uplink (direct: 6, 4, 2, 0)


def test_a_relay_lost_ends_the_wait_for_what_it_relays(four):
    """Device 2 gets device 0's block through device 1: device 1 gone, device 2's wait for it
    ends at once, naming device 1."""
    via = stream.routes(4)
    assert via[0, 2] == 1
    for box in four[1].outboxes.values():  # device 1 sends its own block, relays nothing
        put = box.put
        box.put = lambda frame, put=put: (
            None if isinstance(frame, queue.SimpleQueue) else put(frame)
        )
    stream.exchange_as(four[0], np.zeros(3, np.float32), 0, 4, via)
    stream.exchange_as(four[1], np.ones(3, np.float32), 1, 4, via)
    threading.Timer(0.3, lambda: four[2]._gone(1, "its stream connection ended: closed")).start()
    start = time.monotonic()
    with pytest.raises(pj.PrismError, match=r"^node 2: lost node 1 \(its stream connection"):
        stream.exchange_as(four[2], np.zeros(3, np.float32), 2, 4, via)
    assert time.monotonic() - start < 4  # not the 5 s timeout


def _bare(rank: int, nodes: int):
    """A `Stream` with its queues and records but no connections: its threads are driven by
    hand."""
    s = stream.Stream.__new__(stream.Stream)
    s.rank, s.nodes, s.timeout_s, s.count = rank, nodes, 5.0, 0
    s.arrived, s.gone, s.failed, s.waited_s = {}, {}, None, 0.0
    s.ready = threading.Condition()
    s.outboxes = {q: queue.Queue() for q in range(nodes) if q != rank}
    return s


def test_a_relay_passes_each_piece_on_as_it_arrives():
    """Cut-through: device 1 takes device 0's block in and queues it for device 2 piece by
    piece, the first piece before the rest of the block has even been sent."""
    relay, (a, b) = _bare(1, 3), socket.socketpair()
    threading.Thread(target=relay._receive, args=(0, b), daemon=True).start()
    a.sendall(stream._HEADER.pack(7, 0, 8, 1 << 2) + b"abcd")
    pipe = relay.outboxes[2].get(timeout=5)
    assert pipe.get(timeout=5) == stream._HEADER.pack(7, 0, 8, 0)  # nothing further on
    assert pipe.get(timeout=5) == b"abcd"  # the other half is not sent yet
    a.sendall(b"efgh")
    assert pipe.get(timeout=5) == b"efgh" and pipe.get(timeout=5) is None
    deadline = time.monotonic() + 5
    while (7, 0) not in relay.arrived and time.monotonic() < deadline:
        time.sleep(0.01)
    assert relay.arrived[7, 0] == b"abcdefgh"  # and the relay has the block itself


def test_a_relayed_frame_cut_at_its_source_ends_the_onward_connection():
    """Device 0's connection ends mid-block: device 1 marks it gone and ends what it was
    passing on to device 2 (`_CUT`), whose sending thread then closes that connection, so
    device 2 is not left waiting on half a frame."""
    relay, (a, b) = _bare(1, 3), socket.socketpair()
    threading.Thread(target=relay._receive, args=(0, b), daemon=True).start()
    a.sendall(stream._HEADER.pack(0, 0, 12, 1 << 2) + b"half")
    a.close()
    pipe = relay.outboxes[2].get(timeout=5)
    assert [pipe.get(timeout=5) for _ in range(3)][1:] == [b"half", stream._CUT]
    deadline = time.monotonic() + 5
    while 0 not in relay.gone and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "connection ended" in relay.gone[0]
    c, d = socket.socketpair()
    pipe2 = queue.SimpleQueue()
    for piece in (b"head", b"half", stream._CUT):
        pipe2.put(piece)
    relay.outboxes[2].put(pipe2)
    relay._send(2, c)  # returns at the cut, the connection closed
    assert d.recv(64) == b"headhalf" and d.recv(64) == b""


def test_a_frame_to_pass_on_to_no_such_node_ends_its_connection():
    relay, (a, b) = _bare(1, 3), socket.socketpair()
    threading.Thread(target=relay._receive, args=(0, b), daemon=True).start()
    a.sendall(stream._HEADER.pack(0, 0, 4, 1 << 5) + b"data")
    deadline = time.monotonic() + 5
    while 0 not in relay.gone and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "pass on to nodes [5]" in relay.gone[0]
