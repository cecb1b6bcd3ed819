"""Non-finite losses and gradients: the check, and what the Inf-gradient test hook does.

Whether the hook is on is :class:`~crowdtrain.node.device.hooks.TestHooks`'s
``inf_grad_every``, read once at start; nothing here reads the environment.
"""

from __future__ import annotations

import math

import torch

# Micro-batches in a row with a non-finite loss or gradient before a node gives up.
MAX_NON_FINITE_IN_ROW = 25


def poison_gradient(model: torch.nn.Module) -> None:
    """The Inf-gradient test hook: make one gradient value Inf."""
    grad = next(p.grad for p in model.parameters() if p.grad is not None)
    grad.view(-1)[0] = math.inf


def gradients_finite(model: torch.nn.Module) -> bool:
    """True when every gradient value is finite (one device sync)."""
    flags = [torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None]
    return not flags or bool(torch.stack(flags).all())


__all__ = [
    "MAX_NON_FINITE_IN_ROW",
    "gradients_finite",
    "poison_gradient",
]
