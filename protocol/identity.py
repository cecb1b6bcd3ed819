"""Ed25519 identities and signed, replay-proof envelopes.

An envelope is msgpack ``{kind, nonce, timestamp, payload}`` signed by the
sender's key. :func:`open_envelope` checks the signature, the kind, the age and
the nonce (through a :class:`ReplayGuard`) before anyone reads the payload.
Knows nothing about gRPC or storage.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from crowdtrain.protocol.errors import IdentityError, MalformedMessageError
from crowdtrain.protocol.files import atomic_write

MAX_ENVELOPE_BYTES = 64 * 1024
DEFAULT_MAX_AGE_S = 120.0
_NONCE_BYTES = 16


def peer_id_of(public_key: bytes) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


class Identity:
    """An Ed25519 key pair that signs a peer's messages."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._private_key = private_key
        self.public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id = peer_id_of(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | Path) -> Identity:
        """Load the key at ``path``, or create one there (mode 0600) on first run."""
        path = Path(path)
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError) as e:
                raise IdentityError(
                    f"identity key {path} is not a valid PEM private key ({e}); "
                    "move it away to create a new identity"
                ) from None
            if not isinstance(key, Ed25519PrivateKey):
                raise IdentityError(f"identity key {path} is not an Ed25519 key")
            return cls(key)
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = identity._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # 0600 from the start: the key a peer's credit is bound to is never readable by others.
        atomic_write(path, pem, mode=0o600)
        return identity

    def sign(self, data: bytes) -> bytes:
        return self._private_key.sign(data)


@dataclass(frozen=True)
class Envelope:
    """A signed message as it travels: body (msgpack), signature, sender's public key."""

    body: bytes
    signature: bytes
    public_key: bytes


@dataclass(frozen=True)
class OpenedEnvelope:
    """A verified envelope: who sent it and what it says."""

    peer_id: str
    public_key: bytes
    kind: str
    timestamp: float
    payload: dict[str, Any]


def seal(identity: Identity, kind: str, payload: dict[str, Any]) -> Envelope:
    """Sign ``payload`` as a message of ``kind`` with a fresh nonce and the current time."""
    body = msgpack.packb(
        {
            "kind": kind,
            "nonce": os.urandom(_NONCE_BYTES),
            "timestamp": time.time(),
            "payload": payload,
        },
        use_bin_type=True,
    )
    return Envelope(body=body, signature=identity.sign(body), public_key=identity.public_key)


