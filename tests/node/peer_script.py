"""What the test peer scripts (``diloco_peer.py``, ``cuda_peer.py``, ``sync_peer.py``)
share: their JSON record, and their DHT on 127.0.0.1, dialling the peer named by
``--initial-peers-from``. The scripts run as files, so they import this as a sibling."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import hivemind


def write_record(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` as JSON, atomically (the test reads it while we write)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def start_dht(initial_peers_from: Path | None, client_mode: bool = False) -> hivemind.DHT:
    """A DHT on 127.0.0.1; with ``initial_peers_from`` (another peer's record), once that
    peer has written its addresses, dialling them first."""
    initial_peers: list[str] = []
    while initial_peers_from is not None and not initial_peers:
        try:
            initial_peers = json.loads(initial_peers_from.read_text())["maddrs"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.1)
    return hivemind.DHT(
        initial_peers=initial_peers,
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        client_mode=client_mode,
    )
