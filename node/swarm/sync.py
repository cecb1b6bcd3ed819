"""Sync mode: hivemind's Optimizer, averaging gradients at every collaborative step, with
the guard's checks in both its averagers (:mod:`averagers`).
"""

from __future__ import annotations

from typing import Any

import hivemind
from hivemind.optim.state_averager import TrainingStateAverager

from crowdtrain.node.swarm.averagers import GuardedStateAverager
from crowdtrain.node.swarm.guard import SwarmGuard


class GuardedOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer whose state averager is a :class:`GuardedStateAverager`.

    Pass ``grad_averager_factory=partial(GuardedGradientAverager, guard=swarm_guard.config)``
    so that gradient rounds are checked too.
    """

    def __init__(self, *, swarm_guard: SwarmGuard, **kwargs: Any):
        self._swarm_guard = swarm_guard
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

    @property
    def last_refusal(self) -> str | None:
        """Why the last downloaded state was refused; None when it was not."""
        return self.state_averager.last_refusal  # type: ignore[attr-defined]


__all__ = ["GuardedOptimizer"]
