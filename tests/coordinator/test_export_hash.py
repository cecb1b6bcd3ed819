"""export checks a checkpoint's sha256 with a progress bar that follows the bytes read."""

from __future__ import annotations

import hashlib
import os

import pytest

from crowdtrain.coordinator.export import _BarReader, _file_sha256
from crowdtrain.model.checkpoint import CheckpointError


class _Bar:
    def __init__(self) -> None:
        self.n = 0

    def update(self, num_bytes: int) -> None:
        self.n += num_bytes


def test_the_whole_file_is_hashed_and_counted(tmp_path):
    data = os.urandom(3 * (1 << 18) + 5)  # several of hashlib.file_digest's reads
    path = tmp_path / "step.safetensors"
    path.write_bytes(data)
    assert _file_sha256(path, progress=False) == hashlib.sha256(data).hexdigest()
    bar = _Bar()
    with open(path, "rb") as file:
        digest = hashlib.file_digest(_BarReader(file, bar), "sha256")
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert bar.n == len(data)


def test_a_checkpoint_gone_meanwhile_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="is gone"):
        _file_sha256(tmp_path / "missing.safetensors", progress=False)
