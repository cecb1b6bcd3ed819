"""Verification snapshots: the keeper's private copies of a sync run's parameters.

The step follower (a node-side process the coordinator starts) writes its
parameters of randomly picked steps to a folder the coordinator gives it, as
``step-<n>.safetensors`` (:func:`crowdtrain.model.save_checkpoint`'s format), and
keeps the newest :data:`SNAPSHOTS_KEPT`; the verifier recomputes claimed losses
with them. Unlike checkpoints they are never listed or served, so a node cannot
know which of its steps a spot check can recompute. Standard library only.
"""

from __future__ import annotations

import re
from pathlib import Path

SNAPSHOTS_KEPT = 16  # per run: at fraction 0.5, the last ~32 steps
_NAME = re.compile(r"step-(\d+)\.safetensors")


def snapshot_name(step: int) -> str:
    return f"step-{step}.safetensors"


def list_snapshots(folder: Path) -> dict[int, Path]:
    """The snapshots in ``folder`` by step (empty when it does not exist)."""
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = _NAME.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def prune_snapshots(folder: Path, keep: int = SNAPSHOTS_KEPT) -> None:
    """Remove all but the ``keep`` newest steps' snapshots."""
    found = list_snapshots(folder)
    for step in sorted(found)[:-keep]:
        found[step].unlink(missing_ok=True)


__all__ = ["SNAPSHOTS_KEPT", "list_snapshots", "prune_snapshots", "snapshot_name"]
