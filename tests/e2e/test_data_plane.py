"""Leases never lose data: crashed nodes, a crashed coordinator, many shards (real processes)."""

import json
import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tests.swarm import Process, Swarm, small_corpus, write_spec

pytestmark = pytest.mark.slow

_ACCEPTED = re.compile(r"receipt for shard (\S+) \(epoch (\d+)\) accepted")


def receipts(swarm: Swarm) -> list[tuple[str, str, int]]:
    """(peer_id, shard_id, epoch) of every stored receipt, read from the database itself."""
    db = sqlite3.connect(f"file:{swarm.coord_dir / 'coordinator.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT peer_id, shard_id, epoch FROM receipts").fetchall()
    finally:
        db.close()


def reopened_shards(swarm: Swarm, epoch: int = 0) -> dict[str, int]:
    """How many receipts of each shard failed their spot check (which reopens the shard)."""
    db = sqlite3.connect(f"file:{swarm.coord_dir / 'coordinator.db'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT shard_id, COUNT(*) FROM receipt_checks WHERE epoch = ? AND spot = 'failed'"
            " GROUP BY shard_id",
            (epoch,),
        ).fetchall()
    finally:
        db.close()
    return {shard: n for shard, n in rows}


def peer_ids(swarm: Swarm) -> dict[str, str]:
    return {p["name"]: p["peer_id"] for p in swarm.get("/api/runs/tiny/peers")}


def coverage(swarm: Swarm, epoch: int = 0) -> list[dict]:
    return swarm.get(f"/api/runs/tiny/coverage?epoch={epoch}")["shards"]


def epoch_done(swarm: Swarm, epoch: int = 0):
    shards = coverage(swarm, epoch)
    return all(s["state"] == "done" for s in shards) and shards


def start_run(swarm: Swarm, corpus_bytes: int, shard_tokens: int, lease_s: float) -> Path:
    corpus = small_corpus(swarm.root / "corpus", corpus_bytes)
    data = swarm.prepare(shard_tokens=shard_tokens, source=str(corpus))
    spec = write_spec(swarm.root / "tiny.toml", lease_s=lease_s)
    assert swarm.publish(spec, data).returncode == 0
    return data


def accepted(node: Process) -> set[tuple[str, int]]:
    return {(m[1], int(m[2])) for m in _ACCEPTED.finditer(node.output())}


def test_killed_node_loses_no_shard(swarm: Swarm) -> None:
    start_run(swarm, corpus_bytes=100_000, shard_tokens=4096, lease_s=6)
    coordinator = swarm.start_coordinator()
    doomed = swarm.start_node("doomed")
    survivor = swarm.start_node("survivor")
    swarm.wait_for(lambda: len(accepted(doomed)) >= 1, 180, "the doomed node's first receipt")

    ids = peer_ids(swarm)
    # Between a receipt and its next grant a node can hold no lease for a moment.
    held = swarm.wait_for(
        lambda: {s["shard"] for s in coverage(swarm) if s["holder"] == ids["doomed"]} or None,
        60,
        "a lease held by the doomed node",
    )
    swarm.stop(doomed, signal.SIGKILL)

    swarm.wait_for(lambda: epoch_done(swarm), 300, "epoch 0 to complete")
    shards = coverage(swarm)
    assert all(s["num_completions"] >= 1 for s in shards)
    duplicates = {s["shard"] for s in shards if s["num_completions"] > 1}
    expired = set(re.findall(r"lease of (\S+) \(epoch 0\) by \S+ expired", coordinator.output()))
    reopened = set(reopened_shards(swarm))
    assert duplicates <= expired | reopened, (
        "only shards whose lease expired or whose receipt failed its spot check are trained twice"
    )
    stored = receipts(swarm)
    by_doomed = {shard for peer, shard, _ in stored if peer == ids["doomed"]}
    by_survivor = {shard for peer, shard, _ in stored if peer == ids["survivor"]}
    assert held - by_doomed <= by_survivor, "the doomed node's shards went to the survivor"
    assert held - by_doomed <= expired, "they were handed on only after their lease expired"
    swarm.wait_trained(survivor)
    assert swarm.stop(survivor, signal.SIGINT) == 0, survivor.output()


