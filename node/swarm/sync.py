"""Sync mode: hivemind's Optimizer, averaging gradients at every collaborative step, with
the guard's checks in both its averagers (:mod:`averagers`).

:class:`GuardedOptimizer` implements
:class:`~crowdtrain.node.swarm.optimizer.SwarmOptimizer`, the interface the
node drives both modes through.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import hivemind
import torch
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager

from crowdtrain.node.stats.loop_time import SwarmWait
from crowdtrain.node.swarm.averagers import STEP_KEY, GuardedStateAverager
from crowdtrain.node.swarm.guard import SwarmGuard
from crowdtrain.node.swarm.progress import PlausibleProgressTracker
from crowdtrain.node.swarm.rounds import quiet_averaging_failures

logger = logging.getLogger(__name__)

# How far below its step an out-of-step peer announces its state, so that a peer
# loading state prefers any peer in step (the keeper's follower announces 0.5 above).
OUT_OF_STEP_DISCOUNT = 0.5
# What an out-of-step peer does (GuardedOptimizer.resync_verdict).
LOAD, IN_STEP, WAIT = "load", "in step", "wait"


def round_step(gathered: Mapping[Any, Any]) -> int | None:
    """The step a gradient round averaged: the one most of its members brought gradients
    of (the later one on a tie); None when no member said."""
    steps = [v.get(STEP_KEY) for v in gathered.values() if isinstance(v, dict)]
    counts = Counter(s for s in steps if isinstance(s, int))
    return max(counts, key=lambda s: (counts[s], s)) if counts else None


class GuardedOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer whose state averager is a :class:`GuardedStateAverager`, and
    whose peers, with ``strict_steps``, stay in step.

    Pass ``grad_averager_factory=partial(GuardedGradientAverager, guard=swarm_guard.config,
    exact=strict_steps)`` so that gradient rounds are checked (and, strict, exact: every
    member of a round gets the same bytes; a partial round fails), and, strict, an
    inner optimizer that can skip a step (:class:`~crowdtrain.node.swarm.inner.ClippedAdamW`).
    ``model`` is the module whose parameters ``params`` holds: a checkpoint names them
    as its state dict does.

    Strict, every peer that takes a step applies the same gradients. hivemind lets a
    peer whose gradient round failed step with its own gradients instead, and one a
    step behind average with the next step's group and apply that step's result to
    parameters that lack the step it missed: from then on it holds other parameters
    than the swarm (until the next state averaging, which may be a hundred steps
    away), its loss samples miss the keeper's checkpoint and the verifier rejects
    honest work. Here such a peer skips the step (when the swarm has other peers:
    alone, it trains alone) and is *out of step*: it serves its state below the
    peers in step, takes no loss samples, and loads the state of a peer that
    announces the step (the keeper's step follower announces itself above the nodes)
    as soon as one does; if every peer that serves state announces the step out of
    step too, all of them skipped it and it is in step as it is.
    """

    out_of_step = False
    samples_at_global = False  # parameters change only between steps: sample as trained
    _out_of_step_since: float | None = None
    skipped_steps = 0  # steps whose gradient round failed with other peers around
    resyncs = 0  # out-of-step states replaced by a peer's
    loads = 0  # state downloads from peers, for whatever reason

    def __init__(
        self,
        *,
        swarm_guard: SwarmGuard,
        model: torch.nn.Module,
        strict_steps: bool = False,
        **kwargs: Any,
    ):
        self._swarm_guard = swarm_guard
        self._model = model
        self.strict_steps = strict_steps
        self.swarm_wait = SwarmWait()
        quiet_averaging_failures()  # a failed round is one line, not a traceback
        super().__init__(**kwargs)
        skips = callable(getattr(self.state_averager.optimizer, "skip_next_step", None))
        if strict_steps and not skips:
            raise TypeError(
                f"{type(self).__name__} needs an inner optimizer that can skip a step "
                f"(ClippedAdamW), got {type(self.state_averager.optimizer).__name__}"
            )

    def _make_progress_tracker(self, target_batch_size: int, **kwargs: Any) -> ProgressTracker:
        # hivemind's Optimizer._make_progress_tracker, building ours: records that claim
        # steps the swarm cannot have reached are not read.
        tracker = PlausibleProgressTracker(
            dht=self.dht,
            prefix=self.run_id,
            target_batch_size=target_batch_size,
            client_mode=self.client_mode,
            status_loglevel=self.status_loglevel,
            start=True,
            counts_itself=True,  # a peer is never alone for not having reported yet
            **kwargs,
        )
        tracker.trusted_epoch = self._swarm_guard.coordinator_step
        return tracker

    def _make_state_averager(self, **kwargs: Any) -> TrainingStateAverager:
        # hivemind's Optimizer._make_state_averager, building our class.
        return GuardedStateAverager(
            swarm_guard=self._swarm_guard,
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **kwargs,
        )

    def _maybe_schedule_gradient_averaging(self) -> None:
        # Alone at its step, hivemind pre-schedules a gradient round and then cancels it
        # ("no other peers"). A cancel that lands while another peer is joining that
        # group can leave the averager's matchmaking locked for good: every later round
        # waits behind it and ends in "could not find a group". Alone, schedule nothing.
        if self.tracker.global_progress.num_peers <= 1:
            return
        if (
            self.scheduled_grads is None
            or self.scheduled_grads.triggered
            or self.scheduled_grads.done()
        ):
            self._tag_round()  # hivemind is about to schedule one
        super()._maybe_schedule_gradient_averaging()

    # strict steps

    def _tag_round(self) -> None:
        # each member of the round gathers the step whose gradients it brings
        if self.strict_steps:
            self.grad_averager._guard_step_of_round = self.local_epoch

    def _update_global_epoch(self, grad_scaler: Any) -> None:
        # The swarm's step: its gradient round (waited for unless the optimizer step is
        # delayed), the optimizer step and the state round. All of it is time the trainer
        # waits on the swarm (the optimizer step itself takes milliseconds).
        with self.swarm_wait.timed():
            super()._update_global_epoch(grad_scaler)

    def _begin_averaging_gradients(self, grad_scaler: Any) -> bool:
        if self.scheduled_grads is None or self.scheduled_grads.done():
            self._tag_round()  # (a pre-scheduled round was tagged when it was scheduled)
        began = bool(super()._begin_averaging_gradients(grad_scaler))
        if not self.strict_steps:
            return began
        if not began and self.tracker.global_progress.num_peers > 1:
            # hivemind goes on with our local gradients (tagging along with weight 0 in a
            # pre-scheduled round, if one was running)
            self._skip_step("its gradient round did not start")
        return began

    def _average_gradients_and_load_into_optimizer(self, control: Any) -> None:
        super()._average_gradients_and_load_into_optimizer(control)
        if not self.strict_steps or control is None or not control.done() or control.cancelled():
            return
        if control.exception() is not None:
            return  # failed: hivemind fell back on our local gradients, and we skip
        group_step = round_step(control.result())
        if group_step is not None and group_step != self.local_epoch:
            # A peer a step behind (the swarm stepped while it was busy, or a retry met
            # the next step's group) or ahead: its gradients still count, as they do in
            # hivemind, but our parameters are not that step's.
            self._skip_step(f"its gradient group averaged step {group_step}")

    def _load_local_gradients_into_optimizer(self) -> None:
        # hivemind's fallback after a failed (or, exact, partial) gradient round, and when
        # alone at a pre-scheduled round
        if self.strict_steps and self.tracker.global_progress.num_peers > 1:
            self._skip_step("its gradient round failed")
        super()._load_local_gradients_into_optimizer()

    def _skip_step(self, why: str) -> None:
        # May run in hivemind's step thread (delay_grad_averaging): before the optimizer
        # step, which it turns into nothing.
        self.state_averager.optimizer.skip_next_step()
        self.skipped_steps += 1
        self.out_of_step = True
        self.state_averager.priority_discount = OUT_OF_STEP_DISCOUNT  # before hivemind's
        logger.warning(
            "step %d: %s; skipping it (our own gradients would put us out of step with "
            "the swarm) and loading the state of a peer that took it",
            self.local_epoch,
            why,
        )

    def _announce_in_step(self) -> None:
        """Serve our state at our step again, as the peers in step do."""
        self.state_averager.priority_discount = 0.0
        if not self.client_mode:
            self.state_averager.state_sharing_priority = self.local_epoch

    def _should_load_state_from_peers(self) -> bool:
        if self.out_of_step:
            verdict = self.resync_verdict()
            if verdict == LOAD:
                self.resyncs += 1
                return True  # hivemind loads, from the peer that announces the most
            if verdict == IN_STEP:
                self.out_of_step = False
                self._announce_in_step()
                logger.info(
                    "step %d: every peer that serves state skipped the step too; in step",
                    self.local_epoch,
                )
        return bool(super()._should_load_state_from_peers())

    def global_sample_state(self) -> tuple[int, dict[str, torch.Tensor], str | None]:
        raise NotImplementedError("sync samples come from the training forward pass")

    def load_state_from_peers(self, **kwargs: Any) -> None:
        self.out_of_step = False  # whatever comes of it: one try per skipped step
        self.state_averager.priority_discount = 0.0  # hivemind announces the loaded step
        self.loads += 1
        with self.swarm_wait.timed():
            super().load_state_from_peers(**kwargs)

    def resync_verdict(self) -> str:
        """What an out-of-step peer should do now, from the state priorities peers announce
        in the DHT: :data:`LOAD` when a peer announces our step or a later one (it took the
        step), :data:`IN_STEP` when every other serving peer announces our step as out of
        step too (everyone skipped it, so all hold the same parameters) or none serves,
        :data:`WAIT` while some have not announced our step yet (they are still taking
        it). After ``averaging_timeout`` of waiting: :data:`LOAD`."""
        if self._out_of_step_since is None:
            self._out_of_step_since = time.monotonic()
        key = f"{self.state_averager.prefix}.all_averagers"
        found = self.dht.get(key, latest=True)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        ours = self.dht.peer_id.to_bytes()
        others = [
            float(entry.value)
            for peer, entry in entries.items()
            if peer != ours and isinstance(getattr(entry, "value", None), (int, float))
        ]
        if any(p >= self.local_epoch for p in others):
            verdict = LOAD
        elif all(p >= self.local_epoch - OUT_OF_STEP_DISCOUNT for p in others):
            verdict = IN_STEP
        elif time.monotonic() - self._out_of_step_since > self.averaging_timeout:
            verdict = LOAD
        else:
            return WAIT
        self._out_of_step_since = None
        return verdict

    @property
    def last_refusal(self) -> str | None:
        """Why the last downloaded state was refused; None when it was not."""
        return self.state_averager.last_refusal  # type: ignore[attr-defined, no-any-return]

    def set_step(self, step: int, outer_momentum: Sequence[torch.Tensor] | None = None) -> None:
        """Move to ``step`` after the model's parameters were loaded (the keeper's checkpoint;
        sync mode has no ``outer_momentum``, and ignores one).

        The local epoch, learning-rate schedule, progress record and
        state-sharing priority follow the step; an offloaded copy of the
        parameters is refreshed; Adam's statistics start afresh. If the swarm
        has moved on, hivemind loads state from peers by itself at the next step.
        """
        averager = self.state_averager
        with torch.no_grad():
            offloaded = [p for group in averager.optimizer.param_groups for p in group["params"]]
            if averager.offload_optimizer:
                for main, copy in zip(averager.main_parameters, offloaded, strict=True):
                    copy.copy_(main)
            if not averager.reuse_tensors:
                averager._load_local_tensors_into_averager_()
        averager.local_epoch = step
        with warnings.catch_warnings():
            # Fast-forwarding the learning-rate schedule to the step, as hivemind does.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            averager._update_scheduler()
        self.tracker.report_local_progress(local_epoch=step, samples_accumulated=0)
        if not self.client_mode:
            averager.state_sharing_priority = step
        if self.use_gradient_averaging:
            self.grad_averager.reset_accumulated_grads_()
            if not self.client_mode:
                self.grad_averager.state_sharing_priority = step

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """This peer's parameters are the swarm's after each step: the model's state dict
        (on the CPU), and no extra metadata."""
        state = {k: v.detach().cpu() for k, v in self._model.state_dict().items()}
        return state, {}


__all__ = ["GuardedOptimizer"]
