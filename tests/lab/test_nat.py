"""A host behind its home NAT router reaches out and cannot be reached: its connection to
the coordinator host arrives from the home router's address, and nothing gets in, at
its own address or at the router's (no port forwarding)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from lab.network import HostSpec, Lab
from lab.speed import measure, stream_env

pytestmark = [pytest.mark.slow]

PORT = 5301
# Exits 0 once connected, 1 on refusal or after a 3 s timeout.
DIAL = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()\n"
    "except OSError as e:\n"
    "    sys.exit(f'{type(e).__name__}: {e}')\n"
)


def dial(lab: Lab, host: str, address: str) -> tuple[bool, str]:
    result = lab.run(host, [sys.executable, "-c", DIAL, address, str(PORT)])
    return result.returncode == 0, result.stderr.strip()


def listening(lab: Lab, host: str) -> bool:
    return bool(lab.run(host, ["ss", "-Hltn", f"sport = :{PORT}"]).stdout.strip())


def test_a_host_behind_nat_dials_out_and_nobody_dials_in(lab_ready: None, tmp_path: Path) -> None:
    hosts = [HostSpec("coordinator"), HostSpec("public"), HostSpec("home", behind_nat=True)]
    with Lab(hosts, tmp_path) as lab:
        home = lab.host("home")
        seen = measure(lab, "home", "coordinator", "up", seconds=0.5)
        assert seen.peer == home.public_address != home.address, (seen, home)

        # A listener on each peer host; the coordinator host dials them.
        serve = [sys.executable, "-m", "lab.stream", "serve", "--port", str(PORT)]
        for name in ("public", "home"):
            lab.spawn(name, f"listen-{name}", [*serve, "--timeout", "60"], stream_env())
        deadline = time.monotonic() + 30
        while not all(listening(lab, name) for name in ("public", "home")):
            assert time.monotonic() < deadline, "the listeners did not start"
            time.sleep(0.1)
        reached, why = dial(lab, "coordinator", lab.host("public").address)
        assert reached, why  # listening works: a public host is reached at once
        for address in (home.address, home.public_address):
            reached, why = dial(lab, "coordinator", address)
            assert not reached, address
            print(f"{address}: {why}")
