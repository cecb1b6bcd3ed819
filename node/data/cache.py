"""Shards of one run's data in a local folder: downloaded, checked against the manifest,
and evicted when the folder outgrows its bound.

:class:`ShardCache` checks each shard's sha256 (one retry, then a clear
error). It is handed the node's download function; it knows nothing about
leases, training or gRPC.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from crowdtrain.protocol.errors import ShardError
from crowdtrain.protocol.shards import ShardEntry, ShardManifest, verify_shard

logger = logging.getLogger(__name__)


class ShardCache:
    """Shards of one run's data in a local folder, each checked against the manifest."""

    def __init__(
        self,
        folder: Path,
        manifest: ShardManifest,
        base_url: str,
        download: Callable[[str, Path, int], None],
        max_bytes: int | None = None,
    ):
        self.folder = folder
        self.manifest = manifest
        self.base_url = base_url.rstrip("/")
        self.max_bytes = max_bytes
        self._download = download
        self._entries = {s.id: s for s in manifest.shards}
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)

    def evict(self, keep: set[str]) -> list[str]:
        """Delete the least recently used shards until the cache fits ``max_bytes``.

        Shards named in ``keep`` (being trained, queued, the validation shard)
        are never deleted, so the cache may exceed its bound by those alone.
        """
        if self.max_bytes is None:
            return []
        with self._lock:
            files = {e.file: e.id for e in self.manifest.shards}
            present = [p for p in self.folder.iterdir() if p.name in files]
            total = sum(p.stat().st_size for p in present)
            evicted = []
            for path in sorted(present, key=lambda p: p.stat().st_mtime):
                if total <= self.max_bytes:
                    break
                shard_id = files[path.name]
                if shard_id in keep:
                    continue
                total -= path.stat().st_size
                path.unlink(missing_ok=True)
                evicted.append(shard_id)
        if evicted:
            logger.info("cache over its bound; removed %d shards", len(evicted))
        return evicted

    def entry(self, shard_id: str) -> ShardEntry:
        try:
            return self._entries[shard_id]
        except KeyError:
            raise ShardError(f"shard {shard_id!r} is not in the run's manifest") from None

    def fetch(self, shard_id: str) -> Path:
        """The verified local path of a shard, downloading it (at most twice) if needed."""
        entry = self.entry(shard_id)
        path = self.folder / entry.file
        if path.exists():
            try:
                verify_shard(path, entry)
                path.touch()  # most recently used
                return path
            except ShardError:
                logger.warning("cached shard %s is damaged; downloading it again", shard_id)
                path.unlink()
        for attempt in (1, 2):
            # No more bytes than the signed manifest says the shard has: a server that
            # sends an endless body is cut off, not written to disk.
            self._download(f"{self.base_url}/{shard_id}", path, entry.size_bytes)
            try:
                verify_shard(path, entry)
                return path
            except ShardError as e:
                path.unlink(missing_ok=True)
                if attempt == 2:
                    raise ShardError(
                        f"shard {shard_id} failed its sha256 check twice ({e}); the "
                        "coordinator's copy does not match the run's manifest: tell the run's "
                        "operator, who should prepare and publish the data again"
                    ) from None
                logger.warning("shard %s failed its sha256 check; downloading it again", shard_id)
        raise AssertionError("unreachable")


__all__ = ["ShardCache"]
