"""Shared pieces of the efficiency bench: run specs, training batches, evaluation, processes.

Owns what the baseline, the solo loop, the plain-hivemind peers and the
harness must agree on: which spec a figure trains, how sequences are cut
from the prepared shards, and which validation sequences every run is
judged on. Knows nothing about coordinators or swarms.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
# Validation sequences every final model is judged on (the first windows of the val shard).
NUM_VAL_SEQUENCES = 512
# The nodes' own evaluations use the spec's [eval] num_sequences; curves use that many too.


# specs


def load_toml(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def dump_toml(spec: dict[str, Any]) -> str:
    """A spec of flat tables (what run specs are) as TOML text."""
    lines: list[str] = []
    for section, table in spec.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


def diloco_spec() -> tuple[dict[str, Any], str]:
    """The diloco run spec (examples/stdlib-diloco.toml), and where it came from.

    Until that file lands, the demo spec with the issue's diloco settings stands in.
    """
    path = EXAMPLES / "stdlib-diloco.toml"
    if path.exists():
        return load_toml(path), "examples/stdlib-diloco.toml"
    spec = load_toml(EXAMPLES / "stdlib-tiny.toml")
    spec["run"]["id"] = "stdlib-diloco"
    spec["optimizer"].update(
        mode="diloco",
        inner_steps=100,
        inner_batch_size=16,
        target_batch_size=64,
        pseudo_grad_compression="8bit",
    )
    return (
        spec,
        "examples/stdlib-tiny.toml with the issue's diloco settings (no stdlib-diloco.toml)",
    )


def sync_spec() -> tuple[dict[str, Any], str]:
    return load_toml(EXAMPLES / "stdlib-tiny.toml"), "examples/stdlib-tiny.toml"


def with_overrides(spec: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``spec`` with some keys of some sections replaced."""
    out = {name: dict(table) for name, table in spec.items()}
    for name, table in sections.items():
        out.setdefault(name, {}).update(table)
    return out


def gpt_config(spec: dict[str, Any]) -> Any:
    from crowdtrain.model import GPTConfig

    m = spec["model"]
    return GPTConfig(
        vocab_size=m["vocab_size"],
        seq_len=m["seq_len"],
        num_layers=m["num_layers"],
        num_heads=m["num_heads"],
        d_model=m["d_model"],
        mlp_ratio=m.get("mlp_ratio", 4),
        positions=m.get("positions", "rotary"),
        dropout=m.get("dropout", 0.0),
    )


# data


def train_batches(
    data: Path, seed: int, seq_len: int, batch_size: int, part: int = 0, num_parts: int = 1
) -> Iterator[np.ndarray]:
    """Batches ``[batch_size, seq_len + 1]`` from the prepared training shards, forever.

    Shards are visited in an order seeded by ``seed`` (epoch after epoch), sequences
    within a shard in protocol.shards' seeded order, as nodes train them. ``part`` of
    ``num_parts`` takes every ``num_parts``-th shard, so separate processes never
    train the same sequences.
    """
    from crowdtrain.protocol.shards import batch_windows, load_manifest, read_shard, sequence_order

    manifest = load_manifest(data)
    shards = sorted(manifest.train_shards, key=lambda s: s.id)
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(shards))
        for i in order[part::num_parts]:
            entry = shards[int(i)]
            tokens = read_shard(data / entry.file, entry)
            windows = sequence_order(seed, epoch, entry.id, len(tokens), seq_len, batch_size)
            for b in range(len(windows) // batch_size):
                yield batch_windows(tokens, windows, b, batch_size, seq_len)
        epoch += 1


def val_sequences(data: Path, seq_len: int, count: int) -> Any:
    """The first ``count`` windows of the run's validation shard, int64 [count, seq_len + 1]."""
    import torch

    from crowdtrain.protocol.shards import load_manifest, num_windows, read_shard, window

    manifest = load_manifest(data)
    entry = manifest.val_shards[0]
    tokens = read_shard(data / entry.file, entry)
    n = min(count, num_windows(len(tokens), seq_len))
    return torch.from_numpy(
        np.stack([window(tokens, i, seq_len) for i in range(n)]).astype(np.int64)
    )


def evaluate_checkpoint(path: Path, spec: dict[str, Any], sequences: Any, device: str) -> float:
    """Validation loss (nats) of the model saved at ``path`` on ``sequences``."""
    from crowdtrain.model import GPT, evaluate, load_checkpoint

    model = GPT(gpt_config(spec))
    state, _ = load_checkpoint(path)
    model.load_state_dict(state)
    return evaluate(model.to(device), sequences, batch_size=16, device=device).loss


def checkpoint_metadata(path: Path) -> dict[str, str]:
    from crowdtrain.model import load_checkpoint

    return load_checkpoint(path)[1]


# processes


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


def python_script(name: str) -> list[str]:
    return [sys.executable, str(ROOT / "bench" / name)]


class ForeignCpu:
    """Share of the machine's CPU used by processes this bench did not start.

    Every figure here assumes the bench has the machine to itself; this says
    when it did not (tests or builds running beside it). A process is ours
    when its session is this process's or was started by this process (every
    peer gets its own session, whose leader's parent is us).
    """

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self.own_pid = os.getpid()
        self.own_sids = {os.getsid(0)}
        self.foreign_s = 0.0
        self.wall_s = 0.0
        self._last: dict[int, float] = {}
        self._last_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick = os.sysconf("SC_CLK_TCK")

    def _read(self) -> dict[int, tuple[int, int, float]]:
        """pid -> (ppid, session, cpu seconds) of every process."""
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # fields[0] is the state: ppid, pgrp, session, ... utime is field 14, stime 15.
            out[int(entry)] = (
                int(fields[1]),
                int(fields[3]),
                (int(fields[11]) + int(fields[12])) / self._tick,
            )
        return out

    def sample(self) -> None:
        procs = self._read()
        for pid, (ppid, sid, _) in procs.items():
            if pid == sid and ppid == self.own_pid:
                self.own_sids.add(sid)
        now = time.monotonic()
        foreign = {pid: cpu for pid, (_, sid, cpu) in procs.items() if sid not in self.own_sids}
        if self._last_at:
            self.foreign_s += sum(cpu - self._last.get(pid, 0.0) for pid, cpu in foreign.items())
            self.wall_s += now - self._last_at
        self._last, self._last_at = foreign, now

    def share(self) -> float:
        """Foreign CPU seconds per second of wall time, as a share of all cores."""
        return self.foreign_s / max(self.wall_s, 1e-9) / (os.cpu_count() or 1)

    def start(self) -> None:
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True, name="foreign-cpu")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def stop(self) -> float:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sample()
        return self.share()
