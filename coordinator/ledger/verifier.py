"""The verifier: a process beside the coordinator that keeps checkpoints and runs spot checks.

``crowdtrain-coordinator serve`` starts it as ``python -m
crowdtrain.coordinator.ledger.verifier --data-dir DIR --initial-peers ADDR...`` and
stops it on shutdown. It joins the coordinator's DHT as a client and, for
each run with live peers, keeps the rounds or steps its follower wrote as
checkpoints (:mod:`keeper`). Receipts the ledger queued for a spot check are
checked here: the losses a node claimed for a few sequences of one of its
batches, both picked at random here, are recomputed with the parameters of the
step that batch was trained at (a sync run's private snapshot of it, else its
public checkpoint), from the coordinator's copy of the shard, in the same
seeded order nodes use. A receipt none of whose steps can be recomputed is not
credited. It shares the coordinator's store (SQLite
allows one writer at a time; both keep their writes short).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hivemind.utils.logging import use_hivemind_log_handler

from crowdtrain.coordinator import records
from crowdtrain.coordinator.ledger import checks, ledger
from crowdtrain.coordinator.records import PublishedRun
from crowdtrain.coordinator.store import Store
from crowdtrain.coordinator.swarm.keeper import Keeper
from crowdtrain.model import GPT, CheckpointError, GPTConfig, load_into, sequence_losses
from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.logs import TEXT_FORMAT, JsonFormatter, setup_logging
from crowdtrain.protocol.shards import batch_windows, read_shard, sequence_order, verify_shard
from crowdtrain.protocol.snapshots import list_snapshots

logger = logging.getLogger(__name__)

PORTS_FILE = "ports.json"
# A spot check waits this long (beyond checkpoint_every_s) for a checkpoint of one of
# its receipt's steps before it is skipped.
SPOT_CHECK_GRACE_S = 30.0
_TICK_S = 1.0
SPOT_CHECK_BUDGET_S = 2.0  # spot checks per tick, at most this long (then checkpoints again)
# A spot check recomputes a sample from each of up to this many checkpointed steps of its
# receipt, and passes when one of them matches.
SPOT_CHECK_STEPS = 3
# A peer is flagged (and its averaging parts then weigh nothing, also in the keeper's
# follower) once this many of its receipts failed their spot check. Arrival checks are
# exact and flag at once; a spot check compares with parameters an honest node may not
# have held at one step (a partial round), and one such false positive used to flag an
# honest node for good, after which the keeper's follower dropped its parts and held
# parameters nobody held (fresh-clone CI at 35590e6). Each failed receipt is still not
# credited and its shard retrained.
SPOT_FAILURES_TO_FLAG = 2


@dataclass(frozen=True)
class SpotResult:
    """A finished spot check: its outcome and the receipt's resulting status."""

    spot: str  # passed, failed or skipped
    spot_reason: str
    status: str
    reason: str


