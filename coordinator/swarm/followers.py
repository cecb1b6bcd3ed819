"""The keeper's round followers: one process per DiLoCo run that follows its rounds.

A follower (``python -m crowdtrain.node.swarm.follower``, the node's own
averaging code in a process of its own) takes part in every round with
weight 0, applies the outer step and writes each round's global parameters
and outer momentum to an outbox folder, ``followers/<run>/outbox`` in the
coordinator's data folder. :class:`Followers` starts one per DiLoCo run
(from the newest kept round with its momentum, else round 0), restarts one
that died (with a growing pause), and hands each round the outbox holds to
the caller once its parameters hash to what the follower wrote, then
removes it. Nothing here downloads state from a volunteer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crowdtrain.model import CheckpointError, load_checkpoint, params_sha256
from crowdtrain.protocol.files import atomic_write

logger = logging.getLogger(__name__)

FOLLOWERS_DIR = "followers"
ROUND_FILE = re.compile(r"round-(\d+)\.safetensors")
RESTART_PAUSES_S = (1.0, 5.0, 30.0, 120.0)  # after the 1st, 2nd, ... failure in a row


@dataclass(frozen=True)
class FollowedRound:
    """A round the follower reached: its global parameters (state-dict names) and their
    sha256, and its outer momentum (parameter names), all checked."""

    round: int
    state: dict[str, torch.Tensor]
    sha256: str
    momentum: dict[str, torch.Tensor] | None


@dataclass
class _Process:
    popen: subprocess.Popen[bytes]
    started: float
    failures: int = 0
    restart_at: float = 0.0
    log: Any = field(default=None)


class Followers:
    """The followers of a coordinator's DiLoCo runs (``folder`` is the data folder's
    ``followers``). ``initial_peers`` are the run swarm's DHT multiaddrs, ``host`` the
    address followers listen on."""

    def __init__(self, folder: Path, initial_peers: list[str], host: str = "127.0.0.1"):
        self.folder, self.initial_peers, self.host = folder, list(initial_peers), host
        self._processes: dict[str, _Process] = {}
        self._rosters: dict[str, str] = {}  # run -> the roster last written

    def outbox(self, run_id: str) -> Path:
        return self.folder / run_id / "outbox"

    def snapshots(self, run_id: str) -> Path:
        """A sync run's private verification snapshots (:mod:`crowdtrain.protocol.snapshots`)."""
        return self.folder / run_id / "snapshots"

    def guard(self, run_id: str) -> Path:
        return self.folder / run_id / "guard"

    def update_roster(self, run_id: str, roster: list[tuple[str, float]]) -> None:
        """Each live peer's largest averaging weight, as nodes get it with heartbeats
        (the follower reads it at each round)."""
        text = json.dumps(dict(roster), sort_keys=True)
        if self._rosters.get(run_id) == text:
            return  # unchanged: no write every tick
        folder = self.guard(run_id)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "roster.json", text)
        self._rosters[run_id] = text

    def stats(self, run_id: str) -> dict[str, Any]:
        """What the run's follower says it did (rounds followed, loaded, missed)."""
        try:
            stats = json.loads((self.outbox(run_id) / "stats.json").read_text())
        except (OSError, ValueError):
            return {}
        return stats if isinstance(stats, dict) else {}

    def ensure(
        self,
        run_id: str,
        spec_toml: str,
        start: Path | None,
        start_outer: Path | None,
        heldout: Path | None = None,
    ) -> bool:
        """Start the run's follower unless it runs (``start``: the newest kept round's file
        and ``start_outer`` its momentum; None: round 0; ``heldout``: a validation shard it
        judges the state peers serve on). Returns whether it runs now."""
        process = self._processes.get(run_id)
        now = time.monotonic()
        if process is not None:
            code = process.popen.poll()
            if code is None:
                return True
            if process.restart_at == 0.0:
                pause = RESTART_PAUSES_S[min(process.failures, len(RESTART_PAUSES_S) - 1)]
                process.restart_at = now + pause
                logger.warning(
                    "run %s: the round follower exited (code %s); restarting it in %.0fs "
                    "(its log: %s)",
                    run_id,
                    code,
                    pause,
                    self.folder / run_id / "follower.log",
                )
            if now < process.restart_at:
                return False
        folder = self.folder / run_id
        self.outbox(run_id).mkdir(parents=True, exist_ok=True)
        spec_path = folder / "spec.toml"
        spec_path.write_text(spec_toml)
        command = [
            sys.executable,
            "-m",
            "crowdtrain.node.swarm.follower",
            "--spec",
            str(spec_path),
            "--outbox",
            str(self.outbox(run_id)),
            "--guard",
            str(self.guard(run_id)),
            "--snapshots",
            str(self.snapshots(run_id)),
            "--host",
            self.host,
            "--parent-pid",
            str(os.getpid()),
            "--initial-peers",
            *self.initial_peers,
        ]
        if heldout is not None:
            command += ["--heldout", str(heldout)]
        if start is not None:
            command += ["--checkpoint", str(start)]
            if start_outer is not None:
                command += ["--outer", str(start_outer)]
        log = (folder / "follower.log").open("ab")
        # Its own process group (in the coordinator's session): hivemind's helper processes
        # go with it when it is killed.
        popen = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, process_group=0
        )
        failures = process.failures + 1 if process is not None else 0
        self._processes[run_id] = _Process(popen, now, failures=failures, log=log)
        logger.info(
            "run %s: started its round follower (pid %d) from %s",
            run_id,
            popen.pid,
            start.name if start is not None else "round 0",
        )
        return True

    def rounds(self, run_id: str) -> list[FollowedRound]:
        """The rounds waiting in the run's outbox, oldest first, each checked; a file that
        does not check is removed with a warning."""
        outbox = self.outbox(run_id)
        if not outbox.is_dir():
            return []
        found = sorted(
            (int(m.group(1)), p)
            for p in outbox.iterdir()
            if (m := ROUND_FILE.fullmatch(p.name)) is not None
        )
        rounds = []
        for round_, path in found:
            outer = path.with_name(f"round-{round_}.outer.safetensors")
            try:
                state, metadata = load_checkpoint(path)
                momentum = load_checkpoint(outer)[0] if outer.exists() else None
            except CheckpointError as e:
                logger.warning(
                    "run %s: the follower's round %d is unreadable: %s", run_id, round_, e
                )
                self.taken(run_id, round_)
                continue
            sha256 = params_sha256(state)
            if metadata.get("params_sha256") != sha256 or metadata.get("run_id") != run_id:
                logger.warning("run %s: the follower's round %d does not check", run_id, round_)
                self.taken(run_id, round_)
                continue
            rounds.append(FollowedRound(round_, state, sha256, momentum))
        return rounds

    def taken(self, run_id: str, round_: int) -> None:
        """The round was kept (or refused): remove its files from the outbox."""
        outbox = self.outbox(run_id)
        (outbox / f"round-{round_}.safetensors").unlink(missing_ok=True)
        (outbox / f"round-{round_}.outer.safetensors").unlink(missing_ok=True)

    def running(self, run_id: str) -> bool:
        process = self._processes.get(run_id)
        return process is not None and process.popen.poll() is None

    def stop(self, run_id: str, timeout_s: float = 10.0) -> None:
        """Stop the run's follower (an idle run: nobody to follow)."""
        process = self._processes.pop(run_id, None)
        if process is not None:
            logger.info("run %s: stopping its round follower (no active peer)", run_id)
            self._stop([process], timeout_s)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every follower (SIGTERM: each leaves its group; then SIGKILL)."""
        self._stop(list(self._processes.values()), timeout_s)
        self._processes.clear()

    def _stop(self, processes: list[_Process], timeout_s: float) -> None:
        for process in processes:
            if process.popen.poll() is None:
                process.popen.terminate()
        deadline = time.monotonic() + timeout_s
        for process in processes:
            try:
                process.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # whatever of its group is left (hivemind's helpers)
                os.killpg(process.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.popen.wait()
            if process.log is not None:
                process.log.close()


__all__ = ["FOLLOWERS_DIR", "FollowedRound", "Followers"]
