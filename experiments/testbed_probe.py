"""The testbed link checked: round-trip time of a few bytes and bulk throughput over TCP.

`probe(nodes_ns, link)` runs a server in node 1's namespace and a client in node 0's (both
this file, `python testbed_probe.py serve|rtt|bulk`): `rtt` sends 16 bytes and waits for
them back `--count` times (TCP_NODELAY), one RTT each; `bulk` sends `--mbytes` and waits for
the server's one-byte receipt (the time includes one RTT, taken off by the caller). Over the
relay with one-way delay d the RTT should be 2 d plus the relay's own cost.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time

PORT = 29600


def serve(port: int) -> None:
    """Echo (first byte 'e') or count-and-receipt (first byte 'b') connections, forever."""
    listener = socket.create_server(("0.0.0.0", port))
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            kind = conn.recv(1)
            if kind == b"e":
                while data := conn.recv(64):
                    conn.sendall(data)
            elif kind == b"b":
                want = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "big")
                while want > 0 and (data := conn.recv(min(want, 1 << 20))):
                    want -= len(data)
                conn.sendall(b"k")


def _connect(host: str, port: int, kind: bytes) -> socket.socket:
    for _ in range(100):  # the server may still be starting
        try:
            conn = socket.create_connection((host, port), timeout=60)
            break
        except OSError:
            time.sleep(0.1)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.sendall(kind)
    return conn


def rtt(host: str, port: int, count: int) -> list[float]:
    with _connect(host, port, b"e") as conn:
        conn.sendall(b"x" * 16)  # the first exchange opens the congestion window: untimed
        conn.recv(64, socket.MSG_WAITALL)
        times = []
        for _ in range(count):
            start = time.perf_counter()
            conn.sendall(b"x" * 16)
            got = 0
            while got < 16:
                got += len(conn.recv(64))
            times.append(time.perf_counter() - start)
            time.sleep(0.01)
    return times


def bulk(host: str, port: int, mbytes: float) -> float:
    """Seconds to send `mbytes` and get the receipt."""
    size = int(mbytes * 1e6)
    with _connect(host, port, b"b") as conn:
        start = time.perf_counter()
        conn.sendall(size.to_bytes(8, "big"))
        chunk = b"\0" * (1 << 16)
        left = size
        while left > 0:
            left -= conn.send(chunk[: min(left, len(chunk))])
        conn.recv(1)
        return time.perf_counter() - start


def probe(names: list[str], server_addr: str, *, count: int, mbytes: float | None) -> dict:
    """RTTs (s) of `count` round trips from names[0] to the server in names[1], and the
    bulk throughput (Mbit/s) of `mbytes` if given."""
    run = ["ip", "netns", "exec"]
    server = subprocess.Popen([*run, names[1], sys.executable, __file__, "serve"])
    try:

        def client(*argv):
            command = [*run, names[0], sys.executable, __file__, *argv, "--host", server_addr]
            out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
            return json.loads(out.stdout)

        times = client("rtt", "--count", str(count))
        out = {"rtt_s": times, "rtt_median_s": statistics.median(times),
               "rtt_min_s": min(times), "rtt_max_s": max(times)}  # fmt: skip
        if mbytes:
            seconds = client("bulk", "--mbytes", str(mbytes)) - out["rtt_median_s"]
            out |= {"bulk_mbytes": mbytes, "throughput_mbit": mbytes * 8 / seconds}
        return out
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["serve", "rtt", "bulk"])
    parser.add_argument("--host")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--mbytes", type=float, default=10)
    args = parser.parse_args()
    if args.mode == "serve":
        serve(PORT)
    elif args.mode == "rtt":
        print(json.dumps(rtt(args.host, PORT, args.count)))
    else:
        print(json.dumps(bulk(args.host, PORT, args.mbytes)))


if __name__ == "__main__":
    main()
