"""DiLoCo over hivemind: many local AdamW steps, then one averaged outer step per round.

:class:`DiLoCoOptimizer` owns the inner optimizer, the global (outer)
parameters and their Nesterov SGD, the rounds (a hivemind ProgressTracker
under the run's prefix) and the pseudo-gradient all-reduce, whose shared parts
(group bits, the outer step, the canonical hash, how the averager and tracker
are built) are :mod:`~crowdtrain.node.swarm.rounds`'s; it is built from
a :class:`DiLoCoConfig`. What it serves to late joiners and the coordinator's
keeper, and how it downloads and checks a peer's global state, is
:mod:`~crowdtrain.node.swarm.diloco_state`'s. It knows nothing about the
coordinator, data or receipts: the trainer passes a
:class:`~crowdtrain.node.swarm.guard.SwarmGuard` in and calls :meth:`step`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hivemind
import torch
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.compression import CompressionBase

from crowdtrain.model import params_sha256
from crowdtrain.node.stats.loop_time import SwarmWait
from crowdtrain.node.swarm.compression import compression, feedback_codec
from crowdtrain.node.swarm.diloco_state import (
    GlobalState,
    StateExchange,
    failure_reason,
    served_state,
)
from crowdtrain.node.swarm.guard import HARMFUL, GuardConfig, SwarmGuard
from crowdtrain.node.swarm.packed import FeedbackCodec
from crowdtrain.node.swarm.round_judge import RoundJudge, contributors, own_pseudo_gradient
from crowdtrain.node.swarm.rounds import (
    ROUND_PATIENCE,
    await_round_group,
    canonical_sha256,
    gathered_weight,
    others_may_still_meet,
    outer_optimizer,
    outer_step,
    round_averager,
    round_bits,
    round_tracker,
)
from crowdtrain.protocol.runspec import OptimizerSection, RunSpec, SwarmSection, TrustSection

logger = logging.getLogger(__name__)


@dataclass
class _PendingRound:  # an all-reduce under way
    round: int
    control: StepControl
    weight: float
    global_sha256: str
    local_at_end: list[torch.Tensor]  # θ_local when the round ended (CPU fp32)
    give_up_from: float  # monotonic: stop looking for a group once nobody else is coming
    deadline: float  # monotonic: give up waiting after this


@dataclass(frozen=True)
class DiLoCoConfig:
    """What a :class:`DiLoCoOptimizer` is asked to do; built once from the run spec and
    the node's flags (:meth:`from_spec`).

    ``optimizer`` and ``swarm`` are the run spec's sections; compressions left
    None are 8-bit for pseudo-gradients and none for served state.
    """

    run_id: str
    optimizer: OptimizerSection
    swarm: SwarmSection
    client_mode: bool = False
    pseudo_grad_compression: CompressionBase | None = None
    state_compression: CompressionBase | None = None
    # Low-bit or top-k pseudo-gradients: what is sent is decided here, with error feedback.
    feedback: FeedbackCodec | None = None
    # How reducers combine pseudo-gradients (used when no swarm guard is given).
    trust: TrustSection = TrustSection()

    @classmethod
    def from_spec(cls, spec: RunSpec, client_mode: bool) -> DiLoCoConfig:
        opt = spec.optimizer
        return cls(
            run_id=spec.run.id,
            optimizer=opt,
            swarm=spec.swarm,
            client_mode=client_mode,
            pseudo_grad_compression=compression(opt.pseudo_grad_compression),
            state_compression=compression(opt.state_compression),
            feedback=feedback_codec(opt.pseudo_grad_compression, opt.pseudo_grad_topk),
            trust=spec.trust,
        )


class DiLoCoOptimizer:
    """DiLoCo (inner AdamW, outer Nesterov SGD on averaged pseudo-gradients) over hivemind.

    Call :meth:`step` after each micro-batch's backward with its number of
    sequences: it takes (and clears) the gradients, runs an inner step on their
    sequence-weighted mean once ``inner_batch_size`` sequences are in, and
    ends the round when the swarm has trained ``inner_steps * target_batch_size``
    sequences (the run spec's [optimizer] keys, in ``config.optimizer``).
    :meth:`zero_grad` drops a micro-batch not given to :meth:`step`.

    At a round's end each peer averages its pseudo-gradient (global minus local
    parameters), weighted by the sequences it trained in the round, with the
    peers of that round and applies the average with the outer optimizer; with
    ``outer_overlap`` in the background while the next round trains (that
    progress is kept on top of the new global parameters). Peers that complete
    a round together hold bit-identical global parameters. A peer whose round
    failed loads the next round's state from a peer, else applies its own.

    Create it in the process's main thread (hivemind's averager sets SIGINT to
    be ignored there) and call :meth:`shutdown` before the DHT's.
    """

    # A round that failed leaves us on our own global parameters, which the keeper's
    # checkpoint of the round need not hold: samples carry their hash.
    out_of_step = False
    # Local parameters change at every inner step; receipts sample the global ones.
    samples_at_global = True

    def __init__(
        self,
        config: DiLoCoConfig,
        *,
        dht: hivemind.DHT,
        model: torch.nn.Module,
        params: Iterable[Any],
        inner_optimizer: Callable[[Any], torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        swarm_guard: SwarmGuard | None = None,
    ):
        self.config, self.dht, self.model = config, dht, model
        self.swarm_wait = SwarmWait()
        # The config's parts under short names: the round logic reads them often.
        self.run_id, self.client_mode = config.run_id, config.client_mode
        self.spec, self.swarm = config.optimizer, config.swarm
        spec, swarm = self.spec, self.swarm
        self.swarm_guard = swarm_guard
        self.local_epoch = 0
        self.inner_step = 0
        self.global_round = 0  # outer steps in the global parameters
        # How the last round ended: averaged, reloaded (the group's parameters differed from
        # ours: theirs taken), loaded (failed: a peer's next round taken), own (failed: our
        # pseudo-gradient applied), refused (averaged, but the average made our global
        # parameters worse on held-out data: ours applied) or diverged. Only own, refused
        # and diverged leave us off the swarm's.
        self.last_round_outcome: str | None = None
        self._global_version = 0  # bumped whenever the global parameters change
        self._sha256_cache: tuple[int, str] | None = None
        self._params = list(model.parameters())
        self._names: dict[int, list[str]] = {}  # tied parameters have several names
        for name, param in model.named_parameters(remove_duplicate=False):
            self._names.setdefault(id(param), []).append(name)
        self.inner = inner_optimizer(params)
        self.scheduler = scheduler(self.inner) if scheduler is not None else None

        with torch.no_grad():
            self.global_params = [
                p.detach().to("cpu", torch.float32, copy=True) for p in self._params
            ]
        self.outer = outer_optimizer(self.global_params, spec)
        self._state_lock = threading.Lock()
        self.judge = RoundJudge(
            swarm_guard, self.outer, self.global_params, spec, self._named, self._state_lock
        )
        self._grad_sums = [torch.zeros_like(p) for p in self._params]
        self._has_grad = [False] * len(self._params)
        self._accumulated = 0  # sequences in the grad sums
        self._round_samples = 0  # sequences trained in the current round
        self._pending: _PendingRound | None = None
        self._round_timeout_s = max(swarm.averaging_timeout_s, 2 * swarm.matchmaking_time_s)
        self._round_patience_s = ROUND_PATIENCE * self._round_timeout_s

        self._own_guard_folder: Path | None = None
        if swarm_guard is not None:
            guard_config = swarm_guard.config
        else:
            self._own_guard_folder = Path(tempfile.mkdtemp(prefix="crowdtrain-diloco-guard-"))
            guard_config = GuardConfig(self._own_guard_folder, math.inf, trust=config.trust)

        self.tracker = round_tracker(dht, self.run_id, spec, swarm, self.client_mode)
        try:
            self.averager = round_averager(
                dht,
                self.run_id,
                spec,
                swarm,
                like=self.global_params,
                guard=guard_config,
                use_roster=swarm_guard is not None,
                current_state=self._current_state,
                compression=config.pseudo_grad_compression or compression("8bit"),
                state_compression=config.state_compression or compression("none"),
                client_mode=self.client_mode,
                start_round=0,
            )
        except BaseException:
            self.tracker.shutdown(1.0)  # a failed start must not leave a thread behind
            raise
        self.exchange = StateExchange(
            self.averager,
            dht,
            self.run_id,
            like=self.global_params,
            model_params=self._params,
            num_peers=lambda: self.tracker.global_progress.num_peers,
            swarm_guard=swarm_guard,
        )
        self.exchange.announce(self.global_round)

    # what the trainer calls

    def step(self, batch_size: int) -> None:
        """Take a micro-batch's gradients (``batch_size`` sequences); step when enough are in."""
        self._wait_pending(block=False)
        with torch.no_grad():
            for index, (param, grad_sum) in enumerate(
                zip(self._params, self._grad_sums, strict=True)
            ):
                if param.grad is not None:
                    grad_sum.add_(param.grad, alpha=float(batch_size))
                    self._has_grad[index] = True
                    param.grad = None
        self._accumulated += batch_size
        if self._accumulated < self.spec.inner_batch_size:
            return
        self._inner_step()
        if self.tracker.ready_to_update_epoch:
            self._end_round()

    def zero_grad(self) -> None:
        """Clear the model's gradients (a micro-batch not given to :meth:`step`)."""
        for param in self._params:
            param.grad = None

    def global_sample_state(self) -> tuple[int, dict[str, torch.Tensor], str | None]:
        """The round of our global parameters, those parameters (state-dict names) and
        their sha256: the verifier checks a sample only against a checkpoint of the round
        with the same hash (ours differ after a round met in two groups, or applied
        alone)."""
        return self.global_round, self.global_state_dict(), self.global_params_sha256()

    def global_params_sha256(self) -> str:
        """:func:`params_sha256` of the global parameters under the model's state-dict names
        (the keeper's checkpoint of round ``global_round`` hashes the same)."""
        with self._state_lock:
            # Hashing reads every parameter: once per change of the global parameters.
            if self._sha256_cache is None or self._sha256_cache[0] != self._global_version:
                digest = params_sha256(self.global_state_dict())
                self._sha256_cache = (self._global_version, digest)
            return self._sha256_cache[1]

    def global_state_dict(self) -> dict[str, torch.Tensor]:
        """The global parameters under the model's state-dict names (tied ones under each),
        as a checkpoint of round ``global_round`` holds them. Do not modify them."""
        return self._named(self.global_params)

    def load_state_from_peers(self, timeout: float | None = None) -> bool:
        """Download the global parameters, outer momentum and round from a peer.

        Sets the local parameters to the global ones (the inner optimizer's
        state is kept). Returns False when no peer served acceptable state;
        :attr:`last_refusal` then says why a served state was refused.
        """
        with self.swarm_wait.timed():
            self._wait_pending()
            timeout_s = timeout if timeout is not None else self.swarm.load_state_timeout_s
            state = self.exchange.download(timeout_s)
            if state is None:
                return False
            self._adopt(state, local_at_end=None)
        logger.info(
            "loaded the global state of round %d from %s", state.round, self.exchange.last_source
        )
        return True

    @property
    def last_refusal(self) -> str | None:
        """Why the last downloaded global state was refused; None when it was not."""
        return self.exchange.last_refusal

    def set_step(self, step: int, outer_momentum: Sequence[torch.Tensor] | None = None) -> None:
        """After the model's parameters were loaded (the keeper's checkpoint of round
        ``step``): they become the global parameters of round ``step``, with the round's
        ``outer_momentum`` (in the order of the model's parameters; zero when not given),
        and the round follows."""
        params = [p.detach().to("cpu", torch.float32, copy=True) for p in self._params]
        if outer_momentum is None:
            momentum = [torch.zeros_like(p) for p in params]
        else:
            momentum = [m.detach().to("cpu", torch.float32, copy=True) for m in outer_momentum]
            if [m.shape for m in momentum] != [p.shape for p in params]:
                raise ValueError("the outer momentum does not fit the model's parameters")
        self._adopt(GlobalState(step, params, momentum), local_at_end=None)

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The swarm's model is the global (outer) parameters, not this peer's local
        ones, which hold inner steps not averaged yet: those, and their round."""
        return self.global_state_dict(), {"global_round": str(self.global_round)}

    def shutdown(self) -> None:
        """Leave: stop reporting progress, end or drop a round under way, stop the averager."""
        self.tracker.shutdown(self.swarm.request_timeout_s + 1.0)
        pending, self._pending = self._pending, None
        if pending is not None and not pending.control.done():
            if pending.control.stage == AveragingStage.LOOKING_FOR_GROUP:
                pending.control.cancel()
            else:  # the group counts on us: let the all-reduce finish, bounded
                try:
                    pending.control.result(timeout=max(0.0, pending.deadline - time.monotonic()))
                except Exception:
                    pass
        self.averager.shutdown()
        if self._own_guard_folder is not None:
            shutil.rmtree(self._own_guard_folder, ignore_errors=True)

    # inner steps and rounds

    def _inner_step(self) -> None:
        with torch.no_grad():
            for index, (param, grad_sum) in enumerate(
                zip(self._params, self._grad_sums, strict=True)
            ):
                if self._has_grad[index]:
                    param.grad = grad_sum.div_(self._accumulated)
        self.inner.step()
        if self.scheduler is not None:
            self.scheduler.step()
        for param, grad_sum in zip(self._params, self._grad_sums, strict=True):
            param.grad = None
            grad_sum.zero_()
        self._has_grad = [False] * len(self._params)
        self._round_samples += self._accumulated
        self._accumulated = 0
        self.inner_step += 1
        self.tracker.report_local_progress(self.local_epoch, self._round_samples)

    def _end_round(self) -> None:
        """The swarm trained a round: average pseudo-gradients (in the background with overlap)."""
        self._wait_pending()
        round_, weight = self.local_epoch, float(self._round_samples)
        with self.tracker.pause_updates():
            self.local_epoch = self.tracker.update_epoch(round_ + 1)
        self._round_samples = 0
        with torch.no_grad():
            local_at_end = [p.detach().to("cpu", torch.float32, copy=True) for p in self._params]
        if weight == 0:
            # Nothing of ours to average (we just joined or caught up): follow the swarm.
            self._recover(round_, local_at_end, "no sequences trained in it", trained=False)
            return
        swarm_round = self.tracker.global_epoch
        if swarm_round > round_ + 1:
            # The swarm averaged this round long ago (we joined or came back late): no
            # group is left to meet; take the swarm's newest round instead of waiting.
            self._recover(swarm_round - 1, local_at_end, f"the swarm is at round {swarm_round}")
            return
        with torch.no_grad(), self.averager.get_tensors() as deltas:
            for delta, global_, local in zip(deltas, self.global_params, local_at_end, strict=True):
                torch.sub(global_, local, out=delta)
            if self.config.feedback is not None:
                self.config.feedback.encode_(list(deltas))  # what is not sent stays for later
        global_sha256 = self.global_params_sha256()
        self.averager.set_group_bits(round_bits(round_))
        control = self.averager.step(
            weight=weight,
            gather={
                "round": round_,
                "sha256": global_sha256,
                "weight": weight,
                "serves": not self.client_mode,
            },
            timeout=self._round_patience_s,
            allow_retries=True,
            wait=False,
        )
        now = time.monotonic()
        self._pending = _PendingRound(
            round=round_,
            control=control,
            weight=weight,
            global_sha256=global_sha256,
            local_at_end=local_at_end,
            give_up_from=now + self._round_timeout_s,
            deadline=now + self._round_patience_s + self.swarm.averaging_timeout_s + 5,
        )
        if not self.spec.outer_overlap:
            with self.tracker.performance_ema.pause():
                self._wait_pending()

    def _wait_pending(self, block: bool = True) -> None:
        # Waiting for the round, and applying its result or recovering from its failure
        # (a state download, maybe): time the trainer waits on the swarm.
        if self._pending is not None and (block or self._pending.control.done()):
            with self.swarm_wait.timed():
                self._finish(self._pending)

    def _finish(self, pending: _PendingRound) -> None:
        """Apply a round's averaged pseudo-gradient, or recover from its failure."""
        self._pending = None
        try:
            gathered = await_round_group(
                pending.control,
                pending.give_up_from,
                pending.deadline,
                lambda: others_may_still_meet(
                    pending.round, self.exchange, self.tracker, self.swarm.request_timeout_s
                ),
            )
        except (Exception, asyncio.CancelledError) as e:  # any failure of the round alike
            if not pending.control.done():
                pending.control.cancel()
            self._recover(pending.round, pending.local_at_end, failure_reason(e))
            return
        group = gathered if isinstance(gathered, dict) else {}
        with torch.no_grad(), self.averager.get_tensors() as average:
            own = own_pseudo_gradient(self.global_params, pending.local_at_end)
            problem = self.judge.average_problem(average, own)
            if problem is None:
                self._outer_step(average)
        if problem is not None:
            self._refuse_result(pending, group, problem)
            return
        self._follow_local(pending.local_at_end)
        self.last_round_outcome = "averaged"
        peers = [v for v in group.values() if not (isinstance(v, dict) and v.get("follower"))]
        logger.info(
            "round %d averaged with %d peers%s (%.0f of %.0f sequences ours); global "
            "parameters of round %d: %s",
            pending.round,
            len(peers) or 1,
            " and the coordinator's follower" if len(peers) < len(group) else "",
            pending.weight,
            sum(gathered_weight(v) for v in group.values()) or pending.weight,
            self.global_round,
            self.global_params_sha256(),
        )
        canonical = canonical_sha256(group.values())
        if canonical is not None and canonical != pending.global_sha256:
            # Our global parameters had drifted from the group's (an earlier failed
            # round): stop serving them and take the group's from a peer.
            logger.warning(
                "round %d: our global parameters differed from the group's; reloading them",
                pending.round,
            )
            self.exchange.allow(False)
            state = self.exchange.await_round(pending.round + 1, self.swarm.load_state_timeout_s)
            if state is not None:
                self._adopt(state, local_at_end=None, keep_local=True)
            self.last_round_outcome = "reloaded" if state is not None else "diverged"
            self.exchange.allow(True)

    def _named(self, tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors in the order of the global parameters, under the model's state-dict names."""
        state = {}
        for param, tensor in zip(self._params, tensors, strict=True):
            for name in self._names.get(id(param), []):
                state[name] = tensor
        return state

    def _refuse_result(self, pending: _PendingRound, group: dict[Any, Any], problem: str) -> None:
        """A round's average made our global parameters worse on held-out data than our
        own pseudo-gradient alone: apply ours instead (as after a failed round). With one
        other contributor in the group, the harm was its part: it is reported."""
        others = contributors(group, self.averager.peer_id)
        with torch.no_grad():
            blame = len(others) == 1
            if blame and self.swarm_guard is not None:
                self.swarm_guard.config.report(others[0].to_base58(), HARMFUL)
            logger.warning(
                "round %d: refused the group's average (%s; %d other contributor(s)%s); "
                "applying our own pseudo-gradient",
                pending.round,
                problem.replace("its parameters'", "the averaged parameters'"),
                len(others),
                f", {others[0].to_base58()} reported" if blame else "",
            )
            self._outer_step(own_pseudo_gradient(self.global_params, pending.local_at_end))
        self._follow_local(pending.local_at_end)
        self.last_round_outcome = "refused"

    def _outer_step(self, average: Sequence[torch.Tensor]) -> None:
        with self._state_lock:
            outer_step(self.outer, self.global_params, average)
            self.global_round += 1
            self._global_version += 1
        self.exchange.announce(self.global_round)

    def _follow_local(
        self, local_at_end: list[torch.Tensor], keep_progress: bool | None = None
    ) -> None:
        """Local parameters: the new global ones plus what was trained since ``local_at_end``
        (with overlap, or ``keep_progress``), else exactly the new global ones."""
        keep = self.spec.outer_overlap if keep_progress is None else keep_progress
        with torch.no_grad():
            for param, global_, at_end in zip(
                self._params, self.global_params, local_at_end, strict=True
            ):
                if keep:
                    param.add_((global_ - at_end).to(param.device, param.dtype))
                else:
                    param.copy_(global_)

    def _recover(
        self, round_: int, local_at_end: list[torch.Tensor], reason: str, trained: bool = True
    ) -> None:
        """A round without an average: take the next round's state from a peer, else our own.

        Where we ``trained`` in the round, a state whose held-out loss is more than
        LOSS_MARGIN above what our own pseudo-gradient gives alone is not taken (as a
        group's average is not): the keeper's follower, alone in rounds with a flipper,
        applied its parts, and an honest node that had fallen behind loaded its rounds."""
        state = self.exchange.await_round(round_ + 1, self._round_timeout_s)
        refused = None
        if state is not None and trained:
            own = own_pseudo_gradient(self.global_params, local_at_end)
            refused = self.judge.worse_than_own(state.params, own)
            if refused is not None:
                logger.warning(
                    "round %d: refused round %d's global state from %s (%s)",
                    round_,
                    state.round,
                    self.exchange.last_source,
                    refused.replace("its parameters'", "its"),
                )
                state = None
        if state is not None:
            logger.warning(
                "round %d: averaging failed (%s); loaded round %d's global state from %s",
                round_,
                reason,
                state.round,
                self.exchange.last_source,
            )
            # Progress since the round's end came from its base: on top of the next round
            # it is what overlap keeps; rounds further on, it is stale (a peer stalled for
            # rounds, training on alone), and the swarm's state is taken as it is.
            keep = local_at_end if state.round <= round_ + 1 else None
            self._adopt(state, local_at_end=keep)
            self.last_round_outcome = "loaded"
            return
        if refused is None and reason.startswith(("no sequences", "the swarm is at")):
            logger.info("round %d: %s and no peer is ahead; nothing to average", round_, reason)
            return
        logger.warning(
            "round %d: averaging failed (%s) and no peer has round %d; applying our own "
            "pseudo-gradient",
            round_,
            reason,
            round_ + 1,
        )
        with torch.no_grad(), self.averager.get_tensors() as own:
            self._outer_step(own)  # the buffers still hold our pseudo-gradient
        self._follow_local(local_at_end)
        self.last_round_outcome = "own"

    def _adopt(
        self,
        state: GlobalState,
        local_at_end: list[torch.Tensor] | None,
        keep_local: bool = False,
    ) -> None:
        """Take downloaded global state; local parameters follow it (keeping progress since
        ``local_at_end`` when given, all local progress with ``keep_local``)."""
        with torch.no_grad():
            reference = [g.clone() for g in self.global_params] if keep_local else local_at_end
            with self._state_lock:
                for global_, loaded in zip(self.global_params, state.params, strict=True):
                    global_.copy_(loaded)
                for global_, momentum in zip(self.global_params, state.momentum, strict=True):
                    self.outer.state[global_]["momentum_buffer"] = momentum.clone()
                self.global_round = state.round
                self._global_version += 1
            if reference is not None:
                self._follow_local(reference, keep_progress=keep_local or None)
            else:
                for param, global_ in zip(self._params, self.global_params, strict=True):
                    param.copy_(global_)
        if state.round > self.local_epoch:
            with self.tracker.pause_updates():
                self.local_epoch = self.tracker.update_epoch(state.round)
            self._round_samples = 0
        self.exchange.announce(self.global_round)

    # what peers download

    def _current_state(self) -> tuple[dict[str, Any], list[torch.Tensor], None]:
        """What peers download (runs in hivemind's fetcher thread)."""
        with self._state_lock:
            state = GlobalState(
                self.global_round,
                [g.clone() for g in self.global_params],
                [_momentum(self.outer.state.get(g, {}), g).clone() for g in self.global_params],
            )
            epoch = self.local_epoch
        return served_state(state, epoch)


def _momentum(state: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
    buffer = state.get("momentum_buffer")  # None before the first outer step
    return buffer if isinstance(buffer, torch.Tensor) else torch.zeros_like(like)


__all__ = ["DiLoCoConfig", "DiLoCoOptimizer"]
