"""A run's life on the coordinator: publishing it, its peers and their access, shard
leases, and the views people read.

Handlers in :mod:`~crowdtrain.coordinator.api` call these functions; the
records they share are in :mod:`~crowdtrain.coordinator.records`.
"""
