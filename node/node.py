"""The node: join a run, then train with hivemind until told to stop.

:class:`Node` does the whole join (identity, registration, spec and data
checks, model, DHT, collaborative optimizer) in :meth:`Node.start` and
trains in :meth:`Node.train`; the command line and the notebook API both
drive it. Create it in the process's main thread: hivemind installs signal
handlers there.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
import uuid
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import hivemind
import numpy as np
import torch

from crowdtrain.model import (
    GPT,
    GPTConfig,
    evaluate,
    save_checkpoint,
    sequence_losses,
)
from crowdtrain.node.bootstrap import (
    BootstrapError,
    KeptCheckpoint,
    fall_back,
    latest_checkpoint,
    plan_start,
    start_from_checkpoint,
)
from crowdtrain.node.config import NodeConfig, NodeStats
from crowdtrain.node.data import (
    SAMPLE_SEQUENCES,
    ShardCache,
    ShardProgress,
    ShardStream,
    load_position,
    save_position,
    validation_sequences,
)
from crowdtrain.node.device.device import describe_device, pick_device, process_age_s
from crowdtrain.node.device.hooks import Throttle
from crowdtrain.node.device.micro_batch import micro_batch_size
from crowdtrain.node.device.nonfinite import (
    MAX_NON_FINITE_IN_ROW,
    gradients_finite,
    inf_grad_every,
    poison_gradient,
)
from crowdtrain.node.device.precision import autocast, maybe_compile, prefer_expandable_segments
from crowdtrain.node.link.errors import CoordinatorError
from crowdtrain.node.link.grpc import CoordinatorClient, Registration, check_run
from crowdtrain.node.link.heartbeat import CoordinatorLink
from crowdtrain.node.link.http import RunView, discover
from crowdtrain.node.link.pins import KeyPins
from crowdtrain.node.progress import Progress
from crowdtrain.node.swarm.guard import SwarmGuard
from crowdtrain.node.swarm.optimizer import build_optimizer, swarm_ids
from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.identity import Identity
from crowdtrain.protocol.multiaddr import tcp_multiaddr

logger = logging.getLogger(__name__)

# How long a node keeps asking for its first shard while every shard is leased.
_FIRST_LEASE_WAIT_S = 60.0
# How often a node records its place in the current shard.
_POSITION_EVERY_S = 5.0


class Node:
    """One peer of a run. Call :meth:`start`, then :meth:`train`, then :meth:`shutdown`."""

    def __init__(self, config: NodeConfig):
        self.config = config
        self.stop_event = threading.Event()
        self.fatal: CrowdtrainError | None = None
        self.stats = NodeStats(session_key=uuid.uuid4().hex)
        self.model: GPT | None = None
        self.optimizer: hivemind.Optimizer | None = None
        self.dht: hivemind.DHT | None = None
        self.link: CoordinatorLink | None = None
        self.client: CoordinatorClient | None = None
        self.guard: SwarmGuard | None = None
        self._num_non_finite_in_row = 0
        # What the coordinator last said: the run's step, and this peer's verified credit.
        self.coordinator_step = 0
        self.verified_tokens = 0
        self._rate_window: list[tuple[float, int]] = []
        self._last_eval_step = -1
        self._contributed = False

    @property
    def run_dir(self) -> Path:
        return self.config.home / "runs" / self.config.run_id

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.safetensors"

    @property
    def position_path(self) -> Path:
        return self.run_dir / "position.json"

    def save_position(self) -> None:
        """Remember the shard and batch being trained (atomically), to resume after a restart."""
        save_position(self.position_path, self.manifest.hash, self.stream.position())

    # joining

    def start(self) -> None:
        """Join the run: every check that can fail does so before hivemind starts."""
        cfg = self.config
        # Before anything touches CUDA: fragmented free memory made a probed batch fail.
        prefer_expandable_segments()
        self.device = pick_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        endpoints = discover(cfg.url, ca_cert=cfg.ca_cert)
        self.identity = Identity.load_or_create(cfg.home / "identity.pem")
        self.name = cfg.name or f"{socket.gethostname()}-{self.identity.peer_id[:6]}"
        self.client = CoordinatorClient(
            cfg.url,
            endpoints["grpc_target"],
            self.identity,
            tls=bool(endpoints.get("grpc_tls")),
            ca_cert=cfg.ca_cert,
            pins=KeyPins(cfg.home),
            progress=cfg.progress,
        )
        registration = self._register()
        self.spec, self.manifest = check_run(registration.run)
        self.coordinator_step = registration.run.step
        logger.info(
            "crowdtrain %s, run %s, spec %s, data %s, device %s, torch %s, hivemind %s",
            version("crowdtrain"),
            self.spec.run.id,
            self.spec.hash[:16],
            self.manifest.hash[:16],
            describe_device(self.device),
            torch.__version__,
            hivemind.__version__,
        )

        self.cache = ShardCache(
            self.run_dir / "shards" / self.manifest.hash[:16],
            self.manifest,
            registration.run.shard_base_url,
            self.client.download,
            max_bytes=cfg.cache_bytes,
        )
        val_entry = self.manifest.val_shards[0]
        # Bytes of text behind each token: 1 for bytes, about 3-4 for BPE.
        self.bytes_per_token = val_entry.num_bytes / max(1, val_entry.num_tokens)
        self.val_sequences = torch.from_numpy(
            validation_sequences(
                self.cache.fetch(val_entry.id),
                val_entry,
                self.spec.model.seq_len,
                self.spec.eval.num_sequences,
            )
        )
        self.link = CoordinatorLink(
            client=self.client,
            register=lambda: self._register().session_token,
            token=registration.session_token,
            interval_s=registration.heartbeat_interval_s,
            stats=self._heartbeat_payload,
            cache=self.cache,
            on_fatal=self._on_fatal,
            prefetch=cfg.prefetch_shards,
            on_reply=self._on_heartbeat_reply,
        )
        torch.manual_seed(self.spec.run.seed)
        # The spec's [model] keys are GPTConfig's fields.
        self.model = GPT(GPTConfig.from_spec(self.spec.model)).to(self.device)
        self.micro_batch_size = micro_batch_size(
            cfg.micro_batch, self.spec.optimizer, self.model, self.device, self.spec.model
        )
        self.forward = maybe_compile(
            self.model,
            cfg.compile,
            example_batch=(
                self.micro_batch_size,
                self.spec.model.seq_len,
                self.spec.model.vocab_size,
            ),
        )
        self.stream = ShardStream(
            self.spec.run.seed,
            self.spec.model.seq_len,
            self.micro_batch_size,
            resume=load_position(self.position_path, self.manifest.hash),
            on_shard_taken=self.link.want_shards,
        )
        self._first_lease()
        self._start_swarm(registration)
        self.link.start(self.stream)
        self._load_initial_state(registration.run.step)

    def _register(self) -> Registration:
        assert self.client is not None
        versions = f"crowdtrain={version('crowdtrain')} torch={torch.__version__}"
        return self.client.register(
            self.config.run_id,
            self.name,
            describe_device(self.device),
            versions,
            invite=self.config.invite,
        )

    def _first_lease(self) -> None:
        assert self.link is not None
        deadline = time.monotonic() + _FIRST_LEASE_WAIT_S
        while not self.link.lease_and_fetch(self.stream, self.config.prefetch_shards, resume=True):
            if time.monotonic() > deadline:
                raise CrowdtrainError(
                    "every shard of the current epoch is leased to other peers; "
                    "try again when their leases end"
                )
            time.sleep(2.0)

    def _start_swarm(self, registration: Registration) -> None:
        cfg, opt = self.config, self.spec.optimizer
        announce = None
        if cfg.announce_host:
            announce = [tcp_multiaddr(cfg.announce_host, cfg.dht_port)]
        # Tear the gRPC channel down around the fork: hivemind forks its DHT and
        # averager processes, and gRPC's threads must not be copied into them.
        assert self.client is not None
        self.client.suspend()
        self.dht = hivemind.DHT(
            initial_peers=registration.initial_peers,
            start=True,
            host_maddrs=[tcp_multiaddr(cfg.dht_host, cfg.dht_port)],
            announce_maddrs=announce,
            client_mode=cfg.client_mode,
        )
        assert self.model is not None
        self.guard = SwarmGuard(self.run_dir / "guard", opt.target_batch_size)
        view = RunView(
            cfg.url, cfg.run_id, self.run_dir / "guard", self.client.download, cfg.ca_cert
        )
        self.guard.coordinator_step = view.fresh_step
        self.guard.checkpoint_sha256 = view.checkpoint_sha256
        self.guard.checkpoint_state = view.checkpoint_state
        self.guard.named_parameters = list(self.model.named_parameters(remove_duplicate=False))
        self.optimizer = build_optimizer(
            self.spec, self.model, self.dht, self.guard, self.micro_batch_size
        )
        self.client.reopen()
        logger.info("joined the swarm as %s", self.dht.peer_id.to_base58())

    def _load_initial_state(self, run_step: int) -> None:
        """The swarm's parameters for a node joining a run under way: the keeper's checkpoint
        over HTTP or the peers' state (see :func:`crowdtrain.node.bootstrap.plan_start`)."""
        assert self.optimizer is not None
        cfg = self.config
        checkpoint = None
        if cfg.start_from != "peers":
            checkpoint = latest_checkpoint(cfg.url, cfg.run_id, cfg.ca_cert)
        plan = plan_start(cfg.start_from, run_step, checkpoint, self.spec.optimizer.mode)
        if plan.source != "fresh":
            logger.info("starting from %s: %s", plan.source, plan.reason)
        if plan.source == "checkpoint" and plan.checkpoint is not None:
            if self._start_from_checkpoint(plan.checkpoint):
                return
        if plan.source != "fresh" or self.optimizer.tracker.global_epoch > 0:
            self._load_state_from_peers()
        if fall_back(plan, self.optimizer.local_epoch) and plan.checkpoint is not None:
            logger.info("no peer served newer state; starting from the keeper's checkpoint")
            self._start_from_checkpoint(plan.checkpoint)

    def _start_from_checkpoint(self, checkpoint: KeptCheckpoint) -> bool:
        """Load the keeper's checkpoint and move the optimizer to its step; False (the model
        untouched) when it cannot be used, unless ``--start-from checkpoint`` asked for it."""
        assert self.model is not None
        try:
            start_from_checkpoint(
                self.model,
                self.optimizer,
                self.spec,
                self.config.url,
                checkpoint,
                self.run_dir / "bootstrap",
                self.config.ca_cert,
                self.config.progress,
            )
        except BootstrapError as e:
            if self.config.start_from == "checkpoint":
                raise
            logger.warning("could not start from the keeper's checkpoint (%s); using peers", e)
            return False
        return True

    def _load_state_from_peers(self) -> None:
        assert self.optimizer is not None
        logger.info("run under way; loading the latest state from peers")
        started = time.monotonic()
        try:
            with warnings.catch_warnings():
                # hivemind fast-forwards the learning-rate schedule to the loaded step.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                self.optimizer.load_state_from_peers()
        except Exception as e:  # a failed download is not fatal: hivemind retries at the next step
            logger.warning("could not load state from peers yet: %s", e)
            return
        refusal = getattr(self.optimizer, "last_refusal", None)
        if refusal is not None:
            logger.warning(
                "refused the state peers served (%s); training from step %d until a peer "
                "serves state the coordinator agrees with",
                refusal,
                self.optimizer.local_epoch,
            )
            return
        logger.info(
            "loaded state of step %d in %.1fs",
            self.optimizer.local_epoch,
            time.monotonic() - started,
        )

    def _on_fatal(self, error: CrowdtrainError) -> None:
        self.fatal = error
        self.stop_event.set()

    # training

    def _on_heartbeat_reply(self, reply: Any) -> None:
        """The coordinator's view: its recorded step, and whom to accept parts from."""
        self.coordinator_step = int(reply.step)
        self.verified_tokens = self.stats.verified_tokens = int(reply.verified_tokens)
        guard = getattr(self, "guard", None)
        if guard is not None:
            guard.update_roster({a.dht_peer_id: a.max_weight for a in reply.roster})

    def _heartbeat_payload(self) -> dict[str, Any]:
        s = self.stats
        guard = getattr(self, "guard", None)
        reports = guard.drain_reports()[:32] if guard is not None else []
        return {
            **swarm_ids(self.dht, self.optimizer),
            "num_skipped_steps": s.num_skipped_steps,
            "reports": reports,
            "session_key": s.session_key,
            "num_tokens": s.num_tokens,
            "num_sequences": s.num_sequences,
            "tokens_per_s": s.tokens_per_s,
            "loss": s.loss if s.loss is not None and math.isfinite(s.loss) else None,
            "step": s.step,
            "device": describe_device(self.device),
        }

    def evaluate(self) -> float:
        """Validation loss on the held-out shard now; queued for the coordinator."""
        assert self.model is not None and self.link is not None
        result = evaluate(
            self.model,
            self.val_sequences,
            batch_size=16,
            bytes_per_token=self.bytes_per_token,
            device=self.device,
        )
        self.stats.val_loss = result.loss
        self._last_eval_step = self.stats.step
        self.link.send_evaluation(
            {
                "step": self.stats.step,
                "num_tokens": self.stats.num_tokens,
                "loss": result.loss,
                "bits_per_byte": result.bits_per_byte,
            }
        )
        return result.loss

    def train(self, steps: int | None = None, seconds: float | None = None) -> NodeStats:
        """Train until ``steps`` more swarm steps, ``seconds`` pass, or :attr:`stop_event`.

        Raises the error that stopped training early, if any (a damaged shard,
        say). Returns the node's counters.
        """
        assert self.model is not None and self.optimizer is not None and self.link is not None
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
        losses: list[float] = []
        started = time.monotonic()
        wait_before = self.stream.data_wait_s
        last_saved = started
        inf_every = inf_grad_every()
        throttle = Throttle.from_env()
        num_micro_batches = 0
        try:
            while not self.stop_event.is_set() and time.monotonic() < deadline:
                if steps is not None and opt.local_epoch - start_step >= steps:
                    break
                batch, shard = self.stream.next_batch()
                computed = time.perf_counter()
                batch_t = torch.from_numpy(batch).to(self.device)
                with autocast(self.device):
                    logits, loss = self.forward(batch_t[:, :-1], batch_t[:, 1:])
                assert loss is not None
                sample = self._sample_losses(shard, logits, batch_t)
                del logits
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    opt.zero_grad()
                    self._skip_non_finite("loss", shard)
                    continue
                loss.backward()
                if throttle.active:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)  # time the compute, not the launch
                    throttle.wrap(time.perf_counter() - computed)
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
                if not self._contributed:
                    self._contributed = True
                    logger.info(
                        "first contributing step %.1f s after process start", process_age_s()
                    )
                self._account(batch, loss_value, shard, losses, sample)
                progress.update(self.stats, batch.shape[0] * (batch.shape[1] - 1))
                if opt.local_epoch != self.stats.step:
                    self._on_new_step(opt.local_epoch)
                if time.monotonic() - last_saved > _POSITION_EVERY_S:
                    self.save_position()
                    last_saved = time.monotonic()
        finally:
            progress.close(self.stats)
            self.stats.train_s += time.monotonic() - started
            self.stats.data_wait_s += self.stream.data_wait_s - wait_before
            self.save_position()
        if self.fatal is not None:
            raise self.fatal
        return self.stats

    def _skip_non_finite(self, what: str, shard: ShardProgress) -> None:
        """Count a skipped micro-batch; too many in a row stop the node with advice.

        The batch still counts as gone through, untrained, so its shard still
        ends and is receipted (for the sequences really trained)."""
        shard.batches_done += 1
        if shard.done and shard.replay == 0:
            assert self.link is not None
            self.link.send_receipt(shard.receipt())
        self.stats.num_skipped_steps += 1
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
    ) -> list[float] | None:
        """Per-sequence losses of the batch's first sequences, if it is the shard's first
        batch at this swarm step (parameters change only between steps, so the
        coordinator can recompute them from its checkpoint of the step)."""
        if not shard.wants_sample(self.stats.step):
            return None
        with torch.no_grad():
            n = SAMPLE_SEQUENCES
            return sequence_losses(logits[:n].detach(), batch[:n, 1:]).tolist()

    def _account(
        self,
        batch: np.ndarray,
        loss: float,
        shard: ShardProgress,
        losses: list[float],
        sample: list[float] | None = None,
    ) -> None:
        """Count a trained micro-batch; ``self.stats.step`` is still the step its forward ran at."""
        assert self.optimizer is not None
        num_tokens = batch.shape[0] * (batch.shape[1] - 1)
        self.stats.num_tokens += num_tokens
        self.stats.num_sequences += batch.shape[0]
        losses.append(loss)
        del losses[:-20]
        self.stats.loss = sum(losses) / len(losses)
        now = time.monotonic()
        self._rate_window.append((now, num_tokens))
        while len(self._rate_window) > 2 and now - self._rate_window[0][0] > 10.0:
            self._rate_window.pop(0)
        span = now - self._rate_window[0][0]
        if span > 0:
            self.stats.tokens_per_s = sum(n for _, n in self._rate_window[1:]) / span
        self.stats.num_peers = self.optimizer.tracker.global_progress.num_peers
        if sample is not None and all(math.isfinite(x) for x in sample):
            shard.add_sample(self.stats.step, sample)
        self.stats.shard = shard.shard.shard_id
        shard.batches_done += 1
        shard.num_sequences += batch.shape[0]
        shard.num_tokens += num_tokens
        shard.loss_sum += loss * batch.shape[0]
        if shard.done and shard.replay == 0:
            assert self.link is not None
            self.link.send_receipt(shard.receipt())

    def _on_new_step(self, step: int) -> None:
        self.stats.step = step
        if step - max(self._last_eval_step, 0) >= self.spec.eval.every_steps:
            self.evaluate()
            self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """Write the live model to ``<home>/runs/<run>/checkpoint.safetensors``."""
        assert self.model is not None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        extra: dict[str, str] = {}
        global_state = getattr(self.optimizer, "global_state_dict", None)
        if global_state is not None:
            # diloco: the swarm's model is the global (outer) parameters, not this
            # peer's local ones, which hold inner steps not averaged yet.
            state = global_state()
            extra["global_round"] = str(self.optimizer.global_round)
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
        """Leave the run: checkpoint, tell the coordinator, stop averagers and the DHT."""
        if self.model is not None and self.optimizer is not None:
            try:
                self.save_checkpoint()
            except CrowdtrainError as e:
                logger.warning("could not save the last checkpoint: %s", e)
        if self.link is not None:
            self.link.shutdown(leave=True)
        if self.optimizer is not None:
            self.optimizer.shutdown()
            self.optimizer = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
        if self.client is not None:
            self.client.close()


__all__ = ["Node", "NodeConfig", "NodeStats", "CoordinatorError", "pick_device"]
