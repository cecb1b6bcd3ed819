"""How fast a lab link carries one TCP stream (:mod:`lab.stream`), in each direction."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from lab.network import Lab

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Measured:
    """One stream's rate at its receiver, and the address the server saw it come from."""

    bps: float
    received: int
    window_s: float
    peer: str


def stream_env() -> dict[str, str]:
    """What a process on a host needs to run ``python -m lab.stream``."""
    return {"PYTHONPATH": str(ROOT)}


def measure(
    lab: Lab, client: str, server: str, direction: str, seconds: float = 3.0, port: int = 5201
) -> Measured:
    """One stream between ``client`` (which dials, and may sit behind NAT) and ``server``
    (public): ``up`` from the client, ``down`` to it, for ``seconds``."""
    stream = [sys.executable, "-m", "lab.stream"]
    common = ["--port", str(port), "--direction", direction, "--seconds", str(seconds)]
    n = len(lab.started)
    serving = lab.spawn(server, f"stream{n}-{server}", [*stream, "serve", *common], stream_env())
    address = lab.host(server).address
    connecting = lab.spawn(
        client, f"stream{n}-{client}", [*stream, "connect", "--to", address, *common], stream_env()
    )
    timeout = seconds + 60
    codes = serving.popen.wait(timeout=timeout), connecting.popen.wait(timeout=timeout)
    receiver = serving if direction == "up" else connecting
    lines = receiver.log.read_text().strip().splitlines()
    if any(codes) or not lines:
        logs = "\n".join(f"--- {s.name}\n{s.log.read_text()}" for s in (serving, connecting))
        raise RuntimeError(f"stream {client} {direction} {server} failed {codes}:\n{logs}")
    found = json.loads(lines[-1])
    return Measured(found["bps"], found["received"], found["window_s"], found["peer"])
