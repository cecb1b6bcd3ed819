"""The collaborative optimizer a node trains with: its interface, and building it from the spec.

``mode = "sync"`` is hivemind's Optimizer (guarded:
:class:`~crowdtrain.node.swarm.sync.GuardedOptimizer`), averaging gradients
each collaborative step; ``mode = "diloco"`` is
:class:`~crowdtrain.node.swarm.diloco.DiLoCoOptimizer`, local AdamW steps with
an outer Nesterov step on averaged pseudo-gradients. Both implement
:class:`SwarmOptimizer`, so the node drives them the same way and never asks
which one it has. Knows nothing about the coordinator or the training loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Protocol, runtime_checkable

import hivemind
import torch
from hivemind.optim.progress_tracker import ProgressTracker

from crowdtrain.model import param_groups
from crowdtrain.node.stats.loop_time import SwarmWait
from crowdtrain.node.swarm.averagers import GuardedGradientAverager
from crowdtrain.node.swarm.compression import compression
from crowdtrain.node.swarm.guard import SwarmGuard
from crowdtrain.node.swarm.inner import ClippedAdamW
from crowdtrain.node.swarm.sync import GuardedOptimizer
from crowdtrain.protocol.runspec import RunSpec


@runtime_checkable
class SwarmOptimizer(Protocol):
    """What the node asks of its collaborative optimizer, whichever the run's mode.

    Create it in the process's main thread (hivemind's averagers set SIGINT to
    be ignored there) and :meth:`shutdown` it before its DHT.
    """

    tracker: ProgressTracker
    """The swarm's progress: its peers (``global_progress.num_peers``) and step."""

    out_of_step: bool
    """Whether this peer's parameters are not the swarm's at its step (sync: it skipped a
    step whose gradient round failed for it, and has not loaded the swarm's state yet)."""

    swarm_wait: SwarmWait
    """The seconds :meth:`step` and :meth:`load_state_from_peers` kept the trainer waiting
    on the swarm (rounds, state downloads)."""

    samples_at_global: bool
    """Whether a receipt's loss samples are computed at the swarm's global parameters
    (:meth:`global_sample_state`; DiLoCo, whose local parameters no checkpoint holds)
    rather than from the training forward pass (sync)."""

    def global_sample_state(self) -> tuple[int, dict[str, torch.Tensor], str | None]:
        """With :attr:`samples_at_global`: the round whose global parameters this peer
        holds, those parameters under state-dict names, and their sha256 (the keeper's
        checkpoint of the round hashes the same when it holds them). Do not modify the
        tensors."""
        ...

    @property
    def local_epoch(self) -> int:
        """The swarm step (sync) or round (DiLoCo) this peer is at."""
        ...

    @property
    def last_refusal(self) -> str | None:
        """Why the state last downloaded from a peer was refused; None when it was not."""
        ...

    def step(self, *, batch_size: int) -> object:
        """Take the gradients of a micro-batch of ``batch_size`` sequences, just backed."""
        ...

    def zero_grad(self) -> None:
        """Drop the model's gradients (a micro-batch not given to :meth:`step`)."""
        ...

    def load_state_from_peers(self) -> object:
        """Take the swarm's latest state from a peer, if one serves acceptable state."""
        ...

    def set_step(self, step: int, outer_momentum: Sequence[torch.Tensor] | None = None) -> None:
        """Move to swarm step ``step`` after the model's parameters were loaded from the
        keeper's checkpoint of that step (DiLoCo: with the round's ``outer_momentum``, in
        the order of the model's parameters, when the keeper kept it)."""
        ...

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The swarm's parameters as a checkpoint of this peer's step holds them (state
        dict names), and the metadata that goes with them. Do not modify the tensors."""
        ...

    def shutdown(self) -> None:
        """Leave the swarm's averaging and stop the optimizer's processes."""
        ...


def warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> Any:
    """Linear learning-rate warm-up over ``warmup_steps`` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps))
    )


def _inner_optimizer(spec: RunSpec) -> Any:
    opt = spec.optimizer
    return partial(ClippedAdamW, lr=opt.lr, betas=opt.betas, max_grad_norm=opt.grad_clip)


def build_optimizer(
    spec: RunSpec,
    model: torch.nn.Module,
    dht: hivemind.DHT,
    guard: SwarmGuard,
    micro_batch_size: int,
) -> SwarmOptimizer:
    """The run's collaborative optimizer over ``model``; create it in the main thread."""
    opt = spec.optimizer
    if opt.mode == "diloco":
        from crowdtrain.node.swarm.diloco import DiLoCoConfig, DiLoCoOptimizer

        return DiLoCoOptimizer(
            DiLoCoConfig.from_spec(spec, client_mode=dht.client_mode),
            dht=dht,
            model=model,
            params=param_groups(model, opt.weight_decay),
            inner_optimizer=_inner_optimizer(spec),
            scheduler=partial(warmup, warmup_steps=opt.warmup_steps),
            swarm_guard=guard,
        )
    return GuardedOptimizer(**sync_options(spec, model, dht, guard, micro_batch_size))


def sync_options(
    spec: RunSpec,
    model: torch.nn.Module,
    dht: hivemind.DHT,
    guard: SwarmGuard,
    micro_batch_size: int,
    partial_fails: bool = False,
) -> dict[str, Any]:
    """The keyword arguments of a sync run's :class:`GuardedOptimizer` (or of a class
    derived from it: the keeper's step follower uses the same, with ``partial_fails``: a
    gradient round that some reducer did not answer fails for it, in either mode)."""
    opt, swarm = spec.optimizer, spec.swarm
    return dict(
        swarm_guard=guard,
        model=model,
        dht=dht,
        run_id=spec.run.id,
        target_batch_size=opt.target_batch_size,
        batch_size_per_step=micro_batch_size,
        params=param_groups(model, opt.weight_decay),
        optimizer=_inner_optimizer(spec),
        scheduler=partial(warmup, warmup_steps=opt.warmup_steps),
        matchmaking_time=swarm.matchmaking_time_s,
        averaging_timeout=swarm.averaging_timeout_s,
        load_state_timeout=swarm.load_state_timeout_s,
        average_state_every=swarm.average_state_every,
        offload_optimizer=opt.offload_optimizer or opt.delay_optimizer_step,
        delay_optimizer_step=opt.delay_optimizer_step,
        delay_grad_averaging=opt.delay_grad_averaging,
        grad_compression=compression(opt.grad_compression),
        state_averaging_compression=compression(opt.state_compression),
        load_state_compression=compression(opt.state_compression),
        # hivemind inverts this flag internally; passing the DHT's own value is safe.
        client_mode=dht.client_mode,
        strict_steps=swarm.strict_steps,
        grad_averager_factory=partial(
            GuardedGradientAverager,
            guard=guard.config,
            exact=swarm.strict_steps,
            fail_partial=partial_fails,
            request_timeout=swarm.request_timeout_s,
        ),
        averager_opts={"request_timeout": swarm.request_timeout_s},
        tracker_opts={"metadata_expiration": swarm.metadata_expiration_s},
        verbose=False,
    )


def progress_key(optimizer: SwarmOptimizer) -> str:
    """The public key (hex) that signs this peer's progress records in the DHT, for the
    coordinator to match those records to this node (hivemind keeps it private)."""
    return str(optimizer.tracker._local_public_key.hex())


__all__ = [
    "ClippedAdamW",
    "SwarmOptimizer",
    "build_optimizer",
    "progress_key",
    "sync_options",
    "warmup",
]
