"""Where the keeper's checkpoints live and what the API shows of them.

A run's checkpoints are files ``checkpoints/<run>/step-<step>.safetensors`` in
the coordinator's data folder, each with a sidecar ``<file>.sha256``; the
store keeps a row per checkpoint (its parameters' sha256 stays after the file
is removed). The keeper writes them; the API, exports and the verifier read
them through here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from crowdtrain.coordinator.store import Store
from crowdtrain.protocol.files import atomic_write

SIDECAR_SUFFIX = ".sha256"

STEP_FILE = re.compile(r"step-\d{8,}(\.outer)?\.safetensors")

# Where the verifier's keeper saves checkpoints, inside the coordinator's data folder.
CHECKPOINTS_DIR = "checkpoints"


def checkpoint_path(store: Store, run_id: str, checkpoint: dict[str, Any]) -> Path | None:
    """Where a kept checkpoint's file is; None once the keeper removed it."""
    if not checkpoint.get("file"):
        return None
    return store.data_dir / CHECKPOINTS_DIR / run_id / checkpoint["file"]


def outer_path(path: Path) -> Path:
    """Where a DiLoCo checkpoint's outer momentum is kept beside its parameters."""
    return path.with_name(path.name.removesuffix(".safetensors") + ".outer.safetensors")


def _outer_sha256(store: Store, run_id: str, c: dict[str, Any]) -> str | None:
    path = checkpoint_path(store, run_id, c)
    if path is None:
        return None
    try:
        return sidecar_path(outer_path(path)).read_text().split()[0]
    except (OSError, IndexError):
        return None


def _checkpoint_row(store: Store, run_id: str, c: dict[str, Any]) -> dict[str, Any]:
    return {
        "outer_sha256": _outer_sha256(store, run_id, c),
        "step": c["step"],
        "sha256": c["sha256"],
        "file_sha256": c["file_sha256"],
        "num_bytes": c["num_bytes"],
        "num_tokens": c["num_tokens"],
        "created_at": c["created_at"],
        "available": c["file"] is not None,
    }


def checkpoints_view(store: Store, run_id: str) -> list[dict[str, Any]]:
    """Every checkpoint the keeper took, oldest first: its step, the ``params_sha256`` of
    its parameters (kept after the file is removed), the file's sha256 and size, the
    run's tokens when it was taken and whether it can be downloaded
    (:class:`crowdtrain.protocol.api.CheckpointInfo`; a new key goes there too)."""
    return [_checkpoint_row(store, run_id, c) for c in store.list_checkpoints(run_id)]


def checkpoint_view(store: Store, run_id: str, step: int) -> dict[str, Any] | None:
    """The keeper's checkpoint of ``step`` as :func:`checkpoints_view` shows it, or None."""
    found = store.get_checkpoint(run_id, step)
    return _checkpoint_row(store, run_id, found) if found is not None else None


def checkpoint_file(store: Store, run_id: str, step: int) -> Path | None:
    """The file of the keeper's checkpoint of ``step``, to serve; None when there is no such
    checkpoint or the keeper removed its file."""
    found = store.get_checkpoint(run_id, step)
    path = checkpoint_path(store, run_id, found) if found is not None else None
    return path if path is not None and path.is_file() else None


def outer_file(store: Store, run_id: str, step: int) -> Path | None:
    """The outer momentum file of the keeper's DiLoCo checkpoint of ``step``, to serve;
    None when there is none."""
    path = checkpoint_file(store, run_id, step)
    outer = outer_path(path) if path is not None else None
    return outer if outer is not None and outer.is_file() else None


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.safetensors"


def sidecar_path(path: Path) -> Path:
    """Where the sha256 of a checkpoint file is kept beside it: ``<file>.sha256``."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(sidecar: Path, file_name: str, file_sha256: str) -> None:
    """Write ``<sha256>  <file_name>`` (sha256sum's format) atomically (its temporary
    file is named ``.step-*.tmp``, as the checkpoint's own)."""
    atomic_write(sidecar, f"{file_sha256}  {file_name}\n")
