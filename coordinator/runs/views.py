"""The coordinator's view of its runs: stored rows turned into the JSON that people,
notebooks and nodes read (the API and the dashboard show the same). Read only;
no HTTP or gRPC here.
"""

from __future__ import annotations

import time
from typing import Any

from crowdtrain.coordinator.ledger.views import peer_credit
from crowdtrain.coordinator.records import PEER_TIMEOUT_S, get_run, peer_state
from crowdtrain.coordinator.runs.peers import leading_step
from crowdtrain.coordinator.store import Store
from crowdtrain.protocol.messages import TRAFFIC_PURPOSES, TimeSplit

# What the peers view shows of each peer's ledger (the full ledger is its own view).
_CREDIT_KEYS = ("verified_tokens", "verified_flops", "verified_share", "num_rejected")


def peers_view(store: Store, run_id: str, now: float | None = None) -> list[dict[str, Any]]:
    get_run(store, run_id)
    now = time.time() if now is None else now
    totals = store.peer_totals(run_id)
    traffic = store.peer_traffic(run_id)
    seconds = store.peer_time(run_id)
    credit = peer_credit(store, run_id)
    zero = {"num_tokens": 0, "num_sequences": 0}
    return [
        {
            "peer_id": p["peer_id"],
            "name": p["name"],
            "device": p["device"],
            "state": peer_state(p, now),
            "num_tokens": totals.get(p["peer_id"], zero)["num_tokens"],
            "num_sequences": totals.get(p["peer_id"], zero)["num_sequences"],
            "tokens_per_s": p["tokens_per_s"],
            "loss": p["loss"],
            "step": p["step"],
            "registered_at": p["registered_at"],
            "last_seen": p["last_seen"],
            "admitted_via": p["admitted_via"],
            "flagged": p["flagged"],
            "num_skipped_steps": p["num_skipped_steps"],
            "dht_peer_id": p["dht_peer_id"],
            "traffic": _traffic_view(traffic.get(p["peer_id"], {})),
            "loop_time": _time_view(seconds.get(p["peer_id"], {})),
            **{k: credit.get(p["peer_id"], {}).get(k, 0) for k in _CREDIT_KEYS},
        }
        for p in store.list_peers(run_id)
    ]


def _traffic_view(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Every purpose, in order, zero where the peer reported none."""
    return {
        purpose: counts.get(purpose, {"sent": 0, "received": 0}) for purpose in TRAFFIC_PURPOSES
    }


def _time_view(seconds: dict[str, float]) -> dict[str, float | None]:
    """Every part of the training loop's time, zero where the peer reported none, and its
    compute utilisation (computing over training; None before any training)."""
    parts = {part: seconds.get(part, 0.0) for part in TimeSplit.model_fields}
    training_s = parts["training_s"]
    return {**parts, "utilisation": parts["computing_s"] / training_s if training_s else None}


def run_view(store: Store, run_id: str, now: float | None = None) -> dict[str, Any]:
    """One run as the API serves it: its shape is :class:`crowdtrain.protocol.api.RunView`
    (the route drops what the model does not name, so a new key goes there too)."""
    run = get_run(store, run_id)
    now = time.time() if now is None else now
    # Bounded reads only: live peers by index, the first and latest evaluation.
    active = [
        p
        for p in store.live_peers(run_id, since=now - PEER_TIMEOUT_S)
        if peer_state(p, now) == "active"
    ]
    first, latest = store.eval_ends(run_id)
    totals = store.run_totals(run_id)
    epoch = store.current_epoch(run_id) or 0
    counts = store.epoch_counts(run_id, epoch)
    return {
        "id": run.id,
        "description": run.spec.run.description,
        "step": run.row["step"],
        "leading_step": max(run.row["step"], leading_step(store, run_id, now)),
        "num_tokens": totals["num_tokens"],
        "num_sequences": totals["num_sequences"],
        "val_loss": latest["val_loss"] if latest else None,
        "val_bits_per_byte": latest["bits_per_byte"] if latest else None,
        "val_step": latest["step"] if latest else None,
        "first_val_loss": first["val_loss"] if first else None,
        "num_peers": len(active),
        "tokens_per_s": sum(p["tokens_per_s"] for p in active),
        "epoch": epoch,
        "shards": {
            "total": sum(counts.values()),
            "pending": counts.get("pending", 0),
            "leased": counts.get("leased", 0),
            "done": counts.get("done", 0),
        },
        "spec_hash": run.row["spec_hash"],
        "manifest_hash": run.row["manifest_hash"],
        "published_at": run.row["published_at"],
        "spec": run.spec.to_dict(),
    }


def run_ids(store: Store) -> list[str]:
    """The id of every run published here, in the store's order (as :func:`list_runs_view`)."""
    return [r["id"] for r in store.list_runs()]


def num_active_leases(store: Store, run_id: str) -> int:
    """Shard leases of the run held by peers now, over every open epoch."""
    return len(store.active_leases(run_id))


def list_runs_view(store: Store) -> list[dict[str, Any]]:
    """Every run as :func:`run_view` shows it, without its spec
    (:class:`crowdtrain.protocol.api.RunSummary`)."""
    return [
        {k: v for k, v in run_view(store, run_id).items() if k != "spec"}
        for run_id in run_ids(store)
    ]


def evals_view(store: Store, run_id: str) -> list[dict[str, Any]]:
    get_run(store, run_id)
    return store.list_evals(run_id)
