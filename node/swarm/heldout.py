"""A model state's loss on held-out sequences: how downloaded state that no checkpoint
vouches for, and a DiLoCo round's average, are judged
(:func:`~crowdtrain.node.swarm.guard.loss_problem`)."""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
import torch

from crowdtrain.model import sequence_losses
from crowdtrain.node.swarm.following import seeded_model
from crowdtrain.protocol.runspec import RunSpec
from crowdtrain.protocol.shards import num_windows, read_shard, window

HELDOUT_SEQUENCES = 16  # a forward pass of this many costs the tiny run's model milliseconds


class HeldoutLoss:
    """The mean loss a state gives on :data:`HELDOUT_SEQUENCES` of ``sequences`` (int64
    [n, seq_len + 1]), computed in fp32 on the CPU with a model of its own, built for each
    judgement and let go after (a state load is rare; a large model's copy is not kept):
    the caller's is left alone.

    Which sequences is each process's own choice, drawn from the operating system's
    randomness: the validation data is public, and parts or state tuned to keep the loss
    of known sequences low (the first ones, say) while breaking the model must now keep
    it low on whichever any peer drew."""

    def __init__(self, spec: RunSpec, sequences: torch.Tensor):
        if len(sequences) == 0:
            raise ValueError("no held-out sequences to judge state on")
        self.spec = spec
        picks = sorted(secrets.SystemRandom().sample(range(len(sequences)), _count(len(sequences))))
        self.batch = sequences[picks].to("cpu", torch.int64)

    @classmethod
    def from_shard(cls, spec: RunSpec, shard: Path) -> HeldoutLoss:
        """Windows of a (validation) shard file, drawn as :class:`HeldoutLoss` draws."""
        tokens = read_shard(shard)
        seq_len = spec.model.seq_len
        total = num_windows(len(tokens), seq_len)
        picks = sorted(secrets.SystemRandom().sample(range(total), _count(total)))
        windows = [window(tokens, i, seq_len) for i in picks]
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

    def of_model(self, model: torch.nn.Module) -> float:
        """The mean loss of ``model`` as it is (a GPT; its training mode is restored
        after), without the copy :meth:`__call__` makes: for a caller that judges its own
        parameters often (the keeper's step follower, at every step it keeps)."""
        device = next(model.parameters()).device
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                batch = self.batch.to(device)
                logits, _ = model(batch[:, :-1])
                return float(sequence_losses(logits.float(), batch[:, 1:]).mean())
        finally:
            model.train(training)


def _count(available: int) -> int:
    return min(HELDOUT_SEQUENCES, available)


__all__ = ["HELDOUT_SEQUENCES", "HeldoutLoss"]
