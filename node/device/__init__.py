"""What a node's device can do and how it is used: which device, its micro-batch, mixed
precision and compilation, non-finite checks, and the test hooks that make a node
misbehave on purpose (:mod:`hooks`: every hook, read once where the process starts).

Knows nothing about the swarm, the coordinator or the training loop.
"""
