"""Register a test peer the way the gRPC handler does."""

from crowdtrain.coordinator import peers
from crowdtrain.coordinator.peers import PeerConfig
from crowdtrain.protocol.identity import Identity, ReplayGuard, open_envelope, seal
from crowdtrain.protocol.messages import RegisterPayload


def join_peer(store, run_id, identity=None, name="laptop"):
    """A verified register envelope and a parsed payload, handed to ``peers.register``."""
    identity = identity or Identity.generate()
    info = RegisterPayload(name=name, device="cpu", versions="crowdtrain test")
    opened = open_envelope(seal(identity, "register", info.model_dump()), "register", ReplayGuard())
    return peers.register(store, PeerConfig(), run_id, opened, info)
