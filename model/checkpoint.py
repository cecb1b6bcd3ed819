"""Checkpoint files: a state dict and string metadata in one safetensors file.

Owns the on-disk format, atomic writes, integrity hashes and restoring tied
weights. Never pickles or unpickles: a checkpoint from the network can hold
tensors and strings, nothing that runs. Knows nothing about when checkpoints
are taken, where they are served from or which run they belong to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.files import atomic_path

logger = logging.getLogger(__name__)

ALIASES_KEY = "crowdtrain.aliases"
"""Reserved metadata key: JSON ``{dropped_name: kept_name}`` for tensors saved once."""


class CheckpointError(CrowdtrainError):
    """A checkpoint that cannot be written, read or loaded into a model."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of the file at ``path``, read in chunks so large files fit in memory."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def params_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hex sha256 of a state dict's values, independent of file format and device.

    Hashes, for each tensor in name order: its name, dtype, shape and the bytes
    of its contiguous CPU copy. Two peers holding bit-identical parameters get
    the same hash; any change of a value, name, shape or dtype changes it.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(
    path: str | os.PathLike[str],
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str],
) -> str:
    """Write ``state_dict`` and ``metadata`` to ``path`` atomically; return the file's sha256.

    Readers see the old file or the new one, never a partial one, even after
    a crash: the bytes go to a temporary file in the same folder, are fsynced,
    and replace ``path`` in one rename. Tensors that are the same tensor under
    two names (a tied lm_head) are stored once and restored by
    ``load_checkpoint``; other tensors sharing memory are stored as copies.
    The folder must exist. Raises ``CheckpointError`` naming ``path`` if
    anything fails, and then leaves any existing file at ``path`` untouched.
    """
    path = Path(path)
    _check_metadata(path, metadata)
    tensors, aliases = _dedupe_shared(state_dict)
    header = dict(metadata)
    if aliases:
        header[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)

    folder = path.parent
    if not folder.is_dir():
        raise CheckpointError(
            f"cannot write checkpoint {path}: folder {folder} does not exist; create it first"
        )
    try:
        with atomic_path(path) as temp:
            save_file(tensors, str(temp), metadata=header)
            digest = sha256_file(temp)
    except (OSError, SafetensorError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc}") from exc
    logger.info("saved checkpoint %s (%d tensors, sha256 %s)", path, len(tensors), digest)
    return digest


def load_checkpoint(
    path: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint written by ``save_checkpoint``: its state dict (CPU) and metadata.

    Tied names come back as the same tensor object, so the result loads with
    ``strict=True`` into a model that ties them. Raises ``CheckpointError``
    naming ``path`` for a missing, truncated or malformed file.
    """
    path = Path(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            metadata = dict(file.metadata() or {})
            state_dict = {name: file.get_tensor(name) for name in file.keys()}
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc

    aliases_json = metadata.pop(ALIASES_KEY, None)
    if aliases_json is not None:
        for alias, name in _parse_aliases(path, aliases_json).items():
            if name not in state_dict:
                raise CheckpointError(
                    f"checkpoint {path} ties {alias!r} to {name!r}, which it does not contain"
                )
            state_dict[alias] = state_dict[name]
    return state_dict, metadata


def load_into(
    model: nn.Module, path: str | os.PathLike[str], strict: bool = True
) -> dict[str, str]:
    """Copy the checkpoint at ``path`` into ``model``'s parameters; return its metadata.

    Copies values into the model's existing tensors, so tied weights stay
    tied and the model stays on its device and dtype. With ``strict``, every
    key must match; a mismatch (a checkpoint of another ``GPTConfig``) raises
    ``CheckpointError`` naming ``path``.
    """
    state_dict, metadata = load_checkpoint(path)
    try:
        result = model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: {exc}; was it saved for a "
            "different GPTConfig?"
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        logger.warning(
            "checkpoint %s: missing keys %s, unexpected keys %s",
            path,
            result.missing_keys,
            result.unexpected_keys,
        )
    return metadata


def _check_metadata(path: Path, metadata: dict[str, str]) -> None:
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise CheckpointError(
                f"cannot write checkpoint {path}: metadata must map str to str, got "
                f"{key!r}: {value!r}; convert the value with str() or json.dumps()"
            )
    if ALIASES_KEY in metadata:
        raise CheckpointError(
            f"cannot write checkpoint {path}: metadata key {ALIASES_KEY!r} is reserved"
        )


def _dedupe_shared(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors accepts (CPU, contiguous, unshared) and ``{alias: kept_name}``."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen_views: dict[tuple[object, ...], str] = {}
    seen_storages: set[tuple[torch.device, int]] = set()
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor; "
                "put non-tensor values in metadata"
            )
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tensor.shape, tensor.stride(), tensor.dtype)
        if view in seen_views:
            aliases[name] = seen_views[view]
            continue
        # safetensors refuses tensors that share memory; a copy breaks the link.
        shared = storage in seen_storages and tensor.numel() > 0
        seen_views[view] = name
        seen_storages.add(storage)
        tensor = tensor.to("cpu")
        tensors[name] = (
            tensor.clone(memory_format=torch.contiguous_format) if shared else tensor.contiguous()
        )
    return tensors, aliases


def _parse_aliases(path: Path, aliases_json: str) -> dict[str, str]:
    try:
        aliases = json.loads(aliases_json)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path} has malformed {ALIASES_KEY}: {exc}") from exc
    if not isinstance(aliases, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in aliases.items()
    ):
        raise CheckpointError(f"checkpoint {path} has malformed {ALIASES_KEY}: {aliases_json!r}")
    return aliases
