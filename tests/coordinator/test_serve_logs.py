"""``crowdtrain-coordinator serve --log-json``: every log line is a JSON object, uvicorn's own
included (a log collector that parses JSON lines chokes on anything else)."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import pytest

from tests.swarm import Swarm

pytestmark = pytest.mark.slow


def test_serve_writes_only_json_lines_uvicorns_too(swarm: Swarm) -> None:
    process = swarm.start_coordinator("--log-json")
    url = urlsplit(swarm.url)
    # Bytes that are not HTTP: uvicorn answers 400 and logs a WARNING of its own.
    with socket.create_connection((url.hostname, url.port), timeout=10) as raw:
        raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert raw.recv(64).startswith(b"HTTP/1.1 400")
    swarm.wait_for(
        lambda: "Invalid HTTP request received" in process.output(), 30, "uvicorn's warning"
    )
    assert swarm.stop(process) == 0
    # The log file holds stdout too: the ready block and the goodbye the CLI prints there.
    ports = swarm.ports
    printed = {
        "coordinator ready",
        f"  http  {ports['http_url']}",
        f"  grpc  {ports['grpc_target']}",
        f"  dht   {' '.join(ports['initial_peers'])}",
        f"  data  {swarm.coord_dir.resolve()}",
        "coordinator stopped",
    }
    lines = [line for line in process.output().splitlines() if line and line not in printed]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n{process.output()}")
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records), records
    (warning,) = [r for r in records if r["message"] == "Invalid HTTP request received."]
    assert warning["level"] == "WARNING" and warning["logger"] == "uvicorn.error"
