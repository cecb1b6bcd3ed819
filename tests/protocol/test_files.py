"""Atomic writes: a file is whole or absent, and a secret is never readable by others."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from crowdtrain.protocol.files import atomic_path, atomic_write


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "ports.json"
    atomic_write(path, "one")
    atomic_write(path, b"two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ports.json"]


def test_a_secret_is_created_0600_and_an_ordinary_file_follows_the_umask(tmp_path: Path) -> None:
    atomic_write(tmp_path / "key.pem", b"secret", mode=0o600)
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "plain.json", "{}")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    path = tmp_path / "position.json"
    atomic_write(path, "old")
    with pytest.raises(OSError, match="disk full"), atomic_path(path) as temp:
        temp.write_text("half of the n")
        raise OSError("disk full")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["position.json"]


def test_the_temporary_is_hidden_beside_its_target(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "step-00000001.safetensors") as temp:
        assert temp.parent == tmp_path
        assert temp.name.startswith(".step-00000001.safetensors.") and temp.name.endswith(".tmp")
        temp.write_bytes(b"x")