class SpotChecker:
    """Recomputes claimed losses. Keeps the last few checkpoints' models in memory."""

    def __init__(
        self,
        store: Store,
        keeper_folder: Path,
        rng: random.Random | None = None,
        snapshots_of: Callable[[str], Path] | None = None,
    ):
        """``keeper_folder`` holds the runs' checkpoints; ``snapshots_of(run_id)`` is where
        its step follower keeps private snapshots (None: public checkpoints only)."""
        self.store = store
        self.folder = keeper_folder
        self.snapshots_of = snapshots_of
        self.rng = rng or random.Random()
        self._models: OrderedDict[tuple[str, str], GPT] = OrderedDict()
        self._verified_shards: set[tuple[str, int, int]] = set()

    def check(self, run: PublishedRun, row: dict[str, Any], now: float) -> SpotResult | None:
        """Spot-check one queued receipt; None while it should wait for a checkpoint."""
        samples = [s for s in json.loads(row["samples_json"]) if s["losses"]]
        checkpoints = self.store.list_checkpoints(run.id)
        later = [c["step"] for c in checkpoints if c["created_at"] > row["received_at"]]
        if later and samples and samples[-1]["step"] > max(later) + checks.DHT_STEP_SLACK:
            reason = (
                f"failed its spot check: has a sample at step {samples[-1]['step']} but the "
                f"swarm was at step {max(later)} after the receipt arrived"
            )
            return SpotResult("failed", reason, ledger.REJECTED, reason)
        # A DiLoCo sample names the hash of the global parameters it was computed at: one
        # of a round the keeper holds other parameters of (the round met in two groups, or
        # its node applied it alone) is not checked against them.
        kept = {c["step"]: c["sha256"] for c in checkpoints}
        other = [
            s
            for s in samples
            if s.get("params_sha256") and kept.get(s["step"]) not in (None, s["params_sha256"])
        ]
        if other:
            samples = [s for s in samples if s not in other]
            if not samples:
                rounds = sorted({s["step"] for s in other})
                reason = (
                    f"could not be spot-checked: its node held other global parameters than "
                    f"the keeper's checkpoints of rounds {rounds}"
                )
                return SpotResult("skipped", reason, ledger.UNVERIFIED, reason)
        public = {c["step"]: self.folder / run.id / c["file"] for c in checkpoints if c["file"]}
        private = list_snapshots(self.snapshots_of(run.id)) if self.snapshots_of else {}
        steps = {s["step"] for s in samples}
        private_steps = sorted(steps & private.keys())
        public_steps = sorted((steps & public.keys()) - private.keys())
        if not private_steps and not public_steps:
            # A checkpoint of one of its steps may still come while the swarm trains, until
            # the keeper has pulled once since the receipt arrived.
            newer = any(c["created_at"] > row["received_at"] for c in checkpoints)
            waited = now - row["received_at"]
            live = records.num_active_peers(self.store, run.id, now) > 0
            if (
                live
                and not newer
                and waited < run.spec.verify.checkpoint_every_s + SPOT_CHECK_GRACE_S
            ):
                return None
            span = f"{min(steps)}..{max(steps)}" if steps else "none"
            reason = f"could not be spot-checked: no checkpoint of its steps ({span})"
            return SpotResult("skipped", reason, ledger.UNVERIFIED, reason)
        # Which batches and which of their sequences: chosen now, after the receipt
        # arrived, among all the losses it gives, so a node cannot know which it must get
        # right. Steps the keeper kept privately first: a node knows which steps have a
        # public checkpoint and could compute just those. One sample from each of up to
        # SPOT_CHECK_STEPS steps: an honest node in a sync run may hold other parameters
        # than the keeper's at one step (its round there was partial) and the swarm's
        # again at the next.
        self.rng.shuffle(private_steps)
        self.rng.shuffle(public_steps)
        first = private_steps or public_steps
        passed, failures = self._check_steps(run, row, samples, first, private | public)
        if passed is not None:
            passed += ", with a private snapshot" if private_steps else ", with its checkpoint"
            if failures:
                passed += f"; a sample of another step did not match ({failures[0]})"
            return SpotResult("passed", passed, ledger.VERIFIED, "")
        if not failures:  # every file it needed went away meanwhile (pruned)
            reason = "could not be spot-checked: its steps' checkpoints were removed"
            return SpotResult("skipped", reason, ledger.UNVERIFIED, reason)
        if private_steps and public_steps:
            # Right where the node could know it would be checked, wrong where it could
            # not: not credited. Not flagged either: an honest node whose rounds at those
            # steps were partial looks the same.
            matched, _ = self._check_steps(run, row, samples, public_steps, public)
            if matched is not None:
                reason = (
                    f"failed its spot check where the node could not foresee it "
                    f"({failures[0]}), though its samples at publicly checkpointed steps "
                    f"match ({matched}): not credited"
                )
                return SpotResult("failed", reason, ledger.UNVERIFIED, reason)
        reason = f"failed its spot check: {failures[0]}"
        if len(failures) > 1:
            reason += f" (and samples of {len(failures) - 1} other steps did not match either)"
        return SpotResult("failed", reason, ledger.REJECTED, reason)

    def _check_steps(
        self,
        run: PublishedRun,
        row: dict[str, Any],
        samples: list[dict[str, Any]],
        steps: list[int],
        files: dict[int, Path],
    ) -> tuple[str | None, list[str]]:
        """Check one random sample of each of the first SPOT_CHECK_STEPS ``steps`` with
        ``files``, until one passes: (what passed or None, what failed before)."""
        failures: list[str] = []
        for step in steps[:SPOT_CHECK_STEPS]:
            sample = self.rng.choice([s for s in samples if s["step"] == step])
            try:
                model = self._model(run, files[step])
            except (OSError, CheckpointError) as e:  # pruned since we listed it
                logger.info("spot check: the parameters of step %d went away: %s", step, e)
                continue
            passed, text = self._check_sample(run, row, sample, model)
            if passed:
                return text, failures
            failures.append(text)
        return None, failures

    def _check_sample(
        self,
        run: PublishedRun,
        row: dict[str, Any],
        sample: dict[str, Any],
        model: GPT,
    ) -> tuple[bool, str]:
        """Recompute some of ``sample``'s losses with ``model``: (passed, what was seen)."""
        losses = [float(x) for x in sample["losses"]]
        count = min(run.spec.verify.spot_check_sequences, len(losses))
        picked = sorted(self.rng.sample(range(len(losses)), count))
        batch = self._batch(run, row, int(sample["batch"]))[picked]
        inputs = torch.from_numpy(batch)
        with torch.no_grad():
            logits, _ = model(inputs[:, :-1])
            actual = sequence_losses(logits, inputs[:, 1:]).tolist()
        verify = run.spec.verify
        # DiLoCo samples are at parameters held bit for bit, in fp32: no drift to allow.
        exact = run.spec.optimizer.mode == "diloco"
        loss_tolerance = verify.diloco_tolerance if exact else verify.loss_tolerance
        spread_tolerance = verify.diloco_tolerance if exact else verify.spread_tolerance
        where = f"step {sample['step']}, batch {sample['batch']}"
        errors = [losses[i] - a for i, a in zip(picked, actual, strict=True)]
        for i, a, error in zip(picked, actual, errors, strict=True):
            if not abs(error) <= loss_tolerance:
                return False, (
                    f"claimed loss {losses[i]:.4f} for sequence {i} of {where}, the keeper's "
                    f"parameters of that step give {a:.4f} (tolerance {loss_tolerance})"
                )
        # An honest node whose parameters drifted from the checkpoint's is off by about
        # the same for every sequence; a node that guessed some losses is off by each
        # sequence's own distance from its guess.
        shift = sum(errors) / len(errors)
        spread = max(abs(e - shift) for e in errors)
        if not spread <= spread_tolerance:
            return False, (
                f"the claimed losses of sequences {picked} of {where} are off from the "
                f"keeper's by {', '.join(f'{e:+.3f}' for e in errors)}, {spread:.3f} "
                f"apart from their mean (tolerance {spread_tolerance})"
            )
        worst = max(abs(e) for e in errors)
        return True, (
            f"sequences {picked} of {where} within {worst:.2g} of the checkpoint's losses, "
            f"{spread:.2g} apart"
        )

    def _model(self, run: PublishedRun, path: Path) -> GPT:
        key = (run.id, str(path))
        if key not in self._models:
            model = GPT(GPTConfig.from_spec(run.spec.model))
            load_into(model, path)
            model.eval()
            self._models[key] = model
            while len(self._models) > 3:
                self._models.popitem(last=False)
        self._models.move_to_end(key)
        return self._models[key]

    def _batch(self, run: PublishedRun, row: dict[str, Any], batch: int) -> np.ndarray:
        entry = next(s for s in run.manifest.train_shards if s.id == row["shard_id"])
        path = run.data_path / entry.file
        stat = path.stat()
        if (str(path), stat.st_size, stat.st_mtime_ns) not in self._verified_shards:
            verify_shard(path, entry)  # the coordinator's copy must be the published bytes
            self._verified_shards.add((str(path), stat.st_size, stat.st_mtime_ns))
        tokens = read_shard(path)
        seq_len, mb = run.spec.model.seq_len, int(row["micro_batch_size"])
        order = sequence_order(
            run.spec.run.seed, int(row["epoch"]), entry.id, len(tokens), seq_len, mb
        )
        return batch_windows(tokens, order, batch, mb, seq_len)


