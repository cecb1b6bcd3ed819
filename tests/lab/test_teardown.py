"""Nothing a lab built survives it: no namespace with its prefix, no process started
inside (nor one those forked), after an exception in the lab's block, and after
SIGINT or SIGTERM to a ``python -m lab`` process in the middle of a scenario."""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from lab import netns
from lab.network import HostSpec, Lab, Link
from lab.speed import ROOT, stream_env
from tests.swarm import Processes

pytestmark = [pytest.mark.slow]


def gone(pids: list[int], timeout_s: float = 10) -> list[int]:
    """Those of ``pids`` still running (zombies count as gone) after up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [pid for pid in pids if _running(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def inside(prefix: str) -> list[int]:
    return [pid for name in netns.listed(prefix) for pid in netns.pids(name)]


def test_an_exception_in_the_lab_removes_everything(lab_ready: None, tmp_path: Path) -> None:
    hosts = [HostSpec("coordinator"), HostSpec("peer", Link(1e6, 1e6), behind_nat=True)]
    with pytest.raises(RuntimeError, match="scenario failed"):
        with Lab(hosts, tmp_path) as lab:
            prefix = lab.prefix
            # A process that ignores SIGINT and forks a helper that does too.
            stubborn = "trap '' INT; sleep 1000 & sleep 1000"
            for host in ("coordinator", "peer"):
                lab.spawn(host, f"sleeper-{host}", ["sh", "-c", stubborn], stream_env())
            deadline = time.monotonic() + 10
            while len(inside(prefix)) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            started = inside(prefix)
            assert len(started) >= 4, started
            raise RuntimeError("scenario failed")
    assert netns.listed(prefix) == []
    assert gone(started) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_lab_removes_everything(lab_ready: None, tmp_path: Path, sig: int) -> None:
    processes = Processes(tmp_path)
    try:
        lab = processes.spawn(
            "lab",
            [sys.executable, "-m", "lab", "speed", "--seconds", "60", "--logs", str(tmp_path)],
            env={"PYTHONPATH": str(ROOT)},
        )
        deadline = time.monotonic() + 30
        started: list[int] = []
        prefix = ""
        while time.monotonic() < deadline:
            found = re.search(r"lab (ctlab-\w+-) up", lab.output())
            if found:
                prefix = found.group(1)
                started = inside(prefix)
                if len(started) >= 2:  # a stream's two ends run
                    break
            assert lab.popen.poll() is None, lab.output()
            time.sleep(0.1)
        assert prefix and len(started) >= 2, lab.output()

        lab.popen.send_signal(sig)
        assert lab.wait(timeout=30) == 130, lab.output()
        assert netns.listed(prefix) == [], lab.output()
        assert gone(started) == []
    finally:
        processes.stop_all(grace_s=0)
