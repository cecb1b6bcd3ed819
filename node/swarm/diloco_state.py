"""DiLoCo's global state between peers: what a peer serves, and downloading and checking it.

A DiLoCo peer serves its global (outer) state through hivemind's download
RPC under the DHT prefix :func:`averager_prefix`, laid out as
:mod:`crowdtrain.protocol.state` describes (the coordinator's keeper reads
the same layout). :func:`served_state` lays it out; :class:`StateExchange`
announces it, downloads a peer's and refuses what does not fit the model or
disagrees with the coordinator. Knows nothing about rounds, inner steps or the outer optimizer
(:mod:`~crowdtrain.node.swarm.diloco` owns those).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import hivemind
import torch

from crowdtrain.node.swarm.averagers import DiLoCoAverager
from crowdtrain.node.swarm.guard import SwarmGuard, state_problem
from crowdtrain.protocol.state import DILOCO_STATE_LAYOUT, diloco_prefix

logger = logging.getLogger(__name__)

FOLLOWER_PATIENCE_S = 5.0
"""How long a peer that needs a round's state waits for the coordinator's round follower
to serve it once a volunteer does (the follower applies the same outer step, so it has
the round within moments when it took part)."""

STATE_LAYOUT = DILOCO_STATE_LAYOUT
"""Names the served state's layout (:mod:`crowdtrain.protocol.state`)."""


def averager_prefix(run_id: str) -> str:
    """The DHT prefix of a run's DiLoCo averager (matchmaking and state downloads)."""
    return diloco_prefix(run_id)


@dataclass(frozen=True)
class GlobalState:
    """Global state of round ``round``: the global parameters and the outer momentum
    buffers, CPU fp32, in ``model.parameters()`` order."""

    round: int
    params: list[torch.Tensor]
    momentum: list[torch.Tensor]


def served_state(state: GlobalState, epoch: int) -> tuple[dict[str, Any], list[torch.Tensor], None]:
    """What a peer serves for ``state`` at local epoch ``epoch``, as hivemind's
    ``get_current_state`` returns it (metadata, tensors, no extra)."""
    metadata = {"round": state.round, "epoch": epoch, "layout": STATE_LAYOUT}
    return metadata, [*state.params, *state.momentum], None


def failure_reason(error: BaseException) -> str:
    """One line of at most 200 characters for a failed download or round."""
    return (str(error).strip() or type(error).__name__).splitlines()[0][:200]


