"""The model comes out: export a run's kept checkpoint, or sample a continuation from it.

Reads the coordinator's data folder directly (SQLite in WAL mode lets it read
while ``serve`` runs), takes the checkpoint keeper's newest kept file of a run
(or a given step), checks it against the sha256 the store recorded, and loads
it into the run's GPT. Knows nothing about serving or the swarm.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from crowdtrain.coordinator.records import PublishedRun, get_run
from crowdtrain.coordinator.store import Store
from crowdtrain.coordinator.swarm.checkpoints import checkpoint_path
from crowdtrain.model import GPT, GPTConfig, load_checkpoint
from crowdtrain.model.checkpoint import CheckpointError
from crowdtrain.model.hf_export import ExportError, check_exportable, export_hf
from crowdtrain.model.tokenizer import EOD_BYTE, BPETokenizer, Tokenizer, load_tokenizer
from crowdtrain.protocol.errors import CrowdtrainError

logger = logging.getLogger(__name__)

FORMATS = ("hf",)
"""What ``export --format`` writes: ``hf``, a transformers folder (model/hf_export.py)."""


@dataclass(frozen=True)
class KeptCheckpoint:
    """A checkpoint file the keeper kept, with the run it belongs to."""

    run: PublishedRun
    row: dict[str, Any]
    path: Path

    @property
    def step(self) -> int:
        return int(self.row["step"])


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_run` wrote."""

    run_id: str
    step: int
    out: Path
    files: list[Path]


@dataclass(frozen=True)
class SampleConfig:
    """How :func:`sample` continues a prompt (``GPT.generate``'s arguments and a seed)."""

    prompt: str
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 40
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise CrowdtrainError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise CrowdtrainError(
                f"--temperature must be >= 0 (0 picks the likeliest token), got {self.temperature}"
            )
        if self.top_k is not None and self.top_k < 1:
            raise CrowdtrainError(f"--top-k must be at least 1, got {self.top_k}")


def open_store(data_dir: Path) -> Store:
    """The coordinator's store in ``data_dir``, which must exist already."""
    return Store(data_dir, create=False)


def find_checkpoint(store: Store, run_id: str, step: int | None = None) -> KeptCheckpoint:
    """The keeper's newest kept checkpoint of ``run_id``, or the one of ``step``.

    Raises ``UnknownRunError`` naming the runs there, or :class:`CheckpointError`
    when there is none yet or that step's file is not kept.
    """
    run = get_run(store, run_id)
    rows = store.list_checkpoints(run.id)
    kept = [row for row in rows if row["file"]]
    if step is None:
        if not kept:
            every_s = run.spec.verify.checkpoint_every_s
            raise CheckpointError(
                f"run {run.id} has no checkpoint yet: the coordinator's checkpoint keeper "
                f"(started by `crowdtrain-coordinator serve`) writes one every {every_s:g} s "
                "([verify] checkpoint_every_s) once peers train; try again later"
            )
        row = kept[-1]
    else:
        found = [row for row in rows if row["step"] == step]
        steps = ", ".join(str(row["step"]) for row in kept) or "none"
        if not found:
            raise CheckpointError(f"run {run.id} has no checkpoint of step {step}; kept: {steps}")
        row = found[0]
        if not row["file"]:
            raise CheckpointError(
                f"the keeper removed run {run.id}'s checkpoint of step {step} to keep newer "
                f"ones; kept steps: {steps}"
            )
    path = checkpoint_path(store, run.id, row)
    assert path is not None  # rows without a file were handled above
    return KeptCheckpoint(run=run, row=row, path=path)


def load_model(checkpoint: KeptCheckpoint, progress: bool = False) -> GPT:
    """The run's GPT with the checkpoint's parameters, after checking the file's sha256.

    Raises :class:`CheckpointError` when the file is gone or does not match the
    sha256 the store recorded when the keeper wrote it (a corrupted or
    tampered file), or does not fit the run's model.
    """
    actual = _file_sha256(checkpoint.path, progress)
    expected = checkpoint.row["file_sha256"]
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} is corrupted: its sha256 is {actual[:16]}..., the "
            f"keeper recorded {expected[:16]}...; export another step (--step) or let the "
            "keeper write a new one"
        )
    state_dict, metadata = load_checkpoint(checkpoint.path)
    if metadata.get("run_id", checkpoint.run.id) != checkpoint.run.id:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} belongs to run {metadata['run_id']!r}, "
            f"not {checkpoint.run.id!r}"
        )
    model = GPT(GPTConfig.from_spec(checkpoint.run.spec.model))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} does not fit run {checkpoint.run.id}'s model: {e}"
        ) from e
    return model.eval()


