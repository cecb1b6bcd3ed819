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
node passes the roster in and carries the reports out. The hivemind classes
that use these checks live in ``guarded.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import (
    aiter_with_timeout,
    amap_in_executor,
    attach_event_on_finished,
)

from crowdtrain.model import params_sha256
from crowdtrain.protocol.errors import CrowdtrainError

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

COORDINATOR_LAG_S = 8.0
"""The coordinator reads the swarm's step from the DHT every 5 s: state that is
further ahead is checked again after this long before it is refused."""

ATTACK_ENV = "CROWDTRAIN_TEST_ATTACK"
"""Test hook: ``nan``, ``scale``, ``weight`` or ``cycle`` makes this node a hostile peer."""

ATTACKS = ("nan", "scale", "weight")

# Reasons a part or a result is dropped; reports carry them to the coordinator.
MALFORMED, DTYPE, SHAPE, WEIGHT, NON_FINITE, NORM = (
    "malformed",
    "dtype",
    "shape",
    "weight",
    "non-finite",
    "norm",
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


def _norm(tensor: torch.Tensor) -> float:
    return float(tensor.float().norm())


@dataclass(frozen=True)
class GuardConfig:
    """What the averager processes need; copied into them when hivemind forks."""

    folder: Path
    unknown_max_weight: float
    attack: str = ""

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


class GuardedAllReduceRunner(AllReduceRunner):
    """An AllReduceRunner that checks every part and every result it receives.

    ``max_weight`` maps a sender to the largest weight it may claim. A sender
    whose part fails is banned for the round (its later parts are excluded,
    its earlier ones had passed), its stream is closed and it is reported; a
    reducer whose result fails is treated as failed (our own values are used
    for what it had not yet returned) and reported.

    Each part waits until every sender's part of the same slice is in (the
    reduction waits for them anyway), so that its size is judged against all
    of them: :func:`reference_norm`, :data:`CLIP_BOUND`, :data:`NORM_BOUND`.

    With ``exact_results`` the runner yields the averages themselves, not
    hivemind's differences (average minus our part), and every peer of the
    group receives the very same bytes for each slice: its reducer compresses
    the average once with its own compression, sends that to every sender and
    keeps the decompressed copy for itself. Peers that complete the round
    therefore hold bit-identical results, whatever the compression. A reducer
    that failed leaves our own part in its slice and counts in
    ``tensor_part_container.failed_size``: such a round is partial.
    """

    def __init__(
        self,
        *,
        guard: GuardConfig,
        max_weight: Callable[[PeerID], float],
        attack: str = "",
        exact_results: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self._guard, self._max_weight, self._attack = guard, max_weight, attack
        self._exact = exact_results
        # A failed reducer's slice then holds our own part (not a zero difference).
        self.tensor_part_container.return_deltas = not exact_results
        # part index -> the average of that slice as sent (exact_results only)
        self._serialized_averages: dict[int, asyncio.Task[runtime_pb2.Tensor]] = {}
        # part index -> sender index -> that part's norm (None: weight 0, not compared)
        self._norms: dict[int, dict[int, float | None]] = {}
        self._norms_complete: dict[int, asyncio.Event] = {}

    def _drop(self, peer_id: PeerID, reason: str, what: str) -> None:
        logger.warning("dropped averaging %s from peer %s: %s", what, peer_id.to_base58(), reason)
        self._guard.report(peer_id.to_base58(), reason)

    def _serialized_average(self, part_index: int, average: torch.Tensor) -> Any:
        """The slice's average compressed once (a task): every sender and we get these bytes."""
        task = self._serialized_averages.get(part_index)
        if task is None:
            container = self.tensor_part_container
            own_index = self.ordered_peer_ids.index(self.peer_id)
            info = container._input_parts_by_peer[own_index][part_index][1]
            loop = asyncio.get_event_loop()
            task = asyncio.ensure_future(
                loop.run_in_executor(
                    None,
                    lambda: container.compression.compress(average, info, allow_inplace=False),
                )
            )
            self._serialized_averages[part_index] = task
        return task

    def _complete(self, part_index: int) -> asyncio.Event:
        return self._norms_complete.setdefault(part_index, asyncio.Event())

    def _check_complete(self) -> None:
        for part_index, norms in self._norms.items():
            if all(
                index in norms or peer_id in self.banned_senders or peer_id == self.peer_id
                for index, peer_id in enumerate(self.sender_peer_ids)
            ):
                self._complete(part_index).set()

    async def _ban_sender(self, peer_id: PeerID) -> None:
        await super()._ban_sender(peer_id)
        self._check_complete()  # nobody waits for a banned sender's norms

    async def _reference(self, sender_index: int, part_index: int, norm: float | None) -> Any:
        """Record a part's norm, wait for the other senders', return the slice's reference."""
        self._norms.setdefault(part_index, {})[sender_index] = norm
        self._check_complete()
        finished = asyncio.create_task(self.tensor_part_reducer.finished.wait())
        complete = asyncio.create_task(self._complete(part_index).wait())
        try:
            await asyncio.wait({finished, complete}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            finished.cancel()
            complete.cancel()
        if self.tensor_part_reducer.finished.is_set():
            raise AllreduceException("all-reduce finished while a part waited for its peers")
        norms = [n for n in self._norms[part_index].values() if n is not None]
        if self.weight > 0 and part_index < len(self.parts_for_local_averaging):
            norms.append(_norm(self.parts_for_local_averaging[part_index]))
        return reference_norm(norms)

    async def _accumulate_parts_streaming(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        sender = self.sender_peer_ids[sender_index]
        max_weight = self._max_weight(sender)
        reducer = self.tensor_part_reducer
        part_index = 0
        try:
            loop = asyncio.get_event_loop()
            async for tensor_part, weight, part_compression in amap_in_executor(
                _deserialize_part,
                stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                if part_index >= reducer.num_parts:
                    self._drop(sender, SHAPE, "parts")
                    break
                problem = part_problem(
                    tensor_part, weight, reducer.part_shapes[part_index], max_weight
                )
                norm, reference = 0.0, None
                if problem is None:
                    norm = _norm(tensor_part)
                    # A zero-weight part changes nothing: it is neither judged nor a reference.
                    counted = norm if weight > 0 else None
                    reference = await self._reference(sender_index, part_index, counted)
                    if counted is not None:
                        problem = norm_problem(norm, reference)
                if problem is not None:
                    self._drop(sender, problem, "parts")
                    await self._ban_sender(sender)
                    yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
                    break
                scale = clip_scale(norm, reference) if weight > 0 else 1.0
                try:
                    averaged_part = await reducer.accumulate_part(
                        sender_index,
                        part_index,
                        tensor_part if scale == 1.0 else tensor_part * scale,
                        weight=weight,
                    )
                    part_index += 1
                except BannedException:
                    break  # banned meanwhile (a timeout): nothing more of it is needed

                if self._exact:
                    serialized = await self._serialized_average(part_index - 1, averaged_part)
                else:
                    # The sender adds this to what it sent, so it is relative to the unclipped part.
                    serialized = await loop.run_in_executor(
                        None,
                        lambda p=averaged_part, t=tensor_part, c=part_compression: (
                            serialize_torch_tensor(p - t, c)
                        ),
                    )
                yield averaging_pb2.AveragingData(
                    code=averaging_pb2.AVERAGED_PART, tensor_part=serialized
                )
        finally:
            if part_index != reducer.num_parts:
                await self._ban_sender(sender)

    async def _communicate_with_peer(self, peer_id: PeerID) -> None:
        """hivemind's exchange with one reducer, with each returned result checked."""
        if peer_id == self.peer_id:
            if self._exact:
                await self._reduce_own_slice()
            else:
                await super()._communicate_with_peer(peer_id)
            return
        container = self.tensor_part_container
        peer_index = self.ordered_peer_ids.index(peer_id)
        try:
            done_sending = asyncio.Event()
            inputs_aiter = attach_event_on_finished(
                self._generate_input_for_peer(peer_index), done_sending
            )
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs_aiter)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()

            part_index = 0
            async for delta, code in amap_in_executor(
                _deserialize_result,
                aiter_with_timeout(stream, self.reducer_timeout),
                max_prefetch=container.prefetch,
            ):
                if code != averaging_pb2.AVERAGED_PART:
                    raise AllreduceException(
                        f"{peer_id} sent {averaging_pb2.MessageCode.Name(code)}"
                    )
                sent = container._input_parts_by_peer[peer_index]
                if part_index >= len(sent):
                    raise AllreduceException(f"{peer_id} sent more parts than it was given")
                ours = sent[part_index][0]
                problem = result_problem(delta, ours.shape, ours if self.weight > 0 else None)
                if problem is not None:
                    self._drop(peer_id, problem, "results")
                    if peer_id in self.sender_peer_ids:
                        await self._ban_sender(peer_id)
                    raise AllreduceException(f"{peer_id} returned a bad result: {problem}")
                container.register_processed_part(peer_index, part_index, delta)
                part_index += 1

            if part_index != container.num_parts_by_peer[peer_index]:
                raise AllreduceException(
                    f"peer {peer_id} sent {part_index} parts, but we expected "
                    f"{container.num_parts_by_peer[peer_index]}"
                )
        except BaseException as e:
            if isinstance(e, Exception):
                logger.debug("caught %r when communicating with %s", e, peer_id, exc_info=True)
            container.register_failed_reducer(peer_index)
            raise

    async def _reduce_own_slice(self) -> None:
        """Our own slice in exact mode: keep the average exactly as the other senders get it."""
        container = self.tensor_part_container
        peer_index = self.ordered_peer_ids.index(self.peer_id)
        sender_index = self.sender_peer_ids.index(self.peer_id)
        loop = asyncio.get_event_loop()
        for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
            averaged_part = await self.tensor_part_reducer.accumulate_part(
                sender_index, part_index, tensor_part, weight=self.weight
            )
            serialized = await self._serialized_average(part_index, averaged_part)
            average = await loop.run_in_executor(None, deserialize_torch_tensor, serialized)
            container.register_processed_part(peer_index, part_index, average)

    async def _generate_input_for_peer(
        self, peer_index: int
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for message in super()._generate_input_for_peer(peer_index):
            if self._attack:
                _corrupt(message, self._attack)
            yield message


def _deserialize_part(
    message: averaging_pb2.AveragingData,
) -> tuple[torch.Tensor | None, float, Any]:
    try:
        part = deserialize_torch_tensor(message.tensor_part)
    except Exception:  # any garbage a peer sends is a malformed part, never a crash
        part = None
    return part, message.weight, message.tensor_part.compression


def _deserialize_result(message: averaging_pb2.AveragingData) -> tuple[torch.Tensor | None, int]:
    if message.code != averaging_pb2.AVERAGED_PART:
        return None, message.code
    try:
        return deserialize_torch_tensor(message.tensor_part), message.code
    except Exception:
        return None, message.code


def _corrupt(message: averaging_pb2.AveragingData, attack: str) -> None:
    """Test hook: turn an honest outgoing part into a hostile one, in place."""
    if attack == "weight":
        message.weight = max(message.weight, 1.0) * 100
        return
    part = deserialize_torch_tensor(message.tensor_part)
    part = torch.full_like(part, math.nan) if attack == "nan" else part * -1000
    message.tensor_part.CopyFrom(serialize_torch_tensor(part))


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
        # The coordinator may not have read the latest steps yet: ask again once.
        time.sleep(guard.coordinator_lag_s)
        later = guard.coordinator_step()
        if later is None or epoch > later + STEP_TOLERANCE:
            return f"its step {epoch} is ahead of the coordinator's step {later or step}"
    if len(tensors) < len(main_parameters):
        return f"it holds {len(tensors)} tensors, fewer than the model's {len(main_parameters)}"
    for ours, theirs in zip(main_parameters, tensors, strict=False):
        if theirs.shape != ours.shape or not theirs.dtype.is_floating_point:
            return "its parameters do not fit this model"
        if not bool(torch.isfinite(theirs).all()):
            return "its parameters are not finite"
    expected = guard.checkpoint_sha256(epoch)
    if expected is None:
        return None
    theirs = guard.named_state(main_parameters, tensors)
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


def _no_step() -> int | None:
    return None


def _no_checkpoint(step: int) -> Any:
    return None


class SwarmGuard:
    """The trainer's side of the guard: allowances in, reports out, state checks configured.

    ``coordinator_step()`` gives the step the coordinator recorded (None when
    unknown), ``checkpoint_sha256(step)`` the :func:`params_sha256` of the
    coordinator's checkpoint of ``step`` (None when it has none) and
    ``checkpoint_state(step)`` its tensors (None when unavailable). ``named_parameters`` names the model's
    parameters (tied ones under each name) for hashing downloaded state.
    Start it before hivemind: a previous session's files are removed.
    """

    def __init__(self, folder: Path, target_batch_size: int):
        folder.mkdir(parents=True, exist_ok=True)
        attack = os.environ.get(ATTACK_ENV, "")
        if attack and attack not in (*ATTACKS, "cycle"):
            raise CrowdtrainError(
                f"{ATTACK_ENV}={attack!r}: use one of {', '.join(ATTACKS)} or cycle, or unset it"
            )
        if attack:
            logger.warning(
                "!!! %s=%s: THIS NODE IS A HOSTILE TEST PEER and corrupts what it sends "
                "to the swarm; never set this outside tests !!!",
                ATTACK_ENV,
                attack,
            )
        # A fast honest peer can collect more than the target in one round (1.5x seen
        # on loopback), so a peer the roster does not list yet may claim twice it.
        self.config = GuardConfig(folder, 2.0 * target_batch_size, attack)
        self.config.reports_path.unlink(missing_ok=True)
        self.config.roster_path.unlink(missing_ok=True)
        self._offset = 0
        self._lock = threading.Lock()
        self.coordinator_step: Callable[[], int | None] = _no_step
        self.checkpoint_sha256: Callable[[int], str | None] = _no_checkpoint
        self.checkpoint_state: Callable[[int], dict[str, torch.Tensor] | None] = _no_checkpoint
        self.named_parameters: list[tuple[str, torch.Tensor]] = []
        self.coordinator_lag_s = COORDINATOR_LAG_S

    def update_roster(self, roster: dict[str, float]) -> None:
        """Set each peer's largest averaging weight (``{dht_peer_id: max_weight}``).

        Takes effect from the next averaging round. Peers not listed may claim
        up to twice the run's target batch size.
        """
        tmp = self.config.roster_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({str(k): float(v) for k, v in roster.items()}))
        os.replace(tmp, self.config.roster_path)

    def drain_reports(self) -> list[dict[str, Any]]:
        """Senders dropped since the last call: ``{dht_peer_id, reason, count}``, largest first."""
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
        reports = [
            {"dht_peer_id": peer, "reason": reason, "count": count}
            for (peer, reason), count in counts.items()
        ]
        reports.sort(key=lambda r: -r["count"])
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
    "ATTACK_ENV",
    "CLIP_BOUND",
    "NORM_BOUND",
    "STEP_TOLERANCE",
    "GuardConfig",
    "GuardedAllReduceRunner",
    "SwarmGuard",
    "clip_scale",
    "norm_problem",
    "part_problem",
    "reference_norm",
    "result_problem",
    "state_distance",
    "state_problem",
]
