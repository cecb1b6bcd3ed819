"""What the keeper's two followers share: the model they start from, the outbox the keeper
reads (``round-<r>.safetensors``, and ``round-<r>.outer.safetensors`` for a DiLoCo
round's outer momentum) and the stats they write there.

The round follower (DiLoCo, :mod:`~crowdtrain.node.swarm.follower`) writes every
round; the step follower (sync, :mod:`~crowdtrain.node.swarm.step_follower`)
writes its step every ``[verify] checkpoint_every_s``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from crowdtrain.model import GPT, GPTConfig, params_sha256, save_checkpoint
from crowdtrain.node.stats.traffic import Traffic
from crowdtrain.protocol.files import atomic_write
from crowdtrain.protocol.runspec import RunSpec

OUTBOX_KEEP = 4  # rounds left in the outbox when nobody takes them (the keeper is away)
FOLLOWER_BONUS = 0.5  # added to the announced round: among peers of one round, ours is asked


def outbox_name(round_: int) -> str:
    return f"round-{round_}.safetensors"


def outbox_outer_name(round_: int) -> str:
    return f"round-{round_}.outer.safetensors"


def seeded_model(spec: RunSpec) -> GPT:
    """The run's model as every node initializes it (the run's seed, on the CPU)."""
    torch.manual_seed(spec.run.seed)
    return GPT(GPTConfig.from_spec(spec.model))


@dataclass
class FollowerStats:
    """What the follower did, written to ``stats.json`` in its outbox after every round."""

    round: int = 0
    followed: int = 0  # rounds averaged with the group and applied
    loaded: int = 0  # rounds loaded from a peer (missed, or our state differed)
    loaded_to_start: int = 0  # of those, loads before the first round followed (catching up)
    behind: int = 0  # of those, loads because the swarm stepped on before we joined its step
    missed: int = 0  # round ends with no group and no peer ahead
    jumped: int = 0  # rounds nobody could serve, skipped keeping our global parameters
    disagreed: int = 0  # rounds whose group said other global parameters were the swarm's
    unvouched: int = 0  # rounds followed but neither written nor served (held-out loss up)
    traffic: Traffic | None = None  # what it sent and received, by purpose

    def write(self, folder: Path) -> None:
        values = {k: v for k, v in self.__dict__.items() if k != "traffic"}
        if self.traffic is not None:
            values["traffic"] = {
                purpose: count.model_dump() for purpose, count in self.traffic.counts().items()
            }
        atomic_write(folder / "stats.json", json.dumps(values))


def put_in_outbox(
    outbox: Path,
    run_id: str,
    round_: int,
    state: dict[str, torch.Tensor],
    momentum: dict[str, torch.Tensor] | None,
) -> str:
    """Put round (or step) ``round_``'s parameters and outer ``momentum`` (None: sync,
    which has none) in the outbox, momentum first (the keeper takes a round once its
    parameters file is there), and drop the rounds nobody took. Returns the parameters'
    :func:`params_sha256`."""
    sha256 = params_sha256(state)
    metadata = {"run_id": run_id, "step": str(round_), "params_sha256": sha256}
    if momentum is not None:
        save_checkpoint(outbox / outbox_outer_name(round_), momentum, metadata)
    save_checkpoint(outbox / outbox_name(round_), state, metadata)
    waiting = sorted(
        int(p.name.split("-")[1].split(".")[0])
        for p in outbox.glob("round-*.safetensors")
        if not p.name.endswith(".outer.safetensors")
    )
    for old in waiting[:-OUTBOX_KEEP]:
        (outbox / outbox_name(old)).unlink(missing_ok=True)
        (outbox / outbox_outer_name(old)).unlink(missing_ok=True)
    return sha256


__all__ = [
    "FOLLOWER_BONUS",
    "FollowerStats",
    "outbox_name",
    "outbox_outer_name",
    "put_in_outbox",
    "seeded_model",
]
