"""The node: a peer of a run, joined and trained with hivemind until told to stop.

:meth:`Node.start` joins (the phases are :mod:`crowdtrain.node.joining.phases`'s) and
returns a whole :class:`Node`; :meth:`Node.train` runs the training loop;
:meth:`Node.shutdown` leaves. The command line and the notebook API both
drive it. Start it in the process's main thread: hivemind installs signal
handlers there. What the node counts is :mod:`crowdtrain.node.stats.accounting`'s,
what it reports :mod:`crowdtrain.node.joining.reporting`'s.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from pathlib import Path

import torch
from pydantic import ValidationError

from crowdtrain.model import evaluate, save_checkpoint, sequence_losses
from crowdtrain.node.config import NodeConfig
from crowdtrain.node.data import ShardProgress, save_position
from crowdtrain.node.device.device import process_age_s
from crowdtrain.node.device.hooks import Throttle
from crowdtrain.node.device.nonfinite import (
    MAX_NON_FINITE_IN_ROW,
    gradients_finite,
    poison_gradient,
)
from crowdtrain.node.device.precision import autocast
from crowdtrain.node.device.priority import yield_cpu
from crowdtrain.node.joining.phases import Joined, join, load_initial_state
from crowdtrain.node.stats.accounting import NodeStats, TokenAccounting
from crowdtrain.node.stats.progress import Progress
from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.messages import MAX_SAMPLE_LOSSES, Evaluation

logger = logging.getLogger(__name__)

# How often a node records its place in the current shard.
_POSITION_EVERY_S = 5.0


class Node:
    """One peer of a run, joined: :meth:`start` it, then :meth:`train`, then :meth:`shutdown`.

    Made whole by :meth:`start` (the constructor takes what joining built).
    :attr:`stop_event` stops training at the next micro-batch; it is also set
    when the coordinator ends the session, and :attr:`fatal` then says why.
    """

    def __init__(self, config: NodeConfig, joined: Joined, stats: NodeStats, stop: threading.Event):
        self.config = config
        self.stats = stats
        self.stop_event = stop
        self.name = joined.contact.name
        self.device = joined.contact.device
        self.spec = joined.contact.spec
        self.manifest = joined.contact.manifest
        self.model = joined.replica.model
        self.forward = joined.replica.forward
        self.val_sequences = joined.data.val_sequences
        self.bytes_per_token = joined.data.bytes_per_token
        self.stream = joined.shards.stream
        self.optimizer = joined.swarm.optimizer
        self.link = joined.link
        self._session = joined.contact.session
        self._stack = joined.stack
        self._accounting = TokenAccounting(stats)
        self._throttle = Throttle(config.hooks.slowdown)
        self._num_non_finite_in_row = 0
        self._last_eval_step = -1
        self._contributed = False
        self._shut_down = False

    @classmethod
    def start(cls, config: NodeConfig) -> Node:
        """Join the run, and take the swarm's latest state if the run is under way.

        Every check that can fail does so before hivemind starts; whatever a
        failed join started is shut down before the error is raised.
        """
        stats = NodeStats(session_key=uuid.uuid4().hex)
        stop = threading.Event()
        joined = join(config, stats, stop)
        node = cls(config, joined, stats, stop)
        try:
            load_initial_state(config, joined)
        except BaseException:
            node.shutdown()
            raise
        return node

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    @property
    def checkpoint_path(self) -> Path:
        return self.config.checkpoint_path

    @property
    def fatal(self) -> CrowdtrainError | None:
        """The error that ended the session with the coordinator, if one did."""
        return self._session.fatal

    @property
    def num_peers(self) -> int:
        """Peers in the swarm now (the last count seen, once the node has left)."""
        if self._shut_down:
            return self.stats.num_peers
        return int(self.optimizer.tracker.global_progress.num_peers)

    def save_position(self) -> None:
        """Remember the shard and batch being trained (atomically), to resume after a restart."""
        save_position(self.config.position_path, self.manifest.hash, self.stream.position())

    # training

    def evaluate(self) -> float:
        """Validation loss on the held-out shard now; queued for the coordinator."""
        result = evaluate(
            self.model,
            self.val_sequences,
            batch_size=16,
            bytes_per_token=self.bytes_per_token,
            device=self.device,
        )
        self.stats.val_loss = result.loss
        self._last_eval_step = self.stats.step
        try:
            evaluation = Evaluation(
                step=self.stats.step,
                num_tokens=self.stats.num_tokens,
                loss=result.loss,
                bits_per_byte=result.bits_per_byte,
            )
        except ValidationError:  # not finite, or beyond what the coordinator records
            logger.warning("validation loss %s not reported to the coordinator", result.loss)
        else:
            self.link.send_evaluation(evaluation)
        return result.loss

    def train(self, steps: int | None = None, seconds: float | None = None) -> NodeStats:
        """Train until ``steps`` more swarm steps, ``seconds`` pass, or :attr:`stop_event`.

        Raises the error that stopped training early, if any (a damaged shard,
        say). Returns the node's counters.
        """
        model, opt = self.model, self.optimizer
        model.train()
        start_step = opt.local_epoch
        self.stats.step = start_step
        deadline = time.monotonic() + seconds if seconds is not None else math.inf
        if self._last_eval_step < 0 and start_step == 0:
            # The run's starting loss. A node joining a run under way trains first:
            # its evaluation comes at the next step, not before its first contribution.
            self.evaluate()
        progress = Progress(self.config.progress, self.name)
        self._accounting.start_training()
        started = time.monotonic()
        wait_before = self.stream.data_wait_s
        last_saved = started
        inf_every = self.config.hooks.inf_grad_every
        num_micro_batches = 0
        loop_time = self.stats.time
        loop_time.start(opt.swarm_wait)
        try:
            while not self.stop_event.is_set() and time.monotonic() < deadline:
                if steps is not None and opt.local_epoch - start_step >= steps:
                    break
                data_wait = self.stream.data_wait_s
                batch, shard = self.stream.next_batch()
                loop_time.add(data_wait_s=self.stream.data_wait_s - data_wait)
                computed = time.perf_counter()
                swarm_wait = opt.swarm_wait.so_far()
                batch_t = torch.from_numpy(batch).to(self.device)
                sample = self._sample_at_global(shard, batch_t) if opt.samples_at_global else None
                with autocast(self.device):
                    logits, loss = self.forward(batch_t[:, :-1], batch_t[:, 1:])
                assert loss is not None  # targets were given
                if not opt.samples_at_global:
                    sample = self._sample_losses(shard, logits, batch_t)
                del logits
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    opt.zero_grad()
                    self._skip_non_finite("loss", shard)
                    continue
                loss.backward()
                if self._throttle.active:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)  # time the compute, not the launch
                    self._throttle.wrap(time.perf_counter() - computed)
                num_micro_batches += 1
                if inf_every and num_micro_batches % inf_every == 0:
                    poison_gradient(model)
                if not gradients_finite(model):
                    # Never into the average: hivemind accumulates gradients in opt.step().
                    opt.zero_grad()
                    self._skip_non_finite("gradients", shard)
                    continue
                self._num_non_finite_in_row = 0
                opt.step(batch_size=batch.shape[0])
                opt.zero_grad()
                waited = opt.swarm_wait.so_far() - swarm_wait
                loop_time.add(computing_s=time.perf_counter() - computed - waited)
                if not self._contributed:
                    self._contributed = True
                    logger.info(
                        "first contributing step %.1f s after process start", process_age_s()
                    )
                    yield_cpu(self.config.nice)
                self._count(batch.shape[0], batch.shape[1] - 1, loss_value, shard, sample)
                progress.update(self.stats, batch.shape[0] * (batch.shape[1] - 1))
                if opt.local_epoch != self.stats.step:
                    self._on_new_step(opt.local_epoch)
                if time.monotonic() - last_saved > _POSITION_EVERY_S:
                    self.save_position()
                    last_saved = time.monotonic()
        finally:
            loop_time.stop()
            progress.close(self.stats)
            self.stats.train_s += time.monotonic() - started
            self.stats.data_wait_s += self.stream.data_wait_s - wait_before
            self.save_position()
        if self.fatal is not None:
            raise self.fatal
        return self.stats

    def _count(
        self,
        num_sequences: int,
        seq_len: int,
        loss: float,
        shard: ShardProgress,
        sample: tuple[int, list[float], str | None] | None,
    ) -> None:
        """Count a trained micro-batch (``self.stats.step`` is still the step its forward ran
        at) into the node's counters and its shard's, and send the shard's receipt when
        this completed it."""
        num_tokens = num_sequences * seq_len
        self._accounting.record(num_sequences, num_tokens, loss, shard.shard.shard_id)
        self.stats.num_peers = self.optimizer.tracker.global_progress.num_peers
        step, losses, params = sample if sample is not None else (self.stats.step, None, None)
        receipt = shard.record(
            num_sequences,
            num_tokens,
            loss,
            self.stats.step,
            losses,
            sample_step=step,
            sample_params=params,
        )
        if receipt is not None:
            self.link.send_receipt(receipt)

    def _skip_non_finite(self, what: str, shard: ShardProgress) -> None:
        """Count a skipped micro-batch; too many in a row stop the node with advice.

        The batch still counts as gone through, untrained, so its shard still
        ends and is receipted (for the sequences really trained)."""
        receipt = shard.skip()
        if receipt is not None:
            self.link.send_receipt(receipt)
        self._accounting.skipped()
        self._num_non_finite_in_row += 1
        logger.warning(
            "non-finite %s; skipped this micro-batch (%d skipped since start)",
            what,
            self.stats.num_skipped_steps,
        )
        if self._num_non_finite_in_row >= MAX_NON_FINITE_IN_ROW:
            raise CrowdtrainError(
                f"{self._num_non_finite_in_row} micro-batches in a row had non-finite {what}; "
                "this device or its settings cannot train this run. Check the hardware (GPU "
                "driver, temperature, memory errors), turn mixed precision off, or lower the "
                "learning rate or micro-batch size, then join again"
            )

    def _sample_losses(
        self, shard: ShardProgress, logits: torch.Tensor, batch: torch.Tensor
    ) -> tuple[int, list[float], str | None] | None:
        """The step and per-sequence losses of the whole batch, if the shard wants a sample
        of it (each step's first batch, or in a sync run every batch: parameters change
        only between steps, so the coordinator can recompute any of them from its
        checkpoint of the step)."""
        if self.optimizer.out_of_step:
            return None  # our parameters are not the swarm's at this step: nothing to check
        if not shard.wants_sample(self.stats.step):
            return None
        with torch.no_grad():
            n = MAX_SAMPLE_LOSSES
            losses: list[float] = sequence_losses(logits[:n].detach(), batch[:n, 1:]).tolist()
            return self.stats.step, losses, None

    def _sample_at_global(
        self, shard: ShardProgress, batch: torch.Tensor
    ) -> tuple[int, list[float], str | None] | None:
        """DiLoCo: local parameters change at every inner step and no checkpoint holds
        them, so the sample of each round (a shard's first batch, then the first batch after
        each new round's global parameters) is the batch's per-sequence losses at the
        round's global parameters, in fp32, with their sha256: the keeper's checkpoint of
        the round holds the same parameters bit for bit unless ours differ (a round met in
        two groups, or applied alone), which the hash tells the verifier. One extra
        forward pass per round."""
        step, state, params_sha256 = self.optimizer.global_sample_state()
        if not shard.wants_sample(step):
            return None
        names = dict(self.model.named_parameters())  # each tied parameter once
        params = {name: state[name].to(self.device) for name in names}
        n = MAX_SAMPLE_LOSSES
        with torch.no_grad():
            logits, _ = torch.func.functional_call(self.model, params, (batch[:n, :-1],))
            losses: list[float] = sequence_losses(logits.float(), batch[:n, 1:]).tolist()
        return step, losses, params_sha256

    def _on_new_step(self, step: int) -> None:
        self.stats.step = step
        if step - max(self._last_eval_step, 0) >= self.spec.eval.every_steps:
            self.evaluate()
            self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """Write the swarm's model, as this peer holds it, to
        ``<home>/runs/<run>/checkpoint.safetensors``."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state, extra = self.optimizer.checkpoint_state()
        save_checkpoint(
            self.checkpoint_path,
            state,
            {
                "run_id": self.spec.run.id,
                "spec_hash": self.spec.hash,
                "step": str(self.stats.step),
                "num_tokens": str(self.stats.num_tokens),
                **extra,
            },
        )
        return self.checkpoint_path

    def shutdown(self) -> None:
        """Leave the run: checkpoint, tell the coordinator, stop the optimizer's averagers,
        the DHT and the client. Safe to call again."""
        if self._shut_down:
            return
        self._shut_down = True
        try:
            self.save_checkpoint()
        except CrowdtrainError as e:
            logger.warning("could not save the last checkpoint: %s", e)
        self._stack.close()


__all__ = ["Node"]
