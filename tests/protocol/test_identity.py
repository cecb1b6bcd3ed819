import dataclasses
import os
import stat
import time

import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from crowdtrain.protocol import identity as identity_module
from crowdtrain.protocol.errors import IdentityError, MalformedMessageError
from crowdtrain.protocol.identity import (
    MAX_ENVELOPE_BYTES,
    Envelope,
    Identity,
    ReplayGuard,
    open_envelope,
    peer_id_of,
    run_statement,
    seal,
    unpack_strict,
    verify_signature,
)

PAYLOAD = {"name": "laptop", "device": "cpu", "versions": "crowdtrain 0.1.0"}


@pytest.fixture
def alice():
    return Identity.generate()


def _signed(identity: Identity, body: dict) -> Envelope:
    """An envelope with an arbitrary body, correctly signed by ``identity``."""
    data = msgpack.packb(body, use_bin_type=True)
    return Envelope(body=data, signature=identity.sign(data), public_key=identity.public_key)


def _body(**changes) -> dict:
    body = {"kind": "register", "nonce": os.urandom(16), "timestamp": time.time(), "payload": {}}
    body.update(changes)
    return body


def test_load_or_create_writes_private_key_and_reloads_it(tmp_path):
    path = tmp_path / "keys" / "node.pem"
    created = Identity.load_or_create(path)
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not path.with_suffix(".tmp").exists()

    loaded = Identity.load_or_create(path)
    assert loaded.peer_id == created.peer_id
    assert loaded.public_key == created.public_key
    assert len(created.peer_id) == 16
    assert created.peer_id == peer_id_of(created.public_key)


def test_two_identities_have_different_peer_ids(tmp_path):
    first = Identity.load_or_create(tmp_path / "a.pem")
    second = Identity.load_or_create(tmp_path / "b.pem")
    assert first.peer_id != second.peer_id


def test_garbage_key_file_names_the_path(tmp_path):
    path = tmp_path / "node.pem"
    path.write_bytes(b"this is not a key\n")
    with pytest.raises(IdentityError) as info:
        Identity.load_or_create(path)
    assert str(path) in str(info.value)
    assert "move it away" in str(info.value)
    assert path.read_bytes() == b"this is not a key\n"  # never overwritten


def test_key_of_another_algorithm_is_refused(tmp_path):
    path = tmp_path / "node.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(IdentityError, match="not an Ed25519 key") as info:
        Identity.load_or_create(path)
    assert str(path) in str(info.value)


def test_seal_and_open_round_trip(alice):
    envelope = seal(alice, "register", PAYLOAD)
    opened = open_envelope(envelope, "register", ReplayGuard())
    assert opened.peer_id == alice.peer_id
    assert opened.public_key == alice.public_key
    assert opened.kind == "register"
    assert opened.payload == PAYLOAD
    assert abs(opened.timestamp - time.time()) < 5


def test_open_with_expected_public_key(alice):
    envelope = seal(alice, "heartbeat", {"step": 1})
    opened = open_envelope(
        envelope, "heartbeat", ReplayGuard(), expected_public_key=alice.public_key
    )
    assert opened.payload == {"step": 1}


def test_tampered_body_is_refused(alice):
    envelope = seal(alice, "register", PAYLOAD)
    body = bytearray(envelope.body)
    body[-1] ^= 0x01
    tampered = dataclasses.replace(envelope, body=bytes(body))
    with pytest.raises(IdentityError, match="signature does not verify"):
        open_envelope(tampered, "register", ReplayGuard())


def test_tampered_signature_is_refused(alice):
    envelope = seal(alice, "register", PAYLOAD)
    signature = bytearray(envelope.signature)
    signature[0] ^= 0x80
    tampered = dataclasses.replace(envelope, signature=bytes(signature))
    with pytest.raises(IdentityError, match="signature does not verify"):
        open_envelope(tampered, "register", ReplayGuard())


def test_truncated_signature_is_refused(alice):
    envelope = seal(alice, "register", PAYLOAD)
    tampered = dataclasses.replace(envelope, signature=envelope.signature[:10])
    with pytest.raises(IdentityError, match="signature does not verify"):
        open_envelope(tampered, "register", ReplayGuard())


