"""Checks on what swarm peers send each other: averaging parts, their weights, downloaded state.

hivemind's all-reduce adds whatever tensor a groupmate sends, scaled by
whatever weight it claims, and a new peer loads whatever state the first
peer it asks serves. Here every part is checked before it is accumulated
(it deserializes, is floating point, has the expected shape, is finite, its
weight is within the sender's allowance, its norm is within
:data:`NORM_BOUND` times the slice's typical norm, above :data:`CLIP_BOUND`
it is scaled down) and every averaged result a reducer returns is checked
before it is used. A sender that fails is dropped for the round
and reported; downloaded state is refused when its step or parameters
disagree with what the coordinator recorded.

The all-reduce runs inside hivemind's forked averager processes, so they and
the trainer share only two files in the guard's folder: ``roster.json``
(allowances, written by the trainer) and ``reports.jsonl`` (dropped senders,
appended by the averagers). Knows nothing about the coordinator itself: the
node passes the roster in and carries the reports out. The all-reduce runner
that applies these checks is in :mod:`~crowdtrain.node.swarm.allreduce`; the
hivemind classes that use it, in :mod:`~crowdtrain.node.swarm.averagers`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import ValidationError

from crowdtrain.model import params_sha256
from crowdtrain.node.stats.traffic import Traffic
from crowdtrain.protocol.files import atomic_write
from crowdtrain.protocol.messages import MAX_WEIGHT_BATCHES, NEWCOMER_WEIGHT_BATCHES, PeerReport
from crowdtrain.protocol.runspec import TrustSection

logger = logging.getLogger(__name__)

NORM_BOUND = 200.0
"""A part more than this many times the reference norm is dropped and its sender reported.

The reference for a slice is the lower median of the norms every sender
(us included) sent for it. Honest peers' gradients for one tensor differ by
up to a few dozen times (more while peers that started together are still
out of step); a part scaled by -1000 stands out."""

CLIP_BOUND = 10.0
"""A part between this and NORM_BOUND times the reference is scaled down to this,
quietly: its sender may be honest, and a clipped spike does little harm."""

RESULT_NORM_BOUND = 1000.0
"""A reducer's result (average minus our part) more than this many times our own
part is not used. Our part alone is a noisy reference, so only gross scaling counts."""

STEP_TOLERANCE = 10
"""Downloaded state may be this many steps ahead of or behind the coordinator's step."""

STATE_DISTANCE_BOUND = 0.1
"""Downloaded parameters whose hash differs from the keeper's checkpoint of their step
are still accepted within this relative L2 distance of it. Honest peers at one step
are never bit-identical (each adds the average's difference to its own values) and
drift apart between state averaging rounds: two at step 72 of a test run were 1%
apart. A fabricated or foreign model is about 100% away."""

RESULT_COSINE_FLOOR = -0.3
RESULT_PULL_FLOOR = -1.0
"""A reducer's results for our slice, taken together, must not point against our own parts
of it: their cosine with our parts must be above RESULT_COSINE_FLOOR, and their projection
on our parts (in units of our parts: how far they pull against ours) above
RESULT_PULL_FLOOR. Every rule (the mean, a trimmed mean, CenteredClip) weighs our part in
and honest gradients share a direction. ``python bench/result_direction.py`` measured
honest groups of 2 to 4 peers (the demo's model at 0, 50 and 300 steps; equal batches, and
one peer's 8 times smaller) over whole slices: the smallest cosine -0.03 (median +0.95) and
the smallest projection -0.01 (single parts went down to -0.69, hence judging by slice).
A reducer returning the result flipped (-100x) gives a cosine near -0.95 and a projection
near -100; one returning it times -1, a cosine near -0.95.

Such results are refused, but the reducer is reported (CONTRARY) only when they also pull
against ours by more than BLAME_PULL times ours. An honest reducer's result points against
ours too when its robust rule had only two parts to combine, which is the mean (ours and a
flipped one, or ours and the keeper's follower's weightless part and a flip): one part
within CLIP_BOUND of the smaller pulls by at most CLIP_BOUND, whatever the weights. Seen in the
three-peer sign-flip test: an honest node reported the other honest node as contrary
once, and the flipper (running our code) reported both; two such reports flag a peer."""

BLAME_PULL = -CLIP_BOUND

