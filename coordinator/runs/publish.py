"""Publishing runs: a run spec checked against its data before anything is stored.

:func:`prepare_publication` and :func:`check_publication` check a spec and its
data without touching a store; :func:`publish` stores the checked run, signed
by the coordinator's key, and :func:`publish_text` does both for a spec sent
as text. :func:`epoch_order` is the seeded order shards are
handed out in. No HTTP or gRPC here.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.coordinator.store import Store
from crowdtrain.protocol.errors import ShardError, SpecError
from crowdtrain.protocol.identity import Identity, run_statement
from crowdtrain.protocol.runspec import RunSpec, load_spec, parse_spec
from crowdtrain.protocol.shards import ShardManifest, load_manifest, sha256_file, verify_shard


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


def publish_text(
    store: Store, spec_toml: str, data_path: str | Path, identity: Identity, source: str
) -> PublishResult:
    """Parse a run spec sent as TOML text (``source`` names it in errors), check it
    against the data folder ``data_path`` on this machine and publish it."""
    spec = parse_spec(spec_toml, source=source)
    return publish(store, check_publication(spec, spec_toml, data_path, source), identity)


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
