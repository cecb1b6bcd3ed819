"""Test hooks: settings read from the environment that make a node misbehave on purpose."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator

from crowdtrain.protocol.errors import CrowdtrainError

logger = logging.getLogger(__name__)

# Test hook: make every micro-batch take this many times as long (a slower node).
SLOWDOWN_ENV = "CROWDTRAIN_TEST_SLOWDOWN"


class Throttle:
    """Test hook that makes a node as slow as a device ``factor`` times slower.

    After each micro-batch's compute, :meth:`wrap` sleeps ``factor - 1`` times
    the compute's duration, so the node's throughput divides by ``factor``.
    On a GPU, measure compute after ``torch.cuda.synchronize``.
    """

    def __init__(self, factor: float = 1.0) -> None:
        if not math.isfinite(factor) or factor < 1.0:
            raise CrowdtrainError(f"a slowdown factor must be a number >= 1, got {factor!r}")
        self.factor = float(factor)

    @classmethod
    def from_env(cls) -> Throttle:
        """The ``CROWDTRAIN_TEST_SLOWDOWN`` hook's throttle (factor 1 when unset)."""
        value = os.environ.get(SLOWDOWN_ENV, "").strip()
        if not value:
            return cls(1.0)
        try:
            factor = float(value)
        except ValueError:
            factor = math.nan
        if not math.isfinite(factor) or factor < 1.0:
            raise CrowdtrainError(
                f"{SLOWDOWN_ENV}={value!r} must be a number >= 1, like 2 for half speed"
            )
        throttle = cls(factor)
        logger.warning(
            "!!! %s=%s: TEST HOOK, this node sleeps to train %.3gx slower !!!",
            SLOWDOWN_ENV,
            value,
            factor,
        )
        return throttle

    @property
    def active(self) -> bool:
        return self.factor > 1.0

    def wrap(self, compute_s: float, sleep: Callable[[float], None] = time.sleep) -> float:
        """Sleep ``(factor - 1) * compute_s`` seconds; returns the seconds slept."""
        delay = (self.factor - 1.0) * max(0.0, compute_s)
        if delay > 0:
            sleep(delay)
        return delay

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Time the block as compute, then sleep as :meth:`wrap` does."""
        started = time.perf_counter()
        yield
        self.wrap(time.perf_counter() - started)
