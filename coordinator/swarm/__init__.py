"""The coordinator's side of the tensor plane: its hivemind DHT peer, the checkpoint keeper
and where checkpoints live.

Reads the swarm; never on its hot path. Nothing here knows about leases or
the ledger.
"""
