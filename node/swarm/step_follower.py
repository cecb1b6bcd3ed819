"""The step follower: the keeper's participant in a sync run's gradient averaging.

The sync counterpart of :mod:`~crowdtrain.node.swarm.follower`'s round
follower (the same process, ``python -m crowdtrain.node.swarm.follower``,
runs this for a run whose mode is sync). It runs the nodes' own optimizer
(:func:`~crowdtrain.node.swarm.optimizer.sync_options`: hivemind's Optimizer
with the same AdamW, clip, schedule and guard) and trains nothing. At each
collaborative step it joins the step's gradient group with weight 0 (a zero
part that counts for nothing), receives the averaged gradients every node
receives and takes the same optimizer step, so it holds the swarm's
parameters at every step, as close to any node's as two nodes' are to each
other. Its cost to a volunteer is one more member of the group.

It publishes a progress record with no samples, so nodes count it as a peer:
a node training alone averages with it (and gets its own gradients back),
and when every node is in client mode it is the group's reducer. It serves its
state, announced half a step above the nodes', so a node that fell behind
loads it from here rather than from a volunteer.

A step whose group it missed (the round failed or was partial for it, or its
group averaged another step) it skips, as nodes do, and it is out of step: it
serves its state below the nodes', and when its next checkpoint is due it loads
the swarm's state from a peer that took the step (at most once a step, and
only then: every load is a volunteer's upload), or finds that every peer
skipped the step too. Its parts are the gradient of its held-out sequences (weight
0: nobody counts them), by which it judges reducers' results as nodes judge them
by theirs; a refused slice leaves it out of step. It is out of step as well when
its parameters' loss on held-out sequences rose more than the spot checks'
``loss_tolerance`` above the lowest since it last held the swarm's state: such
parameters would fail honest nodes' receipts.
Where it keeps snapshots for spot checks (below) it
does so every :data:`SNAPSHOT_RESYNC_S` at most: out of step it has none to keep. It writes nothing until it holds
the swarm's state again. Otherwise it writes its parameters to the outbox every
``[verify] checkpoint_every_s``, where the keeper takes them as checkpoints, and those of a
``[verify] snapshot_fraction`` of the steps it followed, picked at random, to
the private snapshots folder the verifier recomputes spot checks with
(:mod:`crowdtrain.protocol.snapshots`).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hivemind
import torch
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.utils import get_dht_time

from crowdtrain.model import (
    CheckpointError,
    load_checkpoint,
    params_sha256,
    save_checkpoint,
    sequence_losses,
)
from crowdtrain.node.stats.traffic import Traffic
from crowdtrain.node.swarm.following import (
    FOLLOWER_BONUS,
    FollowerStats,
    put_in_outbox,
    seeded_model,
)
from crowdtrain.node.swarm.guard import SwarmGuard
from crowdtrain.node.swarm.heldout import HeldoutLoss
from crowdtrain.node.swarm.optimizer import sync_options
from crowdtrain.node.swarm.sync import IN_STEP, WAIT, GuardedOptimizer
from crowdtrain.protocol.runspec import RunSpec
from crowdtrain.protocol.snapshots import prune_snapshots, snapshot_name

logger = logging.getLogger(__name__)

POLL_S = 0.1  # how often the loop asks the optimizer whether the swarm stepped
# Out of step, a follower that keeps snapshots for spot checks loads the swarm's state
# (a volunteer's upload) this often at most; without snapshots, when a checkpoint is due.
SNAPSHOT_RESYNC_S = 15.0


class _ZeroWeightOptimizer(GuardedOptimizer):
    """hivemind's Optimizer for a peer that trains nothing: it reports no samples,
    averages with weight 0 and notes each step whose averaged gradients it did not get."""

    missed_step = False
    reloads = 0
    # Puts a gradient of held-out sequences in the parameters' .grad: sent with weight 0,
    # it counts for nothing and is what the reducers' results are judged by.
    reference: Callable[[], None] | None = None

    def _check_and_accumulate_gradients(self, batch_size: int, grad_scaler: Any) -> bool:
        return True  # no gradients of its own, no samples to report

    def _begin_averaging_gradients(self, grad_scaler: Any) -> bool:
        if self.reference is not None:
            self.reference()
            averager = self.grad_averager
            with torch.no_grad():
                grads = averager._grads_from_parameters()
                for grad, accumulator in zip(grads, averager._grad_accumulators(), strict=True):
                    accumulator.copy_(grad)
            averager.local_times_accumulated = 1  # and no samples: weight 0
        began = bool(super()._begin_averaging_gradients(grad_scaler))
        self.missed_step = self.missed_step or not began
        return began

    def _load_averaged_gradients_into_optimizer_(self) -> None:
        with torch.no_grad(), self.grad_averager.get_tensors() as averaged:
            finite = all(bool(torch.isfinite(t).all()) for t in averaged)
            if not finite or not any(bool(t.any()) for t in averaged):
                # Not finite, or all zero: a group where no node gave any weight (one
                # tagging along with nothing, say). Never step on it: reload instead.
                self.missed_step = True
                for tensor in averaged:
                    tensor.zero_()
        super()._load_averaged_gradients_into_optimizer_()

    def _load_local_gradients_into_optimizer(self) -> None:
        self.missed_step = True  # the step's group failed for us: our gradients are zero
        self.grad_averager.reset_accumulated_grads_()  # (not the held-out reference)
        super()._load_local_gradients_into_optimizer()

    def _skip_step(self, why: str) -> None:
        self.missed_step = True  # whatever the reason, we are not at the swarm's step
        super()._skip_step(why)

    def _should_load_state_from_peers(self) -> bool:
        # Out of step, StepFollower decides when to load (GuardedOptimizer's nodes load
        # at once): hivemind's own rule only.
        return bool(hivemind.Optimizer._should_load_state_from_peers(self))

    def load_state_from_peers(self, **kwargs: Any) -> None:
        before, epoch = params_sha256(self._model.state_dict()), self.local_epoch
        super().load_state_from_peers(**kwargs)
        if params_sha256(self._model.state_dict()) != before:
            self.reloads += 1
        elif self.local_epoch != epoch:
            # hivemind caught up with the swarm's step keeping our parameters: they are
            # not that step's.
            self.missed_step = True


class StepFollower:
    """Follows a sync run's steps from ``start`` (a kept checkpoint, or None for the
    seeded model at step 0), writing its parameters to ``outbox``. Create it in the
    process's main thread; call :meth:`shutdown`."""

    def __init__(
        self,
        spec: RunSpec,
        dht: hivemind.DHT,
        outbox: Path,
        start: Path | None,
        guard: Path,
        snapshots: Path | None = None,
        heldout: Path | None = None,
    ):
        self.spec, self.dht, self.outbox = spec, dht, outbox
        self.snapshots = snapshots
        verify = spec.verify
        self._keeps_snapshots = (
            snapshots is not None
            and verify.snapshot_fraction > 0
            and verify.spot_check_fraction > 0
        )
        # Which steps are kept must not be foreseeable: the operating system's randomness.
        self._picks = random.SystemRandom()
        self.run_id = spec.run.id
        self.model = seeded_model(spec)
        step = 0
        if start is not None:
            state, metadata = load_checkpoint(start)
            self.model.load_state_dict(state)
            step = int(metadata["step"])
        self.traffic = Traffic()
        self.stats = FollowerStats(round=step, traffic=self.traffic)
        swarm_guard = SwarmGuard(
            guard,
            spec.optimizer.target_batch_size,
            named_parameters=self.model.named_parameters(remove_duplicate=False),
            traffic=self.traffic,
            keep_files=True,  # the keeper writes the roster there
            trust=spec.trust,
        )
        self._heldout: HeldoutLoss | None = None
        # The lowest held-out loss of our parameters since we last held the swarm's state
        # for sure (our start, or a load): see _vouches.
        self._vouched_loss: float | None = None
        if heldout is not None:
            # No checkpoint vouches for the swarm's state when we load it (we make them):
            # a state whose held-out loss is well above our own parameters' is refused
            # (a peer announcing the top priority used to become the keeper's checkpoint).
            self._heldout = HeldoutLoss.from_shard(spec, heldout)
            swarm_guard.heldout_loss = self._heldout
            # Our parts weigh nothing: a gradient of held-out sequences in them gives the
            # reducers' results a direction to be judged by (see _reference_gradient).
            swarm_guard.config = dataclasses.replace(swarm_guard.config, reference_parts=True)
            swarm_guard.reference_state = lambda epoch: dict(self.model.state_dict())
        # A partial round (some reducer did not answer) leaves hivemind's members their own
        # values in that slice, silently: we would hold, and snapshot, parameters no node
        # holds. It fails for us instead, and we are out of step.
        options = sync_options(
            spec, self.model, dht, swarm_guard, spec.optimizer.micro_batch_size, partial_fails=True
        )
        self.optimizer = _ZeroWeightOptimizer(**options)
        if self._heldout is not None:
            self.optimizer.reference = self._reference_gradient
        self.optimizer.set_step(step)
        self.in_step = True
        self._last_write = -float("inf")
        self._written = step  # the keeper's newest checkpoint, where we start
        self._resync_tried = -1  # the step at which we last tried to load the swarm's state
        self._resync_at = -float("inf")  # and when
        self._published = threading.Event()
        self._announce()
        # Nothing written yet: where we start (the keeper's newest checkpoint) is kept
        # already, and the swarm may be steps past it.
        self.stats.write(outbox)
        self._vouch_anew()
        self._snapshot()  # the start is the swarm's state of its step (seeded, or kept)

    # the loop

    def run(self, stop: threading.Event) -> None:
        """Follow steps until ``stop`` is set."""
        publisher = threading.Thread(target=self._publish_progress, args=(stop,), daemon=True)
        publisher.start()
        opt = self.optimizer
        while not stop.is_set():
            step, reloads = opt.local_epoch, opt.reloads
            opt.step(batch_size=0)
            followed = not opt.missed_step and opt.reloads == reloads
            if opt.missed_step:
                opt.missed_step = False
                self._missed(step)
            elif opt.reloads != reloads:
                # hivemind found the swarm past our step before we joined its group (our
                # step call came late: a starved machine).
                self.stats.behind += 1
                self._reloaded(f"step {step} was behind the swarm's")
            if opt.local_epoch != step:
                self._published.set()  # tell the swarm our new step now, not at the next refresh
                if self.in_step:
                    self.stats.followed += int(followed)
                    self._announce()
                    if self._picks.random() < self.spec.verify.snapshot_fraction:
                        if self._vouches():
                            self._snapshot()
            else:
                stop.wait(POLL_S)
            # Every checkpoint_every_s, and also once the swarm stopped stepping (everyone
            # left): the keeper then holds the run's last step, where a newcomer starts.
            # Out of step, we load the swarm's state only then (once per step at most):
            # between checkpoints nobody needs our parameters, and every load is a
            # volunteer's upload. Unless spot checks want our snapshots.
            due = time.monotonic() - self._last_write >= self.spec.verify.checkpoint_every_s
            # Spot checks need our snapshots of the steps nodes train now: then we load
            # the swarm's state out of step every SNAPSHOT_RESYNC_S at most.
            since = time.monotonic() - self._resync_at
            resync = due or (self._keeps_snapshots and since >= SNAPSHOT_RESYNC_S)
            if not self.in_step and resync and self._resync_tried != opt.local_epoch:
                self._resync_tried = opt.local_epoch
                self._resync_at = time.monotonic()
                self._resync(f"out of step at step {opt.local_epoch}, a checkpoint due")
            if self.in_step and due and self._written != opt.local_epoch and self._vouches():
                self._write()

    def _missed(self, step: int) -> None:
        """Step ``step``'s group failed for us: we skipped it (GuardedOptimizer), and are
        out of step until the next checkpoint is due."""
        self.stats.missed += 1
        if self.in_step:
            logger.warning("step %d's gradient group failed for us: out of step", step)
        self.in_step = False
        self._announce()

    def _resync(self, why: str) -> None:
        """Out of step: load the state of a peer that took the step, once one announces it
        (or find that every peer skipped it too)."""
        opt = self.optimizer
        opt.out_of_step = True
        verdict = opt.resync_verdict()
        while verdict == WAIT:  # the nodes are still taking the step
            time.sleep(POLL_S)
            verdict = opt.resync_verdict()
        if verdict == IN_STEP:
            opt.out_of_step = False
            self.in_step = True
            self.stats.jumped += 1
            self._announce()
            logger.warning("%s, and every peer that serves state skipped it too; in step", why)
            return
        reloads = opt.reloads
        opt.load_state_from_peers()
        if opt.reloads != reloads:
            self._reloaded(why)
            return
        logger.warning(
            "%s and no peer's state could be loaded (%s); writing no checkpoint until we "
            "hold the swarm's state again",
            why,
            opt.last_refusal or "none served a newer one",
        )

    def _reference_gradient(self) -> None:
        """The gradient of the held-out sequences' loss at our parameters, in their .grad.

        Nodes judge a reducer's results for their slice by their own parts (refused when
        they point against them, and then nobody steps on that slice). Sent with weight
        0, this is ours: we refuse what the nodes refuse and stay in step with them (a
        reducer returning its slice times -100 used to steer us alone, and honest
        receipts then failed their spot checks against our parameters). It costs a
        forward and backward pass of HELDOUT_SEQUENCES sequences per step, and never
        trains: the held-out data stays held out."""
        assert self._heldout is not None
        batch = self._heldout.batch
        self.model.zero_grad(set_to_none=False)
        with torch.enable_grad():
            logits, _ = self.model(batch[:, :-1])
            sequence_losses(logits.float(), batch[:, 1:]).mean().backward()

    def _vouches(self) -> bool:
        """Whether our parameters may be written (a checkpoint) or kept (a snapshot): not
        when their held-out loss is more than ``[verify] loss_tolerance`` above the lowest
        since we last held the swarm's state for sure. Behind the reference gradient
        (_reference_gradient), which judges each reducer's results: results that pass it
        and still move us where no node is (a drift the direction check misses) would
        fail honest nodes' receipts against our parameters and start newcomers there.
        We are out of step instead, and load the swarm's state when a checkpoint is due
        (with vouching alone, a snapshot taken before the drift was caught had already
        failed an honest receipt)."""
        if self._heldout is None:
            return True
        loss = self._heldout.of_model(self.model)
        margin = self.spec.verify.loss_tolerance
        if self._vouched_loss is not None and not loss <= self._vouched_loss + margin:
            self.stats.unvouched += 1
            logger.warning(
                "at step %d: held-out loss %.3f, more than %.2f nats above our lowest since "
                "we last held the swarm's state (%.3f): out of step, nothing written",
                self.optimizer.local_epoch,
                loss,
                margin,
                self._vouched_loss,
            )
            self.in_step = False
            self._announce()
            return False
        self._vouched_loss = loss if self._vouched_loss is None else min(self._vouched_loss, loss)
        return True

    def _vouch_anew(self) -> None:
        """We hold the swarm's state (our start, or one loaded and checked): the held-out
        loss our parameters are held to starts from it."""
        if self._heldout is not None:
            self._vouched_loss = self._heldout.of_model(self.model)

    def _reloaded(self, why: str) -> None:
        self.in_step = True
        self.stats.loaded += 1
        # A swarm that steps faster than a load takes can need a few to catch up with.
        self.stats.loaded_to_start += int(self.stats.followed == 0)
        self.stats.round = self.optimizer.local_epoch
        self.stats.write(self.outbox)
        self._announce()
        self._vouch_anew()
        self._snapshot()  # the swarm's state of this step: the steps before are not ours
        logger.warning("%s: loaded step %d's state from a peer", why, self.optimizer.local_epoch)

    # what peers see

    def _announce(self) -> None:
        """Serve our state above the nodes' of the same step (below them when out of step)."""
        if not self.optimizer.client_mode:
            bonus = FOLLOWER_BONUS if self.in_step else -FOLLOWER_BONUS
            self.optimizer.state_averager.state_sharing_priority = (
                self.optimizer.local_epoch + bonus
            )

    def _publish_progress(self, stop: threading.Event) -> None:
        """Keep a progress record with no samples in the DHT (hivemind's tracker publishes
        none for a peer that reports no samples), refreshed on each step."""
        tracker = self.optimizer.tracker
        expiration = self.spec.swarm.metadata_expiration_s
        while not stop.is_set():
            now = get_dht_time()
            record = LocalTrainingProgress(
                peer_id=self.dht.peer_id.to_bytes(),
                epoch=self.optimizer.local_epoch,
                samples_accumulated=0,
                samples_per_second=0.0,
                time=now,
                client_mode=self.optimizer.client_mode,
            )
            try:
                self.dht.store(
                    tracker.training_progress_key,
                    subkey=tracker._local_public_key,
                    value=record.dict(),
                    expiration_time=now + expiration,
                    return_future=True,
                ).result(timeout=expiration)
            except Exception as e:  # a slow DHT: try again at the next refresh
                logger.debug("publishing our progress record failed: %s", e)
            self._published.wait(expiration / 3)
            self._published.clear()

    # state

    def _write(self) -> None:
        state, _ = self.optimizer.checkpoint_state()
        sha256 = put_in_outbox(self.outbox, self.run_id, self.optimizer.local_epoch, state, None)
        self._last_write = time.monotonic()
        self._written = self.optimizer.local_epoch
        self.stats.round = self.optimizer.local_epoch
        self.stats.write(self.outbox)
        logger.info(
            "at step %d: parameters %s written; followed %d steps, missed %d, loaded %d; "
            "sent %.2f MB so far",
            self.optimizer.local_epoch,
            sha256[:16],
            self.stats.followed,
            self.stats.missed,
            self.stats.loaded,
            self.traffic.total_sent() / 1e6,
        )

    def _snapshot(self) -> None:
        """Keep this step's parameters privately for spot checks (older ones pruned)."""
        if not self._keeps_snapshots or self.snapshots is None:
            return
        self.snapshots.mkdir(parents=True, exist_ok=True)
        step = self.optimizer.local_epoch
        if (self.snapshots / snapshot_name(step)).exists():
            return  # kept already (a step we loaded, then counted as reached)
        state, _ = self.optimizer.checkpoint_state()
        metadata = {"run_id": self.run_id, "step": str(step), "params_sha256": params_sha256(state)}
        try:
            save_checkpoint(self.snapshots / snapshot_name(step), state, metadata)
        except CheckpointError as e:  # a full disk: spot checks fall back on checkpoints
            logger.warning("could not keep a snapshot of step %d: %s", step, e)
        prune_snapshots(self.snapshots)

    def shutdown(self) -> None:
        self.optimizer.shutdown()


__all__ = ["StepFollower"]
