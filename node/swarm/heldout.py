"""A model state's loss on held-out sequences: how the keeper's follower judges state
that no checkpoint vouches for (:func:`~crowdtrain.node.swarm.guard.loss_problem`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from crowdtrain.model import sequence_losses
from crowdtrain.node.swarm.following import seeded_model
from crowdtrain.protocol.runspec import RunSpec
from crowdtrain.protocol.shards import num_windows, read_shard, window

HELDOUT_SEQUENCES = 16  # a forward pass of this many costs the follower well under a second


class HeldoutLoss:
    """The mean loss a state gives on the first ``count`` windows of a validation shard,
    computed in fp32 on the CPU with a model of its own (the caller's is left alone)."""

    def __init__(self, spec: RunSpec, shard: Path, count: int = HELDOUT_SEQUENCES):
        tokens = read_shard(shard)
        seq_len = spec.model.seq_len
        n = min(count, num_windows(len(tokens), seq_len))
        if n == 0:
            raise ValueError(f"{shard} holds no window of {seq_len + 1} tokens")
        self.batch = torch.from_numpy(
            np.stack([window(tokens, i, seq_len) for i in range(n)]).astype(np.int64)
        )
        self.model = seeded_model(spec).eval()
        self._names = {name for name, _ in self.model.named_parameters(remove_duplicate=False)}

    def __call__(self, state: dict[str, torch.Tensor]) -> float:
        missing = self._names - set(state)
        if missing:
            raise ValueError(f"the state lacks {sorted(missing)[:3]}")
        self.model.load_state_dict(state, strict=False)
        with torch.no_grad():
            logits, _ = self.model(self.batch[:, :-1])
            return float(sequence_losses(logits.float(), self.batch[:, 1:]).mean())


__all__ = ["HELDOUT_SEQUENCES", "HeldoutLoss"]
