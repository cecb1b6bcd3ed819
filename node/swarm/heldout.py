"""A model state's loss on held-out sequences: how downloaded state that no checkpoint
vouches for is judged (:func:`~crowdtrain.node.swarm.guard.loss_problem`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from crowdtrain.model import sequence_losses
from crowdtrain.node.swarm.following import seeded_model
from crowdtrain.protocol.runspec import RunSpec
from crowdtrain.protocol.shards import num_windows, read_shard, window

HELDOUT_SEQUENCES = 16  # a forward pass of this many costs the tiny run's model milliseconds


class HeldoutLoss:
    """The mean loss a state gives on ``sequences`` (int64 [n, seq_len + 1]), computed in
    fp32 on the CPU with a model of its own, built for each judgement and let go after
    (a state load is rare; a large model's copy is not kept): the caller's is left alone."""

    def __init__(self, spec: RunSpec, sequences: torch.Tensor):
        if len(sequences) == 0:
            raise ValueError("no held-out sequences to judge state on")
        self.spec = spec
        self.batch = sequences[:HELDOUT_SEQUENCES].to("cpu", torch.int64)

    @classmethod
    def from_shard(cls, spec: RunSpec, shard: Path) -> HeldoutLoss:
        """The first windows of a (validation) shard file."""
        tokens = read_shard(shard)
        seq_len = spec.model.seq_len
        n = min(HELDOUT_SEQUENCES, num_windows(len(tokens), seq_len))
        windows = [window(tokens, i, seq_len) for i in range(n)]
        if not windows:
            raise ValueError(f"{shard} holds no window of {seq_len + 1} tokens")
        return cls(spec, torch.from_numpy(np.stack(windows).astype(np.int64)))

    def __call__(self, state: dict[str, torch.Tensor]) -> float:
        with torch.random.fork_rng(devices=[]):  # the caller's random state is its own
            model = seeded_model(self.spec).eval()
        names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        missing = names - set(state)
        if missing:
            raise ValueError(f"the state lacks {sorted(missing)[:3]}")
        model.load_state_dict({k: v.float().cpu() for k, v in state.items()}, strict=False)
        with torch.no_grad():
            logits, _ = model(self.batch[:, :-1])
            return float(sequence_losses(logits.float(), self.batch[:, 1:]).mean())


__all__ = ["HELDOUT_SEQUENCES", "HeldoutLoss"]
