"""A node's side of the tensor plane: the collaborative optimizers over hivemind behind
one interface (:mod:`optimizer`: sync in :mod:`sync`, DiLoCo's rounds in :mod:`diloco`
and its served global state in :mod:`diloco_state`), the checks on what swarm peers
send (:mod:`guard`), the averagers and all-reduce that apply them, and the compression
of what crosses the network.

Knows nothing about the coordinator, data or receipts.
"""
