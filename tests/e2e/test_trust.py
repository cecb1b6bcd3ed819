"""Trust on the control plane, against a real coordinator: who may join, bans,
admin keys, replays across a restart, expired sessions, pinned keys and TLS.

Nodes here are raw clients (no hivemind): they speak to the coordinator
exactly as ``crowdtrain-node`` does, without training.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from crowdtrain.node.link.errors import CoordinatorError
from crowdtrain.node.link.grpc import CoordinatorClient
from crowdtrain.node.link.http import discover
from crowdtrain.node.link.pins import KeyPins
from crowdtrain.protocol import coordinator_pb2 as pb
from crowdtrain.protocol import coordinator_pb2_grpc as pb_grpc
from crowdtrain.protocol.identity import Identity, run_statement, seal, verify_signature
from crowdtrain.protocol.rpc import KIND_HEARTBEAT, envelope_to_pb
from tests.swarm import COORDINATOR, Swarm, db_rows, run_cli, write_spec

BEAT = {"session_key": "0123456789abcdef", "num_tokens": 0, "num_sequences": 0,
        "tokens_per_s": 0.0, "step": 0}  # fmt: skip


def _spec(swarm: Swarm, run_id: str, access: str = "") -> Path:
    path = write_spec(swarm.root / f"{run_id}.toml", run_id=run_id)
    if access:
        path.write_text(path.read_text() + "\n[access]\n" + access)
    return path


def _client(swarm: Swarm, identity: Identity | None = None, home: Path | None = None):
    endpoints = discover(swarm.url)
    return CoordinatorClient(
        swarm.url,
        endpoints["grpc_target"],
        identity or Identity.generate(),
        pins=KeyPins(home) if home else None,
    )


def _admin(swarm: Swarm) -> dict[str, str]:
    key = (swarm.coord_dir / "admin.key").read_text().strip()
    return {"Authorization": f"Bearer {key}"}


def _code(error: pytest.ExceptionInfo) -> grpc.StatusCode | None:
    return getattr(error.value, "code", None)


ALLOWED = Identity.generate()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """One coordinator with an open, an invite-only and an allowlist run."""
    swarm = Swarm(root=tmp_path_factory.mktemp("trust"))
    try:
        data = swarm.prepare()
        for spec in (
            _spec(swarm, "tiny"),
            _spec(swarm, "invited", 'mode = "invite"\n'),
            _spec(swarm, "listed", f'mode = "allowlist"\nallowlist = ["{ALLOWED.public_key.hex()}"]\n'),
        ):  # fmt: skip
            assert swarm.publish(spec, data).returncode == 0
        swarm.start_coordinator()
        yield swarm
    finally:
        swarm.stop_all()


def test_runs_are_signed_by_the_key_nodes_pin(live: Swarm, tmp_path: Path) -> None:
    client = _client(live, home=tmp_path)
    registration = client.register("tiny", "probe", "cpu", "")
    run = registration.run
    verify_signature(
        run.coordinator_public_key,
        run.run_signature,
        run_statement(run.run_id, run.spec_hash, run.manifest_hash),
    )
    pins = json.loads((tmp_path / "known_coordinators.json").read_text())
    assert pins == {live.url: run.coordinator_public_key.hex()}
    assert live.get("/api/endpoints")["coordinator_public_key"] == pins[live.url]

    # The same URL with another key is refused before anything is signed for it.
    pins[live.url] = Identity.generate().public_key.hex()
    (tmp_path / "known_coordinators.json").write_text(json.dumps(pins))
    with pytest.raises(Exception, match="may be impersonating it") as refused:
        _client(live, home=tmp_path).register("tiny", "probe", "cpu", "")
    assert "known_coordinators.json" in str(refused.value)
    client.close()


def test_invite_only_run_admits_holders_of_a_code_once(live: Swarm) -> None:
    stranger = _client(live)
    with pytest.raises(CoordinatorError, match="invite-only") as refused:
        stranger.register("invited", "probe", "cpu", "")
    assert _code(refused) == grpc.StatusCode.PERMISSION_DENIED

    made = run_cli(COORDINATOR, "invite", "--data-dir", str(live.coord_dir), "--run", "invited")
    assert made.returncode == 0, made.stderr
    code = made.stdout.strip()
    assert code.startswith("ct-") and "--invite" in made.stderr

    with pytest.raises(CoordinatorError, match="not valid"):
        stranger.register("invited", "probe", "cpu", "", invite=code + "x")
    first = _client(live)
    first.register("invited", "first", "cpu", "", invite=code)
    with pytest.raises(CoordinatorError, match="used up"):
        stranger.register("invited", "probe", "cpu", "", invite=code)
    # A peer once admitted needs no code to come back.
    first.register("invited", "first", "cpu", "")
    # Codes are stored hashed: the database never holds the code itself.
    assert code.encode() not in (live.coord_dir / "coordinator.db").read_bytes()
    invites = httpx.get(f"{live.url}/api/admin/runs/invited/invites", headers=_admin(live))
    assert [(i["uses"], i["max_uses"]) for i in invites.json()] == [(1, 1)]


def test_allowlist_run_admits_listed_keys_only(live: Swarm) -> None:
    with pytest.raises(CoordinatorError, match="not on its allowlist") as refused:
        _client(live).register("listed", "probe", "cpu", "")
    assert _code(refused) == grpc.StatusCode.PERMISSION_DENIED
    _client(live, identity=ALLOWED).register("listed", "listed", "cpu", "")


def test_admin_routes_need_the_admin_key(live: Swarm) -> None:
    before = db_rows(live.coord_dir)
    url = f"{live.url}/api/admin/runs/invited/invites"
    assert httpx.post(url, json={}).status_code == 401
    wrong = {"Authorization": "Bearer " + "x" * 43}
    assert httpx.post(url, json={}, headers=wrong).status_code == 403
    not_a_key = run_cli(
        COORDINATOR, "ban", "nobody", "--run", "tiny", "--reason", "x", "--url", live.url,
        "--admin-key", str(live.root / "tiny.toml"),
    )  # fmt: skip
    assert not_a_key.returncode == 1 and "does not hold an admin key" in not_a_key.stderr
    (live.root / "wrong.key").write_text("y" * 43 + "\n")
    refused = run_cli(
        COORDINATOR, "ban", "nobody", "--run", "tiny", "--reason", "x", "--url", live.url,
        "--admin-key", str(live.root / "wrong.key"),
    )  # fmt: skip
    assert refused.returncode == 1 and "wrong admin key" in refused.stderr
    # An open run takes no invites; a body over the limit is not even read.
    assert (
        httpx.post(
            f"{live.url}/api/admin/runs/tiny/invites", json={}, headers=_admin(live)
        ).status_code
        == 400
    )
    huge = httpx.post(url, content=b"{" + b" " * 100_000 + b"}", headers=_admin(live))
    assert huge.status_code == 413
    assert db_rows(live.coord_dir) == before


def test_a_banned_peer_cannot_lease_report_or_return(live: Swarm) -> None:
    identity = Identity.generate()
    client = _client(live, identity=identity)
    token = client.register("tiny", "cheat", "cpu", "").session_token
    [lease] = client.lease(token, 1)
    banned = run_cli(
        COORDINATOR, "ban", identity.peer_id, "--run", "tiny", "--reason", "inflated receipts",
        "--data-dir", str(live.coord_dir),
    )  # fmt: skip
    assert banned.returncode == 0, banned.stderr

    with pytest.raises(CoordinatorError) as refused:
        client.lease(token, 1)
    assert _code(refused) in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    with pytest.raises(CoordinatorError, match="banned from run 'tiny': inflated receipts"):
        client.register("tiny", "cheat", "cpu", "")
    [peer] = [p for p in live.get("/api/runs/tiny/peers") if p["peer_id"] == identity.peer_id]
    assert peer["state"] == "banned"
    coverage = live.get("/api/runs/tiny/coverage")["shards"]
    assert next(s for s in coverage if s["shard"] == lease.shard_id)["state"] == "pending"

    lifted = run_cli(
        COORDINATOR, "unban", identity.peer_id, "--run", "tiny", "--data-dir", str(live.coord_dir)
    )
    assert lifted.returncode == 0, lifted.stderr
    client.register("tiny", "cheat", "cpu", "")


def test_a_run_published_over_http_is_signed_and_served(live: Swarm) -> None:
    spec = _spec(live, "remote").read_text()
    body = {"spec_toml": spec, "data_path": str(live.root / "data")}
    assert httpx.post(f"{live.url}/api/admin/runs", json=body).status_code == 401
    made = httpx.post(f"{live.url}/api/admin/runs", json=body, headers=_admin(live))
    assert made.status_code == 201, made.text
    run = _client(live).register("remote", "probe", "cpu", "").run
    assert run.run_id == "remote"
    verify_signature(
        run.coordinator_public_key,
        run.run_signature,
        run_statement(run.run_id, run.spec_hash, run.manifest_hash),
    )
    bad = {"spec_toml": spec.replace('id = "remote"', 'id = "Bad Id"'), "data_path": "/"}
    refused = httpx.post(f"{live.url}/api/admin/runs", json=bad, headers=_admin(live))
    assert refused.status_code == 400 and "[run] id" in refused.json()["detail"]


def test_replays_stay_refused_after_a_restart_and_tokens_expire(tmp_path: Path) -> None:
    swarm = Swarm(root=tmp_path)
    try:
        data = swarm.prepare()
        assert swarm.publish(_spec(swarm, "tiny"), data).returncode == 0
        swarm.start_coordinator("--session-ttl", "3")
        identity = Identity.generate()
        client = _client(swarm, identity=identity)
        token = client.register("tiny", "probe", "cpu", "").session_token
        envelope = envelope_to_pb(seal(identity, KIND_HEARTBEAT, BEAT))
        target = swarm.ports["grpc_target"]
        stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(target))
        auth = (("authorization", f"Bearer {token}"),)
        stub.Heartbeat(pb.HeartbeatRequest(envelope=envelope), metadata=auth)
        with pytest.raises(grpc.RpcError) as replayed:
            stub.Heartbeat(pb.HeartbeatRequest(envelope=envelope), metadata=auth)
        assert "replayed" in replayed.value.details()

        # A restart forgets nothing that matters: the nonce stays spent.
        swarm.stop(swarm.processes[-1], sig=signal.SIGTERM)
        swarm.start_coordinator("--session-ttl", "3")
        stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(swarm.ports["grpc_target"]))
        fresh = _client(swarm, identity=identity)
        token = fresh.register("tiny", "probe", "cpu", "").session_token
        auth = (("authorization", f"Bearer {token}"),)
        with pytest.raises(grpc.RpcError) as replayed:
            stub.Heartbeat(pb.HeartbeatRequest(envelope=envelope), metadata=auth)
        assert replayed.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "replayed" in replayed.value.details()

        # Session tokens are short-lived: after the TTL the token is refused.
        fresh.lease(token, 1)
        time.sleep(3.5)
        with pytest.raises(CoordinatorError, match="expired") as expired:
            fresh.lease(token, 1)
        assert _code(expired) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        swarm.stop_all()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crowdtrain test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_serves_both_planes_and_refuses_plaintext(tmp_path: Path) -> None:
    swarm = Swarm(root=tmp_path)
    try:
        data = swarm.prepare()
        assert swarm.publish(_spec(swarm, "tiny"), data).returncode == 0
        cert, key = _self_signed(tmp_path)
        swarm.start_coordinator("--tls-cert", str(cert), "--tls-key", str(key))
        assert swarm.url.startswith("https://")
        endpoints = discover(swarm.url, ca_cert=cert)
        assert endpoints["grpc_tls"] is True
        client = CoordinatorClient(
            swarm.url, endpoints["grpc_target"], Identity.generate(), tls=True, ca_cert=cert
        )
        token = client.register("tiny", "probe", "cpu", "").session_token
        assert client.lease(token, 1)
        client.close()

        # Without the authority's certificate, or without TLS, nothing gets through.
        with pytest.raises(CoordinatorError):
            discover(swarm.url)
        plain = pb_grpc.CoordinatorStub(grpc.insecure_channel(endpoints["grpc_target"]))
        with pytest.raises(grpc.RpcError):
            plain.Challenge(pb.ChallengeRequest(run_id="tiny"), timeout=5)
        with pytest.raises(httpx.HTTPError):
            httpx.get(swarm.url.replace("https://", "http://") + "/healthz", timeout=5)
    finally:
        swarm.stop_all()