def test_other_public_key_is_refused(alice):
    mallory = Identity.generate()
    envelope = dataclasses.replace(seal(alice, "register", PAYLOAD), public_key=mallory.public_key)
    with pytest.raises(IdentityError, match="signature does not verify"):
        open_envelope(envelope, "register", ReplayGuard())


def test_malformed_public_key_is_refused(alice):
    envelope = dataclasses.replace(seal(alice, "register", PAYLOAD), public_key=b"short")
    with pytest.raises(IdentityError, match="32 bytes"):
        open_envelope(envelope, "register", ReplayGuard())


def test_wrong_kind_is_refused(alice):
    envelope = seal(alice, "heartbeat", {})
    with pytest.raises(IdentityError, match="expected a 'register' message, got 'heartbeat'"):
        open_envelope(envelope, "register", ReplayGuard())


def test_expected_public_key_mismatch_is_refused(alice):
    bob = Identity.generate()
    envelope = seal(alice, "heartbeat", {})
    with pytest.raises(IdentityError, match="different key than the session's peer"):
        open_envelope(envelope, "heartbeat", ReplayGuard(), expected_public_key=bob.public_key)


@pytest.mark.parametrize("offset_s", [-600.0, 600.0])
def test_message_from_a_skewed_clock_is_refused(alice, monkeypatch, offset_s):
    envelope = seal(alice, "register", PAYLOAD)
    real_time = time.time
    monkeypatch.setattr(identity_module.time, "time", lambda: real_time() - offset_s)
    with pytest.raises(IdentityError, match="off the coordinator's clock") as info:
        open_envelope(envelope, "register", ReplayGuard())
    assert "check this machine's clock" in str(info.value)


def test_message_within_max_age_is_accepted(alice, monkeypatch):
    envelope = seal(alice, "register", PAYLOAD)
    real_time = time.time
    monkeypatch.setattr(identity_module.time, "time", lambda: real_time() + 60)
    assert open_envelope(envelope, "register", ReplayGuard()).payload == PAYLOAD


def test_replayed_nonce_is_refused(alice):
    guard = ReplayGuard()
    envelope = seal(alice, "register", PAYLOAD)
    open_envelope(envelope, "register", guard)
    with pytest.raises(IdentityError, match="replayed message"):
        open_envelope(envelope, "register", guard)
    # A fresh envelope from the same peer still passes.
    open_envelope(seal(alice, "register", PAYLOAD), "register", guard)


def test_refused_envelope_does_not_consume_its_nonce(alice, monkeypatch):
    guard = ReplayGuard()
    envelope = seal(alice, "register", PAYLOAD)
    with pytest.raises(IdentityError):
        open_envelope(envelope, "heartbeat", guard)
    with pytest.raises(IdentityError):
        open_envelope(
            envelope, "register", guard, expected_public_key=Identity.generate().public_key
        )
    real_time = time.time
    monkeypatch.setattr(identity_module.time, "time", lambda: real_time() + 1000)
    with pytest.raises(IdentityError):
        open_envelope(envelope, "register", guard)
    monkeypatch.setattr(identity_module.time, "time", real_time)
    assert open_envelope(envelope, "register", guard).payload == PAYLOAD


def test_signed_garbage_body_is_refused(alice):
    data = b"\xc1not msgpack"
    envelope = Envelope(body=data, signature=alice.sign(data), public_key=alice.public_key)
    with pytest.raises(IdentityError, match="malformed msgpack"):
        open_envelope(envelope, "register", ReplayGuard())


@pytest.mark.parametrize(
    "body, expected",
    [
        ([1, 2, 3], "exactly kind, nonce, timestamp, payload"),
        ({**_body(), "extra": 1}, "exactly kind, nonce, timestamp, payload"),
        ({k: v for k, v in _body().items() if k != "nonce"}, "exactly kind, nonce"),
        (_body(nonce=b"short"), "nonce must be 16 bytes"),
        (_body(nonce="0123456789abcdef"), "nonce must be 16 bytes"),
        (_body(timestamp="now"), "timestamp must be a finite number"),
        (_body(timestamp=True), "timestamp must be a finite number"),
        (_body(payload=[1, 2]), "payload must be a map"),
    ],
)
def test_signed_body_of_wrong_shape_is_refused(alice, body, expected):
    with pytest.raises(IdentityError, match=expected):
        open_envelope(_signed(alice, body), "register", ReplayGuard())


