"""What a node's device can do and how it is used: which device, its micro-batch, mixed
precision and compilation, non-finite checks, and the test hooks that make a node
misbehave on purpose.

Knows nothing about the swarm, the coordinator or the training loop.
"""
