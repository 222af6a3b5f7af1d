"""The exchange on the nodes' own TCP connections: sent at once, waited for only where needed
(`Plan(transport="stream")`, a cluster of one process per device).

Under JAX's CPU collectives (gloo over TCP) a block moves only once its receiver has said it
is ready, so each step of a layer's exchange costs a round trip, and every device waits at
every layer for the slowest (experiments/results/collective_probe.md). Here every node keeps a
connection to every other, with a thread that takes in whatever arrives: a device hands its
layer's block to a sending thread as soon as it is computed and goes on; it waits only for
the blocks it needs. A causal model's device needs only the earlier devices' (the
partition-aware mask hides the later ones', DESIGN.md section 1), so it sends only forward:
device 0 never waits, and device p runs behind device 0 by the delays of the links before it,
once, not at every layer. An encoder's device needs every other device's block, one one-way
delay a layer.

On a causal stream the blocks are relayed where that lightens the busiest uplink (`routes`):
device 0's block goes to every later device, so sent directly its uplink carries N - 1 copies
a layer; a device between can take it in and pass it on as it arrives (N = 4: at most two
blocks a layer on any uplink instead of three), piece by piece as the pieces come in, so the
relay adds about one packet's time to the block's trip, not the whole block's.

Frames on a connection: a header (exchange number, source node, payload bytes, the nodes the
receiver passes the frame on to as a bit mask; network byte order) and the block's bytes. The
i-th exchange of every node is the same layer of the same inference: every node runs the
same program.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import struct
import threading
import time

import jax
import numpy as np
from jax.experimental import io_callback

from prism_jax.errors import PrismError

_HEADER = struct.Struct("!QIIQ")  # exchange number, source node, payload bytes, pass-on mask
_KEY = "prism_jax/stream/{}"
_CUT = object()  # in a relayed frame's pieces: its source's connection ended mid-frame
TIMEOUT_S = 600.0  # how long a node waits for a block before it gives up
# Test hook: a node whose rank is named here kills itself at its second exchange (mid-run).
DIE_MID_RUN = "PRISM_JAX_TEST_DIE_MID_STREAM"


class Stream:
    """This node's connections to the other nodes of a running `jax.distributed` cluster."""

    def __init__(self, rank: int, nodes: int, *, timeout_s: float = TIMEOUT_S):
        self.rank, self.nodes, self.timeout_s = rank, nodes, timeout_s
        self.count = 0  # exchanges this node has made
        self.arrived: dict[tuple[int, int], bytes] = {}  # (exchange, source) -> block
        self.gone: dict[int, str] = {}  # node -> why its connection ended
        self.failed: str | None = None  # the peer an exchange lost: "node q (why)"
        self.waited_s = 0.0  # time spent waiting for blocks, every exchange so far
        self.ready = threading.Condition()
        self.outboxes = {q: queue.Queue() for q in range(nodes) if q != rank}
        self._connect()

    def _connect(self) -> None:
        """Listen, publish the address on the coordination service, connect to every other
        node (one connection each way), and start the threads."""
        from jax._src import distributed

        client = distributed.global_state.client
        listener = socket.create_server((_own_address(), 0))
        host, port = listener.getsockname()[:2]
        client.key_value_set(_KEY.format(self.rank), f"{host}:{port}")
        timeout_ms = int(self.timeout_s * 1000)
        for q in self.outboxes:
            host, port = client.blocking_key_value_get(_KEY.format(q), timeout_ms).rsplit(":", 1)
            conn = socket.create_connection((host, int(port)), timeout=self.timeout_s)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(struct.pack("!I", self.rank))
            conn.settimeout(None)
            threading.Thread(target=self._send, args=(q, conn), daemon=True).start()
        listener.settimeout(self.timeout_s)
        for _ in self.outboxes:
            conn, _ = listener.accept()
            conn.settimeout(None)
            source = struct.unpack("!I", _read(conn, 4))[0]
            threading.Thread(target=self._receive, args=(source, conn), daemon=True).start()
        listener.close()

    def _send(self, q: int, conn: socket.socket) -> None:
        while True:
            frame = self.outboxes[q].get()
            # a relayed frame is a queue of its pieces, passed on as they arrive (None: the
            # end; _CUT: its source's connection ended mid-frame, so this one ends too)
            pieces = _pieces(frame) if isinstance(frame, queue.SimpleQueue) else [frame]
            try:
                for piece in pieces:
                    if piece is _CUT:
                        conn.close()
                        return
                    conn.sendall(piece)
            except OSError as e:
                conn.close()
                self._gone(q, f"sending to it failed: {e}")
                return

    def _receive(self, source: int, conn: socket.socket) -> None:
        while True:
            pipes = []
            try:
                number, sender, size, onward = _HEADER.unpack(_read(conn, _HEADER.size))
                if onward >> self.nodes or onward >> self.rank & 1:
                    raise ConnectionError(f"a frame to pass on to nodes {_bits(onward)}")
                for q in _bits(onward):  # relayed piece by piece as it arrives (cut-through)
                    pipes.append(queue.SimpleQueue())
                    pipes[-1].put(_HEADER.pack(number, sender, size, 0))
                    self.outboxes[q].put(pipes[-1])
                block = _read(conn, size, pipes)
            except OSError as e:
                for pipe in pipes:
                    pipe.put(_CUT)
                self._gone(source, f"its stream connection ended: {e}")
                return
            with self.ready:
                self.arrived[number, sender] = block
                self.ready.notify_all()

    def _gone(self, q: int, why: str) -> None:
        with self.ready:
            self.gone.setdefault(q, why)
            self.ready.notify_all()

    def exchange(self, block: np.ndarray, send_to, receive_from, onward=None, via=None):
        """Send `block` to the nodes `send_to` (`onward[q]`: the nodes q passes it on to);
        return `[N, *block.shape]`: every node's block in node order, this node's own, those
        of `receive_from` once they arrive, zeros for the rest. `via[s]`: the node that
        relays s's block here (lost with it)."""
        onward, via = onward or {}, via or {}
        number = self.count
        self.count += 1
        if number == 1 and os.environ.get(DIE_MID_RUN) == str(self.rank):
            os.kill(os.getpid(), signal.SIGKILL)
        block = np.ascontiguousarray(block)
        payload = block.tobytes()
        for q in send_to:
            mask = sum(1 << d for d in onward.get(q, ()))
            self.outboxes[q].put(_HEADER.pack(number, self.rank, len(payload), mask) + payload)
        every = np.zeros((self.nodes, *block.shape), block.dtype)
        every[self.rank] = block
        wanted = [(number, q) for q in receive_from]
        with self.ready:
            # A block that came before its sender's connection closed still counts: a peer
            # that sent its last block and ended is no failure of this exchange. A relayed
            # block is lost with its relay, not its source (which may end normally before the
            # relay's copy arrives; a source that died fails its relay, which then ends).
            def lost_with(q):
                return via.get(q, q) in self.gone

            start = time.perf_counter()
            self.ready.wait_for(
                lambda: all(k in self.arrived or lost_with(k[1]) for k in wanted), self.timeout_s
            )
            self.waited_s += time.perf_counter() - start
            missing = [q for n, q in wanted if (n, q) not in self.arrived]
            if missing:
                q = next((via.get(q, q) for q in missing if lost_with(q)), missing[0])
                why = self.gone.get(q, f"no block within {self.timeout_s:g} s")
                self.failed = f"node {q} ({why})"
                raise PrismError(f"node {self.rank}: lost {self.failed}")
            got = [self.arrived.pop(k) for k in wanted]
        for q, data in zip(receive_from, got, strict=True):
            every[q] = np.frombuffer(data, block.dtype).reshape(block.shape)
        return every