def test_coordinator_crash_loses_no_acknowledged_receipt(swarm: Swarm) -> None:
    start_run(swarm, corpus_bytes=120_000, shard_tokens=4096, lease_s=30)
    first = swarm.start_coordinator()
    ports = dict(swarm.ports)
    nodes = [swarm.start_node(f"node-{i}") for i in range(2)]
    swarm.wait_for(
        lambda: sum(len(accepted(n)) for n in nodes) >= 4, 240, "receipts before the crash"
    )
    swarm.stop(first, signal.SIGKILL)
    killed_at = time.time()
    acknowledged = {(n.name, shard, epoch) for n in nodes for shard, epoch in accepted(n)}

    swarm.start_coordinator(
        http_port=ports["http_port"], grpc_port=ports["grpc_port"], dht_port=ports["dht_port"]
    )
    ids = peer_ids(swarm)
    stored = set(receipts(swarm))
    for name, shard, epoch in acknowledged:
        assert (ids[name], shard, epoch) in stored, f"{name}'s receipt for {shard} was lost"

    swarm.wait_for(lambda: epoch_done(swarm), 300, "epoch 0 to complete after the restart")
    assert all(s["num_completions"] >= 1 for s in coverage(swarm))
    assert time.time() - killed_at < 300
    swarm.wait_trained(*nodes)
    for node in nodes:
        assert node.popen.poll() is None, node.output()
        assert "coordinator reachable again" in node.output()
        assert swarm.stop(node, signal.SIGINT) == 0, node.output()


def test_one_epoch_of_50_shards_each_exactly_once(swarm: Swarm) -> None:
    start_run(swarm, corpus_bytes=60_000, shard_tokens=1024, lease_s=600)
    swarm.start_coordinator()
    assert swarm.get("/api/runs/tiny")["shards"]["total"] >= 50
    nodes = [swarm.start_node(f"node-{i}") for i in range(2)]

    swarm.wait_for(lambda: epoch_done(swarm), 300, "epoch 0 to complete")
    swarm.wait_trained(*nodes)
    for node in nodes:
        assert swarm.stop(node, signal.SIGINT) == 0, node.output()
    shards = coverage(swarm)
    # Each shard once, and once more for each receipt the verifier reopened it after (a
    # failed spot check: in lenient sync an honest node's parameters can drift from the
    # keeper's at a step, fresh-clone CI at 6f37bb6).
    reopened = reopened_shards(swarm)
    # (A failed check does not always reopen its shard: reopen_unproven_shard leaves it
    # done while another receipt of it may still show it trained. Fresh-clone CI at
    # 2f4cd4d saw a shard with a failed check stay done, completed once.)
    assert all(1 <= s["num_completions"] <= 1 + reopened.get(s["shard"], 0) for s in shards), [
        (s, reopened) for s in shards if s["num_completions"] != 1
    ]
    epoch0 = [r for r in receipts(swarm) if r[2] == 0]
    # (a peer that trains a reopened shard again replaces its own receipt)
    assert len(shards) <= len(epoch0) <= len(shards) + sum(reopened.values())
    assert len({shard for _, shard, _ in epoch0}) == len(shards)
    assert len({peer for peer, _, _ in epoch0}) == 2, "every node trained part of the epoch"


def test_a_restarted_node_resumes_mid_shard(swarm: Swarm) -> None:
    start_run(swarm, corpus_bytes=300_000, shard_tokens=131_072, lease_s=600)
    swarm.start_coordinator()
    first = swarm.start_node("node-a")
    position = swarm.root / "node-a" / "runs" / "tiny" / "position.json"

    def mid_shard() -> bool:
        try:
            saved = json.loads(position.read_text())["position"]
        except (OSError, ValueError, TypeError):
            return False
        return bool(saved) and saved["batches_done"] > 0

    swarm.wait_for(mid_shard, 180, "the node to record its place in a shard")
    saved = json.loads(position.read_text())["position"]
    swarm.stop(first, signal.SIGKILL)

    again = swarm.start_node("node-a")
    swarm.wait_for(lambda: "resuming shard" in again.output(), 120, "the node to resume")
    line = next(ln for ln in again.output().splitlines() if "resuming shard" in ln)
    assert f"resuming shard {saved['shard_id']} at batch" in line
    resumed_at = int(re.search(r"at batch (\d+)", line)[1])
    assert resumed_at >= saved["batches_done"]
    assert swarm.stop(again, signal.SIGINT) == 0, again.output()


def test_a_bpe_run_trains_end_to_end(swarm: Swarm) -> None:
    import hashlib

    import httpx

    corpus = small_corpus(swarm.root / "corpus", 200_000)
    data = swarm.prepare(
        16_384, str(corpus), "--tokenizer", "bpe", "--vocab-size", "512", "--val-fraction", "0.1"
    )
    spec = write_spec(swarm.root / "bpe.toml", tokenizer="bpe", vocab_size=512)
    assert swarm.publish(spec, data).returncode == 0
    swarm.start_coordinator()
    served = httpx.get(f"{swarm.url}/api/runs/tiny/tokenizer", timeout=10)
    assert served.status_code == 200
    manifest = json.loads((data / "manifest.json").read_text())
    assert hashlib.sha256(served.content).hexdigest() == manifest["tokenizer_sha256"]

    node = swarm.start_node("node-a", "--max-seconds", "8")
    assert node.wait(timeout=180) == 0, node.output()
    run = swarm.get("/api/runs/tiny")
    assert run["num_tokens"] > 0
    # BPE tokens carry several bytes each, so bits per byte is well under loss / ln 2.
    assert run["val_bits_per_byte"] < 0.6 * run["val_loss"] / 0.6931
