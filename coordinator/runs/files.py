"""The files a published run serves: its shards and its tokenizer.

A file is found through the run's manifest, by shard id or as the manifest's
tokenizer, never by a path a request names. A file the manifest does not list
raises :class:`NoSuchFileError`; one it lists but the coordinator's data folder
lost raises :class:`FileGoneError`. No HTTP or gRPC here.
"""

from __future__ import annotations

from pathlib import Path

from crowdtrain.coordinator.records import PublishedRun
from crowdtrain.protocol.errors import CrowdtrainError


class NoSuchFileError(CrowdtrainError):
    """The run has no such file: an unknown shard id, or a tokenizer a byte run lacks."""


class FileGoneError(CrowdtrainError):
    """The manifest lists the file but it is missing from the coordinator's data folder."""


def shard_file(run: PublishedRun, shard_id: str) -> Path:
    """The file of ``run``'s shard ``shard_id``."""
    entry = next((s for s in run.manifest.shards if s.id == shard_id), None)
    if entry is None:
        raise NoSuchFileError(f"no shard {shard_id!r} in run {run.id!r}")
    path = run.data_path / entry.file
    if not path.is_file():
        raise FileGoneError(f"shard {shard_id!r} is missing from the coordinator's data")
    return path


def tokenizer_file(run: PublishedRun) -> Path:
    """The BPE tokenizer (``tokenizer.json``) of ``run``, pinned by its manifest's sha256."""
    name = run.manifest.tokenizer_file
    if name is None:
        raise NoSuchFileError(f"run {run.id!r} uses byte tokens")
    path = run.data_path / name
    if not path.is_file():
        raise FileGoneError("the tokenizer is missing on the coordinator")
    return path
