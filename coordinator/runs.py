"""Publishing runs and the coordinator's view of them.

``publish`` checks a run spec against its data before anything is stored;
the view functions turn stored rows into the JSON that people, notebooks and
nodes read. No HTTP or gRPC here.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdtrain.coordinator.ledger import peer_credit
from crowdtrain.coordinator.store import Store
from crowdtrain.protocol.errors import CrowdtrainError, ShardError, SpecError
from crowdtrain.protocol.identity import Identity, run_statement
from crowdtrain.protocol.runspec import RunSpec, load_spec, parse_spec
from crowdtrain.protocol.shards import ShardManifest, load_manifest, sha256_file, verify_shard

# A peer that has not sent a heartbeat for this long is shown as gone.
PEER_TIMEOUT_S = 20.0


class UnknownRunError(CrowdtrainError):
    """A run id that was never published here."""


@dataclass(frozen=True)
class PublishResult:
    run_id: str
    spec_hash: str
    manifest_hash: str
    num_train_shards: int
    already_published: bool


@dataclass(frozen=True)
class Publication:
    """A run spec checked against its data, ready to store."""

    spec: RunSpec
    spec_text: str
    manifest: ShardManifest
    data_path: Path
    source: str


def prepare_publication(spec_path: str | Path, data_path: str | Path) -> Publication:
    """Check a run spec and its data without touching any store.

    Reads the spec, the manifest and every shard (sha256 verified); raises a
    :class:`CrowdtrainError` that names the key or file at fault.
    """
    spec = load_spec(spec_path)
    return check_publication(
        spec, Path(spec_path).read_text(encoding="utf-8"), data_path, str(spec_path)
    )


def check_publication(
    spec: RunSpec, spec_text: str, data_path: str | Path, source: str
) -> Publication:
    """:func:`prepare_publication` for a spec already parsed (from a file or a request)."""
    resolved = Path(data_path).resolve()
    manifest = load_manifest(resolved)
    check_spec_against_data(spec, manifest, source=source)
    for entry in manifest.shards:
        verify_shard(resolved / entry.file, entry)
    if manifest.tokenizer_file is not None:
        tokenizer = resolved / manifest.tokenizer_file
        if not tokenizer.is_file() or sha256_file(tokenizer) != manifest.tokenizer_sha256:
            raise ShardError(
                f"{tokenizer} is missing or does not match the manifest's sha256; "
                "prepare the data again"
            )
    return Publication(
        spec=spec, spec_text=spec_text, manifest=manifest, data_path=resolved, source=source
    )


def publish(store: Store, publication: Publication, identity: Identity) -> PublishResult:
    """Make a checked run visible to nodes, in one insert, signed by the coordinator's key.

    Publishing the same spec and data twice is a no-op; the same run id with
    anything else is refused.
    """
    spec, manifest = publication.spec, publication.manifest
    existing = store.get_run(spec.run.id)
    if existing is not None:
        if existing["spec_hash"] == spec.hash and existing["manifest_hash"] == manifest.hash:
            return _result(spec, manifest, already_published=True)
        raise SpecError(
            f"{publication.source}: run '{spec.run.id}' is already published here with a "
            "different spec or data; choose a new [run] id"
        )
    store.insert_run(
        {
            "id": spec.run.id,
            "spec_toml": publication.spec_text,
            "spec_hash": spec.hash,
            "manifest_json": manifest.to_json(),
            "manifest_hash": manifest.hash,
            "data_path": str(publication.data_path),
            "published_at": time.time(),
            "run_signature": identity.sign(run_statement(spec.run.id, spec.hash, manifest.hash)),
        }
    )
    store.ensure_epoch(spec.run.id, 0, epoch_order(spec, manifest, 0))
    return _result(spec, manifest, already_published=False)


def _result(spec: RunSpec, manifest: ShardManifest, already_published: bool) -> PublishResult:
    return PublishResult(
        run_id=spec.run.id,
        spec_hash=spec.hash,
        manifest_hash=manifest.hash,
        num_train_shards=len(manifest.train_shards),
        already_published=already_published,
    )


def check_spec_against_data(spec: RunSpec, manifest: ShardManifest, source: str) -> None:
    """Refuse a spec whose model cannot read the prepared data."""
    if spec.data.tokenizer != manifest.tokenizer:
        raise SpecError(
            f"{source}: [data] tokenizer is {spec.data.tokenizer!r} but the data was prepared "
            f"with {manifest.tokenizer!r}"
        )
    if spec.model.vocab_size != manifest.vocab_size:
        raise SpecError(
            f"{source}: [model] vocab_size must be {manifest.vocab_size} to match the data, "
            f"got {spec.model.vocab_size}"
        )
    if not manifest.train_shards or not manifest.val_shards:
        raise SpecError(f"{source}: the data needs at least one train and one validation shard")
    shortest = min(s.num_tokens for s in manifest.shards)
    if shortest < spec.model.seq_len + 1:
        raise SpecError(
            f"{source}: [model] seq_len {spec.model.seq_len} is longer than the shortest "
            f"shard ({shortest} tokens); lower seq_len or prepare larger shards"
        )


def epoch_order(spec: RunSpec, manifest: ShardManifest, epoch: int) -> list[str]:
    """The order shards are handed out in an epoch, seeded by (run seed, epoch)."""
    ids = sorted(s.id for s in manifest.train_shards)
    random.Random(f"{spec.run.seed}:{epoch}").shuffle(ids)
    return ids


@dataclass(frozen=True)
class PublishedRun:
    """A stored run with its spec and manifest parsed."""

    row: dict[str, Any]
    spec: RunSpec
    manifest: ShardManifest

    @property
    def id(self) -> str:
        return self.spec.run.id

    @property
    def data_path(self) -> Path:
        return Path(self.row["data_path"])


def get_run(store: Store, run_id: str) -> PublishedRun:
    row = store.get_run(run_id)
    if row is None:
        known = ", ".join(r["id"] for r in store.list_runs()) or "none"
        shown = run_id if len(run_id) <= 64 else run_id[:64] + "..."
        raise UnknownRunError(f"no run '{shown}' on this coordinator; runs here: {known}")
    spec, manifest = _parsed(row)
    return PublishedRun(row=row, spec=spec, manifest=manifest)


# A published run's spec and manifest never change, and every node request needs
# them: parse each once (a manifest of many shards is slow to parse), keyed by hash.
_PARSED: dict[tuple[str, str], tuple[RunSpec, ShardManifest]] = {}


def _parsed(row: dict[str, Any]) -> tuple[RunSpec, ShardManifest]:
    key = (row["spec_hash"], row["manifest_hash"])
    if key not in _PARSED:
        if len(_PARSED) >= 64:
            _PARSED.clear()
        _PARSED[key] = (
            parse_spec(row["spec_toml"], source=f"run {row['id']}"),
            ShardManifest.from_json(row["manifest_json"]),
        )
    return _PARSED[key]


def num_active_peers(store: Store, run_id: str, now: float | None = None) -> int:
    """Peers that heartbeat within PEER_TIMEOUT_S and have not left."""
    now = time.time() if now is None else now
    return store.count_live_peers(run_id, since=now - PEER_TIMEOUT_S)


def peer_state(peer: dict[str, Any], now: float) -> str:
    if peer["state"] in ("left", "banned"):
        return str(peer["state"])
    return "active" if now - peer["last_seen"] <= PEER_TIMEOUT_S else "gone"


# What the peers view shows of each peer's ledger (the full ledger is its own view).
_CREDIT_KEYS = ("verified_tokens", "verified_flops", "verified_share", "num_rejected")


def peers_view(store: Store, run_id: str, now: float | None = None) -> list[dict[str, Any]]:
    get_run(store, run_id)
    now = time.time() if now is None else now
    totals = store.peer_totals(run_id)
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
            **{k: credit.get(p["peer_id"], {}).get(k, 0) for k in _CREDIT_KEYS},
        }
        for p in store.list_peers(run_id)
    ]


def run_view(store: Store, run_id: str, now: float | None = None) -> dict[str, Any]:
    run = get_run(store, run_id)
    now = time.time() if now is None else now
    peers = peers_view(store, run_id, now)
    evals = store.list_evals(run_id)
    totals = store.run_totals(run_id)
    epoch = store.current_epoch(run_id) or 0
    counts = store.epoch_counts(run_id, epoch)
    latest = evals[-1] if evals else None
    return {
        "id": run.id,
        "description": run.spec.run.description,
        "step": run.row["step"],
        "num_tokens": totals["num_tokens"],
        "num_sequences": totals["num_sequences"],
        "val_loss": latest["val_loss"] if latest else None,
        "val_bits_per_byte": latest["bits_per_byte"] if latest else None,
        "val_step": latest["step"] if latest else None,
        "first_val_loss": evals[0]["val_loss"] if evals else None,
        "num_peers": sum(1 for p in peers if p["state"] == "active"),
        "tokens_per_s": sum(p["tokens_per_s"] for p in peers if p["state"] == "active"),
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


def list_runs_view(store: Store) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in run_view(store, r["id"]).items() if k != "spec"}
        for r in store.list_runs()
    ]


def evals_view(store: Store, run_id: str) -> list[dict[str, Any]]:
    get_run(store, run_id)
    return store.list_evals(run_id)


# Throughput over time: the serving coordinator samples each run with live peers.

# Samples kept per run. Past this, every second sample of the older half is
# dropped: recent hours keep full resolution (at one sample each 5 s, 25,000
# samples are about 35 hours), older history gets coarser, and the table stays
# bounded whatever the run's length.
MAX_SAMPLES_PER_RUN = 50_000
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
        active = [p for p in store.list_peers(row["id"]) if peer_state(p, now) == "active"]
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
