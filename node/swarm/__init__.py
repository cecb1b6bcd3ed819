"""A node's side of the tensor plane: the collaborative optimizers (sync and DiLoCo) over
hivemind, the checks on what swarm peers send (:mod:`guard`), the averagers and
all-reduce that apply them, and the compression of what crosses the network.

Knows nothing about the coordinator, data or receipts.
"""
