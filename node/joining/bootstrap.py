"""Where a joining node's first parameters come from: the keeper's checkpoint or the peers.

A node joining a run under way needs the swarm's parameters. hivemind's
``load_state_from_peers`` downloads them tensor by tensor from a peer, with the
optimizer's statistics; the coordinator's keeper serves its latest checkpoint
as one safetensors file over HTTP, parameters only (a DiLoCo round's outer
momentum beside it). :func:`plan_start` picks one (``--start-from
auto|peers|checkpoint``); :class:`CheckpointPrefetch` plans and downloads in the
background while the node starts its DHT and optimizer;
:func:`start_from_checkpoint` downloads the file unless it was prefetched (a
progress bar on a terminal), checks its sha256 against
the keeper's record and its parameters' sha256, loads it into the model
(safetensors: nothing is unpickled) and moves the optimizer to the
checkpoint's step. Knows nothing about training or the gRPC session.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from pydantic import ValidationError

from crowdtrain.model import load_checkpoint, params_sha256
from crowdtrain.model.checkpoint import CheckpointError
from crowdtrain.node.link.errors import CoordinatorError
from crowdtrain.node.link.http import download_file, tls_verify
from crowdtrain.node.stats.traffic import Traffic
from crowdtrain.node.swarm.optimizer import SwarmOptimizer
from crowdtrain.protocol import api
from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.runspec import RunSpec

logger = logging.getLogger(__name__)

START_FROM = ("auto", "peers", "checkpoint")
_TIMEOUT = httpx.Timeout(10.0, read=60.0)


class BootstrapError(CrowdtrainError):
    """The keeper's checkpoint could not be used to start from."""


@dataclass(frozen=True)
class KeptCheckpoint:
    """One of the keeper's checkpoints as ``GET /api/runs/{id}/checkpoints`` lists it."""

    step: int
    params_sha256: str
    file_sha256: str
    num_bytes: int
    num_tokens: int = 0
    outer_sha256: str | None = None  # a DiLoCo round's outer momentum file, when kept

    @classmethod
    def from_row(cls, row: Any) -> KeptCheckpoint | None:
        """Parse a listed row (a :class:`~crowdtrain.protocol.api.CheckpointInfo`); None for
        a row without a downloadable file, or malformed."""
        try:
            info = api.CheckpointInfo.model_validate(row)
        except ValidationError:
            return None
        if not info.available or info.num_bytes <= 0:
            return None
        return cls(
            step=info.step,
            params_sha256=info.sha256,
            file_sha256=info.file_sha256,
            num_bytes=info.num_bytes,
            num_tokens=info.num_tokens,
            outer_sha256=info.outer_sha256,
        )


@dataclass(frozen=True)
class StartPlan:
    """Where the node's parameters come from: ``checkpoint``, ``peers`` or ``fresh`` (the
    run's seeded initialization: nothing trained yet), and why."""

    source: str
    reason: str
    checkpoint: KeptCheckpoint | None = None


def latest_checkpoint(url: str, run_id: str, ca_cert: Path | None = None) -> KeptCheckpoint | None:
    """The keeper's newest downloadable checkpoint of the run; None when it keeps none or
    the coordinator cannot say (the node then loads state from peers)."""
    try:
        response = httpx.get(
            api.url(url, api.CHECKPOINTS, run_id=run_id),
            timeout=_TIMEOUT,
            verify=tls_verify(ca_cert),
        )
        response.raise_for_status()
        rows = response.json()
    except (httpx.HTTPError, ValueError) as e:
        logger.info("could not list the coordinator's checkpoints (%s)", e)
        return None
    found = [c for c in map(KeptCheckpoint.from_row, rows if isinstance(rows, list) else [])]
    kept = [c for c in found if c is not None]
    return max(kept, key=lambda c: c.step) if kept else None