LOSS_MARGIN = 0.5
"""Downloaded parameters that no checkpoint of their step vouches for are refused when
their loss on held-out sequences is more than this many nats above the reference's (the
keeper's follower: its own parameters, at most a few steps older). A state pushed along
the gradient to break the model (issue 15: 9.7% away, loss 0.08 to 3.6) is nats worse;
a few honest steps change it by hundredths."""

COORDINATOR_LAG_S = 8.0
"""The coordinator reads the swarm's step from the DHT every 5 s: state that is
further ahead is checked again after this long before it is refused."""

# Reasons a part or a result is dropped; reports carry them to the coordinator. FAR: a
# part kept, but far from its slice's robust result (see crowdtrain.node.swarm.robust).
# HARMFUL: the one other contributor of a DiLoCo round whose average made the global
# parameters worse on held-out data (see crowdtrain.node.swarm.diloco).
# CONTRARY: a reducer whose results for our slice point against our own parts, further
# than an honest reducer's can (AGAINST: refused, nobody reported).
MALFORMED, DTYPE, SHAPE, WEIGHT, NON_FINITE, NORM, FAR, HARMFUL, CONTRARY, AGAINST = (
    "malformed",
    "dtype",
    "shape",
    "weight",
    "non-finite",
    "norm",
    "far",
    "harmful",
    "contrary",
    "against",
)

_MAX_REPORTS = 32  # as many as a heartbeat carries


def part_problem(
    part: torch.Tensor | None, weight: float, expected_shape: torch.Size, max_weight: float
) -> str | None:
    """Why a received averaging part must not be accumulated, or None when it may.

    ``part`` is None when it did not deserialize. Its size is judged apart,
    against the other senders' (:func:`norm_problem`).
    """
    if part is None:
        return MALFORMED
    if not part.dtype.is_floating_point:
        return DTYPE
    if part.shape != expected_shape:
        return SHAPE
    if not math.isfinite(weight) or weight < 0 or weight > max_weight:
        return WEIGHT
    if not bool(torch.isfinite(part).all()):
        return NON_FINITE
    return None


