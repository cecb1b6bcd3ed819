"""hivemind's all-reduce with the guard's checks: :class:`GuardedAllReduceRunner`.

Overrides hivemind 1.1.12's AllReduceRunner internals (pinned in pyproject):
every part a sender streams in and every result a reducer returns passes
the checks of :mod:`crowdtrain.node.swarm.guard` before it is used.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import (
    aiter_with_timeout,
    amap_in_executor,
    attach_event_on_finished,
)

from crowdtrain.node.swarm.guard import (
    AGAINST,
    FAR,
    SHAPE,
    GuardConfig,
    _norm,
    clip_scale,
    norm_problem,
    part_problem,
    reference_norm,
    result_problem,
    slice_problem,
)
from crowdtrain.node.swarm.robust import aggregate
from crowdtrain.protocol.runspec import TrustSection

logger = logging.getLogger(__name__)

FLIP = -9.9
"""The ``flip`` test attack's factor: a sign flip just inside the guard's CLIP_BOUND."""

HOSTILE_RESULT = -100.0
"""The ``reducer`` test attack's factor: what a hostile reducer returns, times the average.
Inside the bound on a result's norm (RESULT_NORM_BOUND times our part)."""

PART_ATTACKS = ("nan", "scale", "weight", "flip")
"""The test attacks on what a sender sends (``reducer`` is on what a reducer returns)."""


class _RefusedSlice(AllreduceException):
    """A reducer whose slice we do not take: flagged, or its results point against ours."""


