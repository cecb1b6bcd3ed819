"""hivemind's averagers with the guard's checks built in.

Each averages with :class:`~crowdtrain.node.swarm.allreduce.GuardedAllReduceRunner`;
:class:`GuardedStateAverager` also refuses downloaded state the coordinator
disagrees with; :class:`DiLoCoAverager` averages DiLoCo's pseudo-gradients with
exact results and serves its global state. The RPC names stay hivemind's, so
a plain hivemind averager can still download a peer's state; averaging rounds
are ours alone (exact rounds send averages where hivemind sends differences),
so every peer of a run must run crowdtrain. Everything here overrides
hivemind 1.1.12 internals (pinned in pyproject).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import typing
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AveragingMode
from hivemind.averaging.control import StepControl
from hivemind.averaging.group_info import GroupInfo
from hivemind.compression import deserialize_torch_tensor
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture, ValueWithExpiration, get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout, as_aiter, azip
from hivemind.utils.streaming import combine_from_streaming

from crowdtrain.node.device.hooks import ATTACKS
from crowdtrain.node.swarm.allreduce import GuardedAllReduceRunner
from crowdtrain.node.swarm.guard import GuardConfig, SwarmGuard, state_problem

logger = logging.getLogger(__name__)

STEP_KEY = "step"  # the gathered key of a sync gradient round's step
SERVE_WAIT_S = 5.0  # how long served sync state waits for an optimizer step under way
# The round (hivemind's StepControl) that the averager's task is running.
_ROUND: ContextVar[StepControl] = ContextVar("crowdtrain_round")


class _GuardedAllReduceMixin(DecentralizedAverager):
    """Runs each all-reduce round with :class:`GuardedAllReduceRunner`.

    Subclasses set ``_guard_config``, ``_guard_roster`` (weights are bounded by
    the roster, else by 1, hivemind's default weight) and ``_guard_attacks``
    before hivemind forks the averager process in ``__init__``. With
    ``_guard_exact`` the averaged tensors are replaced by the group's exact
    average (see :class:`GuardedAllReduceRunner`'s ``exact_results``) only
    when every reducer answered; a partial round raises AllreduceException
    and leaves the tensors as they were.
    """

    _guard_config: GuardConfig
    _guard_roster: bool
    _guard_attacks: bool
    _guard_round: int = 0
    _guard_exact: bool = False
    # Sync gradient rounds are tagged with their step: each member gathers the step
    # whose gradients it brings (set by the optimizer, in the main process, before each
    # round), and a partial round is not retried.
    _guard_tags_steps: bool = False
    _guard_step_of_round: int | None = None
    # A round whose reducers did not all answer fails (after the slices that came were
    # applied) and is not retried: for a peer that must know it missed the swarm's step.
    _guard_fail_partial: bool = False

    def step(self, *args: Any, gather: Any = None, **kwargs: Any) -> Any:
        # hivemind's GradientAverager.step and .schedule_step both come here.
        if gather is None and self._guard_tags_steps:
            gather = {STEP_KEY: self._guard_step_of_round}
        return super().step(*args, gather=gather, **kwargs)

    # Each peer's weight bound as the running round started (the roster is read once a
    # round): the group it joins, whom it lets in and whose parts and results it takes.
    _guard_weights: Callable[[PeerID], float] | None = None

    async def _step(self, *, step: StepControl, **kwargs: Any) -> None:
        _ROUND.set(step)  # for _no_retries, in this task and the ones it starts
        self._guard_weights = self._guard_max_weight()
        self._guard_matchmaking()
        await super()._step(step=step, **kwargs)

    def _guard_round_weights(self) -> Callable[[PeerID], float]:
        """The running round's weight bounds (read now before any round ran)."""
        if self._guard_weights is None:
            self._guard_weights = self._guard_max_weight()
        return self._guard_weights

    def _guard_flagged(self, peer_id: PeerID) -> bool:
        """The coordinator's roster bounds the peer to nothing (flagged or banned)."""
        return self._guard_roster and self._guard_round_weights()(peer_id) <= 0

    def _guard_matchmaking(self) -> None:
        """Groups without flagged peers: we do not ask a flagged leader to take us in (and
        :meth:`rpc_join_group` turns flagged peers away). Its parts would be refused for
        their weight anyway, but as a member it would still reduce a slice of ours, and
        the keeper's follower, which sends no gradient, cannot judge a reducer's results.
        Set on hivemind's Matchmaking, which the averager process builds at its start."""
        matchmaking = self._matchmaking
        if getattr(matchmaking, "_crowdtrain_guarded", False):
            return
        request_join_group = matchmaking._request_join_group

        async def unless_flagged(leader: PeerID) -> Any:
            if self._guard_flagged(leader):
                logger.debug("not joining the group of flagged peer %s", leader.to_base58())
                return None
            return await request_join_group(leader)

        setattr(matchmaking, "_request_join_group", unless_flagged)  # noqa: B010
        setattr(matchmaking, "_crowdtrain_guarded", True)  # noqa: B010

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> typing.AsyncIterator[averaging_pb2.MessageFromLeader]:  # noqa: UP006
        # hivemind's, turning flagged peers away (see _guard_matchmaking). A streamed
        # answer is told by typing.AsyncIterator's hint, as in rpc_download_state.
        if self._guard_flagged(context.remote_id):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    def _no_retries(self) -> None:
        """Make the running round's failure final: hivemind would look for a new group
        within the same deadline, which for a sync peer is the next step's group."""
        step = _ROUND.get(None)
        if step is not None:
            step._allow_retries = False  # hivemind's StepControl keeps it private

    def _guard_max_claim(self) -> float:
        """Claims above a sender's bound and up to this count at its bound (the roster
        caps weights by verified work); 0: a claim above the bound is refused."""
        return self._guard_config.max_claim if self._guard_roster else 0.0

    def _guard_max_weight(self) -> Callable[[PeerID], float]:
        if not self._guard_roster:
            return lambda peer_id: 1.0
        roster = self._guard_config.read_roster()
        default = self._guard_config.unknown_max_weight
        return lambda peer_id: roster.get(peer_id.to_base58(), default)

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> typing.AsyncIterator[averaging_pb2.DownloadData]:  # noqa: UP006
        # hivemind's, with the bytes this peer serves counted as state traffic. hivemind
        # tells a streamed answer by typing.AsyncIterator's hint (not collections.abc's).
        async for message in super().rpc_download_state(request, context):
            self._guard_config.count("state", sent=message.ByteSize())
            yield message

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None) -> Any:
        # Counted by the tensors' decoded size (hivemind sends state uncompressed).
        loaded = super().load_state_from_peers(wait=wait, timeout=timeout)
        if wait and loaded is not None:
            size = sum(t.numel() * t.element_size() for t in loaded[1])
            self._guard_config.count("state", received=size)
        return loaded

    def _guard_next_attack(self) -> str:
        attack = self._guard_config.attack if self._guard_attacks else ""
        if attack == "cycle":
            attack = ATTACKS[self._guard_round % len(ATTACKS)]
        self._guard_round += 1
        return attack

    async def _run_allreduce_inplace_(
        self,
        tensors: Sequence[torch.Tensor],
        group_info: GroupInfo,
        group_id: bytes | None = None,
        **kwargs: Any,
    ) -> None:
        # hivemind's DecentralizedAverager._run_allreduce_inplace_ with our runner.
        group_id = group_info.group_id if group_id is None else group_id
        runner = GuardedAllReduceRunner(
            guard=self._guard_config,
            max_weight=self._guard_round_weights(),
            max_claim=self._guard_max_claim(),
            attack=self._guard_next_attack(),
            exact_results=self._guard_exact,
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        assert group_id in self._running_groups, f"group {group_id!r} was not registered"
        self._running_groups[group_id].set_result(runner)

        if self._guard_exact:
            await self._replace_with_exact_average(tensors, runner)
        elif runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, update in azip(as_aiter(*tensors), runner):
                tensor.add_(update, alpha=self._averaging_alpha)
                self.last_updated = get_dht_time()
                self._state_updated.set()
            container = runner.tensor_part_container
            if self._guard_fail_partial and container.failed_size > 0:
                self._no_retries()
                raise AllreduceException(
                    f"partial round: {container.failed_size} of {container.total_size} "
                    "values were not averaged by their reducer"
                )
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")

    async def _replace_with_exact_average(
        self, tensors: Sequence[torch.Tensor], runner: GuardedAllReduceRunner
    ) -> None:
        # Gathered first (one extra copy of the tensors for the round): a partial round
        # must leave the tensors untouched, as hivemind may retry with them.
        averages = [average async for average in runner]
        container = runner.tensor_part_container
        if container.failed_size > 0:
            if self._guard_tags_steps:
                # the members that got every slice already took this step's result
                self._no_retries()
            raise AllreduceException(
                f"partial round: {container.failed_size} of {container.total_size} values "
                "were not averaged by their reducer"
            )
        for tensor, average in zip(tensors, averages, strict=True):
            tensor.copy_(average)
        self.last_updated = get_dht_time()
        self._state_updated.set()


class GuardedGradientAverager(GradientAverager, _GuardedAllReduceMixin):
    """hivemind's GradientAverager whose rounds check what groupmates send. With
    ``exact`` (a run's ``[swarm] strict_steps``) they end exact: every member of a round
    gets the same averaged gradients, a partial round fails (hivemind would leave each
    member its own gradients in the failed slices) and is not retried, and each member
    gathers the step it brings gradients of. With ``fail_partial`` (the keeper's step
    follower, in either mode) a partial round fails too, so that it knows it did not
    take the swarm's step.

    Weights are samples, bounded by the roster; the test attack hooks apply here.
    """

    def __init__(
        self,
        *args: Any,
        guard: GuardConfig,
        exact: bool = False,
        fail_partial: bool = False,
        **kwargs: Any,
    ):
        self._guard_config, self._guard_roster, self._guard_attacks = guard, True, True
        self._guard_exact = self._guard_tags_steps = exact
        self._guard_fail_partial = fail_partial
        super().__init__(*args, **kwargs)

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        # hivemind names RPCs after the class: keep hivemind's names.
        return GradientAverager._get_handle_name(namespace, method_name)


MAX_STATE_SOURCES = 3
"""How many peers a state download tries, each after the previous one's state was refused."""

STATE_CHUNK_TIMEOUT_S = 10.0
"""A state download waits at least this long for each next chunk (64 KiB) before it gives
the serving peer up; the whole download still ends at its own timeout (the spec's
``load_state_timeout_s``). hivemind waits the averaging request timeout (1 s in the
default spec), which a 64 KiB chunk exceeds on a slow or saturated uplink: at the lab's
scaled 10 Mbit/s (23.6 KB/s, 2.8 s a chunk) the keeper's step follower gave up all of its
21 downloads from nodes in 75 s, each after the node's uplink had carried part of the
state for nothing. A peer that stalls is still given up within this long."""


class _StateCheckMixin(DecentralizedAverager):
    """Refuses downloaded state that disagrees with the coordinator (the check runs in the
    trainer) and then downloads from the next peer by priority, up to MAX_STATE_SOURCES:
    hivemind takes the state of the peer announcing the highest priority, so one hostile
    peer announcing the top priority used to stop every newcomer from loading any."""

    _swarm_guard: SwarmGuard
    last_refusal: str | None = None

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None) -> Any:
        self.last_refusal = None
        if not wait:
            return super().load_state_from_peers(wait=wait, timeout=timeout)
        refused: list[str] = []
        for _ in range(MAX_STATE_SOURCES):
            future: MPFuture = MPFuture()
            self._outer_pipe.send(
                (
                    "_load_state_from_peers",
                    [],
                    dict(timeout=timeout, future=future, skip=tuple(refused), with_source=True),
                )
            )
            found = future.result(timeout=timeout)
            if found is None:
                return None  # nobody (else) served state; last_refusal says why, if refused
            metadata, tensors, source = found
            size = sum(t.numel() * t.element_size() for t in tensors)
            self._guard_config.count("state", received=size)  # type: ignore[attr-defined]
            try:
                main = self.main_parameters  # type: ignore[attr-defined]
                problem = state_problem(self._swarm_guard, main, metadata, tensors)
            except Exception as e:  # the coordinator or keeper may be away: refuse nothing
                logger.warning("could not check the downloaded state (%s); accepting it", e)
                problem = None
            if problem is None:
                self.last_refusal = None
                return metadata, tensors
            self.last_refusal = problem
            logger.warning("refused the state downloaded from peer %s: %s", source, problem)
            refused.append(source)
        return None

    async def _load_state_from_peers(
        self,
        future: MPFuture,
        timeout: float | None = None,
        skip: Sequence[str] = (),
        with_source: bool = False,
    ) -> None:
        # hivemind 1.1.12's DecentralizedAverager._load_state_from_peers (in the averager
        # process), passing over the peers in ``skip`` (base58) and, ``with_source``,
        # giving (metadata, tensors, the peer's base58 id); each chunk may take
        # STATE_CHUNK_TIMEOUT_S.
        if timeout is not None:
            chunk = (
                self.next_chunk_timeout
                if self.next_chunk_timeout is not None
                else self.request_timeout
            )
            timeout = min(timeout, max(chunk, STATE_CHUNK_TIMEOUT_S))
        try:
            key_manager = self._matchmaking.group_key_manager
            found, _ = self.dht.get(f"{key_manager.prefix}.all_averagers", latest=True) or (
                {},
                None,
            )
            priority = {
                PeerID(peer_id): (float(info.value), random.random())  # random breaks ties
                for peer_id, info in (found.items() if isinstance(found, dict) else ())
                if isinstance(info, ValueWithExpiration) and isinstance(info.value, float | int)
            }
            for peer in sorted(priority, key=priority.__getitem__, reverse=True):
                if peer == self.peer_id or peer.to_base58() in skip:
                    continue
                try:
                    loaded = await self._download_state(peer, timeout)
                except Exception as e:
                    logger.warning("could not download state from %s (%r)", peer, e)
                    continue
                if loaded is None:
                    continue
                metadata, tensors = loaded
                future.set_result(
                    (metadata, tensors, peer.to_base58()) if with_source else (metadata, tensors)
                )
                return
        finally:
            if not future.done():
                future.set_result(None)

    async def _download_state(
        self, peer: PeerID, timeout: float | None
    ) -> tuple[Any, list[torch.Tensor]] | None:
        """One peer's served state (hivemind's stream of it), or None when it sent none."""
        stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
        stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
        metadata: Any = None
        parts: list[Any] = []
        tensors: list[torch.Tensor] = []
        async for message in aiter_with_timeout(stream, timeout=timeout):
            if message.metadata:
                metadata = self.serializer.loads(message.metadata)
            if message.tensor_part.dtype and parts:  # a new tensor begins
                tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                parts = []
            parts.append(message.tensor_part)
        if parts:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
        return (metadata, tensors) if metadata else None


class GuardedStateAverager(TrainingStateAverager, _StateCheckMixin, _GuardedAllReduceMixin):
    """hivemind's TrainingStateAverager with checked state downloads and checked rounds."""

    # How far below the priority it is given this peer announces its state: a peer out
    # of step (GuardedOptimizer) sets it before hivemind announces its new step, so that
    # no peer loads its state meanwhile.
    priority_discount = 0.0

    def __init__(self, *, swarm_guard: SwarmGuard, **kwargs: Any):
        self._swarm_guard = swarm_guard
        self._guard_config = swarm_guard.config
        self._guard_roster = self._guard_attacks = False
        self._serving = threading.RLock()  # held by step(); taken to serve a consistent state
        super().__init__(**kwargs)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        with self._serving:
            return super().step(*args, **kwargs)

    def get_current_state(self) -> Any:
        # hivemind counts the new step (local_epoch) before its optimizer step has updated
        # the parameters it serves (in a background executor): a peer downloading then gets
        # one step's parameters labelled with the next. Serve once that update is done
        # (within SERVE_WAIT_S; then as hivemind would).
        give_up_at = time.monotonic() + SERVE_WAIT_S
        while True:
            with self._serving:
                busy = any(not update.done() for update in self.pending_updates)
                if not busy or time.monotonic() >= give_up_at:
                    return super().get_current_state()
            time.sleep(0.01)

    @property
    def state_sharing_priority(self) -> float:
        return DecentralizedAverager.state_sharing_priority.__get__(self)

    @state_sharing_priority.setter
    def state_sharing_priority(self, value: float) -> None:
        DecentralizedAverager.state_sharing_priority.__set__(self, value - self.priority_discount)

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        return TrainingStateAverager._get_handle_name(namespace, method_name)


class DiLoCoAverager(_GuardedAllReduceMixin):
    """Averages pseudo-gradients exactly (every peer of a round gets the same bytes) and
    serves the global state. Its RPCs keep hivemind's DecentralizedAverager names, so a
    plain client-mode DecentralizedAverager (the keeper's) can download that state.

    Weights are the sequences a peer trained in the round, bounded by the roster's
    allowance (in sequences per sync step) times ``weight_scale`` (the inner steps
    per round), or unbounded without a roster.
    """

    def __init__(
        self,
        *,
        averaged_tensors: Sequence[torch.Tensor],
        guard: GuardConfig,
        use_roster: bool,
        weight_scale: float,
        current_state: Callable[[], tuple[Any, Sequence[torch.Tensor], Any]],
        **kwargs: Any,
    ):
        self._guard_config, self._guard_roster, self._guard_attacks = guard, use_roster, True
        self._guard_exact = True
        self._weight_scale = weight_scale
        self._current_state = current_state
        super().__init__(averaged_tensors=averaged_tensors, **kwargs)

    def _guard_max_weight(self) -> Callable[[PeerID], float]:
        if not self._guard_roster:
            return lambda peer_id: math.inf
        roster = self._guard_config.read_roster()
        default, scale = self._guard_config.unknown_max_weight, self._weight_scale
        return lambda peer_id: scale * roster.get(peer_id.to_base58(), default)

    def _guard_max_claim(self) -> float:
        if not self._guard_roster:
            return 0.0
        return self._weight_scale * self._guard_config.max_claim

    def get_current_state(self) -> tuple[Any, Sequence[torch.Tensor], Any]:
        return self._current_state()

    async def _step(self, *, step: StepControl, **kwargs: Any) -> None:
        # The group key is the round's (set_group_bits before each round). hivemind moves
        # it on after every assembled group, so a round retried after its group's
        # all-reduce failed would look for peers under another round's key.
        self._matchmaking.group_key_manager.update_key_on_group_assembled = _keep_group_key
        await super()._step(step=step, **kwargs)

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        return DecentralizedAverager._get_handle_name(namespace, method_name)


async def _keep_group_key(group_info: GroupInfo) -> None:
    """Replaces hivemind's key update after an assembled group: the key stays the round's."""