def run_tokenizer(run: PublishedRun) -> Tokenizer:
    """The run's tokenizer, from the data folder it was published with."""
    manifest = run.manifest
    path = run.data_path / manifest.tokenizer_file if manifest.tokenizer_file else None
    return load_tokenizer(manifest.tokenizer, path, manifest.tokenizer_sha256)


def export_run(
    data_dir: Path,
    run_id: str,
    out: Path,
    fmt: str = "hf",
    step: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> ExportResult:
    """Export a run's checkpoint into the folder ``out``, whole or not at all.

    Writes into a temporary folder beside ``out`` and renames it at the end,
    so a failure leaves ``out`` as it was. A non-empty ``out`` is refused
    unless ``force``, which replaces it.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of: {', '.join(FORMATS)}")
    out = Path(out)
    _check_out(out, force)
    store = open_store(data_dir)
    try:
        # A learned-position run can never be exported: say so before anything else.
        check_exportable(GPTConfig.from_spec(get_run(store, run_id).spec.model))
        checkpoint = find_checkpoint(store, run_id, step)
    finally:
        store.close()
    run = checkpoint.run
    model = load_model(checkpoint, progress)
    manifest = run.manifest
    tokenizer_file = run.data_path / manifest.tokenizer_file if manifest.tokenizer_file else None
    if tokenizer_file is not None:
        load_tokenizer(manifest.tokenizer, tokenizer_file, manifest.tokenizer_sha256)  # checks

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        export_hf(
            staging,
            model.config,
            model.state_dict(),
            manifest.tokenizer,
            tokenizer_file,
            metadata={
                "run_id": run.id,
                "spec_hash": run.spec.hash,
                "step": str(checkpoint.step),
                "params_sha256": str(checkpoint.row["sha256"]),
                "num_tokens": str(checkpoint.row.get("num_tokens") or 0),
            },
            progress=_bar if progress else None,
        )
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = sorted(p for p in out.iterdir() if p.is_file())
    logger.debug("exported run %s at step %d to %s", run.id, checkpoint.step, out)
    return ExportResult(run_id=run.id, step=checkpoint.step, out=out, files=files)


def sample(
    data_dir: Path, run_id: str, config: SampleConfig, step: int | None = None
) -> tuple[int, str]:
    """Continue ``config.prompt`` with the run's checkpoint: (step, the continuation's text).

    The prompt follows an end-of-document token, as every document's start does
    in training; the continuation ends early where the model ends the document.
    """
    store = open_store(data_dir)
    try:
        checkpoint = find_checkpoint(store, run_id, step)
    finally:
        store.close()
    tokenizer = run_tokenizer(checkpoint.run)
    model = load_model(checkpoint)
    eod_id = tokenizer.eod_id if isinstance(tokenizer, BPETokenizer) else EOD_BYTE
    prompt_ids = [eod_id, *(int(i) for i in tokenizer.encode(config.prompt))]
    if config.seed is not None:
        torch.manual_seed(config.seed)
    idx = torch.tensor([prompt_ids], dtype=torch.long)
    generated = model.generate(
        idx, config.max_new_tokens, temperature=config.temperature, top_k=config.top_k
    )[0, len(prompt_ids) :].tolist()
    if eod_id in generated:
        generated = generated[: generated.index(eod_id)]
    return checkpoint.step, tokenizer.decode(generated)


def _check_out(out: Path, force: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        if not force:
            raise ExportError(f"{out} exists and is not a folder; pass --force to replace it")
    elif out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(
            f"{out} is not empty; pick a new folder or pass --force to replace its contents"
        )


def _replace(staging: Path, out: Path) -> None:
    """Put ``staging`` where ``out`` is: one rename, the old ``out`` removed after."""
    old: Path | None = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) / "old"
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


def _bar(items: Iterable[Any], total: int, description: str) -> Iterable[Any]:
    # disable=None: no bar when stderr is not a terminal (a log file, a test).
    return tqdm(
        items, total=total, desc=f"export {description}", unit="tensor", leave=False, disable=None
    )


def _file_sha256(path: Path, progress: bool) -> str:
    try:
        size = path.stat().st_size
        with (
            open(path, "rb") as file,
            tqdm(
                total=size,
                desc="check sha256",
                unit="B",
                unit_scale=True,
                disable=None if progress else True,
                leave=False,
            ) as bar,
        ):
            digest = hashlib.file_digest(_BarReader(file, bar), "sha256")
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path} is gone (the keeper may have just replaced it); run again"
        ) from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from e
    return digest.hexdigest()


class _BarReader:
    """A binary file whose reads move a progress bar, for ``hashlib.file_digest``
    (which needs only ``readable`` and ``readinto``)."""

    def __init__(self, file: io.BufferedIOBase, bar: tqdm) -> None:
        self._file = file
        self._bar = bar

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        num_read = self._file.readinto(buffer)
        self._bar.update(num_read)
        return num_read