class Verifier:
    """One verifier process's work: checkpoints for live runs, then queued spot checks."""

    def __init__(self, store: Store, keeper: Keeper | None, checker: SpotChecker):
        self.store = store
        self.keeper = keeper
        self.checker = checker

    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if self.keeper is not None:
            for row in self.store.list_runs():
                try:
                    self._keep_checkpoints(row["id"])
                except Exception:  # one run's trouble must not stop the others' checks
                    logger.exception("keeping a checkpoint of run %s failed", row["id"])
        # A backlog of spot checks must not hold up the next tick's checkpoints (a DiLoCo
        # round's may come every few seconds): a slice of it per tick.
        self.run_spot_checks(now, budget_s=SPOT_CHECK_BUDGET_S)

    def _keep_checkpoints(self, run_id: str) -> None:
        assert self.keeper is not None
        # Every round or step its follower wrote (a sync follower writes one every
        # [verify] checkpoint_every_s).
        self.keeper.follow(records.get_run(self.store, run_id))

    def run_spot_checks(self, now: float, budget_s: float | None = None) -> int:
        """Check every queued receipt that can be checked now, or as many as fit in
        ``budget_s`` (the rest wait for the next tick); returns how many finished."""
        done = 0
        started = time.monotonic()
        for row in self.store.queued_spot_checks():
            if budget_s is not None and time.monotonic() - started > budget_s:
                break
            cpu_started = time.thread_time()
            try:
                run = records.get_run(self.store, row["run_id"])
                result = self.checker.check(run, row, now)
            except (CrowdtrainError, OSError, StopIteration, ValueError, KeyError) as e:
                # Our own data is at fault (a missing shard, say): never blame the peer, and
                # never credit what nobody checked.
                reason = f"could not be spot-checked: the verifier failed ({e})"
                result = SpotResult("skipped", reason, ledger.UNVERIFIED, reason)
                logger.warning("spot check of %s skipped: %s", row["shard_id"], e)
            if result is None:
                continue
            status = result.status
            self.store.finish_spot_check(
                {
                    "run_id": row["run_id"],
                    "peer_id": row["peer_id"],
                    "shard_id": row["shard_id"],
                    "epoch": row["epoch"],
                    "spot": result.spot,
                    "spot_reason": result.spot_reason,
                    "status": status,
                    "reason": result.reason,
                    "cpu_s": time.thread_time() - cpu_started,
                    "now": time.time(),
                }
            )
            if status == ledger.REJECTED:
                failures = self.store.failed_spot_checks(row["run_id"], row["peer_id"])
                if failures >= SPOT_FAILURES_TO_FLAG:
                    ledger.flag_for_receipt(
                        self.store, row["run_id"], row["peer_id"], row["shard_id"], result.reason
                    )
                else:
                    logger.warning(
                        "receipt of %s for shard %s failed its spot check (%d of %d before "
                        "its peer is flagged): %s",
                        row["peer_id"],
                        row["shard_id"],
                        failures,
                        SPOT_FAILURES_TO_FLAG,
                        result.reason,
                    )
            if result.spot == "failed":  # its shard may well be untrained: someone trains it
                self.store.reopen_unproven_shard(row["run_id"], row["epoch"], row["shard_id"])
            logger.info("spot check of %s by %s: %s", row["shard_id"], row["peer_id"], result.spot)
            done += 1
        return done


