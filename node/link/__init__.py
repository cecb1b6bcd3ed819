"""A node's link to its coordinator: gRPC for the control plane (:mod:`grpc`), HTTP for
discovery, files and the run's public view (:mod:`http`), the session its calls share
(:mod:`session`), the shards it leases and fetches (:mod:`supply`), the background
heartbeat with receipts and evaluations (:mod:`heartbeat`), and the coordinator keys it
trusts (:mod:`pins`).

Knows nothing about the swarm or the training loop.
"""
