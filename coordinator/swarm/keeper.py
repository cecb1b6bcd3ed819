"""The checkpoint keeper: downloads a run's state from its swarm and keeps it as checkpoints.

For each run it holds one hivemind ``TrainingStateAverager`` in client mode,
shaped like the nodes' (the same parameter groups and an AdamW of the same
shapes, under the prefix ``{run_id}_state_averager``), and asks it to load
the state of the swarm's best peer. The parameters are saved as a
params-only safetensors file ``checkpoints/<run>/step-<step>.safetensors``
in the coordinator's data folder, recorded with their :func:`params_sha256`
in the store, and only the newest ``[verify] keep_checkpoints`` files are kept (their
hashes stay). Each file carries the spec hash, step, tokens seen and parameters'
sha256 in its metadata, and a sidecar ``<file>.sha256`` with the file's own sha256.

A DiLoCo run (``[optimizer] mode = "diloco"``) is pulled from the nodes'
DiLoCo averagers instead (prefix ``{run_id}_diloco``, a plain client-mode
DecentralizedAverager here): they serve the global parameters of round ``r``
(the checkpoint's step), which every peer that completed the round holds bit
for bit. Runs in the verifier process, never in the coordinator's serving
process.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.optim.state_averager import TrainingStateAverager

from crowdtrain.coordinator.records import PublishedRun
from crowdtrain.coordinator.store import Store
from crowdtrain.coordinator.swarm.checkpoints import (
    CHECKPOINTS_DIR,
    SIDECAR_SUFFIX,
    STEP_FILE,
    checkpoint_name,
    outer_path,
    sidecar_path,
    write_sidecar,
)
from crowdtrain.model import (
    GPT,
    CheckpointError,
    GPTConfig,
    param_groups,
    params_sha256,
    save_checkpoint,
)
from crowdtrain.protocol.state import DILOCO_STATE_LAYOUT, diloco_prefix

logger = logging.getLogger(__name__)


# Downloads per pull until two in a row agree (see Keeper.pull).
MAX_DOWNLOADS = 4


def _seeded_model(run: PublishedRun) -> GPT:
    """The run's model as every node initializes it (the run's seed, on the CPU)."""
    torch.manual_seed(run.spec.run.seed)
    return GPT(GPTConfig.from_spec(run.spec.model))


def tree_cpu_s() -> float:
    """CPU seconds used by this process and every live process it started (Linux /proc);
    hivemind does its downloading in child processes. Elsewhere: this process only."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    stats: dict[int, tuple[int, float]] = {}
    try:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                text = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()
            # fields[1] is the parent pid; fields[11], fields[12] are utime, stime.
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    except OSError:
        return time.process_time()
    me = os.getpid()
    total, frontier = 0.0, [me]
    seen = {me}
    while frontier:
        pid = frontier.pop()
        total += stats.get(pid, (0, 0.0))[1]
        for child, (parent, _) in stats.items():
            if parent == pid and child not in seen:
                seen.add(child)
                frontier.append(child)
    return total


