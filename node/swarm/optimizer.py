"""The collaborative optimizer a node trains with, built from the run spec.

``mode = "sync"`` is hivemind's Optimizer (guarded), averaging gradients each
collaborative step; ``mode = "diloco"`` is :class:`~crowdtrain.node.swarm.diloco.DiLoCoOptimizer`,
local AdamW steps with an outer Nesterov step on averaged pseudo-gradients.
Both are built here so that the trainer drives them the same way: ``step()``
after each micro-batch, ``local_epoch`` for the swarm's step, ``tracker`` for
the swarm's progress, ``load_state_from_peers()`` and ``shutdown()``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import hivemind
import torch

from crowdtrain.model import param_groups
from crowdtrain.node.swarm.averagers import GuardedGradientAverager
from crowdtrain.node.swarm.compression import compression
from crowdtrain.node.swarm.guard import SwarmGuard
from crowdtrain.node.swarm.sync import GuardedOptimizer
from crowdtrain.protocol.runspec import RunSpec


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that clips the (already averaged) gradient norm before each step.

    hivemind applies the optimizer to the swarm's averaged gradients, so
    clipping belongs here rather than in the training loop.
    """

    def __init__(self, params: Any, max_grad_norm: float, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.max_grad_norm > 0:
            grads = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        return super().step(closure)


def warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> Any:
    """Linear learning-rate warm-up over ``warmup_steps`` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps))
    )


def build_optimizer(
    spec: RunSpec,
    model: torch.nn.Module,
    dht: hivemind.DHT,
    guard: SwarmGuard,
    micro_batch_size: int,
) -> Any:
    """The run's collaborative optimizer over ``model``; create it in the main thread."""
    opt = spec.optimizer
    inner = partial(ClippedAdamW, lr=opt.lr, betas=opt.betas, max_grad_norm=opt.grad_clip)
    scheduler = partial(warmup, warmup_steps=opt.warmup_steps)
    if opt.mode == "diloco":
        from crowdtrain.node.swarm.diloco import DiLoCoOptimizer

        return DiLoCoOptimizer(
            dht=dht,
            run_id=spec.run.id,
            model=model,
            params=param_groups(model, opt.weight_decay),
            inner_optimizer=inner,
            scheduler=scheduler,
            spec=opt,
            swarm=spec.swarm,
            client_mode=dht.client_mode,
            swarm_guard=guard,
            pseudo_grad_compression=compression(opt.pseudo_grad_compression),
            state_compression=compression(opt.state_compression),
        )
    swarm = spec.swarm
    return GuardedOptimizer(
        swarm_guard=guard,
        dht=dht,
        run_id=spec.run.id,
        target_batch_size=opt.target_batch_size,
        batch_size_per_step=micro_batch_size,
        params=param_groups(model, opt.weight_decay),
        optimizer=inner,
        scheduler=scheduler,
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
        grad_averager_factory=partial(
            GuardedGradientAverager,
            guard=guard.config,
            request_timeout=swarm.request_timeout_s,
        ),
        averager_opts={"request_timeout": swarm.request_timeout_s},
        tracker_opts={"metadata_expiration": swarm.metadata_expiration_s},
        verbose=False,
    )


def swarm_ids(dht: hivemind.DHT | None, optimizer: Any) -> dict[str, str]:
    """A node's hivemind identities, for the coordinator to match DHT records to it."""
    if dht is None or optimizer is None:
        return {"dht_peer_id": "", "progress_key": ""}
    try:
        return {
            "dht_peer_id": dht.peer_id.to_base58(),
            # The subkey its progress records are signed under (hivemind keeps it private).
            "progress_key": optimizer.tracker._local_public_key.hex(),
        }
    except Exception:  # not started, or shutting down
        return {"dht_peer_id": "", "progress_key": ""}


__all__ = ["ClippedAdamW", "build_optimizer", "swarm_ids", "warmup"]
