"""Non-finite losses and gradients: the check, and the test hook that makes them."""

from __future__ import annotations

import logging
import math
import os

import torch

from crowdtrain.protocol.errors import CrowdtrainError

logger = logging.getLogger(__name__)

# Micro-batches in a row with a non-finite loss or gradient before a node gives up.
MAX_NON_FINITE_IN_ROW = 25
# Test hook: every Nth micro-batch's gradient becomes Inf.
INF_GRAD_ENV = "CROWDTRAIN_TEST_INF_GRAD_EVERY"


def inf_grad_every() -> int:
    value = os.environ.get(INF_GRAD_ENV, "")
    if not value:
        return 0
    try:
        every = int(value)
    except ValueError:
        raise CrowdtrainError(f"{INF_GRAD_ENV}={value!r} must be a whole number") from None
    logger.warning(
        "!!! %s=%d: TEST HOOK, every %d-th micro-batch's gradient is made Inf !!!",
        INF_GRAD_ENV,
        every,
        every,
    )
    return max(0, every)


def poison_gradient(model: torch.nn.Module) -> None:
    grad = next(p.grad for p in model.parameters() if p.grad is not None)
    grad.view(-1)[0] = math.inf


def gradients_finite(model: torch.nn.Module) -> bool:
    """True when every gradient value is finite (one device sync)."""
    flags = [torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None]
    return not flags or bool(torch.stack(flags).all())


__all__ = [
    "INF_GRAD_ENV",
    "MAX_NON_FINITE_IN_ROW",
    "gradients_finite",
    "inf_grad_every",
    "poison_gradient",
]
