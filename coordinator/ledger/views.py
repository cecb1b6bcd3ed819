"""What the API shows of the ledger: each peer's claimed and verified work, the
leaderboard, each receipt's checks and what verifying a run cost. Read only.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from crowdtrain.coordinator.ledger.checks import flops_per_token
from crowdtrain.coordinator.store import Store
from crowdtrain.protocol.runspec import VerifySection

if TYPE_CHECKING:
    from crowdtrain.coordinator.records import PublishedRun


def peer_credit(store: Store, run_id: str) -> dict[str, dict[str, Any]]:
    """Per peer of a run: claimed and verified work, and its share of all verified compute.

    A banned peer is credited nothing, and its work is left out of the shares.
    """
    totals = store.ledger_totals(run_id)
    peers = store.list_peers(run_id)
    banned = {b["peer_id"] for b in store.list_bans(run_id)}  # one query, not one per peer
    credit: dict[str, dict[str, Any]] = {}
    for p in peers:
        row = totals.get(p["peer_id"], {})

        def total(key: str, row: dict[str, Any] = row) -> float:
            return row.get(key) or 0

        verified = p["peer_id"] not in banned
        credit[p["peer_id"]] = {
            "peer_id": p["peer_id"],
            "name": p["name"],
            "device": p["device"],
            "flagged": p.get("flagged"),
            "num_shards": int(total("num_receipts")),
            "num_tokens": int(total("num_tokens")),
            "num_sequences": int(total("num_sequences")),
            "flops": float(total("flops")),
            "device_s": float(total("device_s")),
            "verified_shards": int(total("verified_shards")) if verified else 0,
            "verified_tokens": int(total("verified_tokens")) if verified else 0,
            "verified_sequences": int(total("verified_sequences")) if verified else 0,
            "verified_flops": float(total("verified_flops")) if verified else 0.0,
            "num_rejected": int(total("num_rejected")),
            "num_pending": int(total("num_pending")),
            "num_unverified": int(total("num_unverified")),
            "banned": not verified,
        }
    all_verified = sum(c["verified_flops"] for c in credit.values())
    for c in credit.values():
        c["verified_share"] = c["verified_flops"] / all_verified if all_verified > 0 else 0.0
        c["verified_fraction"] = c["verified_tokens"] / c["num_tokens"] if c["num_tokens"] else 0.0
    return credit


# How long a run's total verified work may be reused for the shares heartbeats report.
STANDING_CACHE_S = 5.0


def peer_standing(store: Store, run_id: str, peer_id: str) -> tuple[int, float]:
    """A peer's verified tokens and its share of the run's verified compute, as each
    heartbeat reports them: two indexed reads (the run's total is reused for a few
    seconds), whatever the number of peers and receipts."""
    if store.is_banned(run_id, peer_id):
        return 0, 0.0
    own = store.verified_work(run_id, peer_id)
    bucket = int(time.time() // STANDING_CACHE_S)
    run_total = store.memo.get(
        ("verified work", run_id, bucket), lambda: store.verified_work(run_id)
    )
    share = own["flops"] / run_total["flops"] if run_total["flops"] > 0 else 0.0
    return int(own["tokens"]), min(1.0, share)


def ledger_peers(store: Store, run_id: str) -> list[dict[str, Any]]:
    """Every peer of the run with its ledger, most verified compute first."""
    rows = list(peer_credit(store, run_id).values())
    rows.sort(key=lambda r: (-r["verified_flops"], -r["verified_tokens"], r["name"]))
    return rows


def leaderboard_view(store: Store, run: PublishedRun) -> list[dict[str, Any]]:
    """Peers ranked by verified compute, with their flags."""
    return [{"rank": i + 1, **row} for i, row in enumerate(ledger_peers(store, run.id))]


def receipts_view(store: Store, run_id: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Each receipt (the latest ``limit``), oldest first, with its status, the outcome of
    each check and why it failed."""
    return [
        {
            "peer_id": r["peer_id"],
            "shard_id": r["shard_id"],
            "epoch": r["epoch"],
            "num_tokens": r["num_tokens"],
            "num_sequences": r["num_sequences"],
            "flops": r["flops"],
            "device_s": r["device_s"],
            "received_at": r["received_at"],
            "status": r["status"],
            "reason": r["reason"],
            "checks": {
                "possible": r["possible"],
                "dht": r["dht"],
                "spot": r["spot"],
                "spot_reason": r["spot_reason"],
            },
            "num_samples": len(json.loads(r["samples_json"])),
        }
        for r in store.list_receipt_checks(run_id, limit)
    ]


def costs_view(store: Store, run: PublishedRun) -> dict[str, Any]:
    """What verifying this run cost the coordinator, in CPU seconds and as a share of the
    peers' compute, measured and projected to the default spot-check fraction."""
    c = store.verification_costs(run.id)
    verify = run.spec.verify
    default_fraction = VerifySection().spot_check_fraction
    cpu_s = c["assess_cpu_s"] + c["spot_cpu_s"] + c["keeper_cpu_s"]
    per_spot = c["spot_cpu_s"] / c["num_spot_checks"] if c["num_spot_checks"] else None
    # A spot check runs forwards only (a third of training's FLOPs per token).
    spot_flops = (
        verify.spot_check_sequences * run.spec.model.seq_len * flops_per_token(run.spec) / 3
    )
    mean_receipt_tokens = c["num_tokens"] / c["num_receipts"] if c["num_receipts"] else 0
    receipt_flops = mean_receipt_tokens * flops_per_token(run.spec)
    return {
        **c,
        "cpu_s": cpu_s,
        "cpu_s_per_verified_receipt": cpu_s / c["num_verified"] if c["num_verified"] else None,
        "assess_cpu_s_per_receipt": (
            c["assess_cpu_s"] / c["num_receipts"] if c["num_receipts"] else None
        ),
        "cpu_s_per_spot_check": per_spot,
        "spot_check_fraction": verify.spot_check_fraction,
        "spot_check_share": c["spot_cpu_s"] / c["device_s"] if c["device_s"] else None,
        "spot_check_share_at_default_fraction": (
            per_spot * default_fraction * c["num_receipts"] / c["device_s"]
            if per_spot is not None and c["device_s"]
            else None
        ),
        "spot_check_flops_share_at_default_fraction": (
            default_fraction * spot_flops / receipt_flops if receipt_flops else None
        ),
    }


def ledger_view(store: Store, run: PublishedRun, limit: int = 1000) -> dict[str, Any]:
    """The ledger of a run: per peer, its latest ``limit`` receipts, and what verifying
    it cost."""
    return {
        "peers": ledger_peers(store, run.id),
        "receipts": receipts_view(store, run.id, limit),
        "costs": costs_view(store, run),
    }


def verified_tokens(store: Store, run_id: str, peer_id: str) -> int:
    """Tokens of a peer's receipts that passed every check; 0 for a banned peer."""
    if store.is_banned(run_id, peer_id):
        return 0
    return store.verified_tokens(run_id, peer_id)
