"""How a coordinator holds up under a crowd, on the real wire protocol.

Starts a real coordinator (with its verifier) on a run whose store already
holds ``--identities`` peers that once registered and ``--evals`` evaluation
rows (seeded straight into SQLite: what a long, popular run leaves behind),
registers ``--active`` fresh identities over gRPC, then measures:

- the latency of one heartbeat and of ``GET /api/runs/{id}`` on that store;
- heartbeats per second at offered rates that rise until p99 passes 50 ms,
  each active identity signing its own heartbeats (clients share the
  machine with the coordinator: the figure is a floor);
- the coordinator process's CPU seconds per heartbeat.

    python bench/coordinator_load.py --out bench/results/coordinator_load.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from crowdtrain.coordinator.store import Store  # noqa: E402
from crowdtrain.node.link.grpc import CoordinatorClient  # noqa: E402
from crowdtrain.protocol.identity import Identity  # noqa: E402
from crowdtrain.protocol.messages import HeartbeatPayload  # noqa: E402
from tests.swarm import Swarm, write_spec  # noqa: E402

RUN_ID = "load"
P99_GOAL_MS = 50.0


def seed(coord_dir: Path, identities: int, evals: int) -> None:
    """Peers that registered long ago and left, and a long history of evaluations."""
    store = Store(coord_dir)
    try:
        now = time.time()
        with store.transaction() as db:
            db.executemany(
                "INSERT INTO peers (run_id, peer_id, public_key, name, registered_at,"
                " last_seen, state) VALUES (?, ?, ?, ?, ?, ?, 'left')",
                (
                    (
                        RUN_ID,
                        f"old{i:012d}",
                        i.to_bytes(32, "big"),
                        f"old-{i}",
                        now - 9e5,
                        now - 9e5,
                    )
                    for i in range(identities)
                ),
            )
            db.executemany(
                "INSERT INTO evals (run_id, step, num_tokens, val_loss, bits_per_byte, peer_id,"
                " time, swarm_tokens) VALUES (?, ?, ?, 3.0, 4.0, ?, ?, ?)",
                (
                    (RUN_ID, i // 4, i * 64, f"old{i % max(identities, 1):012d}", now - 9e5, i)
                    for i in range(evals)
                ),
            )
    finally:
        store.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Member:
    """One active identity with its session, heartbeating over its own client."""

    def __init__(self, swarm: Swarm, index: int):
        self.client = CoordinatorClient(swarm.url, swarm.ports["grpc_target"], Identity.generate())
        self.token = self.client.register(RUN_ID, f"load-{index}", "cpu:1", "bench").session_token
        self.key = f"bench-session-{index:06d}"
        self.tokens = 0

    def beat(self) -> float:
        self.tokens += 64
        payload = HeartbeatPayload(
            session_key=self.key,
            num_tokens=self.tokens,
            num_sequences=self.tokens // 64,
            tokens_per_s=100.0,
            step=1,
        )
        started = time.perf_counter()
        self.client.heartbeat(self.token, payload)
        return (time.perf_counter() - started) * 1000


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def offered(members: list[Member], rate: float, seconds: float) -> tuple[list[float], float]:
    """Heartbeats at ``rate`` per second for ``seconds`` (each member in turn); returns
    latencies (ms) and the rate achieved."""
    latencies: list[float] = []
    lock = threading.Lock()
    total = int(rate * seconds)
    started = time.perf_counter()

    def one(i: int) -> None:
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        ms = members[i % len(members)].beat()
        with lock:
            latencies.append(ms)

    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(one, range(total)))
    return latencies, total / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--identities", type=int, default=100_000)
    parser.add_argument("--evals", type=int, default=1_000_000)
    parser.add_argument("--active", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rates", default="25,50,100,200,400")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="crowdtrain-load-") as tmp:
        swarm = Swarm(root=Path(tmp))
        try:
            data = swarm.prepare(65_536)
            spec = write_spec(Path(tmp) / "load.toml", run_id=RUN_ID)
            assert swarm.publish(spec, data).returncode == 0
            print(f"seeding {args.identities:,} identities and {args.evals:,} evaluations")
            seed(swarm.coord_dir, args.identities, args.evals)
            coordinator = swarm.start_coordinator()
            print(f"registering {args.active} active identities")
            members = [Member(swarm, i) for i in range(args.active)]

            one = [members[0].beat() for _ in range(200)]
            gets = []
            for _ in range(30):
                t = time.perf_counter()
                httpx.get(f"{swarm.url}/api/runs/{RUN_ID}", timeout=60).raise_for_status()
                gets.append((time.perf_counter() - t) * 1000)
            rows.append(
                f"| one heartbeat, alone | {statistics.median(one):.1f} | "
                f"{percentile(one, 0.99):.1f} | |"
            )
            rows.append(
                f"| `GET /api/runs/{{id}}` | {statistics.median(gets):.1f} | "
                f"{percentile(gets, 0.99):.1f} | |"
            )
            held = 0.0
            for rate in (float(r) for r in args.rates.split(",")):
                cpu_before = cpu_seconds(coordinator.popen.pid)
                latencies, achieved = offered(members, rate, args.seconds)
                cpu = (cpu_seconds(coordinator.popen.pid) - cpu_before) / len(latencies)
                p99 = percentile(latencies, 0.99)
                print(f"offered {rate:.0f}/s: {achieved:.0f}/s, p99 {p99:.1f} ms")
                rows.append(
                    f"| {achieved:.0f} heartbeats/s ({len(members)} identities) | "
                    f"{statistics.median(latencies):.1f} | {p99:.1f} | {cpu * 1000:.2f} |"
                )
                if p99 > P99_GOAL_MS:
                    break
                held = achieved
        finally:
            swarm.stop_all()
    lines = [
        "# Coordinator under load",
        "",
        f"A store holding {args.identities:,} identities that once registered and "
        f"{args.evals:,} evaluation rows; {args.active} identities active, each signing its "
        "own heartbeats over gRPC from client threads on the same machine.",
        "",
        "| measured | p50 ms | p99 ms | coordinator CPU ms per heartbeat |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Heartbeats per second held at p99 under {P99_GOAL_MS:.0f} ms: **{held:.0f}**, the "
        f"load of {2 * held:.0f} live peers at the default 2 s interval. What holds it back: "
        "two fsynced SQLite transactions per heartbeat (the nonce journal and the counters) "
        "under one store lock, one Python process, and the load's own client threads "
        "signing on the same two cores.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
