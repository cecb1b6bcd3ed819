"""A crowdtrain swarm for one efficiency figure: a real coordinator and real nodes.

Publishes a spec, starts ``crowdtrain-coordinator serve`` and ``crowdtrain-node
join`` processes the way a user does (through tests/swarm.py, which reaps
every process group), and while they train records the coordinator's view of
the run and its peers every two seconds and each node's bytes sent (see
traffic.py). Knows nothing about which figure it serves.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.efficiency.specs import dump_toml
from bench.efficiency.traffic import ByteSampler
from crowdtrain.node.device.priority import DEFAULT_NICE
from tests.swarm import Process, Swarm

SAMPLE_EVERY_S = 2.0


@dataclass
class Sample:
    """The coordinator's view at one moment (wall-clock ``time``, ``t`` since the swarm began)."""

    t: float
    time: float
    step: int
    num_tokens: int
    num_sequences: int
    peers: dict[str, dict[str, Any]]


@dataclass
class SwarmRun:
    """A coordinator and ``names`` nodes training ``spec`` on ``data`` under ``root``."""

    root: Path
    data: Path
    spec: dict[str, Any]
    device: str = "cpu"
    node_env: dict[str, dict[str, str]] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    nodes: dict[str, Process] = field(default_factory=dict)
    started_at: dict[str, float] = field(default_factory=dict)
    swarm: Swarm | None = None
    bytes: ByteSampler | None = None
    # seconds from start to when the nodes were asked to leave
    stopped_t: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _t0: float = 0.0

    @property
    def run_id(self) -> str:
        return str(self.spec["run"]["id"])

    def start(self, names: list[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.swarm = Swarm(root=self.root)
        spec_path = self.root / "spec.toml"
        spec_path.write_text(dump_toml(self.spec))
        published = self.swarm.publish(spec_path, self.data)
        if published.returncode != 0:
            raise RuntimeError(f"publish failed:\n{published.stderr[-3000:]}")
        coordinator = self.swarm.start_coordinator()
        ports = {int(self.swarm.url.rsplit(":", 1)[1])}
        grpc = str(self.swarm.ports.get("grpc_target", "")).rsplit(":", 1)[-1]
        if grpc.isdigit():
            ports.add(int(grpc))
        for key in ("grpc_port", "http_port"):
            if isinstance(self.swarm.ports.get(key), int):
                ports.add(self.swarm.ports[key])
        self.bytes = ByteSampler(control_ports=ports, coordinator_session=coordinator.popen.pid)
        self._t0 = time.monotonic()
        self.bytes.start()
        self._thread = threading.Thread(target=self._sample_loop, daemon=True, name="views")
        self._thread.start()
        for name in names:
            self.add_node(name)

    def add_node(self, name: str) -> Process:
        assert self.swarm is not None and self.bytes is not None
        self.started_at[name] = time.time()
        node = self.swarm.start_node(
            name,
            *("--device", self.device, "--nice", str(DEFAULT_NICE)),  # the product's default
            run_id=self.run_id,
            env=self.node_env.get(name),
        )
        self.nodes[name] = node
        self.bytes.add(name, node.popen.pid)
        return node

    def _view(self) -> Sample | None:
        assert self.swarm is not None
        try:
            run = self.swarm.get(f"/api/runs/{self.run_id}")
            peers = self.swarm.get(f"/api/runs/{self.run_id}/peers")
        except (httpx.HTTPError, ValueError):
            return None
        return Sample(
            t=time.monotonic() - self._t0,
            time=time.time(),
            step=int(run["step"]),
            num_tokens=int(run["num_tokens"]),
            num_sequences=int(run.get("num_sequences", 0)),
            peers={p["name"]: p for p in peers},
        )

    def _sample_loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            sample = self._view()
            if sample is not None:
                self.samples.append(sample)

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def wait_for(self, predicate: Callable[[Sample], bool], timeout_s: float) -> Sample | None:
        """The first sample meeting ``predicate``; None when ``timeout_s`` passed first
        or a node died."""
        deadline = time.monotonic() + timeout_s
        seen = len(self.samples)
        while time.monotonic() < deadline:
            while seen < len(self.samples):
                sample = self.samples[seen]
                seen += 1
                if predicate(sample):
                    return sample
            dead = [n for n, p in self.nodes.items() if p.popen.poll() is not None]
            if dead:
                raise RuntimeError(
                    f"node {dead[0]} exited early:\n{self.nodes[dead[0]].output()[-3000:]}"
                )
            time.sleep(0.5)
        return None

    def stop_nodes(self, grace_s: float = 90.0) -> None:
        """Ask every node to leave at once (each saves its checkpoint), then reap them."""
        self.stopped_t = time.monotonic() - self._t0
        for node in self.nodes.values():
            if node.popen.poll() is None:
                try:
                    node.popen.send_signal(signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for node in self.nodes.values():
            try:
                node.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if self.bytes is not None:
            self.bytes.stop()
        assert self.swarm is not None
        for node in self.nodes.values():
            self.swarm.stop(node, timeout=1)

    def evals(self) -> list[dict[str, Any]]:
        assert self.swarm is not None
        try:
            return list(self.swarm.get(f"/api/runs/{self.run_id}/evals"))
        except (httpx.HTTPError, ValueError):
            return []

    def shutdown(self) -> None:
        """Stop everything this run started (safe to call twice, and after errors)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        if self.bytes is not None:
            self.bytes._stop.set()
        if self.swarm is not None:
            self.swarm.stop_all()

    def checkpoint(self, name: str) -> Path:
        return self.root / name / "runs" / self.run_id / "checkpoint.safetensors"

    def tokens_at(self, wall_time: float) -> float:
        """The run's tokens (coordinator's count) at ``wall_time``, interpolated."""
        points = [(s.time, s.num_tokens) for s in self.samples]
        if not points:
            return 0.0
        if wall_time <= points[0][0]:
            return float(points[0][1])
        for (t0, n0), (t1, n1) in zip(points, points[1:], strict=False):
            if t0 <= wall_time <= t1:
                return n0 + (n1 - n0) * (wall_time - t0) / max(t1 - t0, 1e-9)
        return float(points[-1][1])

    def record(self) -> dict[str, Any]:
        """Raw numbers for efficiency.json."""
        return {
            "run_id": self.run_id,
            "stopped_t": self.stopped_t,
            "byte_samples_failed": self.bytes.num_failed if self.bytes else 0,
            "samples": [
                {
                    "t": round(s.t, 2),
                    "step": s.step,
                    "num_tokens": s.num_tokens,
                    "peers": {
                        n: {k: p.get(k) for k in ("num_tokens", "num_sequences", "step", "state")}
                        for n, p in s.peers.items()
                    },
                }
                for s in self.samples
            ],
            "bytes": (
                [
                    {"t": round(t, 2), "peers": {n: list(v) for n, v in totals.items()}}
                    for t, totals in self.bytes.series
                ]
                if self.bytes
                else []
            ),
        }


def spec_json(spec: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(spec))
    return path
