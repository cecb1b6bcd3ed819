"""The tokens every efficiency run trains and is judged on, cut from the prepared shards.

Owns what the baseline, the solo loop and the plain-hivemind peers must agree
on with the nodes: how training sequences are cut from the shards, which
validation sequences every final model is evaluated on, and the loss a saved
checkpoint scores on them. Knows nothing about coordinators or swarms.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.efficiency.specs import gpt_config

# Validation sequences every final model is judged on (the first windows of the val shard).
NUM_VAL_SEQUENCES = 512
# The nodes' own evaluations use the spec's [eval] num_sequences; curves use that many too.


def train_batches(
    data: Path, seed: int, seq_len: int, batch_size: int, part: int = 0, num_parts: int = 1
) -> Iterator[np.ndarray]:
    """Batches ``[batch_size, seq_len + 1]`` from the prepared training shards, forever.

    Shards are visited in an order seeded by ``seed`` (epoch after epoch), sequences
    within a shard in protocol.shards' seeded order, as nodes train them. ``part`` of
    ``num_parts`` takes every ``num_parts``-th shard, so separate processes never
    train the same sequences.
    """
    from crowdtrain.protocol.shards import batch_windows, load_manifest, read_shard, sequence_order

    manifest = load_manifest(data)
    shards = sorted(manifest.train_shards, key=lambda s: s.id)
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(shards))
        for i in order[part::num_parts]:
            entry = shards[int(i)]
            tokens = read_shard(data / entry.file, entry)
            windows = sequence_order(seed, epoch, entry.id, len(tokens), seq_len, batch_size)
            for b in range(len(windows) // batch_size):
                yield batch_windows(tokens, windows, b, batch_size, seq_len)
        epoch += 1


def val_sequences(data: Path, seq_len: int, count: int) -> Any:
    """The first ``count`` windows of the run's validation shard, int64 [count, seq_len + 1]."""
    import torch

    from crowdtrain.protocol.shards import load_manifest, num_windows, read_shard, window

    manifest = load_manifest(data)
    entry = manifest.val_shards[0]
    tokens = read_shard(data / entry.file, entry)
    n = min(count, num_windows(len(tokens), seq_len))
    return torch.from_numpy(
        np.stack([window(tokens, i, seq_len) for i in range(n)]).astype(np.int64)
    )


def evaluate_checkpoint(path: Path, spec: dict[str, Any], sequences: Any, device: str) -> float:
    """Validation loss (nats) of the model saved at ``path`` on ``sequences``."""
    from crowdtrain.model import GPT, evaluate, load_checkpoint

    model = GPT(gpt_config(spec))
    state, _ = load_checkpoint(path)
    model.load_state_dict(state)
    return evaluate(model.to(device), sequences, batch_size=16, device=device).loss


def checkpoint_metadata(path: Path) -> dict[str, str]:
    from crowdtrain.model import load_checkpoint

    return load_checkpoint(path)[1]