def _initial_peers(data_dir: Path, given: list[str], wait_s: float = 60.0) -> list[str]:
    if given:
        return given
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            peers = json.loads((data_dir / PORTS_FILE).read_text())["initial_peers"]
            if peers:
                return [str(p) for p in peers]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        time.sleep(0.5)
    raise CrowdtrainError(
        f"no {PORTS_FILE} in {data_dir}; start `crowdtrain-coordinator serve` or pass "
        "--initial-peers"
    )


def _parent_alive(pid: int | None) -> bool:
    if pid is None:
        return True
    return os.getppid() == pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crowdtrain.coordinator.ledger.verifier",
        description="Keep checkpoints of a coordinator's runs and spot-check receipts.",
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="the coordinator's folder")
    parser.add_argument(
        "--initial-peers", nargs="*", default=[], help="DHT multiaddrs (default: ports.json)"
    )
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when it is gone")
    parser.add_argument(
        "--follower-host",
        default="127.0.0.1",
        help="the address DiLoCo round followers listen on (the coordinator's --host)",
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines")
    args = parser.parse_args(argv)
    _setup_logging(args.log_level, args.log_json)
    torch.set_num_threads(1)  # the coordinator's machine serves first, verifies second

    stop = threading.Event()
    _install_signals(stop)
    store = Store(args.data_dir, create=False)
    keeper: Keeper | None = None
    try:
        peers = _initial_peers(args.data_dir, args.initial_peers)
        keeper = Keeper(store, initial_peers=peers, follower_host=args.follower_host)
        checker = SpotChecker(store, keeper.folder, snapshots_of=keeper.followers.snapshots)
        verifier = Verifier(store, keeper, checker)
        logger.info("verifier ready (pid %d)", os.getpid())
        while not stop.is_set() and _parent_alive(args.parent_pid):
            try:
                verifier.tick()
            except Exception:  # the store was busy, say: try again at the next tick
                logger.exception("verifier tick failed")
            stop.wait(_TICK_S)
    except CrowdtrainError as e:
        logger.error("%s", e)
        return 1
    finally:
        if keeper is not None:
            keeper.shutdown()
        store.close()
    return 0


def start_verifier(
    data_dir: Path, initial_peers: list[str], follower_host: str = "127.0.0.1"
) -> subprocess.Popen:
    """Start the verifier process for a serving coordinator, in the coordinator's process
    group (stopping the group stops it); it exits by itself if the coordinator dies.

    It logs the way this process does: JSON lines when the root logger's handler
    formats JSON (``--log-json``), debug details when the root logger is at DEBUG.
    """
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "crowdtrain.coordinator.ledger.verifier",
            "--data-dir",
            str(data_dir),
            "--parent-pid",
            str(os.getpid()),
            *_log_flags(),
            "--follower-host",
            follower_host,
            "--initial-peers",
            *initial_peers,
        ],
        stdin=subprocess.DEVNULL,
    )