def plan_start(
    start_from: str, run_step: int, checkpoint: KeptCheckpoint | None, mode: str = "sync"
) -> StartPlan:
    """Choose where a joining node's parameters come from.

    ``run_step`` is the coordinator's step of the run and ``mode`` the run's
    ``[optimizer] mode``. ``auto`` takes the checkpoint when it is of the run's
    current step (no progress is lost, and one bulk HTTP stream beats hivemind's
    per-tensor download); in DiLoCo mode also when it is one round behind (the
    keeper's follower serves the next round) and only with the round's outer
    momentum. Otherwise peers; :func:`fall_back` then
    takes a newer checkpoint when no peer served state. ``checkpoint`` always
    takes it, and raises :class:`BootstrapError` when the keeper has none.
    """
    if start_from not in START_FROM:
        raise BootstrapError(
            f"--start-from must be one of {', '.join(START_FROM)}, got {start_from!r}"
        )
    if start_from == "checkpoint":
        if checkpoint is None:
            raise BootstrapError(
                "--start-from checkpoint: the coordinator keeps no checkpoint of this run yet; "
                "use --start-from auto or peers"
            )
        return StartPlan("checkpoint", "asked for", checkpoint)
    if run_step == 0 and (checkpoint is None or checkpoint.step == 0):
        return StartPlan("fresh", "the run has not stepped yet", checkpoint)
    if start_from == "peers":
        return StartPlan("peers", "asked for", checkpoint)
    if checkpoint is None:
        return StartPlan("peers", "the keeper has no checkpoint yet")
    if mode == "diloco" and checkpoint.outer_sha256 is None:
        return StartPlan(
            "peers", "a DiLoCo peer needs the outer momentum, which the keeper did not keep",
            checkpoint,
        )  # fmt: skip
    if checkpoint.step >= run_step:
        return StartPlan("checkpoint", f"the keeper holds the run's step {run_step}", checkpoint)
    if mode == "diloco" and checkpoint.step + 1 >= run_step:
        # The keeper's follower keeps every round; the one it is writing now reaches the
        # node at its first round's end, from the follower (see DiLoCoOptimizer).
        return StartPlan(
            "checkpoint",
            f"the keeper holds round {checkpoint.step}; round {run_step} follows from its follower",
            checkpoint,
        )
    return StartPlan(
        "peers",
        f"the keeper's checkpoint is of step {checkpoint.step}, the run is at step {run_step}",
        checkpoint,
    )


@dataclass
class Prefetched:
    """Where a joining node starts from, decided and downloaded while it joins the swarm:
    the plan, the checkpoint's file and (DiLoCo) its outer momentum file when the plan
    takes the checkpoint, or the error that stopped that."""

    plan: StartPlan | None = None
    path: Path | None = None
    outer_path: Path | None = None
    error: BootstrapError | None = None
    seconds: float = 0.0