class _RobustPartReducer(TensorPartReducer):
    """hivemind's reducer, combining each slice's parts by the run's ``[trust]`` rule.

    hivemind adds each part into a running weighted sum as it comes; here each
    part is kept until every current sender's is in, then :func:`aggregate`
    combines them (the weighted mean under ``aggregation = "mean"``). A slice
    nobody gave any weight averages to zero: hivemind would hand every member
    0/0 = NaN when every part weighs 0 (the keeper's step follower and a node
    tagging along with nothing accumulated); the step follower takes an all-zero
    average as a step it did not get. ``far(sender_index, count, judged)`` hears,
    once the last part is reduced, of each sender most of whose judged parts (``count``
    of ``judged``) lay more than ``trust.report_distance`` clip radii from their
    results: an honest part can stray on one part of a slice (its batch's own data); a
    hostile sender's lie on every part.
    """

    def __init__(
        self,
        part_shapes: Sequence[torch.Size],
        num_senders: int,
        trust: TrustSection,
        far: Callable[[int, int, int], None],
    ):
        self._trust, self._far = trust, far
        self._parts: dict[int, tuple[torch.Tensor, float]] = {}
        self._judged = [0] * num_senders  # parts of each sender judged by their distance
        self._far_parts = [0] * num_senders  # and of those, found far
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        self._parts = {}
        super().reset_accumulators()

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        # hivemind 1.1.12's TensorPartReducer.accumulate_part, keeping the part.
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait(
                {self.current_part_future, asyncio.create_task(self.finished.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self.finished.is_set():
                raise AllreduceException("attempted to aggregate part in a finalized reducer")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self._parts[sender_index] = (tensor_part, float(weight))
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self) -> None:
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from != self.num_current_senders:
            return
        senders = sorted(self._parts)
        if senders:
            result = aggregate(
                [self._parts[i][0] for i in senders],
                [self._parts[i][1] for i in senders],
                self._trust,
            )
            average = result.value
            if result.judged:
                for i, distance in zip(senders, result.distances, strict=True):
                    if self._parts[i][1] > 0:
                        self._judged[i] += 1
                        self._far_parts[i] += distance > self._trust.report_distance
        else:
            average = torch.zeros(self.part_shapes[self.current_part_index])
        self.current_part_future.set_result(average)
        if self.current_part_index == self.num_parts - 1:
            for i, (far, judged) in enumerate(zip(self._far_parts, self._judged, strict=True)):
                if 2 * far > judged:
                    self._far(i, far, judged)
        self.reset_accumulators()


class GuardedAllReduceRunner(AllReduceRunner):
    """An AllReduceRunner that checks every part and every result it receives.

    ``max_weight`` maps a sender to the most weight its parts count for (0: refused);
    a claim above it and up to ``max_claim`` counts at it, a claim above both is
    refused (``max_claim`` 0: every claim above ``max_weight`` is). A sender
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

    tensor_part_reducer: TensorPartReducer  # hivemind's attribute

    def __init__(
        self,
        *,
        guard: GuardConfig,
        max_weight: Callable[[PeerID], float],
        max_claim: float = 0.0,
        attack: str = "",
        exact_results: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        # In place of hivemind's reducer, unused yet: finished quietly (one that finishes
        # having received nothing warns "Reducer: received 0.0% of input tensors").
        self.tensor_part_reducer.current_part_future.cancel()
        self.tensor_part_reducer.finished.set()
        self.tensor_part_reducer = _RobustPartReducer(
            tuple(part.shape for part in self.parts_for_local_averaging),
            len(self.sender_peer_ids),
            guard.trust,
            self._far,
        )
        self._guard, self._max_weight, self._attack = guard, max_weight, attack
        self._max_claim = max_claim
        self._exact = exact_results
        # A failed reducer's slice then holds our own part (not a zero difference).
        self.tensor_part_container.return_deltas = not exact_results
        # part index -> the average of that slice as sent (exact_results only)
        self._serialized_averages: dict[int, asyncio.Task[runtime_pb2.Tensor]] = {}
        # part index -> sender index -> that part's norm (None: weight 0, not compared)
        self._norms: dict[int, dict[int, float | None]] = {}
        self._norms_complete: dict[int, asyncio.Event] = {}
        if self.weight == 0 and not guard.reference_parts and not exact_results:
            # (how often this happens is worth knowing: the results of such a round are
            # taken unjudged, whatever a group of two made of a flip)
            logger.info(
                "averaging round with nothing of ours in it (weight 0): its results are "
                "taken unjudged"
            )

    def _far(self, sender_index: int, far: int, judged: int) -> None:
        """Most of a sender's parts lay far from our slice's robust results: reported."""
        peer_id = self.sender_peer_ids[sender_index]
        if peer_id == self.peer_id:
            return
        logger.warning(
            "averaging parts from peer %s lay more than %.0f clip radii from our slice's "
            "%s in %d of %d parts",
            peer_id.to_base58(),
            self._guard.trust.report_distance,
            self._guard.trust.aggregation,
            far,
            judged,
        )
        self._guard.report(peer_id.to_base58(), FAR)

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
        refused_above = max(max_weight, self._max_claim) if max_weight > 0 else 0.0
        reducer = self.tensor_part_reducer
        part_index = 0
        try:
            loop = asyncio.get_event_loop()
            async for tensor_part, weight, part_compression in amap_in_executor(
                _deserialize_part,
                self._received(stream),
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                if part_index >= reducer.num_parts:
                    self._drop(sender, SHAPE, "parts")
                    break
                problem = part_problem(
                    tensor_part, weight, reducer.part_shapes[part_index], refused_above
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
                        weight=min(weight, max_weight),  # what the sender's work backs
                    )
                    part_index += 1
                except BannedException:
                    break  # banned meanwhile (a timeout): nothing more of it is needed

                if self._attack == "reducer":
                    serialized = await loop.run_in_executor(
                        None,
                        _serialize_delta,
                        averaged_part * HOSTILE_RESULT,
                        torch.zeros_like(tensor_part) if self._exact else tensor_part,
                        part_compression,
                    )
                elif self._exact:
                    serialized = await self._serialized_average(part_index - 1, averaged_part)
                else:
                    # The sender adds this to what it sent, so it is relative to the unclipped part.
                    serialized = await loop.run_in_executor(
                        None, _serialize_delta, averaged_part, tensor_part, part_compression
                    )
                reply = averaging_pb2.AveragingData(
                    code=averaging_pb2.AVERAGED_PART, tensor_part=serialized
                )
                self._guard.count("averaging", sent=reply.ByteSize())
                yield reply
        finally:
            if part_index != reducer.num_parts:
                await self._ban_sender(sender)

    async def _communicate_with_peer(self, peer_id: PeerID) -> None:
        """hivemind's exchange with one reducer, with each returned result checked."""
        if peer_id == self.peer_id:
            if self._exact:
                await self._reduce_own_slice()
            else:
                await self._reduce_and_judge_own_slice()
            return
        container = self.tensor_part_container
        peer_index = self.ordered_peer_ids.index(peer_id)
        try:
            if self.weight > 0 and not self._exact and self._max_weight(peer_id) <= 0:
                # Flagged or banned (the coordinator's roster bounds it to nothing): neither
                # our parts nor its results (_RefusedSlice). Not in exact rounds (a partial
                # one fails for the whole group) nor with nothing of our own in the round.
                raise _RefusedSlice(f"{peer_id} is flagged: we step on nothing in its slice")
            done_sending = asyncio.Event()
            inputs_aiter = attach_event_on_finished(
                self._generate_input_for_peer(peer_index), done_sending
            )
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs_aiter)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()

            # Under the mean a hostile sender moves an honest reducer's result anywhere, so
            # a result against ours would not tell who lied; the robust rules keep it with
            # the honest majority. Nothing of ours weighed in (weight 0): nothing to judge
            # by, unless our parts are a reference (GuardConfig.reference_parts). Exact
            # rounds (DiLoCo) are judged whole, by the held-out loss of the global
            # parameters they give (crowdtrain.node.swarm.round_judge): refusing one slice
            # there fails the round for us, and a peer whose rounds keep failing falls
            # behind its group (seen in the three-peer DiLoCo sign-flip test).
            judged = self._judges_results
            part_index = 0
            # A judged slice is taken in only once it is whole (slice_problem below).
            results: list[torch.Tensor] = []
            async for delta, code in amap_in_executor(
                _deserialize_result,
                self._received(aiter_with_timeout(stream, self.reducer_timeout)),
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
                    raise _RefusedSlice(f"{peer_id} returned a bad result: {problem}")
                if judged:
                    results.append(delta)
                else:
                    container.register_processed_part(peer_index, part_index, delta)
                part_index += 1

            if part_index != container.num_parts_by_peer[peer_index]:
                raise AllreduceException(
                    f"peer {peer_id} sent {part_index} parts, but we expected "
                    f"{container.num_parts_by_peer[peer_index]}"
                )
            if judged:
                ours = [part for part, _ in container._input_parts_by_peer[peer_index]]
                # the results are deltas from what we sent
                averages = [d + o for d, o in zip(results, ours, strict=True)]
                problem = slice_problem(averages, ours)
                if problem == AGAINST:  # refused, but an honest reducer can return it
                    logger.warning(
                        "refused averaging results from peer %s: against our own parts (the "
                        "mean of too few parts can give it; not reported)",
                        peer_id.to_base58(),
                    )
                elif problem is not None:
                    self._drop(peer_id, problem, "results")
                    if peer_id in self.sender_peer_ids:
                        await self._ban_sender(peer_id)
                if problem is not None:
                    raise _RefusedSlice(f"{peer_id} returned results against ours: {problem}")
            for index, delta in enumerate(results):
                container.register_processed_part(peer_index, index, delta)
        except BaseException as e:
            if isinstance(e, Exception):
                logger.debug("caught %r when communicating with %s", e, peer_id, exc_info=True)
            if container.finished.is_set():  # finalized (a timeout): its parts are gone
                raise
            if isinstance(e, _RefusedSlice):
                self._step_on_nothing(peer_index)
            else:
                container.register_failed_reducer(peer_index)
            raise

    def _step_on_nothing(self, peer_index: int) -> None:
        """A refused slice: its average is taken as zero (the delta from our part is minus
        our part). Every honest sender refuses a hostile reducer's results (each by its own
        parts), and stepping on nothing there keeps them in step with each other; each
        keeping its own part, as after a reducer that failed, moved each its own way, and
        they stayed apart for good (spot checks then judge a node by parameters it never
        held)."""
        container = self.tensor_part_container
        start = container._outputs_registered_by_peer[peer_index]
        for index, (part, _) in enumerate(container._input_parts_by_peer[peer_index]):
            if index >= start:
                nothing = -part if container.return_deltas else torch.zeros_like(part)
                container.register_processed_part(peer_index, index, nothing)
                container.failed_size += part.numel()

    @property
    def _judges_results(self) -> bool:
        """Whether the results for a slice are judged against our own parts of it (see
        _communicate_with_peer): not under the mean, in exact rounds, or with nothing of
        ours in the round unless our parts are a reference."""
        reference = self.weight > 0 or self._guard.reference_parts
        return reference and not self._exact and self._guard.trust.aggregation != "mean"

    async def _reduce_and_judge_own_slice(self) -> None:
        """Our own slice outside exact mode, judged as another reducer's results are.

        The robust rules cannot outvote anyone in a group of two: ours and a part flipped
        within CLIP_BOUND average against ours (seen in fresh-clone CI, where an honest
        node's validation loss went from 3.9 to 6.8 in a round met by the sign-flipper
        alone). The senders get the result as it is (each judges it by its own parts) and
        nobody is blamed (we reduced it), but we step on nothing in our own slice, as in
        any other reducer's whose results point against ours."""
        container = self.tensor_part_container
        peer_index = self.ordered_peer_ids.index(self.peer_id)
        sender_index = self.sender_peer_ids.index(self.peer_id)
        ours = self.parts_for_local_averaging
        averages = [
            await self.tensor_part_reducer.accumulate_part(
                sender_index, part_index, part, weight=self.weight
            )
            for part_index, part in enumerate(ours)
        ]
        if self._judges_results and slice_problem(averages, ours) is not None:
            logger.warning(
                "refused our own slice's averaging results: against our own parts (the "
                "robust rule had too few parts to outvote one; not reported)"
            )
            self._step_on_nothing(peer_index)
            return
        for part_index, (average, part) in enumerate(zip(averages, ours, strict=True)):
            container.register_processed_part(peer_index, part_index, average - part)

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
            if self._attack in PART_ATTACKS:
                _corrupt(message, self._attack)
            self._guard.count("averaging", sent=message.ByteSize())
            yield message

    async def _received(
        self, stream: AsyncIterator[averaging_pb2.AveragingData]
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for message in stream:
            self._guard.count("averaging", received=message.ByteSize())
            yield message


def _serialize_delta(average: torch.Tensor, sent: torch.Tensor, compression: Any) -> Any:
    return serialize_torch_tensor(average - sent, compression)


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
    if attack == "nan":
        part = torch.full_like(part, math.nan)
    else:
        part = part * (FLIP if attack == "flip" else -1000)
    message.tensor_part.CopyFrom(serialize_torch_tensor(part))


__all__ = ["GuardedAllReduceRunner"]
