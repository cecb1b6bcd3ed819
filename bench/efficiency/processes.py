"""The processes the efficiency bench starts itself, each in a session of its own.

Owns starting a helper (a plain-hivemind peer, a one-process training loop)
and stopping its whole process group, as hivemind leaves DHT, averager and
p2pd children behind. Coordinators and nodes are started through
tests/swarm.py instead (see swarm.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.efficiency import ROOT

BIN = Path(sys.executable).parent


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Children:
    """Processes started in their own sessions; :meth:`stop_all` stops every group."""

    folder: Path
    children: list[Child] = field(default_factory=list)

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        log = self.folder / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=ROOT,  # where ``python -m bench.efficiency.*`` finds the package
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        child = Child(name, popen, log)
        self.children.append(child)
        return child

    def stop_all(self, grace_s: float = 20.0) -> None:
        for child in self.children:
            if child.popen.poll() is None:
                try:
                    child.popen.send_signal(signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for child in self.children:
            kill_group(child.popen)


def kill_group(popen: subprocess.Popen) -> None:
    """SIGKILL a child's whole session (hivemind leaves DHT, averagers and p2pd behind)."""
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def python_module(name: str) -> list[str]:
    """The command that runs ``bench.efficiency.<name>`` (spawn it with ``cwd=ROOT``)."""
    return [sys.executable, "-m", f"bench.efficiency.{name}"]
