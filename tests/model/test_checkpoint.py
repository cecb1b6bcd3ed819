"""Checkpoints round trip a model exactly, are written atomically and refuse bad files by name."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from crowdtrain.model import (
    GPT,
    CheckpointError,
    GPTConfig,
    load_checkpoint,
    load_into,
    save_checkpoint,
    sha256_file,
)
from crowdtrain.model import checkpoint as checkpoint_module
from crowdtrain.protocol.errors import CrowdtrainError


@pytest.fixture
def saved(tmp_path: Path, model: GPT) -> Path:
    path = tmp_path / "step-10.safetensors"
    save_checkpoint(path, model.state_dict(), {"step": "10"})
    return path


def test_round_trip_reproduces_logits(saved: Path, model: GPT, config: GPTConfig) -> None:
    torch.manual_seed(123)
    restored = GPT(config)
    idx = torch.randint(0, 256, (2, 32))
    assert not torch.equal(restored(idx)[0], model(idx)[0])

    metadata = load_into(restored, saved)

    assert metadata == {"step": "10"}
    assert torch.equal(restored(idx)[0], model(idx)[0])


def test_tied_weights_stay_tied(saved: Path, config: GPTConfig) -> None:
    restored = GPT(config)
    load_into(restored, saved)
    assert restored.lm_head.weight is restored.token_embedding.weight

    state_dict, _ = load_checkpoint(saved)
    assert state_dict["lm_head.weight"] is state_dict["token_embedding.weight"]


def test_tied_weight_is_stored_once(tmp_path: Path, model: GPT) -> None:
    tied = tmp_path / "tied.safetensors"
    untied = tmp_path / "untied.safetensors"
    save_checkpoint(tied, model.state_dict(), {})
    save_checkpoint(untied, {k: v.clone() for k, v in model.state_dict().items()}, {})
    embedding_bytes = model.token_embedding.weight.numel() * 4
    assert untied.stat().st_size - tied.stat().st_size >= embedding_bytes


def test_returned_sha256_is_the_files(tmp_path: Path, model: GPT) -> None:
    path = tmp_path / "model.safetensors"
    digest = save_checkpoint(path, model.state_dict(), {})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_file(path)


def test_tensors_sharing_memory_are_saved_as_copies(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state_dict = {"whole": base, "rows": base[1:], "transposed": base.t()}
    path = tmp_path / "views.safetensors"
    save_checkpoint(path, state_dict, {})
    loaded, _ = load_checkpoint(path)
    for name, tensor in state_dict.items():
        assert torch.equal(loaded[name], tensor)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: data[:6], id="truncated-header"),
        pytest.param(lambda data: b"not a checkpoint at all" * 4, id="garbage"),
        pytest.param(lambda data: b"", id="empty"),
    ],
)
def test_damaged_file_is_refused_by_name(
    saved: Path, config: GPTConfig, damage: Callable[[bytes], bytes]
) -> None:
    saved.write_bytes(damage(saved.read_bytes()))
    with pytest.raises(CheckpointError, match=re.escape(str(saved))):
        load_checkpoint(saved)
    with pytest.raises(CheckpointError, match=re.escape(str(saved))):
        load_into(GPT(config), saved)


def test_missing_file_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)


def test_checkpoint_of_another_config_is_refused(
    saved: Path, tiny_config: Callable[..., GPTConfig], positions: str
) -> None:
    other = GPT(tiny_config(positions=positions, d_model=64))
    with pytest.raises(CheckpointError, match="GPTConfig"):
        load_into(other, saved)


def test_checkpoint_error_is_a_user_error() -> None:
    assert issubclass(CheckpointError, CrowdtrainError)


def test_save_into_missing_folder_names_the_path(tmp_path: Path, model: GPT) -> None:
    path = tmp_path / "no-such-folder" / "model.safetensors"
    with pytest.raises(CheckpointError, match="no-such-folder"):
        save_checkpoint(path, model.state_dict(), {})


def test_failed_write_leaves_existing_checkpoint_intact(
    saved: Path, model: GPT, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = saved.read_bytes()

    def write_half_then_fail(
        tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None
    ) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", write_half_then_fail)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(saved, model.state_dict(), {"step": "20"})

    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]


def test_bad_metadata_is_refused_and_changes_nothing(saved: Path, model: GPT) -> None:
    before = saved.read_bytes()
    with pytest.raises(CheckpointError, match="step"):
        save_checkpoint(saved, model.state_dict(), {"step": 20})  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(saved, model.state_dict(), {checkpoint_module.ALIASES_KEY: "{}"})
    assert saved.read_bytes() == before


def test_overwrite_replaces_file_and_leaves_no_temporaries(saved: Path, model: GPT) -> None:
    with torch.no_grad():
        model.final_norm.weight.add_(1.0)
    digest = save_checkpoint(saved, model.state_dict(), {"step": "20"})
    assert sha256_file(saved) == digest
    assert load_checkpoint(saved)[1] == {"step": "20"}
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]
