"""Which swarm ids belong to which peer: bound once, and only with proof.

A node's heartbeat names its hivemind peer id (``dht_peer_id``, the hash of
its libp2p key) and the key that signs its progress records in the DHT
(``progress_key``). Both are public: anyone can read them from the DHT. The
ledger reads a peer's progress records by them and peers report averaging
parts by them, so a peer that claimed another's ids would be credited with
that peer's progress or could frame it. An id is therefore bound to a peer
only with a :class:`~crowdtrain.protocol.messages.SwarmProof` (both keys'
signatures over the peer's crowdtrain key and the run), and never to a second
peer. No HTTP or gRPC here.
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPublicKey

from crowdtrain.coordinator.records import Session
from crowdtrain.coordinator.store import Store
from crowdtrain.protocol.errors import AccessError
from crowdtrain.protocol.identity import swarm_binding_statement
from crowdtrain.protocol.messages import SwarmProof


class BindingError(AccessError):
    """Swarm ids a peer may not take: unproven, or another peer's."""


def dht_peer_id_of(der_public_key: bytes) -> str:
    """The hivemind (libp2p) peer id of an RSA public key in DER form."""
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der_public_key)
    # A multihash: code 0x12 (sha2-256), length 32, digest (the libp2p peer id spec).
    digest = b"\x12\x20" + hashlib.sha256(encoded.SerializeToString()).digest()
    return str(PeerID(digest).to_base58())


def _progress_public_key(progress_key: str) -> RSAPublicKey:
    """The RSA key inside a hivemind progress record's subkey (``[owner:<ssh key>]``)."""
    raw = bytes.fromhex(progress_key)
    prefix, suffix = RSASignatureValidator.PUBLIC_KEY_FORMAT.split(b"_key_")
    if not (raw.startswith(prefix) and raw.endswith(suffix)):
        raise BindingError("progress_key is not a hivemind progress record's owner key")
    try:
        return RSAPublicKey.from_bytes(raw[len(prefix) : len(raw) - len(suffix)])
    except ValueError as e:
        raise BindingError(f"progress_key holds no RSA public key: {e}") from None


def check_proof(
    run_id: str, public_key: bytes, dht_peer_id: str, progress_key: str, proof: SwarmProof | None
) -> None:
    """Raise :class:`BindingError` unless ``proof`` shows that whoever holds crowdtrain key
    ``public_key`` also holds the keys behind ``dht_peer_id`` and ``progress_key``."""
    if proof is None:
        raise BindingError(
            "new swarm ids need a swarm_proof (both swarm keys' signatures); update "
            "crowdtrain-node, which sends it"
        )
    statement = swarm_binding_statement(run_id, public_key, dht_peer_id, progress_key)
    if dht_peer_id:
        try:
            der = bytes.fromhex(proof.dht_public_key)
            key = serialization.load_der_public_key(der)
        except ValueError as e:
            raise BindingError(f"swarm_proof.dht_public_key is not a DER public key: {e}") from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise BindingError("swarm_proof.dht_public_key is not an RSA key (hivemind's kind)")
        if dht_peer_id_of(der) != dht_peer_id:
            raise BindingError(f"swarm_proof.dht_public_key is not the key of {dht_peer_id}")
        if not RSAPublicKey(key).verify(statement, proof.dht_signature.encode()):
            raise BindingError("swarm_proof.dht_signature does not verify")
    if progress_key:
        verifier = _progress_public_key(progress_key)
        if not verifier.verify(statement, proof.progress_signature.encode()):
            raise BindingError("swarm_proof.progress_signature does not verify")


def bind_swarm_ids(
    store: Store,
    session: Session,
    peer: dict[str, Any],
    dht_peer_id: str,
    progress_key: str,
    proof: SwarmProof | None,
) -> None:
    """Bind the swarm ids of ``peer`` (the session's stored row), once checked: unchanged
    ids cost nothing; new ones need their proof and must belong to no other peer."""
    if (peer["dht_peer_id"], peer["progress_key"]) == (dht_peer_id, progress_key):
        return
    for holder in (
        store.peer_by_dht_id(session.run_id, dht_peer_id) if dht_peer_id else None,
        store.peer_by_progress_key(session.run_id, progress_key) if progress_key else None,
    ):
        if holder is not None and holder["peer_id"] != session.peer_id:
            raise BindingError(
                f"swarm ids {dht_peer_id or '-'} / progress key {progress_key[:24]}... belong to "
                "another peer of this run"
            )
    check_proof(session.run_id, session.public_key, dht_peer_id, progress_key, proof)
    store.set_swarm_ids(session.run_id, session.peer_id, dht_peer_id, progress_key)
