"""Network namespaces and the commands that build them: ``ip``, ``tc`` and ``nft``.

Owns the names: every namespace the lab creates is ``ctlab-<lab id>-<host>``, so
one lab's leftovers are found by its own prefix and every lab's by :data:`PREFIX`
(:func:`cleanup`). Knows nothing about hosts, links or what runs on them.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import time

logger = logging.getLogger(__name__)

# The prefix every lab's namespaces share; `python -m lab cleanup` removes them all.
PREFIX = "ctlab-"
TOOLS = ("ip", "tc", "nft")


class LabUnavailable(RuntimeError):
    """The machine cannot host a lab: not root / no CAP_NET_ADMIN, or a tool is missing.
    The message is one line a user can act on."""


class CommandFailed(RuntimeError):
    """A command that builds the lab failed; the message holds the command and its stderr."""


def new_prefix() -> str:
    """A prefix no other lab on this machine uses: ``ctlab-<6 hex digits>-``."""
    return f"{PREFIX}{secrets.token_hex(3)}-"


def run(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run one command to completion; ``check`` raises :class:`CommandFailed` on failure."""
    result = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise CommandFailed(f"{' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


def unavailable() -> str | None:
    """Why a lab cannot run here (one line), or None when it can: the tools are installed
    and a namespace can be created and deleted (root, or CAP_NET_ADMIN and CAP_SYS_ADMIN)."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        packages = {"ip": "iproute2", "tc": "iproute2", "nft": "nftables"}
        needed = " ".join(sorted({packages[tool] for tool in missing}))
        return f"the lab needs {', '.join(missing)}: install {needed} (apt-get install -y {needed})"
    probe = f"{new_prefix()}probe"
    result = run("ip", "netns", "add", probe, check=False)
    if result.returncode != 0:
        return (
            "the lab needs root (CAP_NET_ADMIN) to create network namespaces: "
            f"`ip netns add` said: {result.stderr.strip()}"
        )
    run("ip", "netns", "delete", probe, check=False)
    return None


def require() -> None:
    """Raise :class:`LabUnavailable` when :func:`unavailable` gives a reason."""
    reason = unavailable()
    if reason is not None:
        raise LabUnavailable(reason)


def listed(prefix: str = PREFIX) -> list[str]:
    """The namespaces whose name starts with ``prefix``."""
    out = run("ip", "netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [name for name in names if name.startswith(prefix)]


def add(name: str) -> None:
    """Create namespace ``name`` with its loopback up (p2pd and the coordinator's own
    helpers talk over it)."""
    run("ip", "netns", "add", name)
    run("ip", "-n", name, "link", "set", "lo", "up")


def pids(name: str) -> list[int]:
    """Every process running in namespace ``name``."""
    out = run("ip", "netns", "pids", name, check=False).stdout
    return [int(pid) for pid in out.split() if pid.isdigit()]


def kill_all(name: str) -> int:
    """SIGKILL every process left in namespace ``name`` (and its process group, so
    helpers it forked outside the namespace go too); how many were found."""
    found = pids(name)
    for pid in found:
        for kill in (_kill_group, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return len(found)


def delete(name: str) -> None:
    """Kill what runs in namespace ``name``, then delete it (its interfaces go with it,
    and a veth's peer in another namespace with them)."""
    for _ in range(50):
        if not kill_all(name):
            break
        time.sleep(0.1)
    result = run("ip", "netns", "delete", name, check=False)
    if result.returncode != 0 and name in listed(name):
        logger.warning("could not delete namespace %s: %s", name, result.stderr.strip())


def cleanup(prefix: str = PREFIX) -> list[str]:
    """Delete every namespace whose name starts with ``prefix`` and every process in it
    (a lab killed with SIGKILL leaves them); the names removed."""
    names = listed(prefix)
    for name in names:
        delete(name)
    return names


def _kill_group(pid: int, sig: int) -> None:
    group = os.getpgid(pid)
    if group != os.getpgid(0):  # never our own group: the lab and its caller live there
        os.killpg(group, sig)