class CheckpointPrefetch:
    """Lists the keeper's checkpoints, plans the start (:func:`plan_start`) and, when the
    plan takes the checkpoint, downloads its files, all in a background thread started
    at once: the node starts its DHT and optimizer meanwhile. :meth:`result` waits for
    it; :meth:`discard` removes files nobody used."""

    def __init__(
        self,
        start_from: str,
        url: str,
        run_id: str,
        run_step: int,
        mode: str,
        folder: Path,
        ca_cert: Path | None = None,
        progress: str = "auto",
    ):
        self._args = (start_from, url, run_id, run_step, mode, folder, ca_cert, progress)
        self._result = Prefetched()
        self._thread = threading.Thread(target=self._run, name="checkpoint-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start_from, url, run_id, run_step, mode, folder, ca_cert, progress = self._args
        started = time.monotonic()
        result = self._result
        try:
            checkpoint = None
            if start_from != "peers":
                checkpoint = latest_checkpoint(url, run_id, ca_cert)
            result.plan = plan_start(start_from, run_step, checkpoint, mode)
            kept = result.plan.checkpoint
            if result.plan.source == "checkpoint" and kept is not None:
                result.path = download_checkpoint(url, run_id, kept, folder, ca_cert, progress)
                if mode == "diloco" and kept.outer_sha256 is not None:
                    result.outer_path = download_outer_file(
                        url, run_id, kept, folder, ca_cert, progress
                    )
        except BootstrapError as e:
            result.error = e
        except Exception as e:  # the node falls back to peers; the reason goes to the log
            result.error = BootstrapError(f"could not prefetch the keeper's checkpoint: {e}")
        result.seconds = time.monotonic() - started

    def result(self) -> Prefetched:
        self._thread.join()
        return self._result

    def discard(self) -> None:
        """Wait for the thread and remove what it downloaded (a join that failed)."""
        self._thread.join()
        for path in (self._result.path, self._result.outer_path):
            if path is not None:
                path.unlink(missing_ok=True)


def fall_back(plan: StartPlan, loaded_step: int) -> bool:
    """After loading from peers under ``auto``: take the checkpoint instead when peers left
    the node at an older step (no peer served state, or its state was refused)."""
    return (
        plan.source == "peers"
        and plan.reason != "asked for"
        and plan.checkpoint is not None
        and plan.checkpoint.step > loaded_step
    )


def download_outer_file(
    url: str,
    run_id: str,
    checkpoint: KeptCheckpoint,
    folder: Path,
    ca_cert: Path | None = None,
    progress: str = "auto",
) -> Path:
    """Stream the outer momentum file of a DiLoCo ``checkpoint`` into ``folder``, checked
    against the sha256 the keeper listed."""
    path = folder / f"keeper-step-{checkpoint.step}.outer.safetensors"
    _download_kept(
        url, api.CHECKPOINT_OUTER, run_id, checkpoint, path, "outer momentum",
        checkpoint.outer_sha256, 2 * checkpoint.num_bytes, ca_cert, progress,
    )  # fmt: skip
    return path


def read_outer_momentum(
    model: torch.nn.Module, path: Path, checkpoint: KeptCheckpoint
) -> list[torch.Tensor]:
    """A downloaded outer momentum file in the order of ``model.parameters()``, each
    tensor of its parameter's shape and finite."""
    try:
        tensors, _ = load_checkpoint(path)
    except CheckpointError as e:
        raise BootstrapError(
            f"the outer momentum of the keeper's checkpoint of step {checkpoint.step}: {e}"
        ) from None
    momentum = []
    for name, param in model.named_parameters():
        tensor = tensors.get(name)
        if tensor is None or tensor.shape != param.shape or not bool(torch.isfinite(tensor).all()):
            raise BootstrapError(
                f"the outer momentum of the keeper's checkpoint of step {checkpoint.step} "
                f"does not fit this model ({name})"
            )
        momentum.append(tensor.float())
    return momentum


def download_checkpoint(
    url: str,
    run_id: str,
    checkpoint: KeptCheckpoint,
    folder: Path,
    ca_cert: Path | None = None,
    progress: str = "auto",
) -> Path:
    """Stream the keeper's checkpoint file into ``folder``; return its path once its sha256
    is the one the keeper recorded. A partial or wrong download leaves no file behind."""
    path = folder / f"keeper-step-{checkpoint.step}.safetensors"
    _download_kept(
        url, api.CHECKPOINT_FILE, run_id, checkpoint, path, "checkpoint",
        checkpoint.file_sha256, checkpoint.num_bytes, ca_cert, progress,
    )  # fmt: skip
    return path


def _download_kept(
    url: str,
    route: str,
    run_id: str,
    checkpoint: KeptCheckpoint,
    path: Path,
    label: str,
    sha256: str | None,
    max_bytes: int,
    ca_cert: Path | None,
    progress: str,
) -> None:
    """Stream one of the keeper's files of ``checkpoint`` (``route``) into ``path``, checked
    against ``sha256``; a partial or wrong download leaves no file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file_url = api.url(url, route, run_id=run_id, step=checkpoint.step)
    try:
        with httpx.Client(timeout=_TIMEOUT, verify=tls_verify(ca_cert)) as http:
            download_file(
                http,
                file_url,
                path,
                f"{label} {checkpoint.step}",
                progress,
                sha256=sha256,
                max_bytes=max_bytes,
            )
    except CoordinatorError as e:
        raise BootstrapError(
            f"the keeper's {label} of step {checkpoint.step}: {e} (the keeper may have "
            "removed it: join again, or use --start-from peers)"
        ) from None


def load_kept_checkpoint(
    model: torch.nn.Module, path: Path, checkpoint: KeptCheckpoint, spec: RunSpec
) -> dict[str, str]:
    """Load a downloaded keeper checkpoint into ``model``; return its metadata.

    Everything is checked before the model is touched: the file's run, spec
    hash and step, and the sha256 of its parameters against the keeper's
    record. On any mismatch :class:`BootstrapError` is raised and the model is
    left as it was.
    """
    try:
        state, metadata = load_checkpoint(path)
    except CheckpointError as e:
        raise BootstrapError(f"the keeper's checkpoint cannot be read: {e}") from None
    expected = {"run_id": spec.run.id, "spec_hash": spec.hash, "step": str(checkpoint.step)}
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise BootstrapError(
                f"the keeper's checkpoint of step {checkpoint.step} says {key} = "
                f"{metadata.get(key)!r}, not {value!r}: it is not this run's; refusing it"
            )
    digest = params_sha256(state)
    if digest != checkpoint.params_sha256 or metadata.get("params_sha256") != digest:
        raise BootstrapError(
            f"the parameters of the keeper's checkpoint of step {checkpoint.step} hash to "
            f"{digest[:16]}..., not the {checkpoint.params_sha256[:16]}... the keeper "
            "recorded; refusing them"
        )
    own = model.state_dict()
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        raise BootstrapError(
            f"the keeper's checkpoint of step {checkpoint.step} does not fit this run's model"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)
    return metadata


def start_from_checkpoint(
    model: torch.nn.Module,
    optimizer: SwarmOptimizer | None,
    spec: RunSpec,
    url: str,
    checkpoint: KeptCheckpoint,
    folder: Path,
    ca_cert: Path | None = None,
    progress: str = "auto",
    traffic: Traffic | None = None,
    files: Prefetched | None = None,
) -> int:
    """Download, check and load the keeper's ``checkpoint`` into ``model``, then move
    ``optimizer`` (None: none yet) to its step; returns the step. Raises
    :class:`BootstrapError` and leaves the model as it was when anything fails.

    Sync mode: Adam's statistics start afresh, and hivemind loads state from peers
    by itself at the next step if the swarm has moved on. DiLoCo: the
    checkpoint's parameters become the global parameters of its round, with the
    round's outer momentum when the keeper kept it (zero otherwise; see
    :meth:`SwarmOptimizer.set_step`). ``traffic`` counts the bytes as state."""
    started = time.monotonic()
    outer = None
    diloco = spec.optimizer.mode == "diloco" and checkpoint.outer_sha256 is not None
    if files is not None and files.path is not None:  # downloaded while the node joined
        path, outer_file = files.path, files.outer_path
    else:
        path = download_checkpoint(url, spec.run.id, checkpoint, folder, ca_cert, progress)
        outer_file = None
        if diloco:
            outer_file = download_outer_file(
                url, spec.run.id, checkpoint, folder, ca_cert, progress
            )
    try:
        if diloco:
            if outer_file is None:
                raise BootstrapError(
                    f"the outer momentum of the keeper's checkpoint of step {checkpoint.step} "
                    "was not downloaded"
                )
            outer = read_outer_momentum(model, outer_file, checkpoint)
        load_kept_checkpoint(model, path, checkpoint, spec)
    finally:
        path.unlink(missing_ok=True)
        if outer_file is not None:
            outer_file.unlink(missing_ok=True)
    if traffic is not None:
        outer_bytes = sum(t.numel() * t.element_size() for t in outer or [])
        traffic.add("state", received=checkpoint.num_bytes + outer_bytes)
    if optimizer is not None:
        optimizer.set_step(checkpoint.step, outer_momentum=outer)
    logger.info(
        "started from the keeper's checkpoint of step %d (%d tokens, %.1f MB%s) in %.1fs",
        checkpoint.step,
        checkpoint.num_tokens,
        checkpoint.num_bytes / 1e6,
        ", with its outer momentum" if outer is not None else "",
        time.monotonic() - started,
    )
    return checkpoint.step


__all__ = [
    "START_FROM",
    "BootstrapError",
    "CheckpointPrefetch",
    "KeptCheckpoint",
    "Prefetched",
    "StartPlan",
    "download_checkpoint",
    "download_outer_file",
    "fall_back",
    "latest_checkpoint",
    "load_kept_checkpoint",
    "plan_start",
    "read_outer_momentum",
    "start_from_checkpoint",
]
