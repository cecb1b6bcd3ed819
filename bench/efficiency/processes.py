"""How the efficiency bench starts its own helpers (a plain-hivemind peer, a one-process
training loop): :class:`tests.swarm.Processes`, the one process-group helper every
real-process test and benchmark uses, with the command and environment that let
``python -m bench.efficiency.<name>`` find this package from any folder.
Coordinators and nodes are started through :class:`tests.swarm.Swarm` (see swarm.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.efficiency import ROOT
from tests.swarm import Processes

BIN = Path(sys.executable).parent


def helpers(folder: Path) -> Processes:
    """A fresh set of helper processes logging to ``folder/<name>.log``."""
    return Processes(folder)


def module_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` plus a PYTHONPATH that starts with the repository (where ``bench`` lives)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, **(env or {})}


def python_module(name: str) -> list[str]:
    """The command that runs ``bench.efficiency.<name>`` (spawn it with :func:`module_env`)."""
    return [sys.executable, "-m", f"bench.efficiency.{name}"]