def reference_norm(norms: Iterable[float]) -> float | None:
    """The lower median of the positive norms, or None without any.

    With two senders it is the smaller one: from two parts alone nobody can
    tell which is wrong, so the larger must stay within bounds of the smaller.
    """
    positive = sorted(n for n in norms if n > 0)
    return positive[(len(positive) - 1) // 2] if positive else None


def norm_problem(norm: float, reference: float | None) -> str | None:
    """NORM when a part's norm is beyond NORM_BOUND times the reference."""
    return NORM if reference is not None and norm > NORM_BOUND * reference else None


def clip_scale(norm: float, reference: float | None) -> float:
    """The factor that brings a part down to CLIP_BOUND times the reference (1 when within)."""
    if reference is None or norm <= CLIP_BOUND * reference:
        return 1.0
    return CLIP_BOUND * reference / norm


def result_problem(
    delta: torch.Tensor | None, expected_shape: torch.Size, local_part: torch.Tensor | None
) -> str | None:
    """Why an averaged result (average minus our part) from a reducer must not be used."""
    if delta is None:
        return MALFORMED
    if not delta.dtype.is_floating_point:
        return DTYPE
    if delta.shape != expected_shape:
        return SHAPE
    if not bool(torch.isfinite(delta).all()):
        return NON_FINITE
    if local_part is not None:
        ours = _norm(local_part)
        if ours > 0 and _norm(delta) > RESULT_NORM_BOUND * ours:
            return NORM
    return None


def slice_problem(results: Sequence[torch.Tensor], ours: Sequence[torch.Tensor]) -> str | None:
    """Why a reducer's ``results`` for our slice (the averages, part by part) are refused, or
    None: they point against our own parts of it (``ours``: cosine at most
    RESULT_COSINE_FLOOR, or pulling against ours by RESULT_PULL_FLOOR of ours or more):
    CONTRARY (its reducer is to blame) when they also pull by more than BLAME_PULL, AGAINST
    (the mean of too few parts can give it) otherwise. Unjudged when either is all zero
    (nothing of ours weighed in)."""
    dot = sum(
        float(torch.dot(r.float().reshape(-1), o.float().reshape(-1)))
        for r, o in zip(results, ours, strict=True)
    )
    theirs = math.sqrt(sum(_norm(r) ** 2 for r in results))
    own = math.sqrt(sum(_norm(o) ** 2 for o in ours))
    if theirs == 0 or own == 0:
        return None
    cosine, pull = dot / (theirs * own), dot / own**2
    if cosine > RESULT_COSINE_FLOOR and pull > RESULT_PULL_FLOOR:
        return None
    return CONTRARY if pull < BLAME_PULL else AGAINST


def _norm(tensor: torch.Tensor) -> float:
    return float(tensor.float().norm())


@dataclass(frozen=True)
class GuardConfig:
    """What the averager processes need; copied into them when hivemind forks.

    ``attack`` is the ``CROWDTRAIN_TEST_ATTACK`` test hook (see
    :class:`~crowdtrain.node.device.hooks.TestHooks`): empty for an honest peer.
    """

    folder: Path
    # The weight a sender the roster does not list counts for at most.
    unknown_max_weight: float
    attack: str = ""
    # Where the averager processes count the bytes they send and receive (shared memory).
    traffic: Traffic | None = None
    # How reducers combine the parts of their slice (the run spec's [trust]).
    trust: TrustSection = TrustSection()
    # Our parts weigh nothing but are a reference to judge reducers' results by (the
    # keeper's step follower sends a gradient of held-out sequences with weight 0).
    reference_parts: bool = False
    # A part claiming more weight than its sender's bound (the roster's, or
    # unknown_max_weight) and at most this counts at that bound; one claiming more than
    # both is refused and its sender reported (0: every claim above the bound is).
    max_claim: float = 0.0

    def count(self, purpose: str, sent: int = 0, received: int = 0) -> None:
        if self.traffic is not None:
            self.traffic.add(purpose, sent, received)

    @property
    def roster_path(self) -> Path:
        return self.folder / "roster.json"

    @property
    def reports_path(self) -> Path:
        return self.folder / "reports.jsonl"

    def read_roster(self) -> dict[str, float]:
        try:
            roster = json.loads(self.roster_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(roster, dict):
            return {}
        return {str(k): float(v) for k, v in roster.items() if isinstance(v, int | float)}

    def report(self, dht_peer_id: str, reason: str) -> None:
        """Append one dropped sender; one write per line keeps concurrent appends whole."""
        line = json.dumps({"dht_peer_id": dht_peer_id, "reason": reason, "count": 1}) + "\n"
        fd = os.open(self.reports_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def state_problem(
    guard: SwarmGuard,
    main_parameters: Sequence[torch.Tensor],
    metadata: Any,
    tensors: Sequence[torch.Tensor],
) -> str | None:
    """Why state downloaded from a peer must not be loaded, or None when it may.

    ``main_parameters`` are the model's parameters in the order the download
    lists them (hivemind sends parameters first, then optimizer statistics).
    """
    epoch = metadata.get("epoch") if isinstance(metadata, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        return "it carries no step"
    step = guard.coordinator_step()
    if step is not None and epoch < step - STEP_TOLERANCE:
        return f"its step {epoch} is behind the coordinator's step {step}"
    if step is not None and epoch > step + STEP_TOLERANCE:
        # The run's step is the lower median of live peers' (a peer behind, this one
        # perhaps, holds it back): the upper median bounds how new state may be. The
        # coordinator may not have read the latest steps yet: ask again once.
        leading = guard.coordinator_leading_step()
        if leading is None or epoch > leading + STEP_TOLERANCE:
            time.sleep(guard.coordinator_lag_s)
            later = guard.coordinator_leading_step() or guard.coordinator_step()
            if later is None or epoch > later + STEP_TOLERANCE:
                return f"its step {epoch} is ahead of the coordinator's step {later or step}"
    if len(tensors) < len(main_parameters):
        return f"it holds {len(tensors)} tensors, fewer than the model's {len(main_parameters)}"
    for ours, tensor in zip(main_parameters, tensors, strict=False):
        if tensor.shape != ours.shape or not tensor.dtype.is_floating_point:
            return "its parameters do not fit this model"
        if not bool(torch.isfinite(tensor).all()):
            return "its parameters are not finite"
    expected = guard.checkpoint_sha256(epoch)
    theirs = guard.named_state(main_parameters, tensors)
    if expected is None:
        # Nothing vouches for this step: judged against the newest trusted state before it.
        reference = guard.reference_state(epoch) if guard.reference_state is not None else None
        return loss_problem(guard, theirs, reference)
    if params_sha256(theirs) == expected:
        return None
    kept = guard.checkpoint_state(epoch)
    if kept is None:
        logger.warning(
            "the keeper's checkpoint of step %d could not be fetched to compare with", epoch
        )
        return None
    distance = state_distance(theirs, kept)
    if distance > STATE_DISTANCE_BOUND:
        return (
            f"its parameters are {distance:.1%} away from the coordinator's checkpoint of "
            f"step {epoch} (at most {STATE_DISTANCE_BOUND:.0%} allowed)"
        )
    # Near is not enough: a push along the gradient 9.7% away broke a model (issue 15).
    return loss_problem(guard, theirs, kept)


def loss_problem(
    guard: SwarmGuard,
    state: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor] | None,
    margin: float = LOSS_MARGIN,
    what: str = "the trusted state",
) -> str | None:
    """Why downloaded parameters (``state``) are refused by their held-out loss, or None:
    more than ``margin`` above ``reference``'s (``what``; unjudged without either, or
    without the guard's ``heldout_loss``)."""
    if guard.heldout_loss is None or reference is None:
        return None
    theirs, ours = guard.heldout_loss(state), guard.heldout_loss(reference)
    if not theirs <= ours + margin:  # NaN too
        return (
            f"its parameters' loss on held-out data is {theirs:.3f}, more than "
            f"{margin} nats above {what}'s {ours:.3f}"
        )
    return None


def state_distance(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Relative L2 distance of ``state`` from ``reference``; inf when their names or shapes differ."""
    if set(state) != set(reference):
        return math.inf
    diff = total = 0.0
    for name, ref in reference.items():
        if state[name].shape != ref.shape:
            return math.inf
        ref = ref.detach().float().cpu()
        diff += float((state[name].detach().float().cpu() - ref).square().sum())
        total += float(ref.square().sum())
    return math.sqrt(diff / total) if total > 0 else (0.0 if diff == 0 else math.inf)


class CoordinatorView(Protocol):
    """What the guard asks the coordinator (the node's
    :class:`~crowdtrain.node.link.http.RunView` answers)."""

    def fresh_step(self) -> int | None: ...

    def fresh_leading_step(self) -> int | None: ...

    def checkpoint_sha256(self, step: int) -> str | None: ...

    def checkpoint_state(self, step: int) -> dict[str, torch.Tensor] | None: ...

    def newest_checkpoint_state(self, at_most: int) -> dict[str, torch.Tensor] | None: ...


def _no_step() -> int | None:
    return None


def _no_checkpoint(step: int) -> Any:
    return None


class SwarmGuard:
    """The trainer's side of the guard: allowances in, reports out, state checks configured.

    ``coordinator_step()`` gives the step the coordinator recorded (None when
    unknown), ``checkpoint_sha256(step)`` the :func:`params_sha256` of the
    coordinator's checkpoint of ``step`` (None when it has none) and
    ``checkpoint_state(step)`` its tensors (None when unavailable): ``coordinator``
    gives all three (a :class:`CoordinatorView`; without one, nothing is known and
    downloaded state is checked for its shape and finiteness only).
    ``named_parameters`` names the model's parameters (tied ones under each name)
    for hashing downloaded state. ``attack`` is the test hook that makes this a
    hostile peer (empty: honest). ``trust`` is the run spec's rule for combining
    averaging parts. ``traffic`` counts the bytes the averagers send and
    receive. Start it before hivemind: a previous session's files are removed, unless
    ``keep_files`` (the keeper's step follower, whose roster the keeper writes). Tests may
    replace the three callables and
    ``coordinator_lag_s`` after construction.
    """

    def __init__(
        self,
        folder: Path,
        target_batch_size: int,
        *,
        attack: str = "",
        coordinator: CoordinatorView | None = None,
        named_parameters: Iterable[tuple[str, torch.Tensor]] = (),
        traffic: Traffic | None = None,
        keep_files: bool = False,
        trust: TrustSection | None = None,
    ):
        folder.mkdir(parents=True, exist_ok=True)
        # A peer the roster does not list counts as a newcomer; a claim past the cap
        # counts at the cap (a fast honest peer collects more than the target in one
        # round: 1.5x seen on loopback) up to MAX_WEIGHT_BATCHES, which nobody honest makes.
        self.config = GuardConfig(
            folder,
            NEWCOMER_WEIGHT_BATCHES * target_batch_size,
            attack,
            traffic,
            trust or TrustSection(),
            max_claim=MAX_WEIGHT_BATCHES * target_batch_size,
        )
        if not keep_files:
            self.config.reports_path.unlink(missing_ok=True)
            self.config.roster_path.unlink(missing_ok=True)
        self._offset = 0
        self._lock = threading.Lock()
        self.coordinator_step: Callable[[], int | None] = _no_step
        self.coordinator_leading_step: Callable[[], int | None] = _no_step
        self.checkpoint_sha256: Callable[[int], str | None] = _no_checkpoint
        self.checkpoint_state: Callable[[int], dict[str, torch.Tensor] | None] = _no_checkpoint
        if coordinator is not None:
            self.coordinator_step = coordinator.fresh_step
            self.coordinator_leading_step = coordinator.fresh_leading_step
            self.checkpoint_sha256 = coordinator.checkpoint_sha256
            self.checkpoint_state = coordinator.checkpoint_state
        self.named_parameters: list[tuple[str, torch.Tensor]] = list(named_parameters)
        self.coordinator_lag_s = COORDINATOR_LAG_S
        # Judging downloaded state by its loss (:func:`loss_problem`): a state's mean loss
        # on held-out sequences (None: not judged), and, for a step no checkpoint vouches
        # for, the newest trusted state at or before it (None: none known).
        self.heldout_loss: Callable[[dict[str, torch.Tensor]], float] | None = None
        self.reference_state: Callable[[int], dict[str, torch.Tensor] | None] | None = (
            coordinator.newest_checkpoint_state if coordinator is not None else None
        )

    def update_roster(self, roster: dict[str, float]) -> None:
        """Set the most averaging weight each peer's parts count for
        (``{dht_peer_id: max_weight}``; 0: refused).

        Takes effect from the next averaging round. Peers not listed count for up to
        NEWCOMER_WEIGHT_BATCHES target batches.
        """
        atomic_write(
            self.config.roster_path, json.dumps({str(k): float(v) for k, v in roster.items()})
        )

    def drain_reports(self) -> list[PeerReport]:
        """Senders dropped since the last call, largest count first (at most as many as a
        heartbeat carries); a line that does not make a :class:`PeerReport` is skipped."""
        with self._lock:
            try:
                with open(self.config.reports_path, "rb") as file:
                    file.seek(self._offset)
                    data = file.read()
            except FileNotFoundError:
                return []
            complete = data[: data.rfind(b"\n") + 1]
            self._offset += len(complete)
        counts: dict[tuple[str, str], int] = {}
        for line in complete.splitlines():
            try:
                report = json.loads(line)
                key = (str(report["dht_peer_id"]), str(report["reason"]))
                counts[key] = counts.get(key, 0) + int(report["count"])
            except (ValueError, KeyError, TypeError):
                continue
        reports = []
        for (peer, reason), count in counts.items():
            try:
                reports.append(PeerReport(dht_peer_id=peer, reason=reason, count=count))
            except ValidationError:
                logger.debug("skipped a malformed report about %r", peer[:64])
        reports.sort(key=lambda r: -r.count)
        return reports[:_MAX_REPORTS]

    def named_state(
        self, main_parameters: Sequence[torch.Tensor], tensors: Iterable[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Downloaded parameters under the model's names, as a checkpoint holds them."""
        names: dict[int, list[str]] = {}
        for name, param in self.named_parameters:
            names.setdefault(id(param), []).append(name)
        state: dict[str, torch.Tensor] = {}
        for param, tensor in zip(main_parameters, tensors, strict=False):
            for name in names.get(id(param), []):
                state[name] = tensor
        return state


__all__ = [
    "CLIP_BOUND",
    "CoordinatorView",
    "NORM_BOUND",
    "STEP_TOLERANCE",
    "GuardConfig",
    "SwarmGuard",
    "clip_scale",
    "norm_problem",
    "part_problem",
    "reference_norm",
    "result_problem",
    "slice_problem",
    "state_distance",
    "state_problem",
    "loss_problem",
    "LOSS_MARGIN",
]