class StateExchange:
    """Announces this peer's global state and downloads and checks other peers'.

    ``averager`` serves and downloads (its ``get_current_state`` gives what is
    served); ``like`` are tensors shaped as the global parameters, ``model_params``
    the model's parameters in the same order (to name downloaded tensors for the
    guard); ``num_peers()`` says how many peers the swarm has now. With a
    ``swarm_guard``, downloaded parameters must also agree with the coordinator.
    A client-mode peer serves nothing.
    """

    def __init__(
        self,
        averager: DiLoCoAverager,
        dht: hivemind.DHT,
        run_id: str,
        like: Sequence[torch.Tensor],
        model_params: Sequence[torch.Tensor],
        num_peers: Callable[[], int],
        swarm_guard: SwarmGuard | None = None,
    ):
        self.averager, self.dht, self.run_id = averager, dht, run_id
        self._like = list(like)
        self._model_params = list(model_params)
        self._num_peers = num_peers
        self._swarm_guard = swarm_guard
        self.client_mode = bool(averager.client_mode)
        self.last_refusal: str | None = None
        # Who served the last download: hivemind asks the peer announcing the highest round.
        self.last_source = "a peer"

    def announce(self, round_: int) -> None:
        """Serve the global state of ``round_`` to peers that ask for the newest."""
        if not self.client_mode:
            self.averager.state_sharing_priority = float(round_)

    def allow(self, allowed: bool) -> None:
        """Serve our global state (True) or stop serving it while it is being replaced."""
        if not self.client_mode:
            self.averager.allow_state_sharing = allowed

    def await_round(self, round_: int, timeout_s: float) -> GlobalState | None:
        """Global state of ``round_`` or later from a peer, waiting up to ``timeout_s`` for a
        peer to announce it; None when no other peer has it.

        A round follower (the coordinator's, announcing half a round above its round) is
        waited for up to :data:`FOLLOWER_PATIENCE_S` after a volunteer announces the round,
        so that state comes from the coordinator's side rather than a volunteer's uplink;
        also when the follower has the round but a volunteer announces a newer one (the
        follower a moment behind it): a download comes from whoever announces the most.
        """
        deadline = time.monotonic() + timeout_s
        announced_at: float | None = None
        while True:
            rounds = self.announced_rounds()
            followers = [r for r in rounds if r != int(r)]
            if self._num_peers() <= 1 and not followers:
                return None
            best = max(rounds, default=-1.0)
            if best >= round_ and announced_at is None:
                announced_at = time.monotonic()
            follower_best = max(followers, default=-1.0)
            follower_leads = follower_best >= round_ and follower_best == best
            patience_over = (
                not followers
                or announced_at is not None
                and time.monotonic() - announced_at >= FOLLOWER_PATIENCE_S
            )
            if follower_leads or (best >= round_ and patience_over):
                # Still patient: only from the follower, which must still lead when we ask
                # (rounds of a small model end every second or so, and a volunteer that
                # ended one a moment before the follower announces more meanwhile).
                state = self.download(
                    max(1.0, deadline - time.monotonic()), follower_only=not patience_over
                )
                if state is not None and state.round >= round_:
                    return state
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    def announced_rounds(self, timeout_s: float | None = None) -> list[float]:
        """The rounds other peers announce for state downloads (a follower's are x.5).
        Raises TimeoutError when the DHT does not answer within ``timeout_s``."""
        key = f"{averager_prefix(self.run_id)}.all_averagers"
        found = self.dht.get(key, latest=True, return_future=True).result(timeout=timeout_s)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        me = self.dht.peer_id.to_bytes()
        return [
            float(entry.value)
            for peer, entry in entries.items()
            if peer != me
            and isinstance(getattr(entry, "value", None), int | float)
            and not isinstance(entry.value, bool)
            and math.isfinite(entry.value)
        ]

    def download(self, timeout_s: float, follower_only: bool = False) -> GlobalState | None:
        """A peer's global state, checked; None when none came or it was refused
        (:attr:`last_refusal` then says why), or, ``follower_only``, when a volunteer
        announces more than the coordinator's follower (hivemind asks the highest first)."""
        self.last_refusal = None
        best = max(self.announced_rounds(), default=-1.0)
        from_follower = best != int(best)
        if follower_only and not from_follower:
            return None
        self.last_source = "the coordinator's follower" if from_follower else "a peer"
        try:
            loaded = self.averager.load_state_from_peers(timeout=timeout_s)
        except Exception as e:  # a timeout, a peer that left mid-download
            logger.info("could not download the global state: %s", failure_reason(e))
            return None
        if loaded is None:
            return None
        metadata, tensors = loaded
        problem = self._problem(metadata, tensors)
        if problem is not None:
            self.last_refusal = problem
            logger.warning("refused the global state %s served: %s", self.last_source, problem)
            return None
        n = len(self._like)
        return GlobalState(
            int(metadata["round"]),
            [t.float() for t in tensors[:n]],
            [t.float() for t in tensors[n : 2 * n]],
        )

    def _problem(self, metadata: Any, tensors: Sequence[torch.Tensor]) -> str | None:
        if not isinstance(metadata, dict) or metadata.get("layout") != STATE_LAYOUT:
            return "it is not DiLoCo state"
        round_ = metadata.get("round")
        if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0:
            return "it carries no round"
        n = len(self._like)
        if len(tensors) != 2 * n:
            return f"it holds {len(tensors)} tensors, not the {2 * n} of this model"
        for ours, theirs in zip(self._like * 2, tensors, strict=True):
            if theirs.shape != ours.shape or not theirs.dtype.is_floating_point:
                return "its tensors do not fit this model"
            if not bool(torch.isfinite(theirs).all()):
                return "its tensors are not finite"
        if self._swarm_guard is None:
            return None
        try:
            return state_problem(
                self._swarm_guard, self._model_params, {"epoch": round_}, tensors[:n]
            )
        except Exception as e:  # the coordinator or keeper may be away: say so, refuse nothing
            logger.warning("could not check the downloaded state (%s); accepting it", e)
            return None


__all__ = [
    "STATE_LAYOUT",
    "GlobalState",
    "StateExchange",
    "averager_prefix",
    "failure_reason",
    "served_state",
]
