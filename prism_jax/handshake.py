"""The handshake before a cluster forms: node 0 takes the coordinator port itself and every
other node says hello there with its rank and node count, so that what the runtime would crash
on (SIGSEGV on a port in use or an address of another machine, an abort on different node
counts, one rank twice) or wait out its timeout on is one `PrismError` naming the cause.

One line of JSON each way over TCP (a hello, then node 0's "ok" or what differs); node 0 then
closes the port, and `jax.distributed` takes it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import time

from prism_jax.errors import PrismError


def coordinator_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:PORT` for IPv6) -> (host, port), the port in [1, 65535]."""
    host, _, port = text.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise PrismError(f"coordinator must be HOST:PORT, PORT in [1, 65535]; got {text!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def take_port(bind: str, port: int) -> socket.socket:
    """Node 0 listens on the coordinator port itself first: the runtime crashes (SIGSEGV)
    where the port is taken or `bind` is not an address of this machine."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError):
        raise PrismError(f"bind address {bind!r} is not a host name or address") from None
    server = socket.socket(family, kind, proto)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the runtime's server
    try:
        server.bind(address)
        server.listen()
    except OSError as e:
        server.close()
        if e.errno == errno.EADDRINUSE:
            raise PrismError(
                f"port {port} on {bind} is already in use (by another program, or "
                "another node started with rank 0)"
            ) from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise PrismError(f"bind address {bind} is not an address of this machine") from None
        raise PrismError(f"cannot listen on {bind} port {port}: {e.strerror}") from None
    return server


_HELLO = "prism_jax_node"  # the key every handshake message carries


def welcome(server: socket.socket, nodes: int, deadline: float, late: str) -> None:
    """Node 0: wait for a hello from every other rank; all agree, or all hear what differs."""
    joined: dict[int, socket.socket] = {}
    try:
        while _drop_dead(joined) < nodes - 1:
            server.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                conn, _ = server.accept()
            except TimeoutError:
                missing = ", ".join(str(r) for r in range(1, nodes) if r not in joined)
                raise PrismError(f"{late} (no word from node {missing})") from None
            said = _receive(conn, min(time.monotonic() + 5, deadline))
            if not (said and all(type(said.get(k)) is int for k in ("rank", "nodes"))):
                conn.close()  # not a node of ours (a port scanner, a browser)
                continue
            _drop_dead(joined)  # a node started again is no second node of its rank
            problem = _disagreement(said, nodes, joined)
            if problem:
                for c in [*joined.values(), conn]:
                    _send(c, {"error": problem})
                raise PrismError(f"node 0: {problem}")
            joined[said["rank"]] = conn
        for c in joined.values():
            _send(c, {"ok": True})
    finally:
        for c in joined.values():
            c.close()
        server.close()  # the runtime's server takes the port next


def _disagreement(said: dict, nodes: int, joined: dict) -> str | None:
    """What is wrong with a node's hello, if anything."""
    rank, theirs = said["rank"], said["nodes"]
    if theirs != nodes:
        return (
            f"node {rank} was started with {theirs} nodes, node 0 with {nodes}: give every "
            "node the same --nodes"
        )
    if not 1 <= rank < nodes:
        return f"a node was started with rank {rank}, outside [1, {nodes})"
    if rank in joined:
        return f"two nodes were started with rank {rank}: give each node its own --rank"
    return None


def _drop_dead(joined: dict) -> int:
    """Forget the nodes that died waiting for the answer (they may be started again); returns
    how many are left."""
    for rank in [r for r, conn in joined.items() if not _alive(conn)]:
        joined.pop(rank).close()
    return len(joined)


def _alive(conn: socket.socket) -> bool:
    """Whether the node at the other end of a hello is still there."""
    timeout = conn.gettimeout()
    conn.setblocking(False)
    try:
        return conn.recv(1, socket.MSG_PEEK) != b""  # b"": closed
    except BlockingIOError:  # nothing to read: still connected
        return True
    except OSError:
        return False
    finally:
        conn.settimeout(timeout)


def hello(address, rank: int, nodes: int, deadline: float, late: str) -> None:
    """Another node: tell node 0 this node's rank and node count, and wait until it has
    heard every node (retrying while node 0 is not up yet)."""
    why = "nothing listens there: is node 0 started, at that address?"
    while time.monotonic() < deadline:
        try:
            conn = socket.create_connection(address, timeout=1)
        except socket.gaierror:
            raise PrismError(
                f"node {rank}: coordinator host {address[0]!r} is not a host name or address"
            ) from None
        except OSError:  # node 0 not listening yet
            time.sleep(0.2)
            continue
        why = "node 0 still waits for other nodes"
        with conn:
            _send(conn, {"rank": rank, "nodes": nodes})
            answer = _receive(conn, deadline)
        if answer is None:
            time.sleep(0.2)  # node 0 went away mid-hello: it may be started again
        elif answer is False:
            raise PrismError(
                f"node {rank}: {address[0]}:{address[1]} answers, but not as a prism-jax node 0 "
                f"waiting for its nodes (a cluster that formed already, with another node of "
                f"rank {rank}? another program?)"
            )
        elif "error" in answer:
            raise PrismError(f"node {rank}: {answer['error']}")
        elif answer.get("ok"):
            return
    raise PrismError(f"{late} ({why})")


def _send(conn: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):  # a peer gone already hears nothing
        conn.sendall(json.dumps({_HELLO: 1, **message}).encode() + b"\n")


def _receive(conn: socket.socket, deadline: float):
    """One handshake message from `conn` by `deadline`; None if the peer closed or said
    nothing; `False` for bytes that are no handshake (another program on the port)."""
    data = b""
    while b"\n" not in data and len(data) < 4096:
        conn.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            chunk = conn.recv(4096)
        except OSError:
            return None
        if not chunk:
            break
        data += chunk
    if not data:
        return None
    try:
        message = json.loads(data.split(b"\n")[0])
    except ValueError:
        return False
    return message if isinstance(message, dict) and message.pop(_HELLO, None) == 1 else False
