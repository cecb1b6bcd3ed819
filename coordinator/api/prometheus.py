"""The coordinator's Prometheus metrics, read from the store at each scrape.

One :class:`CoordinatorCollector` per app, in its own registry (no global
state): every scrape asks the same view functions the JSON API and the
dashboard use, so ``/metrics`` and ``/api`` never disagree. Names start with
``crowdtrain_``; labels are run ids and peer ids (never peer names, which are
user input). No HTTP here: the route in :mod:`http_app` serves
:func:`exposition`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from crowdtrain.coordinator.api.refusals import Refusals
from crowdtrain.coordinator.runs import views as run_views
from crowdtrain.coordinator.store import Store
from crowdtrain.coordinator.swarm.checkpoints import checkpoints_view

PEER_STATES = ("active", "gone", "left", "banned")
SHARD_STATES = ("pending", "leased", "done")
TIME_PARTS = ("training", "computing", "swarm_wait", "data_wait")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class CoordinatorCollector(Collector):
    """Runs, peers, shards, the ledger and refused requests, as Prometheus families."""

    def __init__(self, store: Store, refusals: Refusals):
        self.store = store
        self.refusals = refusals

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        run = ["run"]
        info = GaugeMetricFamily(
            "crowdtrain_run_info",
            "A published run (always 1), with its spec and manifest hashes.",
            labels=["run", "spec_hash", "manifest_hash"],
        )
        peers = GaugeMetricFamily(
            "crowdtrain_peers",
            "Peers of a run by state: active (heartbeat within 20 s), gone, left, banned.",
            labels=["run", "state"],
        )
        tokens_per_s = GaugeMetricFamily(
            "crowdtrain_tokens_per_second",
            "The swarm's training throughput: the sum of its active peers' tokens/s.",
            labels=run,
        )
        tokens = CounterMetricFamily(
            "crowdtrain_tokens", "Tokens trained by the run's peers, as they reported.", labels=run
        )
        sequences = CounterMetricFamily(
            "crowdtrain_sequences",
            "Sequences trained by the run's peers, as they reported.",
            labels=run,
        )
        step = GaugeMetricFamily(
            "crowdtrain_step", "The swarm's collaborative optimizer step.", labels=run
        )
        epoch = GaugeMetricFamily(
            "crowdtrain_epoch", "The current epoch (pass over the run's shards).", labels=run
        )
        val_loss = GaugeMetricFamily(
            "crowdtrain_validation_loss",
            "The latest validation loss (nats per token) a peer measured.",
            labels=run,
        )
        val_bpb = GaugeMetricFamily(
            "crowdtrain_validation_bits_per_byte",
            "The latest validation loss in bits per byte of text.",
            labels=run,
        )
        train_loss = GaugeMetricFamily(
            "crowdtrain_training_loss",
            "Mean training loss of the active peers, from their latest heartbeats.",
            labels=run,
        )
        shards = GaugeMetricFamily(
            "crowdtrain_shards",
            "Shards of the current epoch by state: pending, leased or done.",
            labels=["run", "state"],
        )
        leases = GaugeMetricFamily(
            "crowdtrain_active_leases", "Shard leases held by peers now.", labels=run
        )
        verified = GaugeMetricFamily(
            "crowdtrain_verified_flops",
            "Training FLOPs of receipts that passed every check (a gauge: banning a "
            "peer takes its credit back).",
            labels=run,
        )
        peer_verified = GaugeMetricFamily(
            "crowdtrain_peer_verified_flops",
            "Verified training FLOPs of each peer (the leaderboard), by peer id.",
            labels=["run", "peer_id"],
        )
        peer_bytes = CounterMetricFamily(
            "crowdtrain_peer_bytes",
            "Bytes each peer reported sending and receiving, by purpose (averaging, state, "
            "control, data) and direction; self-reported, never credited.",
            labels=["run", "peer_id", "purpose", "direction"],
        )
        peer_seconds = CounterMetricFamily(
            "crowdtrain_peer_seconds",
            "Seconds each peer's training loop ran (what=training), and of those, spent "
            "computing, waiting for the swarm and waiting for data; self-reported, never "
            "credited.",
            labels=["run", "peer_id", "what"],
        )
        checkpoint_step = GaugeMetricFamily(
            "crowdtrain_checkpoint_step",
            "The step of the latest checkpoint whose file can be downloaded.",
            labels=run,
        )
        checkpoints = GaugeMetricFamily(
            "crowdtrain_checkpoints",
            "Checkpoints whose files the keeper still keeps.",
            labels=run,
        )
        for run_id in run_views.run_ids(self.store):
            view = run_views.run_view(self.store, run_id, now)
            peer_rows = run_views.peers_view(self.store, run_id, now)
            info.add_metric([run_id, view["spec_hash"], view["manifest_hash"]], 1)
            for state in PEER_STATES:
                count = sum(1 for p in peer_rows if p["state"] == state)
                peers.add_metric([run_id, state], count)
            tokens_per_s.add_metric([run_id], view["tokens_per_s"])
            tokens.add_metric([run_id], view["num_tokens"])
            sequences.add_metric([run_id], view["num_sequences"])
            step.add_metric([run_id], view["step"])
            epoch.add_metric([run_id], view["epoch"])
            if view["val_loss"] is not None:
                val_loss.add_metric([run_id], view["val_loss"])
            if view["val_bits_per_byte"] is not None:
                val_bpb.add_metric([run_id], view["val_bits_per_byte"])
            losses = [
                p["loss"] for p in peer_rows if p["state"] == "active" and p["loss"] is not None
            ]
            if losses:
                train_loss.add_metric([run_id], sum(losses) / len(losses))
            for state in SHARD_STATES:
                shards.add_metric([run_id, state], view["shards"][state])
            leases.add_metric([run_id], run_views.num_active_leases(self.store, run_id))
            verified.add_metric([run_id], sum(p["verified_flops"] for p in peer_rows))
            for p in peer_rows:
                peer_verified.add_metric([run_id, p["peer_id"]], p["verified_flops"])
                for purpose, counts in p["traffic"].items():
                    for direction in ("sent", "received"):
                        labels = [run_id, p["peer_id"], purpose, direction]
                        peer_bytes.add_metric(labels, counts[direction])
                for part in TIME_PARTS:
                    peer_seconds.add_metric(
                        [run_id, p["peer_id"], part], p["loop_time"][f"{part}_s"]
                    )
            kept = [c for c in checkpoints_view(self.store, run_id) if c["available"]]
            checkpoints.add_metric([run_id], len(kept))
            if kept:
                checkpoint_step.add_metric([run_id], kept[-1]["step"])
        refused = CounterMetricFamily(
            "crowdtrain_refused_requests",
            "Requests refused since this coordinator started, by method and reason.",
            labels=["method", "reason"],
        )
        for r in self.refusals.snapshot():
            refused.add_metric([str(r["method"]), str(r["reason"])], cast(int, r["count"]))
        yield from (info, peers, tokens_per_s, tokens, sequences, step, epoch, val_loss, val_bpb)
        yield from (train_loss, shards, leases, verified, peer_verified, checkpoint_step)
        yield from (peer_bytes, peer_seconds, checkpoints, refused)


def coordinator_registry(store: Store, refusals: Refusals) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) for one app."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CoordinatorCollector(store, refusals))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format (serve with :data:`CONTENT_TYPE`)."""
    return generate_latest(registry)