def unpack_strict(data: bytes) -> Any:
    """msgpack decoding with bounded sizes and no extension types."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise MalformedMessageError(
            f"message of {len(data)} bytes exceeds the limit of {MAX_ENVELOPE_BYTES}"
        )
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_ENVELOPE_BYTES,
            max_str_len=MAX_ENVELOPE_BYTES,
            max_array_len=4096,
            max_map_len=4096,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises many types for malformed input
        raise MalformedMessageError(f"malformed msgpack: {type(e).__name__}") from None


def open_envelope(
    envelope: Envelope,
    kind: str,
    guard: ReplayGuard,
    expected_public_key: bytes | None = None,
    max_age_s: float = DEFAULT_MAX_AGE_S,
) -> OpenedEnvelope:
    """Verify an envelope and return its contents, or raise :class:`IdentityError`.

    Checks, in order: the public key's form, the sender (when
    ``expected_public_key`` is given), the signature, the body's shape, the
    kind, the age and the nonce. Nothing is recorded unless every check passes.
    """
    if len(envelope.body) > MAX_ENVELOPE_BYTES:
        raise MalformedMessageError(
            f"envelope body of {len(envelope.body)} bytes exceeds the limit of {MAX_ENVELOPE_BYTES}"
        )
    if len(envelope.public_key) != 32:
        raise IdentityError("public key must be 32 bytes of Ed25519")
    if expected_public_key is not None and envelope.public_key != expected_public_key:
        raise IdentityError("message signed by a different key than the session's peer")
    try:
        Ed25519PublicKey.from_public_bytes(envelope.public_key).verify(
            envelope.signature, envelope.body
        )
    except (InvalidSignature, ValueError):
        raise IdentityError("signature does not verify") from None
    body = unpack_strict(envelope.body)
    if not isinstance(body, dict) or set(body) != {"kind", "nonce", "timestamp", "payload"}:
        raise MalformedMessageError(
            "envelope body must have exactly kind, nonce, timestamp, payload"
        )
    if body["kind"] != kind:
        raise IdentityError(f"expected a {kind!r} message, got {body['kind']!r}")
    nonce, timestamp, payload = body["nonce"], body["timestamp"], body["payload"]
    if not isinstance(nonce, bytes) or len(nonce) != _NONCE_BYTES:
        raise MalformedMessageError("nonce must be 16 bytes")
    if (
        not isinstance(timestamp, int | float)
        or isinstance(timestamp, bool)
        or not math.isfinite(timestamp)
    ):
        raise MalformedMessageError("timestamp must be a finite number")
    if not isinstance(payload, dict):
        raise MalformedMessageError("payload must be a map")
    age = time.time() - float(timestamp)
    if abs(age) > max_age_s:
        raise IdentityError(
            f"message timestamp is {age:+.0f}s off the coordinator's clock "
            f"(limit {max_age_s:.0f}s); check this machine's clock"
        )
    guard.check_and_remember(envelope.public_key, nonce, float(timestamp))
    return OpenedEnvelope(
        peer_id=peer_id_of(envelope.public_key),
        public_key=envelope.public_key,
        kind=kind,
        timestamp=float(timestamp),
        payload=payload,
    )


NonceJournal = Callable[[bytes, bytes, float], None]


class ReplayGuard:
    """Remembers nonces for as long as their messages could still pass the age check.

    ``journal`` (optional) is told of every nonce accepted, so a coordinator
    can write them down and, after a restart, seed a new guard with
    :meth:`remember` and still refuse a replay from before the restart.
    """

    def __init__(self, max_age_s: float = DEFAULT_MAX_AGE_S, journal: NonceJournal | None = None):
        self.max_age_s = max_age_s
        self._journal = journal
        self._seen: dict[tuple[bytes, bytes], float] = {}
        # The same nonces by timestamp, oldest first: pruning costs O(log n) per nonce
        # whatever the number held (a rebuild of the whole dict per message did not).
        self._by_age: list[tuple[float, tuple[bytes, bytes]]] = []
        self._lock = threading.Lock()

    def _add(self, key: tuple[bytes, bytes], timestamp: float) -> None:
        self._seen[key] = timestamp
        heapq.heappush(self._by_age, (timestamp, key))

    def _prune(self, now: float) -> None:
        horizon = now - 2 * self.max_age_s
        while self._by_age and self._by_age[0][0] <= horizon:
            timestamp, key = heapq.heappop(self._by_age)
            if self._seen.get(key) == timestamp:
                del self._seen[key]

    def __len__(self) -> int:
        return len(self._seen)

    def remember(self, public_key: bytes, nonce: bytes, timestamp: float) -> None:
        """Mark a nonce as used without checking it (seeding from a journal)."""
        with self._lock:
            self._add((public_key, nonce), timestamp)

    def check_and_remember(self, public_key: bytes, nonce: bytes, timestamp: float) -> None:
        now = time.time()
        with self._lock:
            self._prune(now)
            if (public_key, nonce) in self._seen:
                raise IdentityError("replayed message: this nonce was already used")
            if self._journal is not None:
                self._journal(public_key, nonce, timestamp)
            self._add((public_key, nonce), timestamp)


RUN_STATEMENT_PREFIX = b"crowdtrain-run/v1"


def run_statement(run_id: str, spec_hash: str, manifest_hash: str) -> bytes:
    """What a coordinator signs to vouch for a published run."""
    return b"\0".join(
        [RUN_STATEMENT_PREFIX, run_id.encode(), spec_hash.encode(), manifest_hash.encode()]
    )


SWARM_BINDING_PREFIX = b"crowdtrain-swarm-binding/v1"


def swarm_binding_statement(
    run_id: str, public_key: bytes, dht_peer_id: str, progress_key: str
) -> bytes:
    """What a node's two swarm keys (its libp2p identity and the key that signs its
    progress records) each sign to say they belong to crowdtrain key ``public_key`` in
    run ``run_id``: a coordinator binds a swarm id to a peer only with both."""
    return b"\0".join(
        [
            SWARM_BINDING_PREFIX,
            run_id.encode(),
            public_key.hex().encode(),
            dht_peer_id.encode(),
            progress_key.encode(),
        ]
    )


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> None:
    """Raise :class:`IdentityError` unless ``signature`` is ``public_key``'s over ``data``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        raise IdentityError("signature does not verify") from None
