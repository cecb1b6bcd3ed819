"""Throughput over time: the serving coordinator samples each run with live peers.

:func:`take_samples` appends one sample per run with active peers (its step,
tokens, the swarm's tokens/s and peers) and thins a run's oldest samples past
:data:`MAX_SAMPLES_PER_RUN`; :func:`metrics_view` serves them.
"""

from __future__ import annotations

import time
from typing import Any

from crowdtrain.coordinator.records import PEER_TIMEOUT_S, get_run, peer_state
from crowdtrain.coordinator.store import Store

# Samples kept per run. Past this, every second sample of the older half is
# dropped: recent hours keep full resolution (at one sample each 5 s, 25,000
# samples are about 35 hours), older history gets coarser, and the table stays
# bounded whatever the run's length.
MAX_SAMPLES_PER_RUN = 50_000
# Past this many evaluations a run's oldest half is thinned (each heartbeat may carry
# 32, and nothing else bounds them): the loss curve keeps its shape.
MAX_EVALS_PER_RUN = 20_000


# At most this many samples per answer of the metrics view (the newest).
MAX_SAMPLES_PER_VIEW = 10_000


def take_samples(
    store: Store, now: float | None = None, max_samples: int = MAX_SAMPLES_PER_RUN
) -> int:
    """Append one sample to each run with active peers: its step, total tokens, the sum
    of its active peers' tokens/s and their number. Returns how many runs were sampled."""
    now = time.time() if now is None else now
    taken = 0
    for row in store.list_runs():
        store.thin_evals(row["id"], MAX_EVALS_PER_RUN)
        live = store.live_peers(row["id"], since=now - PEER_TIMEOUT_S)
        active = [p for p in live if peer_state(p, now) == "active"]
        if not active:
            continue
        store.insert_sample(
            {
                "run_id": row["id"],
                "time": now,
                "step": row["step"],
                "num_tokens": store.run_totals(row["id"])["num_tokens"],
                "tokens_per_s": float(sum(p["tokens_per_s"] or 0.0 for p in active)),
                "num_peers": len(active),
            }
        )
        taken += 1
        if store.count_samples(row["id"]) > max_samples:
            store.thin_samples(row["id"], max_samples // 2)
    return taken


def metrics_view(store: Store, run_id: str, since: float | None = None) -> list[dict[str, Any]]:
    """A run's samples after ``since`` (unix seconds), oldest first: time, step,
    num_tokens, tokens_per_s, num_peers. At most the newest MAX_SAMPLES_PER_VIEW."""
    get_run(store, run_id)
    return store.list_samples(run_id, since or 0.0, MAX_SAMPLES_PER_VIEW)