_STREAM: Stream | None = None


def lost() -> str | None:
    """The peer this process's stream lost, "node q (why)", or None: a failed exchange
    reaches the caller as the runtime's error around the callback's, so `cluster.fail_fast`
    asks here."""
    return _STREAM.failed if _STREAM is not None else None


def waited() -> float:
    """Seconds this process's stream has waited for blocks so far (0 without a stream)."""
    return _STREAM.waited_s if _STREAM is not None else 0.0


def connect(mesh) -> Stream:
    """This process's `Stream`, made on first use: every node of the cluster calls it at the
    same point (when it builds a program with `transport="stream"`). The mesh must hold one
    device per process, every process of the cluster."""
    global _STREAM
    devices = mesh.devices.ravel()
    owners = [d.process_index for d in devices]
    if sorted(owners) != list(range(jax.process_count())) or len(set(owners)) != len(owners):
        raise PrismError(
            "transport 'stream' runs on a cluster of one process per device (prism-jax launch "
            "or node); on emulated devices in one process use 'all_gather' or 'all_to_all'"
        )
    if owners != list(range(len(owners))):
        raise PrismError("transport 'stream': the mesh must hold node p's device at place p")
    if _STREAM is None:
        _STREAM = Stream(jax.process_index(), jax.process_count())
    return _STREAM


