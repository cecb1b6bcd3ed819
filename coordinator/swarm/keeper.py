"""The checkpoint keeper: keeps a run's state, as its follower holds it, as checkpoints.

Each run has a follower (:mod:`~crowdtrain.coordinator.swarm.followers`): a
process of its own that takes part in the run's averaging without training.
In a DiLoCo run it holds every round's global parameters bit for bit as the
nodes do, and each round it reaches is kept here with its outer momentum. In
a sync run it joins each step's gradient group with weight 0 and takes the
nodes' optimizer step, and its parameters are kept every ``[verify]
checkpoint_every_s``. No volunteer's uplink carries state for the keeper.

The parameters are saved as a params-only safetensors file
``checkpoints/<run>/step-<step>.safetensors`` in the coordinator's data
folder, recorded with their :func:`params_sha256` in the store, and only the
newest ``[verify] keep_checkpoints`` files are kept (their hashes stay). Each
file carries the spec hash, step, tokens seen and parameters' sha256 in its
metadata, and a sidecar ``<file>.sha256`` with the file's own sha256. Runs in
the verifier process, never in the coordinator's serving process.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from crowdtrain.coordinator.records import PublishedRun, num_active_peers, roster
from crowdtrain.coordinator.store import Store
from crowdtrain.coordinator.swarm.checkpoints import (
    CHECKPOINTS_DIR,
    SIDECAR_SUFFIX,
    STEP_FILE,
    checkpoint_file,
    checkpoint_name,
    outer_file,
    outer_path,
    sidecar_path,
    write_sidecar,
)
from crowdtrain.coordinator.swarm.followers import FOLLOWERS_DIR, Followers
from crowdtrain.model import (
    GPT,
    CheckpointError,
    GPTConfig,
    save_checkpoint,
)

logger = logging.getLogger(__name__)


# A run's follower runs from the keeper's start, and stops after this long without
# an active peer; it starts again with the next one (from the newest kept round).
FOLLOWER_IDLE_S = 600.0
# A sync run's follower starts this long before the run's first checkpoint is due: its
# start-up and one load of the swarm's state from a peer.
SYNC_FOLLOWER_LEAD_S = 20.0


def _seeded_model(run: PublishedRun) -> GPT:
    """The run's model as every node initializes it (the run's seed, on the CPU)."""
    torch.manual_seed(run.spec.run.seed)
    return GPT(GPTConfig.from_spec(run.spec.model))


def tree_cpu_s() -> float:
    """CPU seconds used by this process and every live process it started (Linux /proc);
    the followers are child processes. Elsewhere: this process only."""
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
    """Keeps runs' state, as their followers hold it, as checkpoints."""

    def __init__(
        self,
        store: Store,
        keep: int | None = None,
        initial_peers: list[str] | None = None,
        follower_host: str = "127.0.0.1",
    ):
        """``keep`` overrides each run's ``[verify] keep_checkpoints``. Files an interrupted
        save left behind are removed here. Runs are followed only with ``initial_peers``
        (the swarm's DHT multiaddrs), by followers listening on ``follower_host``; without
        them the keeper can only :meth:`save`."""
        self.store = store
        self.keep = keep
        self.folder = store.data_dir / CHECKPOINTS_DIR
        self.followers = Followers(
            store.data_dir / FOLLOWERS_DIR, initial_peers or [], host=follower_host
        )
        self._following = initial_peers is not None
        self._last_active: dict[str, float] = {}  # run -> when it last had an active peer
        self._peers_since: dict[str, float] = {}  # run -> when peers came (after idling)
        self.remove_stale_files()

    def follow(self, run: PublishedRun) -> dict[str, Any] | None:
        """Make sure the run's follower runs, and keep every round (DiLoCo) or step (sync)
        it wrote since the last call. Returns the newest stored checkpoint row, or None
        when none was new."""
        if not self._following:
            return None
        now = time.monotonic()
        if num_active_peers(self.store, run.id) > 0:
            self._last_active[run.id] = now
            self._peers_since.setdefault(run.id, now)
        # A run nobody has joined yet counts as active from the keeper's start: a DiLoCo
        # follower is ready (and has kept round 0) when its first node comes.
        if now - self._last_active.setdefault(run.id, now) > FOLLOWER_IDLE_S:
            if self.followers.running(run.id):
                self.followers.stop(run.id)
            self._peers_since.pop(run.id, None)
            return None
        self.followers.update_roster(run.id, roster(self.store, run))
        if not self.followers.running(run.id) and self._follower_due(run, now):
            start, outer = self._follow_from(run)
            val = run.manifest.val_shards
            heldout = run.data_path / val[0].file if val else None
            self.followers.ensure(run.id, run.row["spec_toml"], start, outer, heldout)
        row = None
        for followed in self.followers.rounds(run.id):
            cpu_started = tree_cpu_s()
            model = _seeded_model(run)
            try:
                model.load_state_dict(followed.state)
            except RuntimeError as e:
                logger.warning(
                    "run %s: round %d does not fit the model: %s", run.id, followed.round, e
                )
                self.followers.taken(run.id, followed.round)
                continue
            momentum: list[torch.Tensor] | None = None
            if followed.momentum is not None:
                found = [followed.momentum.get(n) for n, _ in model.named_parameters()]
                momentum = [m for m in found if m is not None]
                if len(momentum) != len(found):
                    momentum = None
            stored = self._keep(
                run, model, (followed.round, followed.sha256), cpu_started, momentum
            )
            self.followers.taken(run.id, followed.round)
            row = stored or row
        return row

    def _follower_due(self, run: PublishedRun, now: float) -> bool:
        """A DiLoCo run's follower runs whenever the keeper does, but for idle spells (it
        keeps every round from round 0, and may be the only reducer). So does a sync run's
        where spot checks need its private snapshots of steps (``[verify]
        snapshot_fraction``): it must follow from the first step, and starting takes longer
        than a step of a small model. Otherwise a sync run's starts
        :data:`SYNC_FOLLOWER_LEAD_S` before its first checkpoint is due,
        ``checkpoint_every_s`` after peers came: a run that stops sooner costs the
        coordinator's machine no follower."""
        verify = run.spec.verify
        snapshots = verify.spot_check_fraction > 0 and verify.snapshot_fraction > 0
        if run.spec.optimizer.mode != "sync" or snapshots:
            return True
        if run.id not in self._peers_since:
            return False  # a sync follower has nothing to do before a node comes
        lead = verify.checkpoint_every_s - SYNC_FOLLOWER_LEAD_S
        return now - self._peers_since[run.id] >= lead

    def _follow_from(self, run: PublishedRun) -> tuple[Path | None, Path | None]:
        """The newest kept checkpoint and its outer momentum, where a (re)started follower
        begins; (None, None) for step 0, or for a DiLoCo round whose momentum is not kept."""
        kept = self.store.list_checkpoints(run.id)
        if not kept:
            return None, None
        start = checkpoint_file(self.store, run.id, kept[-1]["step"])
        if run.spec.optimizer.mode == "sync":
            return start, None  # Adam's statistics come from a peer, or start afresh
        outer = outer_file(self.store, run.id, kept[-1]["step"])
        return (start, outer) if start is not None and outer is not None else (None, None)

    def _keep(
        self,
        run: PublishedRun,
        model: GPT,
        downloaded: tuple[int, str] | None,
        cpu_started: float,
        momentum: list[torch.Tensor] | None = None,
    ) -> dict[str, Any] | None:
        """Save ``model``'s parameters, the follower's as ``(step, sha256)`` (a DiLoCo
        round's with its outer ``momentum``), unless they are not finite or that step is
        kept already."""
        if downloaded is None:
            return None
        step, sha256 = downloaded
        # Not copied: the tied embedding stays one tensor, saved once; nothing else writes
        # these parameters (a model of this call's own).
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
        self.followers.shutdown()