def test_signed_body_with_extension_type_is_refused(alice):
    data = msgpack.packb(msgpack.ExtType(1, b"x"))
    envelope = Envelope(body=data, signature=alice.sign(data), public_key=alice.public_key)
    with pytest.raises(IdentityError, match="malformed msgpack"):
        open_envelope(envelope, "register", ReplayGuard())


def test_nan_timestamp_is_refused(alice):
    with pytest.raises(IdentityError):
        open_envelope(_signed(alice, _body(timestamp=float("nan"))), "register", ReplayGuard())


def test_unpack_strict_round_trips_small_input():
    assert unpack_strict(msgpack.packb({"a": [1, 2]})) == {"a": [1, 2]}


def test_unpack_strict_refuses_oversize_input():
    data = msgpack.packb(b"x" * MAX_ENVELOPE_BYTES, use_bin_type=True)
    with pytest.raises(IdentityError, match=f"exceeds the limit of {MAX_ENVELOPE_BYTES}"):
        unpack_strict(data)


def test_unpack_strict_refuses_trailing_bytes():
    with pytest.raises(IdentityError, match="malformed msgpack"):
        unpack_strict(msgpack.packb(1) + msgpack.packb(2))


def test_unpack_strict_refuses_non_string_map_keys():
    with pytest.raises(IdentityError, match="malformed msgpack"):
        unpack_strict(msgpack.packb({1: "a"}))


def test_oversize_envelope_is_refused_after_signature(alice):
    envelope = seal(alice, "register", {"blob": b"x" * MAX_ENVELOPE_BYTES})
    with pytest.raises(IdentityError, match="exceeds"):
        open_envelope(envelope, "register", ReplayGuard())


def test_malformed_bodies_are_their_own_kind_of_error(alice):
    data = b"\xc1not msgpack"
    envelope = Envelope(body=data, signature=alice.sign(data), public_key=alice.public_key)
    with pytest.raises(MalformedMessageError):
        open_envelope(envelope, "register", ReplayGuard())


def test_journal_sees_accepted_nonces_and_seeds_a_new_guard(alice):
    journal: list[tuple[bytes, bytes, float]] = []
    guard = ReplayGuard(journal=lambda k, n, t: journal.append((k, n, t)))
    envelope = seal(alice, "heartbeat", PAYLOAD)
    with pytest.raises(IdentityError):
        open_envelope(envelope, "register", guard)
    assert journal == []
    open_envelope(envelope, "heartbeat", guard)
    assert len(journal) == 1
    restarted = ReplayGuard()
    for entry in journal:
        restarted.remember(*entry)
    with pytest.raises(IdentityError, match="replayed message"):
        open_envelope(envelope, "heartbeat", restarted)


def test_run_statement_signature_verifies_only_for_its_key_and_fields(alice):
    statement = run_statement("demo", "a" * 64, "b" * 64)
    signature = alice.sign(statement)
    verify_signature(alice.public_key, signature, statement)
    with pytest.raises(IdentityError):
        verify_signature(alice.public_key, signature, run_statement("demo", "a" * 64, "c" * 64))
    with pytest.raises(IdentityError):
        verify_signature(Identity.generate().public_key, signature, statement)
    with pytest.raises(IdentityError):
        verify_signature(b"short", signature, statement)


def test_a_replay_guard_forgets_what_can_no_longer_be_replayed() -> None:
    """Nonces older than twice the age limit go as new ones come, a few at a time: the
    guard's size follows the message rate, not the number of messages ever seen."""
    guard = ReplayGuard(max_age_s=60.0)
    now = time.time()
    for i in range(20_000):
        guard.remember(b"k", i.to_bytes(4, "big"), now - 600.0 + i * 1e-3)
    guard.remember(b"k", b"recent", now - 1.0)
    guard.check_and_remember(b"k", b"fresh", now)
    assert len(guard) == 2
    with pytest.raises(IdentityError, match="replayed"):
        guard.check_and_remember(b"k", b"recent", now)
