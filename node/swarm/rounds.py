"""A DiLoCo round as every participant takes part in it: nodes and the keeper's follower.

The group bits that let only one round's peers meet (:func:`round_bits`), the
averager and the progress tracker built alike for every participant
(:func:`round_averager`, :func:`round_tracker`), the outer optimizer and its
step that turn the round's exact average into the next global parameters
bit for bit (:func:`outer_optimizer`, :func:`outer_step`), and the group's
canonical global-parameter hash read from what its members gathered
(:func:`canonical_sha256`). :mod:`~crowdtrain.node.swarm.diloco` trains with
them; :mod:`~crowdtrain.node.swarm.follower` follows with them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import hivemind
import torch
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.compression import CompressionBase

from crowdtrain.node.swarm.averagers import DiLoCoAverager
from crowdtrain.node.swarm.diloco_state import StateExchange, averager_prefix
from crowdtrain.node.swarm.guard import GuardConfig
from crowdtrain.node.swarm.progress import PlausibleProgressTracker
from crowdtrain.protocol.runspec import OptimizerSection, SwarmSection

ROUND_BITS = 8  # group-key bits carrying the round (mod 2**8): only one round's peers meet

ROUND_PATIENCE = 3.0
"""How many round timeouts a round's averaging goes on looking for its group while a
peer that trained the round has not come to it yet. A machine that stalled (a laptop
that slept, a loaded CPU) comes to a round's matchmaking late; giving up after one
timeout would leave every peer applying its own pseudo-gradient, and as each round
then takes as long for everyone (the timeout and the wait for a peer's state), peers
would stay that late apart, missing each other at every round from then on."""


def round_bits(round_: int) -> str:
    """The averager's group bits for ``round_``."""
    return format(round_ % (1 << ROUND_BITS), f"0{ROUND_BITS}b")


class _OneLineAveragingFailures(logging.Filter):
    """hivemind logs every failed averaging round with a traceback; we log one line instead."""

    QUIET = {"AllreduceException", "MatchmakingException", "BannedException", "TimeoutError"}
    QUIET |= {"CancelledError", "P2PDaemonError", "P2PHandlerError"}

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or type(error).__name__ not in self.QUIET


_FILTER = _OneLineAveragingFailures()


def quiet_averaging_failures() -> None:
    # Installed before the averager forks, so its process has it too.
    for name in ("hivemind.averaging.averager", "hivemind.averaging.matchmaking"):
        log = logging.getLogger(name)
        if _FILTER not in log.filters:
            log.addFilter(_FILTER)


def outer_optimizer(global_params: list[torch.Tensor], spec: OptimizerSection) -> torch.optim.SGD:
    """The outer optimizer every participant of a run applies to the global parameters: the
    same inputs give the same bits on every machine (one code path, no foreach kernels)."""
    return torch.optim.SGD(
        global_params,
        lr=spec.outer_lr,
        momentum=spec.outer_momentum,
        nesterov=spec.outer_nesterov and spec.outer_momentum > 0,
        foreach=False,
    )


def outer_step(
    outer: torch.optim.SGD, global_params: Sequence[torch.Tensor], average: Sequence[torch.Tensor]
) -> None:
    """Apply a round's averaged pseudo-gradient to the global parameters."""
    for global_, delta in zip(global_params, average, strict=True):
        global_.grad = delta
    outer.step()
    for global_ in global_params:
        global_.grad = None


def after_outer_step(
    outer: torch.optim.SGD,
    global_params: Sequence[torch.Tensor],
    average: Sequence[torch.Tensor],
    spec: OptimizerSection,
) -> list[torch.Tensor]:
    """The global parameters :func:`outer_step` would give, on copies: ``global_params``
    and ``outer``'s momentum stay as they are (a round's result judged before it is
    applied)."""
    candidate = [g.detach().clone() for g in global_params]
    trial = outer_optimizer(candidate, spec)
    for param, global_ in zip(candidate, global_params, strict=True):
        buffer = outer.state.get(global_, {}).get("momentum_buffer")
        if buffer is not None:
            trial.state[param]["momentum_buffer"] = buffer.clone()
    outer_step(trial, candidate, average)
    return candidate


def round_tracker(
    dht: hivemind.DHT,
    run_id: str,
    optimizer: OptimizerSection,
    swarm: SwarmSection,
    client_mode: bool,
    eager: bool = False,
) -> RoundTracker:
    """The run's round progress (its prefix is the run id): a round ends when the swarm
    trained ``inner_steps * target_batch_size`` sequences. A participant that never
    reports samples (the follower) never publishes a record.

    Peers must notice a round's end within one matchmaking window. ``eager`` (the
    follower, one process per run) reads twice as often: it has no training to be
    late for, and a round it is late for costs a volunteer's upload of the state."""
    window = swarm.matchmaking_time_s / (2 if eager else 1)
    return RoundTracker(
        dht=dht,
        prefix=run_id,
        target_batch_size=optimizer.inner_steps * optimizer.target_batch_size,
        client_mode=client_mode,
        min_refresh_period=0.25 if eager else 0.5,
        max_refresh_period=max(0.5, window),
        default_refresh_period=max(0.5, min(3.0, window)),
        metadata_expiration=swarm.metadata_expiration_s,
        start=True,
    )


class RoundTracker(PlausibleProgressTracker):
    """hivemind's progress tracker (records claiming rounds the swarm cannot have
    reached left out: :class:`PlausibleProgressTracker`), also keeping the round (local epoch) each other peer
    reports (:attr:`peer_rounds`, by peer id), refreshed with the swarm's progress."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.peer_rounds: dict[bytes, int] = {}
        super().__init__(*args, **kwargs)

    def _parse_swarm_progress_data(self, metadata: Any) -> Any:
        progress = super()._parse_swarm_progress_data(metadata)
        rounds: dict[bytes, int] = {}
        metadata = self._plausible(metadata)
        for entry in metadata.values() if isinstance(metadata, dict) else ():
            value = getattr(entry, "value", None)
            if isinstance(value, dict):
                peer, epoch = value.get("peer_id"), value.get("epoch")
                if isinstance(peer, bytes) and isinstance(epoch, int):
                    rounds[peer] = epoch
        rounds.pop(self.local_progress.peer_id, None)
        self.peer_rounds = rounds
        return progress

    def majority_round(self) -> int | None:
        """The highest round that more than half of the other peers report having reached
        (None: no other peer), client-mode peers included: hivemind's swarm epoch counts
        only peers that accept connections, so a follower among client-mode nodes never
        saw them start a round's averaging (which a peer reports as the next round)."""
        return majority_round(self.peer_rounds.values())


def majority_round(rounds: Iterable[int]) -> int | None:
    """The highest round that more than half of ``rounds`` are at or past."""
    ordered = sorted(rounds, reverse=True)
    return ordered[len(ordered) // 2] if ordered else None


def round_may_still_meet(
    round_: int, announced: Sequence[float], peer_rounds: Iterable[int]
) -> bool:
    """Whether another participant may still come to round ``round_``'s matchmaking:
    nobody serves a later round's state yet (``announced``: the rounds others serve, a
    follower's x.5), and the coordinator's follower is about or a peer reports a round up
    to ``round_ + 1`` (it is training the round or averaging it)."""
    if max(announced, default=-1.0) >= round_ + 1:
        return False  # a peer holds the next round: take its state instead
    follower_about = any(r != int(r) for r in announced)
    return follower_about or any(r <= round_ + 1 for r in peer_rounds)


def others_may_still_meet(
    round_: int, exchange: StateExchange, tracker: RoundTracker, timeout_s: float
) -> bool:
    """:func:`round_may_still_meet` with what ``exchange`` and ``tracker`` know now; True
    when the DHT does not answer within ``timeout_s`` (go on looking, within the round's
    deadline)."""
    try:
        announced = exchange.announced_rounds(timeout_s)
    except TimeoutError:
        return True
    return round_may_still_meet(round_, announced, tracker.peer_rounds.values())


def await_round_group(
    control: StepControl,
    give_up_from: float,
    deadline: float,
    may_still_meet: Callable[[], bool],
) -> Any:
    """What the round's group gathered once it averaged. From ``give_up_from``
    (monotonic) on, a round still looking for its group is cancelled as soon as
    ``may_still_meet()`` says nobody else is coming; at ``deadline`` in any case.
    Raises what the round raised, or TimeoutError."""
    checked_at = -math.inf
    while True:
        try:
            return control.result(timeout=max(0.0, min(0.25, deadline - time.monotonic())))
        except TimeoutError:
            pass
        now = time.monotonic()
        if now >= deadline:
            _cancel(control, "the round did not finish in time")
        looking = control.stage in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP)
        if now >= give_up_from and looking and now - checked_at >= 1.0:
            checked_at = now
            if not may_still_meet():
                _cancel(control, "could not find a group, and no other peer is coming")


def _cancel(control: StepControl, reason: str, settle_s: float = 10.0) -> None:
    """Cancel the round and wait (up to ``settle_s``) until the averager has left it: a
    round still looking for its group when the next round's group bits are set would
    otherwise meet the next round's group with this round's tensors. Raises TimeoutError."""
    control.cancel()
    settle_by = time.monotonic() + settle_s
    while control.stage != AveragingStage.FINISHED and time.monotonic() < settle_by:
        time.sleep(0.05)
    raise TimeoutError(reason)


def round_averager(
    dht: hivemind.DHT,
    run_id: str,
    optimizer: OptimizerSection,
    swarm: SwarmSection,
    *,
    like: Sequence[torch.Tensor],
    guard: GuardConfig,
    use_roster: bool,
    current_state: Callable[[], tuple[Any, Sequence[torch.Tensor], Any]],
    compression: CompressionBase,
    state_compression: CompressionBase,
    client_mode: bool,
    start_round: int,
) -> DiLoCoAverager:
    """The run's round averager (pseudo-gradients shaped ``like``, exact results), its
    weights bounded by the roster in ``guard`` when ``use_roster``, serving
    ``current_state()``; it meets round ``start_round``'s group first."""
    quiet_averaging_failures()
    return DiLoCoAverager(
        averaged_tensors=[torch.zeros_like(t) for t in like],
        guard=guard,
        use_roster=use_roster,
        weight_scale=float(optimizer.inner_steps),
        current_state=current_state,
        dht=dht,
        prefix=averager_prefix(run_id),
        start=True,
        min_matchmaking_time=swarm.matchmaking_time_s,
        request_timeout=swarm.request_timeout_s,
        allreduce_timeout=swarm.averaging_timeout_s,
        compression=compression,
        state_compression=state_compression,
        initial_group_bits=round_bits(start_round),
        client_mode=client_mode,
    )


def gathered_weight(gathered: Any) -> float:
    value = gathered.get("weight") if isinstance(gathered, dict) else None
    return float(value) if isinstance(value, int | float) else 0.0


def canonical_sha256(gathered: Iterable[Any]) -> str | None:
    """The group's global-parameter hash held by the most members (ties: the follower's,
    else the smallest), among the peers that serve state (others could never download a
    client's). Members count one each: the weight a member gathers is its own claim, and
    one claiming 1e300 made its hash the group's. A follower's (the coordinator's)
    counts only when no volunteer of the group serves state: it is then the one state
    every peer can download, so peers whose parameters drifted apart (a round that failed
    for everyone) all converge on it."""
    dicts = [v for v in gathered if isinstance(v, dict)]
    followers = {
        v["sha256"] for v in dicts if v.get("follower") and isinstance(v.get("sha256"), str)
    }
    values = [v for v in dicts if not v.get("follower")]
    if any(v.get("serves") for v in values):
        values = [v for v in values if v.get("serves")]
    elif followers:
        return min(followers)
    votes: dict[str, int] = {}
    for value in values:
        sha256 = value.get("sha256")
        if isinstance(sha256, str):
            votes[sha256] = votes.get(sha256, 0) + 1
    if not votes:
        return None
    most = max(votes.values())
    tied = sorted(sha for sha, n in votes.items() if n == most)
    return next((sha for sha in tied if sha in followers), tied[0])


__all__ = [
    "ROUND_BITS",
    "ROUND_PATIENCE",
    "RoundTracker",
    "await_round_group",
    "canonical_sha256",
    "gathered_weight",
    "others_may_still_meet",
    "outer_optimizer",
    "outer_step",
    "quiet_averaging_failures",
    "round_averager",
    "round_bits",
    "round_may_still_meet",
    "round_tracker",
]
