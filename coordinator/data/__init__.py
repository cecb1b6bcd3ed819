"""A run's data: reading a corpus (``prepare-data``) and writing it as token shards.

Stands apart from the serving coordinator: nothing here knows about runs,
peers or the swarm. The shard and manifest formats are in
:mod:`crowdtrain.protocol.shards`.
"""
