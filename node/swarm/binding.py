"""Proof that this node holds the keys behind its swarm ids, for the coordinator.

The coordinator binds a hivemind peer id and a progress-record key to a
crowdtrain peer only when both keys sign the binding statement
(:func:`~crowdtrain.protocol.identity.swarm_binding_statement`); their ids are
public in the DHT, so without this anyone could claim them. The libp2p key is
a fresh identity file this node writes for each start (hivemind's own
format, so its daemon uses it); the progress key is hivemind's process-wide
key that signs this node's progress records.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from crowdtrain.protocol.identity import swarm_binding_statement
from crowdtrain.protocol.messages import SwarmProof

logger = logging.getLogger(__name__)

# hivemind's RSA signatures (hivemind.utils.crypto), which the coordinator checks with
# hivemind's RSAPublicKey.verify.
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


def fresh_identity_path(folder: Path) -> Path:
    """Where hivemind writes this start's libp2p identity: removed first, so hivemind
    makes a new one (and skips its slow check that a reused one is free)."""
    path = folder / "swarm-identity.key"
    path.unlink(missing_ok=True)
    return path


def swarm_proof(
    identity_path: Path, run_id: str, public_key: bytes, dht_peer_id: str, progress_key: str
) -> SwarmProof | None:
    """Both swarm keys' signatures over the binding statement; None (with a warning) if
    this process's progress key is not the one its records are signed with."""
    validator = RSASignatureValidator(RSAPrivateKey.process_wide())
    if validator.local_public_key.hex() != progress_key:
        logger.warning("the progress records' key is not this process's: no swarm proof")
        return None
    statement = swarm_binding_statement(run_id, public_key, dht_peer_id, progress_key)
    der = crypto_pb2.PrivateKey.FromString(identity_path.read_bytes()).data
    dht_key = serialization.load_der_private_key(der, password=None)
    assert isinstance(dht_key, rsa.RSAPrivateKey), "hivemind writes RSA identities"
    dht_public = dht_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return SwarmProof(
        dht_public_key=dht_public.hex(),
        dht_signature=base64.b64encode(dht_key.sign(statement, _PSS, hashes.SHA256())).decode(),
        progress_signature=RSAPrivateKey.process_wide().sign(statement).decode(),
    )
