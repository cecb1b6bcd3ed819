"""Register a test peer the way the gRPC handler does, and the key that signs test runs."""

import os

from crowdtrain.coordinator.runs import peers
from crowdtrain.coordinator.runs.peers import PeerConfig
from crowdtrain.protocol.identity import Identity, ReplayGuard, open_envelope, seal
from crowdtrain.protocol.messages import RegisterPayload

COORDINATOR_KEY = Identity.generate()


def join_peer(store, run_id, identity=None, name="laptop", invite="", config=None):
    """A verified register envelope and a parsed payload, handed to ``peers.register``."""
    identity = identity or Identity.generate()
    info = RegisterPayload(
        challenge=os.urandom(32), name=name, device="cpu", versions="crowdtrain test", invite=invite
    )
    opened = open_envelope(seal(identity, "register", info.model_dump()), "register", ReplayGuard())
    return peers.register(store, config or PeerConfig(), run_id, opened, info)
