"""Sync mode: hivemind's Optimizer, averaging gradients at every collaborative step, with
the guard's checks in both its averagers (:mod:`averagers`).

:class:`GuardedOptimizer` implements
:class:`~crowdtrain.node.swarm.optimizer.SwarmOptimizer`, the interface the
node drives both modes through.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import hivemind
import torch
from hivemind.optim.state_averager import TrainingStateAverager

from crowdtrain.node.swarm.averagers import GuardedStateAverager
from crowdtrain.node.swarm.guard import SwarmGuard


class GuardedOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer whose state averager is a :class:`GuardedStateAverager`.

    Pass ``grad_averager_factory=partial(GuardedGradientAverager, guard=swarm_guard.config)``
    so that gradient rounds are checked too. ``model`` is the module whose
    parameters ``params`` holds: a checkpoint names them as its state dict does.
    """

    def __init__(self, *, swarm_guard: SwarmGuard, model: torch.nn.Module, **kwargs: Any):
        self._swarm_guard = swarm_guard
        self._model = model
        super().__init__(**kwargs)

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
        super()._maybe_schedule_gradient_averaging()

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
