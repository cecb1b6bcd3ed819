"""Start a real coordinator and real nodes through their command lines, and always reap them.

Every process starts in its own session (hivemind peers are several OS
processes each), so stopping a process group stops everything it spawned.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.specs import write_tiny_spec

BIN = Path(sys.executable).parent
COORDINATOR = str(BIN / "crowdtrain-coordinator")
NODE = str(BIN / "crowdtrain-node")


# The nonce journal records every signed session message that reached the
# coordinator, refused or not (a refused message's nonce stays spent).
JOURNAL_TABLES = {"nonces"}
# The metrics sampler writes its time series on its own clock every few seconds while a
# peer is live, whatever a request did.
CLOCK_TABLES = {"run_samples"}


def db_rows(coord_dir: Path) -> dict[str, list]:
    """Every row of every table of a coordinator's database but its nonce journal and the
    metrics sampler's time series."""
    db = sqlite3.connect(coord_dir / "coordinator.db")
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {
            t: db.execute(f"SELECT * FROM {t}").fetchall()
            for t in sorted(tables)
            if t not in JOURNAL_TABLES | CLOCK_TABLES
        }
    finally:
        db.close()


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command to completion, capturing its output."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def small_corpus(folder: Path, num_bytes: int) -> Path:
    """A folder of the standard library's first source files, about ``num_bytes`` in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for path in sorted(root.glob("*.py")):
        text = path.read_bytes()
        if not text or b"\0" in text or len(text) > 16_384:
            continue  # small files only, so shard counts follow num_bytes closely
        (folder / path.name).write_bytes(text)
        total += len(text)
        if total >= num_bytes:
            break
    return folder


def write_spec(
    path: Path,
    run_id: str = "tiny",
    lease_s: float = 600.0,
    tokenizer: str = "byte",
    vocab_size: int = 256,
) -> Path:
    """The tiny run's spec (:func:`tests.specs.tiny_spec`) at ``path``."""
    return write_tiny_spec(
        path,
        run={"id": run_id},
        model={"vocab_size": vocab_size},
        data={"tokenizer": tokenizer, "lease_s": lease_s},
    )


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)


