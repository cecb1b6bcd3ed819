"""Test hooks: settings that make a node misbehave on purpose, read once where the process starts.

:class:`TestHooks` holds every hook. The command line's ``join`` and the
notebook's :func:`~crowdtrain.node.session.join` call :meth:`TestHooks.from_env`
once, which warns loudly for each hook that is set, and pass the result down
in :class:`~crowdtrain.node.config.NodeConfig`; no library module reads these
variables itself. :class:`Throttle` is the slowdown hook's mechanism. Knows
nothing about the swarm, the coordinator or the training loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from crowdtrain.protocol.errors import CrowdtrainError

logger = logging.getLogger(__name__)

ATTACK_ENV = "CROWDTRAIN_TEST_ATTACK"
"""``nan``, ``scale``, ``weight``, ``flip``, ``reducer`` or ``cycle`` makes this node a hostile
peer: what it sends to the swarm's averaging is corrupted (``cycle`` takes the first three in
turn; ``flip`` sends every part times -9.9, inside the guard's norm bounds; ``reducer`` sends
honest parts but returns each slice it reduces times -100 to the other senders)."""

ATTACKS = ("nan", "scale", "weight")
"""The attacks ``cycle`` goes through, in order."""

INF_GRAD_ENV = "CROWDTRAIN_TEST_INF_GRAD_EVERY"
"""Every Nth micro-batch's gradient becomes Inf."""

SLOWDOWN_ENV = "CROWDTRAIN_TEST_SLOWDOWN"
"""Every micro-batch takes this many times as long (a slower node)."""

MEMORY_CAP_ENV = "CROWDTRAIN_MEMORY_CAP_BYTES"
"""Pretend this device has only this many bytes of memory."""

_GIB = 2**30


@dataclass(frozen=True)
class TestHooks:
    """Every test hook of a node; the defaults make an ordinary node.

    ``attack`` is one of :data:`ATTACKS`, ``cycle`` or empty; it reaches hivemind's
    forked averager processes in :class:`~crowdtrain.node.swarm.guard.GuardConfig`.
    ``inf_grad_every`` 0 poisons nothing; ``slowdown`` 1 sleeps never;
    ``memory_cap_bytes`` None caps nothing. The other three act in the training
    process.
    """

    __test__ = False  # not a pytest test class, whatever its name

    attack: str = ""
    inf_grad_every: int = 0
    slowdown: float = 1.0
    memory_cap_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.attack and self.attack not in (*ATTACKS, "flip", "reducer", "cycle"):
            raise CrowdtrainError(
                f"{ATTACK_ENV}={self.attack!r}: use one of {', '.join(ATTACKS)}, flip, "
                "reducer or cycle, or unset it"
            )
        if self.inf_grad_every < 0:
            raise CrowdtrainError(f"{INF_GRAD_ENV}={self.inf_grad_every}: must not be negative")
        if not math.isfinite(self.slowdown) or self.slowdown < 1.0:
            raise CrowdtrainError(
                f"{SLOWDOWN_ENV}={self.slowdown!r} must be a number >= 1, like 2 for half speed"
            )
        if self.memory_cap_bytes is not None and self.memory_cap_bytes <= 0:
            raise CrowdtrainError(
                f"{MEMORY_CAP_ENV}={self.memory_cap_bytes}: must be a positive number of bytes"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TestHooks:
        """The hooks set in ``environ`` (default: this process's environment), each checked
        (a bad value raises :class:`CrowdtrainError` naming its variable) and, when set,
        announced with a loud warning. Call once, where the process starts."""
        env = os.environ if environ is None else environ
        hooks = cls(
            attack=env.get(ATTACK_ENV, ""),
            inf_grad_every=_inf_grad_every(env.get(INF_GRAD_ENV, "")),
            slowdown=_slowdown(env.get(SLOWDOWN_ENV, "").strip()),
            memory_cap_bytes=_memory_cap(env.get(MEMORY_CAP_ENV, "").strip()),
        )
        hooks._announce()
        return hooks

    def _announce(self) -> None:
        if self.attack:
            logger.warning(
                "!!! %s=%s: THIS NODE IS A HOSTILE TEST PEER and corrupts what it sends "
                "to the swarm; never set this outside tests !!!",
                ATTACK_ENV,
                self.attack,
            )
        if self.inf_grad_every:
            logger.warning(
                "!!! %s=%d: TEST HOOK, every %d-th micro-batch's gradient is made Inf !!!",
                INF_GRAD_ENV,
                self.inf_grad_every,
                self.inf_grad_every,
            )
        if self.slowdown > 1.0:
            logger.warning(
                "!!! %s=%s: TEST HOOK, this node sleeps to train %.3gx slower !!!",
                SLOWDOWN_ENV,
                f"{self.slowdown:g}",
                self.slowdown,
            )
        if self.memory_cap_bytes is not None:
            logger.warning(
                "!!! %s=%d: TEST HOOK, this node acts as if its device had only %.2f GiB !!!",
                MEMORY_CAP_ENV,
                self.memory_cap_bytes,
                self.memory_cap_bytes / _GIB,
            )


def _inf_grad_every(value: str) -> int:
    if not value:
        return 0
    try:
        every = int(value)
    except ValueError:
        raise CrowdtrainError(f"{INF_GRAD_ENV}={value!r} must be a whole number") from None
    return max(0, every)


def _slowdown(value: str) -> float:
    if not value:
        return 1.0
    try:
        factor = float(value)
    except ValueError:
        factor = math.nan
    if not math.isfinite(factor) or factor < 1.0:
        raise CrowdtrainError(
            f"{SLOWDOWN_ENV}={value!r} must be a number >= 1, like 2 for half speed"
        )
    return factor


def _memory_cap(value: str) -> int | None:
    if not value:
        return None
    try:
        cap = int(float(value))
    except ValueError:
        raise CrowdtrainError(
            f"{MEMORY_CAP_ENV}={value!r} must be a number of bytes, like 4000000000"
        ) from None
    if cap <= 0:
        raise CrowdtrainError(f"{MEMORY_CAP_ENV}={value!r} must be a positive number of bytes")
    return cap


class Throttle:
    """The slowdown hook: makes a node as slow as a device ``factor`` times slower.

    After each micro-batch's compute, :meth:`wrap` sleeps ``factor - 1`` times
    the compute's duration, so the node's throughput divides by ``factor``.
    On a GPU, measure compute after ``torch.cuda.synchronize``.
    """

    def __init__(self, factor: float = 1.0) -> None:
        if not math.isfinite(factor) or factor < 1.0:
            raise CrowdtrainError(f"a slowdown factor must be a number >= 1, got {factor!r}")
        self.factor = float(factor)

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


__all__ = [
    "ATTACKS",
    "ATTACK_ENV",
    "INF_GRAD_ENV",
    "MEMORY_CAP_ENV",
    "SLOWDOWN_ENV",
    "TestHooks",
    "Throttle",
]
