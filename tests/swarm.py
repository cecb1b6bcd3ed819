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

BIN = Path(sys.executable).parent
COORDINATOR = str(BIN / "crowdtrain-coordinator")
NODE = str(BIN / "crowdtrain-node")

TINY_SPEC = """
[run]
id = "{run_id}"
seed = 1

[model]
vocab_size = {vocab_size}
seq_len = 64
num_layers = 2
num_heads = 2
d_model = 64

[data]
tokenizer = "{tokenizer}"
lease_s = {lease_s}

[optimizer]
target_batch_size = 32
micro_batch_size = 8
lr = 0.005
warmup_steps = 2

[swarm]
matchmaking_time_s = 1.0
averaging_timeout_s = 10.0
request_timeout_s = 0.5
metadata_expiration_s = 10.0

[eval]
every_steps = 2
num_sequences = 32
"""


# The nonce journal records every signed session message that reached the
# coordinator, refused or not (a refused message's nonce stays spent).
JOURNAL_TABLES = {"nonces"}


def db_rows(coord_dir: Path) -> dict[str, list]:
    """Every row of every table of a coordinator's database but its nonce journal."""
    db = sqlite3.connect(coord_dir / "coordinator.db")
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {
            t: db.execute(f"SELECT * FROM {t}").fetchall()
            for t in sorted(tables)
            if t not in JOURNAL_TABLES
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
    path.write_text(
        TINY_SPEC.format(run_id=run_id, lease_s=lease_s, tokenizer=tokenizer, vocab_size=vocab_size)
    )
    return path


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
class Swarm:
    """A coordinator and its nodes under one temporary folder."""

    root: Path
    processes: list[Process] = field(default_factory=list)
    ports: dict[str, Any] = field(default_factory=dict)

    @property
    def coord_dir(self) -> Path:
        return self.root / "coordinator"

    @property
    def url(self) -> str:
        return self.ports["http_url"]

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Process:
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
        process = self._spawn(
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
        """Start ``crowdtrain-node join`` with its home in ``root/name``; ``env`` adds variables."""
        return self._spawn(
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
            time.sleep(1.0)
        logs = "\n".join(f"--- {p.name}\n{p.output()[-3000:]}" for p in self.processes)
        raise AssertionError(f"timed out waiting for {what}\n{logs}")

    def stop(self, process: Process, sig: int = signal.SIGINT, timeout: float = 60) -> int | None:
        """Ask politely, then stop the whole process group."""
        if process.popen.poll() is None:
            try:
                process.popen.send_signal(sig)
                process.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(process.popen)
        return process.popen.poll()

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            if process.popen.poll() is None:
                self.stop(process, timeout=30)
            _kill_group(process.popen)


def _kill_group(popen: subprocess.Popen) -> None:
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
