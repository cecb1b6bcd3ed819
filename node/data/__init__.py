"""A node's data: verified shards on disk, the batches cut from them, and what was done
with each shard.

:mod:`.cache` downloads and checks shards; :mod:`.stream` cuts leased shards
into micro-batches (and the validation shard into its sequences);
:mod:`.shard_progress` accounts for each shard and makes its receipt. Knows
nothing about gRPC, the swarm or the model.
"""

from crowdtrain.node.data.cache import ShardCache
from crowdtrain.node.data.shard_progress import (
    LeasedShard,
    ShardProgress,
    load_position,
    save_position,
)
from crowdtrain.node.data.stream import ShardStream, validation_sequences

__all__ = [
    "LeasedShard",
    "ShardCache",
    "ShardProgress",
    "ShardStream",
    "load_position",
    "save_position",
    "validation_sequences",
]
