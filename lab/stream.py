"""One TCP stream between two lab hosts, measured where it is received; plain sockets.

``python -m lab.stream serve`` listens on a public host; ``python -m lab.stream
connect`` dials it from another (behind NAT too, as the connection goes out from
there). ``--direction up`` sends from the connecting side, ``down`` from the
serving side, for ``--seconds``. The receiving side prints one JSON line:
``{"received": bytes, "window_s": seconds, "bps": bits per second, "peer": address}``,
the rate counted after the first half second (the cap's burst and TCP's slow start).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

CHUNK = 64 * 1024
WARMUP_S = 0.5


def send(sock: socket.socket, seconds: float) -> None:
    payload = b"\0" * CHUNK
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)


def receive(sock: socket.socket, peer: str) -> dict:
    """Read until the sender closes; the bytes and time after :data:`WARMUP_S`."""
    start = time.monotonic()
    counted, first, last = 0, None, start
    while chunk := sock.recv(CHUNK):
        now = time.monotonic()
        if now - start >= WARMUP_S:
            if first is None:
                first = now
            else:
                counted += len(chunk)
            last = now
    window_s = last - first if first is not None else 0.0
    bps = 8 * counted / window_s if window_s > 0 else 0.0
    return {"received": counted, "window_s": round(window_s, 3), "bps": bps, "peer": peer}


def serve(port: int, direction: str, seconds: float, timeout_s: float) -> None:
    with socket.create_server(("0.0.0.0", port)) as server:
        server.settimeout(timeout_s)
        conn, (peer, _) = server.accept()
        with conn:
            conn.settimeout(timeout_s)
            if direction == "down":
                send(conn, seconds)
                conn.recv(1)  # the other side closes once it has read everything
            else:
                _report(receive(conn, peer))


def connect(address: str, port: int, direction: str, seconds: float, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:  # the server may not listen yet
        try:
            conn = socket.create_connection((address, port), timeout=timeout_s)
            break
        except (ConnectionRefusedError, TimeoutError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with conn:
        if direction == "up":
            send(conn, seconds)
            conn.recv(1)
        else:
            _report(receive(conn, address))


def _report(result: dict) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["serve", "connect"])
    parser.add_argument("--to", default="", help="the serving host's address (connect)")
    parser.add_argument("--port", type=int, default=5201)
    parser.add_argument("--direction", choices=["up", "down"], default="up")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=30.0, help="give up after this long")
    args = parser.parse_args(argv)
    if args.role == "serve":
        serve(args.port, args.direction, args.seconds, args.timeout)
    else:
        connect(args.to, args.port, args.direction, args.seconds, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
