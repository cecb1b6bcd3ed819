"""A peer's two swarm keys, made the way a node has them, for tests that bind swarm ids.

A node proves its hivemind peer id (a libp2p RSA identity) and its progress
records' key (hivemind's RSA key) to the coordinator by signing the binding
statement with both (node/swarm/binding.py); tests do the same by hand.
"""

from __future__ import annotations

import base64
import pickle
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from crowdtrain.coordinator.runs.bindings import dht_peer_id_of
from crowdtrain.protocol.identity import swarm_binding_statement
from crowdtrain.protocol.messages import SwarmProof

if TYPE_CHECKING:
    from tests.swarm import Process, Swarm

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


class SwarmKeys:
    """A libp2p identity key and a progress-record key, and the ids they stand for."""

    def __init__(self) -> None:
        self.dht_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = self.dht_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.dht_public = der.hex()
        self.dht_peer_id = dht_peer_id_of(der)
        self.progress_private = RSAPrivateKey()
        self.progress_key = RSASignatureValidator(self.progress_private).local_public_key.hex()

    def proof(
        self, run_id: str, public_key: bytes, dht_peer_id: str = "", progress_key: str = ""
    ) -> SwarmProof:
        """Both keys' signatures over the statement for ``public_key`` (a crowdtrain key)
        and the given ids (these keys' own by default)."""
        statement = swarm_binding_statement(
            run_id,
            public_key,
            dht_peer_id or self.dht_peer_id,
            progress_key or self.progress_key,
        )
        signature = self.dht_key.sign(statement, _PSS, hashes.SHA256())
        return SwarmProof(
            dht_public_key=self.dht_public,
            dht_signature=base64.b64encode(signature).decode(),
            progress_signature=self.progress_private.sign(statement).decode(),
        )

    def write(self, identity_path: Path, progress_key_path: Path) -> None:
        """Both private keys as a hivemind process loads them: the libp2p identity file
        (hivemind's DHT ``identity_path``) and the pickled progress key."""
        der = self.dht_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        identity = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=der)
        identity_path.write_bytes(identity.SerializeToString())
        progress_key_path.write_bytes(pickle.dumps(self.progress_private))

    def fields(self, run_id: str, public_key: bytes) -> dict[str, Any]:
        """A heartbeat's swarm fields, as an honest node sends them to bind its ids."""
        return {
            "dht_peer_id": self.dht_peer_id,
            "progress_key": self.progress_key,
            "swarm_proof": self.proof(run_id, public_key).model_dump(),
        }


def publish_fake_progress(
    swarm: Swarm, name: str, run_id: str, keys: SwarmKeys, folder: Path, ahead: int = 0
) -> Process:
    """Start ``tests/fake_progress.py`` as process ``name``: progress records for ``run_id``
    signed with ``keys`` (written to ``folder``), claiming work nobody does; with
    ``ahead``, as a full peer that many epochs ahead of the swarm's records."""
    keys.write(folder / "identity.key", folder / "progress.key")
    return swarm.spawn(
        name,
        [
            sys.executable,
            str(Path(__file__).parent / "fake_progress.py"),
            "--initial-peers",
            *swarm.ports["initial_peers"],
            "--run",
            run_id,
            "--identity",
            str(folder / "identity.key"),
            "--progress-key",
            str(folder / "progress.key"),
            "--ahead",
            str(ahead),
        ],
    )