def _log_flags() -> list[str]:
    root = logging.getLogger()
    flags = ["--log-level", "DEBUG" if root.level == logging.DEBUG else "INFO"]
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        flags.append("--log-json")
    return flags


def _setup_logging(level: str, json_lines: bool) -> None:
    setup_logging(verbose=level.upper() == "DEBUG", json_lines=json_lines)
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in root.handlers:
        # Its lines share the coordinator's stderr: say whose they are.
        handler.addFilter(_tag_verifier)
        if not json_lines:
            handler.setFormatter(
                logging.Formatter(TEXT_FORMAT.replace("%(levelname)s", "verifier %(levelname)s"))
            )
    use_hivemind_log_handler("nowhere")  # hivemind's lines through the handler above
    if level.upper() != "DEBUG":
        # Leaving its own handler resets the hivemind logger's level to NOTSET.
        logging.getLogger("hivemind").setLevel(logging.WARNING)


def _tag_verifier(record: logging.LogRecord) -> bool:
    record.process_role = "verifier"  # a JSON key of its own
    return True


def stop_verifier(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it has not left in ``timeout_s``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("the verifier did not stop in %.0fs; killing it", timeout_s)
            process.kill()
            process.wait(timeout=5)


def _install_signals(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


if __name__ == "__main__":
    sys.exit(main())
