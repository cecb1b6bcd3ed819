"""Bytes each peer sends, from the kernel's per-connection TCP counters.

hivemind reports no traffic and its p2pd is a separate process, so a peer's
bytes are those of every TCP socket owned by any process of its session (the
node and its DHT, averagers and p2pd children all share the session the
harness started it in). ``ss -tinp`` gives each socket's ``bytes_sent``; a
sampler reads it every few seconds and keeps each socket's largest count, so
a connection that closes between two samples loses at most its last few
seconds (the peers' libp2p connections live for the whole run). What a peer
sends to any process of the coordinator (gRPC, HTTP, its DHT peer, the
keeper pulling checkpoints) is counted apart ("control") from what it sends
to other peers ("swarm").
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field

COORDINATOR = "coordinator"
_BYTES_SENT = re.compile(r"\bbytes_sent:(\d+)")
_PIDS = re.compile(r"pid=(\d+)")


def _port(address: str) -> int:
    try:
        return int(address.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return -1


def read_sockets() -> list[tuple[str, str, list[int], int]]:
    """(local, peer, owning pids, bytes_sent) of every TCP socket the kernel lists."""
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, timeout=20).stdout
    sockets = []
    current: tuple[str, str, list[int]] | None = None
    for line in out.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            parts = line.split()
            if len(parts) < 5:
                current = None
                continue
            current = (parts[3], parts[4], [int(p) for p in _PIDS.findall(line)])
            continue
        if current is not None:
            match = _BYTES_SENT.search(line)
            if match:
                sockets.append((*current, int(match.group(1))))
            current = None
    return sockets


@dataclass
class ByteSampler:
    """Samples, every ``every_s``, the bytes sent by each named process session.

    ``sessions`` maps a peer's name to its session id (the pid of the process the
    harness started with ``start_new_session``). ``control_ports`` are the
    coordinator's gRPC and HTTP ports.
    """

    control_ports: set[int]
    every_s: float = 3.0
    sessions: dict[str, int] = field(default_factory=dict)
    # per peer: socket -> largest bytes_sent seen
    _sent: dict[str, dict[tuple[str, str], int]] = field(default_factory=dict)
    # (seconds since start, {peer: (swarm bytes, control bytes)})
    series: list[tuple[float, dict[str, tuple[int, int]]]] = field(default_factory=list)
    num_failed: int = 0
    # the coordinator's session (its gRPC, HTTP, DHT and keeper all run in it); 0: none
    coordinator_session: int = 0
    _coordinator_links: set[tuple[str, str]] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _started: float = 0.0

    def add(self, name: str, session: int) -> None:
        self.sessions[name] = session

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True, name="byte-sampler")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - one bad reading must not end the sampling
                self.num_failed += 1

    def sample(self) -> None:
        owner: dict[int, str] = {}
        session_names = {sid: name for name, sid in self.sessions.items()}
        session_names[self.coordinator_session] = COORDINATOR
        sockets = []
        at: dict[str, str] = {}  # local address -> whose process holds it
        for local, peer, pids, sent in read_sockets():
            name = None
            for pid in pids:
                if pid not in owner:
                    try:
                        owner[pid] = session_names.get(os.getsid(pid), "")
                    except OSError:
                        owner[pid] = ""
                name = owner[pid] or name
            if name:
                at[local] = name
                sockets.append((name, local, peer, sent))
        for name, local, peer, sent in sockets:
            if name == COORDINATOR:
                continue
            key = (local, peer)
            # The far end's owner, when it is still listed; a connection once seen
            # going to the coordinator stays counted as the coordinator's.
            if at.get(peer) == COORDINATOR or _port(peer) in self.control_ports:
                self._coordinator_links.add(key)
            known = self._sent.setdefault(name, {})
            known[key] = max(known.get(key, 0), sent)
        totals = {}
        for name in self.sessions:
            known = self._sent.get(name, {})
            to_coordinator = sum(v for k, v in known.items() if k in self._coordinator_links)
            totals[name] = (sum(known.values()) - to_coordinator, to_coordinator)
        self.series.append((time.monotonic() - self._started, totals))

    def totals(self) -> dict[str, dict[str, int]]:
        if not self.series:
            return {}
        return {
            name: {"swarm": swarm, "control": control}
            for name, (swarm, control) in self.series[-1][1].items()
        }
