"""The optimizer a peer steps its own parameters with, inside hivemind's averagers: AdamW
that clips the averaged gradients and can be told to skip a step.
"""

from __future__ import annotations

from typing import Any

import torch


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that clips the (already averaged) gradient norm before each step.

    hivemind applies the optimizer to the swarm's averaged gradients, so
    clipping belongs here rather than in the training loop. :meth:`skip_next_step`
    makes the next :meth:`step` do nothing at all (parameters, Adam's statistics
    and its step count stay as they are): hivemind calls the step from its own
    thread, and a sync peer whose gradient round failed must not take it.
    """

    def __init__(self, params: Any, max_grad_norm: float, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self._skip_next = False

    def skip_next_step(self) -> None:
        self._skip_next = True

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self._skip_next:
            self._skip_next = False
            return None
        if self.max_grad_norm > 0:
            grads = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        return super().step(closure)


__all__ = ["ClippedAdamW"]