def routes(devices: int) -> dict[tuple[int, int], int]:
    """Who sends device s's block to each later device d on a causal stream: `(s, d) -> v`,
    v = s itself or a device between them that has the block from s directly and passes it on.
    Greedy over (d, s) in order, each to whichever of them has sent fewest blocks a layer so
    far (ties: s, no extra hop); kept only where the busiest uplink carries fewer blocks a layer
    than sending directly would (N - 1, device 0's): N = 4 two instead of three. Past 64
    devices (the frame's pass-on mask) every block goes directly."""
    direct = {(s, d): s for d in range(devices) for s in range(d)}
    if devices > 64:  # the pass-on mask is 64 bits
        return direct
    via, load = {}, [0] * devices
    for d in range(1, devices):
        for s in range(d):
            senders = [s] + [v for v in range(s + 1, d) if via[s, v] == s]
            v = min(senders, key=lambda v: (load[v], v != s))
            via[s, d], load[v] = v, load[v] + 1
    return direct if max(load) >= devices - 1 else via


def gather(rows: jax.Array, device, devices: int, causal: bool) -> jax.Array:
    """`[B, N, V, C]`: every device's `[B, V, C]` rows in device order, by the stream (inside
    the program: a host callback). Causal: only the earlier devices' rows (the others zero),
    relayed along `routes`."""
    via = routes(devices) if causal else None

    def host(block, p):
        every = exchange_as(_STREAM, block, int(p), devices, via)
        return np.moveaxis(every, 0, 1)  # [B, N, V, C]

    b, v, c = rows.shape
    out = jax.ShapeDtypeStruct((b, devices, v, c), rows.dtype)
    return io_callback(host, out, rows, device)


def exchange_as(node: Stream, block: np.ndarray, p: int, devices: int, via=None) -> np.ndarray:
    """Device p's exchange on `node`: `[N, ...]` as `Stream.exchange` returns it. `via`: the
    causal `routes` (p sends forward, directly or through a relay, and waits for the earlier
    devices); None: an encoder's, to and from every other device."""
    later, others = range(p + 1, devices), [q for q in range(devices) if q != p]
    if via is None:
        return node.exchange(block, others, others)
    direct = [d for d in later if via[p, d] == p]
    onward = {q: [d for d in later if via[p, d] == q != p] for q in direct}
    return node.exchange(block, direct, range(p), onward, {s: via[s, p] for s in range(p)})


def _pieces(pipe: queue.SimpleQueue):
    """A relayed frame's pieces until its end, those that have arrived by the time one is
    taken joined into one (a slow link's many small pieces do not cost a send each); `_CUT`
    last if its source's connection ended mid-frame. None or `_CUT` is the last thing a pipe
    gets."""
    while True:
        ready = [pipe.get()]
        while not pipe.empty():
            ready.append(pipe.get())
        ended = ready[-1] is None or ready[-1] is _CUT
        end = ready.pop() if ended else None
        if ready:
            yield b"".join(ready)
        if end is _CUT:
            yield _CUT
        if ended:
            return


def _bits(mask: int) -> list[int]:
    return [q for q in range(mask.bit_length()) if mask >> q & 1]


def _read(conn: socket.socket, size: int, pipes=()) -> bytes:
    """`size` bytes from `conn`; each piece also put on every queue of `pipes` as it arrives,
    and None after the last."""
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
        for pipe in pipes:
            pipe.put(chunk)
    for pipe in pipes:
        pipe.put(None)
    return bytes(data)


def _own_address() -> str:
    """The address this node reaches the coordinator from (its interface on the cluster's
    network; loopback when the cluster is one machine)."""
    from jax._src import distributed

    host = distributed.global_state.coordinator_address.rsplit(":", 1)[0]
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((host, 9))  # no packet is sent: this only picks the route
        return probe.getsockname()[0]
    finally:
        probe.close()