@dataclass
class Processes:
    """Processes started as a user starts them, each in its own session (a hivemind peer
    is several OS processes) and logging to ``root/<name>.log``. :meth:`stop_all`
    ends every group; use it in a ``finally``. Every real-process test and benchmark
    starts its processes through this class (or :class:`Swarm`, which is one)."""

    root: Path
    processes: list[Process] = field(default_factory=list)

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Process:
        """Start ``args`` in a new session; ``env`` adds variables to this process's."""
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def named(self, name: str) -> Process:
        """The last process started under ``name``."""
        return next(p for p in reversed(self.processes) if p.name == name)

    def stop(self, process: Process, sig: int = signal.SIGINT, timeout: float = 60) -> int | None:
        """Ask politely, then stop the whole process group."""
        if process.popen.poll() is None:
            try:
                process.popen.send_signal(sig)
                process.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        kill_group(process.popen)
        return process.popen.poll()

    def kill(self, process: Process) -> None:
        """SIGKILL the process's whole group at once (a crash, as a test wants it)."""
        kill_group(process.popen)

    def stop_all(self, grace_s: float = 30.0) -> None:
        """SIGINT every live process at once, wait up to ``grace_s`` for them all, then
        SIGKILL every group (what a process left behind goes too)."""
        for process in self.processes:
            if process.popen.poll() is None:
                try:
                    process.popen.send_signal(signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            try:
                process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for process in self.processes:
            kill_group(process.popen)

    def logs(self, tail_chars: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.output()[-tail_chars:]}" for p in self.processes)


class ScriptPeers(Processes):
    """Peers run by a test's own script (``tests/node/diloco_peer.py``, ``cuda_peer.py``):
    each writes what it saw to ``root/<name>.json``, and trains once its ``--go`` file
    (``root/go`` unless the arguments name another) exists.

    :meth:`wait_for` fails early when a peer exits with a code outside ``allowed_exits``.
    """

    def __init__(self, root: Path, script: Path, allowed_exits: tuple[int, ...]):
        super().__init__(root)
        self.script = script
        self.allowed_exits = allowed_exits
        self.go = root / "go"
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str, initial: str | None = None) -> Process:
        """Start a peer; ``initial`` names a peer whose addresses it dials first."""
        command = [sys.executable, str(self.script), "--out", str(self.out(name))]
        if "--go" not in args:
            command += ["--go", str(self.go)]
        if initial is not None:
            command += ["--initial-peers-from", str(self.out(initial))]
        process = self.spawn(name, [*command, *args])
        self.procs[name] = process.popen
        return process

    def out(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def read(self, name: str) -> dict:
        try:
            return json.loads(self.out(name).read_text())
        except (OSError, ValueError):
            return {}

    def rounds(self, name: str) -> dict[int, str]:
        """The sha256 of the global parameters the peer held after each round."""
        return {int(k): v for k, v in self.read(name).get("rounds", {}).items()}

    def wait_for(self, what: str, check: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            for name, popen in self.procs.items():
                if popen.poll() is not None and popen.returncode not in self.allowed_exits:
                    raise AssertionError(f"peer {name} exited ({popen.returncode}):\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.logs()}")
            time.sleep(0.2)

    def stop_all(self, grace_s: float = 0.0) -> None:
        """SIGKILL every peer's group at once: these scripts do not leave politely."""
        for process in self.processes:
            kill_group(process.popen)

    def kill_peer(self, name: str) -> None:
        """SIGKILL a peer's whole group, as a crash would."""
        self.kill(self.named(name))

    def log(self, name: str, tail_chars: int = 3000) -> str:
        return self.named(name).output()[-tail_chars:]

    def logs(self, tail_chars: int = 3000) -> str:
        return "\n".join(f"--- {name}\n{self.log(name, tail_chars)}" for name in self.procs)


@dataclass
class Swarm(Processes):
    """A coordinator and its nodes under one temporary folder."""

    ports: dict[str, Any] = field(default_factory=dict)

    @property
    def coord_dir(self) -> Path:
        return self.root / "coordinator"

    @property
    def url(self) -> str:
        return self.ports["http_url"]

    def prepare(self, shard_tokens: int = 262_144, source: str = "stdlib", *extra: str) -> Path:
        data = self.root / "data"
        result = run_cli(
            COORDINATOR,
            "prepare-data",
            "--source",
            source,
            "--out",
            str(data),
            "--shard-tokens",
            str(shard_tokens),
            *extra,
        )
        assert result.returncode == 0, result.stderr
        return data

    def publish(self, spec: Path, data: Path) -> subprocess.CompletedProcess:
        return run_cli(
            COORDINATOR,
            "publish",
            str(spec),
            "--data-dir",
            str(self.coord_dir),
            "--data",
            str(data),
        )

    def start_coordinator(
        self,
        *extra: str,
        timeout: float = 90,
        http_port: int = 0,
        grpc_port: int = 0,
        dht_port: int = 0,
    ) -> Process:
        """Start ``crowdtrain-coordinator serve`` on free ports; ``extra`` adds flags."""
        ports_file = self.coord_dir / "ports.json"
        ports_file.unlink(missing_ok=True)  # a killed coordinator leaves its file behind
        process = self.spawn(
            "coordinator",
            [
                COORDINATOR,
                "serve",
                "--data-dir",
                str(self.coord_dir),
                "--http-port",
                str(http_port),
                "--grpc-port",
                str(grpc_port),
                "--dht-port",
                str(dht_port),
                *extra,
            ],
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.popen.poll() is not None:
                raise AssertionError(f"coordinator exited early:\n{process.output()}")
            if ports_file.exists():
                try:
                    self.ports = json.loads(ports_file.read_text())
                    break
                except ValueError:
                    pass
            time.sleep(0.2)
        else:
            raise AssertionError(f"coordinator not ready in {timeout}s:\n{process.output()}")
        return process

    def start_node(
        self, name: str, *extra: str, run_id: str = "tiny", env: dict[str, str] | None = None
    ) -> Process:
        """Start ``crowdtrain-node join`` with its home in ``root/name``; ``env`` adds variables.

        Nodes train at normal priority here (``--nice 0``, unless ``extra`` says otherwise):
        on one machine, the coordinator's processes and the nodes share the CPU, and
        tests keep the scheduling they were written under; benches measure the default."""
        return self.spawn(
            name,
            [
                NODE,
                "join",
                self.url,
                "--run",
                run_id,
                "--home",
                str(self.root / name),
                "--name",
                name,
                "--threads",
                "1",
                "--progress",
                "log",
                "--nice",
                "0",
                *extra,
            ],
            env=env,
        )

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=10)
        response.raise_for_status()
        return response.json()

    def wait_for(self, predicate: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
            except httpx.HTTPError:
                last = None
            if last:
                return last
            time.sleep(0.25)  # most predicates are one loopback request: poll often
        raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")

    def wait_trained(self, *nodes: Process, timeout: float = 120) -> None:
        """Wait until each node has made its first contributing step. A Ctrl-C before it
        interrupts the join (exit 130) instead of leaving the run (exit 0): a test that
        checks how nodes leave waits for this first, however far the run already is."""
        self.wait_for(
            lambda: all("first contributing step" in node.output() for node in nodes),
            timeout,
            f"{', '.join(node.name for node in nodes)} to train",
        )

    def stop_all(self, grace_s: float = 2.0) -> None:
        """The end of a test: nodes first (each may tell the coordinator it leaves), then the
        coordinator, each given ``grace_s`` before its group is killed. A test that checks
        how a process leaves stops it itself (:meth:`stop`)."""
        coordinators = [p for p in self.processes if p.name == "coordinator"]
        nodes = Processes(self.root, [p for p in self.processes if p.name != "coordinator"])
        nodes.stop_all(grace_s)
        Processes(self.root, coordinators).stop_all(grace_s)


def kill_group(popen: subprocess.Popen) -> None:
    """SIGKILL a child's whole session and reap the child."""
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