class Keeper:
    """Pulls runs' state from their swarms into checkpoints. Create it in the main thread:
    hivemind's averagers install signal handlers when they start."""

    def __init__(self, store: Store, dht: hivemind.DHT | None, keep: int | None = None):
        """``keep`` overrides each run's ``[verify] keep_checkpoints``. Files an interrupted
        save left behind are removed here. ``dht`` may be None to only :meth:`save`."""
        self.store = store
        self.dht = dht
        self.keep = keep
        self.folder = store.data_dir / CHECKPOINTS_DIR
        self._averagers: dict[str, tuple[DecentralizedAverager, GPT]] = {}
        self.remove_stale_files()

    def _averager(self, run: PublishedRun) -> tuple[DecentralizedAverager, GPT]:
        assert self.dht is not None, "a Keeper without a DHT can only save"
        if run.id not in self._averagers and run.spec.optimizer.mode == "diloco":
            model = _seeded_model(run)
            diloco = DecentralizedAverager(
                [torch.zeros(1)],  # never averaged: only downloads state
                self.dht,
                prefix=diloco_prefix(run.id),
                client_mode=True,
                request_timeout=max(1.0, run.spec.swarm.request_timeout_s),
                start=True,
            )
            self._averagers[run.id] = (diloco, model)
        if run.id not in self._averagers:
            model = _seeded_model(run)
            averager = TrainingStateAverager(
                dht=self.dht,
                prefix=f"{run.id}_state_averager",
                optimizer=torch.optim.AdamW,
                params=param_groups(model, run.spec.optimizer.weight_decay),
                client_mode=True,
                request_timeout=max(1.0, run.spec.swarm.request_timeout_s),
                start=True,
            )
            self._averagers[run.id] = (averager, model)
        return self._averagers[run.id]

    def _download(self, run: PublishedRun, timeout_s: float) -> tuple[int, str] | None:
        """Load the state of the swarm's best peer into this run's model: (step, sha256)."""
        averager, model = self._averager(run)
        if not isinstance(averager, TrainingStateAverager):
            found = self._download_diloco(run, averager, model, timeout_s)
            return found[:2] if found is not None else None
        averager.local_epoch = -1  # stays below 0 unless a download succeeds
        try:
            averager.load_state_from_peers(timeout=timeout_s)
        except Exception as e:  # no peer, a timeout, a peer that left mid-download
            logger.info("run %s: could not download the swarm's state: %s", run.id, e)
            return None
        if averager.local_epoch < 0:
            logger.info("run %s: no peer shared its state", run.id)
            return None
        return averager.local_epoch, params_sha256(model.state_dict())

    def _download_diloco(
        self, run: PublishedRun, averager: DecentralizedAverager, model: GPT, timeout_s: float
    ) -> tuple[int, str, list[torch.Tensor] | None] | None:
        """A DiLoCo run: the global parameters of the best peer's round, loaded into
        ``model``: (round, sha256, its outer momentum or None when it does not fit)."""
        try:
            loaded = averager.load_state_from_peers(timeout=timeout_s)
        except Exception as e:  # no peer, a timeout, a peer that left mid-download
            logger.info("run %s: could not download the swarm's state: %s", run.id, e)
            return None
        if loaded is None:
            logger.info("run %s: no peer shared its state", run.id)
            return None
        metadata, tensors = loaded
        params = list(model.parameters())
        round_ = metadata.get("round") if isinstance(metadata, dict) else None
        if (
            not isinstance(metadata, dict)
            or metadata.get("layout") != DILOCO_STATE_LAYOUT
            or not isinstance(round_, int)
            or isinstance(round_, bool)
            or round_ < 0
            or len(tensors) < len(params)
            or any(t.shape != p.shape for t, p in zip(tensors, params, strict=False))
        ):
            logger.warning(
                "run %s: a peer served state that is not this run's DiLoCo state", run.id
            )
            return None
        with torch.no_grad():
            for param, tensor in zip(params, tensors, strict=False):
                param.copy_(tensor)
        momentum = tensors[len(params) : 2 * len(params)]
        fits = len(momentum) == len(params) and all(
            m.shape == p.shape and m.dtype.is_floating_point
            for m, p in zip(momentum, params, strict=False)
        )
        outer = [m.detach().float().clone() for m in momentum] if fits else None
        return round_, params_sha256(model.state_dict()), outer

    def served_round(self, run: PublishedRun) -> int | None:
        """The newest round a DiLoCo peer of ``run`` serves (its state-sharing priority in
        the DHT), or None when none serves state."""
        if self.dht is None:
            return None
        found = self.dht.get(f"{diloco_prefix(run.id)}.all_averagers", latest=True)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        rounds = [
            int(entry.value)
            for entry in entries.values()
            if isinstance(getattr(entry, "value", None), int | float)
            and not isinstance(entry.value, bool)
            and 0 <= entry.value < 2**62
        ]
        return max(rounds, default=None)

    def pull(self, run: PublishedRun, timeout_s: float) -> dict[str, Any] | None:
        """Download the swarm's state and save it if it is a step not kept yet.

        hivemind reads a sync peer's step and parameters at two moments, so a
        download taken as the peer steps can label one step's parameters with the
        next step: a sync checkpoint is kept only when two downloads in a row
        agree on both. A DiLoCo peer serves its round and global state in one
        snapshot: one download is kept, and none is asked for while the newest
        round peers serve is kept already (each costs a volunteer's uplink the
        whole state). Returns the stored checkpoint row, or None when no peer
        answered in ``timeout_s``, the downloads never agreed, the state was not
        finite, or that step is already kept.
        """
        cpu_started = tree_cpu_s()
        averager, model = self._averager(run)
        if run.spec.optimizer.mode == "diloco":
            served = self.served_round(run)
            if served is not None and self.store.get_checkpoint(run.id, served) is not None:
                logger.debug("run %s: round %d is kept already; nothing to pull", run.id, served)
                return None
            if served == 0:
                # Round 0's global parameters are the run's seeded initialization, which
                # this process computes as every node does, and its momentum is zero:
                # nothing to download.
                seeded = _seeded_model(run)
                zeros = [torch.zeros_like(p) for p in seeded.parameters()]
                initial = (0, params_sha256(seeded.state_dict()))
                return self._keep(run, seeded, initial, cpu_started, zeros)
            found = self._download_diloco(run, averager, model, timeout_s)
            if found is None:
                return None
            return self._keep(run, model, found[:2], cpu_started, found[2])
        agreed = None
        previous = self._download(run, timeout_s)
        for _ in range(MAX_DOWNLOADS - 1):
            if previous is None:
                return None
            latest = self._download(run, timeout_s)
            if latest == previous:
                agreed = latest
                break
            previous = latest
        if agreed is None:
            logger.info("run %s: the swarm stepped during every download; next time", run.id)
            return None
        return self._keep(run, model, agreed, cpu_started)

    def _keep(
        self,
        run: PublishedRun,
        model: GPT,
        downloaded: tuple[int, str] | None,
        cpu_started: float,
        momentum: list[torch.Tensor] | None = None,
    ) -> dict[str, Any] | None:
        """Save ``model``'s parameters, just downloaded as ``(step, sha256)`` (a DiLoCo
        round's with its outer ``momentum``), unless they are not finite or that step is
        kept already."""
        if downloaded is None:
            return None
        step, sha256 = downloaded
        # Not copied: the tied embedding stays one tensor, saved once; nothing else writes
        # these parameters until the next pull, in this thread.
        state = {k: v.detach() for k, v in model.state_dict().items()}
        if not all(bool(torch.isfinite(t).all()) for t in state.values()):
            logger.warning("run %s: the swarm's state at step %d is not finite", run.id, step)
            return None
        existing = self.store.get_checkpoint(run.id, step)
        if existing is not None:
            if existing["sha256"] != sha256:
                logger.warning(
                    "run %s: peers hold different parameters at step %d; keeping the first",
                    run.id,
                    step,
                )
            return None
        outer = None
        if momentum is not None and all(bool(torch.isfinite(m).all()) for m in momentum):
            names = [name for name, _ in model.named_parameters()]
            outer = dict(zip(names, momentum, strict=True))
        try:
            return self.save(run, step, state, sha256, cpu_started=cpu_started, outer=outer)
        except CheckpointError as e:
            logger.warning("run %s: could not keep the checkpoint of step %d: %s", run.id, step, e)
            return None

    def save(
        self,
        run: PublishedRun,
        step: int,
        state: dict[str, torch.Tensor],
        params_sha256: str,
        cpu_started: float | None = None,
        outer: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """Keep ``state`` as the run's checkpoint of ``step``; returns its stored row.

        The file ``step-<step>.safetensors`` is written atomically (temporary
        file, fsync, rename) with metadata run_id, spec_hash, step,
        params_sha256 and num_tokens (the run's tokens so far, as the store
        counts them), then its sidecar ``<file>.sha256`` (sha256sum's format,
        so a copied-out file can be checked with ``sha256sum -c``), then the
        row; older files beyond ``[verify] keep_checkpoints`` are removed.
        Raises ``CheckpointError`` when any of it fails (a full disk, say):
        then no row is stored and every earlier checkpoint, row and sidecar
        is as it was.
        """
        cpu_started = tree_cpu_s() if cpu_started is None else cpu_started
        num_tokens = int(self.store.run_totals(run.id)["num_tokens"])
        folder = self.folder / run.id
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / checkpoint_name(step)
        sidecar = sidecar_path(path)
        metadata = {
            "run_id": run.id,
            "spec_hash": run.spec.hash,
            "step": str(step),
            "params_sha256": params_sha256,
            "num_tokens": str(num_tokens),
        }
        file_sha256 = save_checkpoint(path, state, metadata)
        outer_file = outer_path(path)
        try:
            write_sidecar(sidecar, path.name, file_sha256)
            if outer is not None:  # a DiLoCo round's outer momentum, beside it
                outer_sha256 = save_checkpoint(outer_file, outer, metadata)
                write_sidecar(sidecar_path(outer_file), outer_file.name, outer_sha256)
            row = {
                "run_id": run.id,
                "step": step,
                "sha256": params_sha256,
                "file": path.name,
                "file_sha256": file_sha256,
                "num_bytes": path.stat().st_size,
                "spec_hash": run.spec.hash,
                "created_at": time.time(),
                "cpu_s": max(0.0, tree_cpu_s() - cpu_started),
                "num_tokens": num_tokens,
            }
            self.store.insert_checkpoint(row)
        except BaseException as e:
            # No row names this file: take it away, so the folder holds only kept steps.
            for leftover in (path, sidecar, outer_file, sidecar_path(outer_file)):
                leftover.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise CheckpointError(f"cannot keep checkpoint {path}: {e}") from e
            raise
        self._prune(run)
        logger.info(
            "run %s: checkpoint of step %d, %d tokens (%s)",
            run.id,
            step,
            num_tokens,
            params_sha256[:16],
        )
        return row

    def _prune(self, run: PublishedRun) -> None:
        keep = self.keep if self.keep is not None else run.spec.verify.keep_checkpoints
        kept = [c for c in self.store.list_checkpoints(run.id) if c["file"]]
        for old in kept[: max(0, len(kept) - keep)]:
            path = self.folder / run.id / old["file"]
            for leftover in (sidecar_path(path), outer_path(path), sidecar_path(outer_path(path))):
                leftover.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            self.store.forget_checkpoint_file(run.id, old["step"])

    def remove_stale_files(self) -> list[Path]:
        """Remove what a crashed keeper left: temporary files of unfinished writes, and
        checkpoint files (with their sidecars) that no stored row names. Returns them."""
        removed: list[Path] = []
        if not self.folder.is_dir():
            return removed
        for folder in sorted(p for p in self.folder.iterdir() if p.is_dir()):
            files = [c["file"] for c in self.store.list_checkpoints(folder.name) if c["file"]]
            named = {*files, *(outer_path(Path(f)).name for f in files)}
            for path in sorted(folder.iterdir()):
                stale_temp = path.name.startswith(".step-") and path.name.endswith(".tmp")
                name = path.name.removesuffix(SIDECAR_SUFFIX)
                orphan = STEP_FILE.fullmatch(name) is not None and name not in named
                if path.is_file() and (stale_temp or orphan):
                    path.unlink(missing_ok=True)
                    removed.append(path)
        if removed:
            logger.info(
                "removed %d files an interrupted checkpoint left: %s",
                len(removed),
                ", ".join(p.name for p in removed),
            )
        return removed

    def shutdown(self) -> None:
        for averager, _ in self._averagers.values():
            try:
                averager.shutdown()
            except Exception as e:  # shutting down must go on for the others
                logger.debug("averager shutdown failed: %s", e)
        self._averagers.clear()
