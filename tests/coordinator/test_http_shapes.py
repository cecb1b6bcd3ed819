"""The coordinator's HTTP app in-process (FastAPI's TestClient): what its routes answer is
exactly what the domain views say, in the protocol's shapes; the routes that used to
reach the store or sequence two domain calls answer as before."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from crowdtrain.coordinator.api.http_app import Endpoints, create_app
from crowdtrain.coordinator.api.refusals import Refusals
from crowdtrain.coordinator.records import get_run
from crowdtrain.coordinator.runs import access, peers
from crowdtrain.coordinator.runs.leases import LeaseBook
from crowdtrain.coordinator.runs.publish import prepare_publication, publish
from crowdtrain.coordinator.runs.views import list_runs_view, run_view
from crowdtrain.coordinator.store import Store
from crowdtrain.coordinator.swarm.checkpoints import (
    CHECKPOINTS_DIR,
    checkpoint_name,
    checkpoint_view,
    checkpoints_view,
)
from crowdtrain.protocol import api
from crowdtrain.protocol.messages import Evaluation, HeartbeatPayload
from tests.coordinator.registration import COORDINATOR_KEY, join_peer
from tests.specs import small_spec

ADMIN_KEY = "k" * 43
SPEC = small_spec(
    run={"id": "shapes", "description": "a run whose answers are checked"},
    access={"mode": "invite"},
)


@pytest.fixture
def app(store: Store, prepared: Path, tmp_path: Path) -> Iterator[tuple[TestClient, LeaseBook]]:
    spec = tmp_path / "run.toml"
    spec.write_text(SPEC, encoding="utf-8")
    data = shutil.copytree(prepared, tmp_path / "data")
    publish(store, prepare_publication(spec, data), COORDINATOR_KEY)
    book = LeaseBook(store)
    endpoints = Endpoints(
        "http://127.0.0.1:1", "127.0.0.1:2", lambda: ["/ip4/127.0.0.1/tcp/3/p2p/x"]
    )
    app = create_app(store, endpoints, book, Refusals(), ADMIN_KEY, COORDINATOR_KEY)
    with TestClient(app) as client:
        yield client, book


def _admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def _keep_checkpoints(store: Store, with_file: int, without_file: int) -> Path:
    folder = store.data_dir / CHECKPOINTS_DIR / "shapes"
    folder.mkdir(parents=True)
    kept = folder / checkpoint_name(with_file)
    kept.write_bytes(b"safetensors bytes")
    for step, file in ((without_file, None), (with_file, kept.name)):
        store.insert_checkpoint(
            {
                "run_id": "shapes",
                "step": step,
                "sha256": "a" * 64,
                "file": file,
                "file_sha256": "b" * 64,
                "num_bytes": 17,
                "spec_hash": get_run(store, "shapes").spec.hash,
                "created_at": 1000.0 + step,
                "cpu_s": 0.1,
                "num_tokens": 100 * step,
            }
        )
    return kept


def test_run_and_checkpoint_answers_are_the_views_in_the_protocols_shapes(app, store):
    client, _ = app
    session = join_peer(store, "shapes", invite=access.create_invite(store, "shapes", 0).code)
    beat = HeartbeatPayload(
        session_key="session-aaaa",
        num_tokens=640,
        num_sequences=20,
        tokens_per_s=50.0,
        loss=3.0,
        step=1,
        evaluations=[Evaluation(step=1, num_tokens=640, loss=3.5, bits_per_byte=1.2)],
    )
    peers.heartbeat(store, session, beat)
    kept = _keep_checkpoints(store, with_file=4, without_file=2)

    run = client.get("/api/runs/shapes").json()
    assert run == run_view(store, "shapes")
    assert api.RunView.model_validate(run).val_loss == 3.5
    assert api.RunHead.model_validate(run) == api.RunHead(id="shapes", step=1, leading_step=1)
    assert client.get("/api/runs").json() == list_runs_view(store)

    rows = client.get("/api/runs/shapes/checkpoints").json()
    assert rows == checkpoints_view(store, "shapes")
    assert [(r["step"], r["available"]) for r in rows] == [(2, False), (4, True)]
    assert client.get("/api/runs/shapes/checkpoints/4").json() == checkpoint_view(
        store, "shapes", 4
    )
    assert client.get("/api/runs/shapes/checkpoints/4/file").content == kept.read_bytes()
    for gone in ("/api/runs/shapes/checkpoints/2/file", "/api/runs/shapes/checkpoints/3/file"):
        answer = client.get(gone)
        assert answer.status_code == 404 and "is kept" in answer.json()["detail"], gone

    endpoints = api.CoordinatorEndpoints.model_validate_json(client.get("/api/endpoints").content)
    assert endpoints.grpc_target == "127.0.0.1:2" and endpoints.grpc_tls is False
    assert endpoints.initial_peers == ["/ip4/127.0.0.1/tcp/3/p2p/x"] and endpoints.version


def test_files_are_found_through_the_manifest_or_answered_404_or_410(app, store):
    client, _ = app
    run = get_run(store, "shapes")
    shard = run.manifest.train_shards[0]
    assert (
        client.get(f"/api/runs/shapes/shards/{shard.id}").content
        == (run.data_path / shard.file).read_bytes()
    )
    missing = client.get("/api/runs/shapes/shards/train-99999")
    assert missing.status_code == 404
    assert missing.json()["detail"] == "no shard 'train-99999' in run 'shapes'"
    (run.data_path / shard.file).unlink()
    gone = client.get(f"/api/runs/shapes/shards/{shard.id}")
    assert gone.status_code == 410 and "missing from the coordinator's data" in gone.text
    tokenizer = client.get("/api/runs/shapes/tokenizer")
    assert tokenizer.status_code == 404 and "uses byte tokens" in tokenizer.text
    assert client.get("/api/runs/nope/shards/x").status_code == 404


def test_admin_invites_bans_and_publishing_answer_as_before(app, store, tmp_path):
    client, book = app
    made = client.post("/api/admin/runs/shapes/invites", json={"uses": 2}, headers=_admin())
    assert made.status_code == 201
    invite = api.InviteCreated.model_validate(made.json())
    assert invite.run_id == "shapes" and invite.uses == 2 and invite.code.startswith("ct-")
    listed = client.get("/api/admin/runs/shapes/invites", headers=_admin()).json()
    assert [(i["prefix"], i["max_uses"]) for i in listed] == [(invite.code[:8], 2)]
    assert client.get("/api/admin/runs/nope/invites", headers=_admin()).status_code == 404

    session = join_peer(store, "shapes", invite=invite.code)
    held = book.grant(get_run(store, "shapes"), session, max_shards=2)
    ban = {"peer_id": session.peer_id, "reason": "inflated receipts"}
    banned = client.post("/api/admin/runs/shapes/bans", json=ban, headers=_admin())
    assert banned.status_code == 201
    assert (banned.json()["peer_id"], banned.json()["reason"]) == (
        session.peer_id,
        "inflated receipts",
    )
    # One operation: the peer's leases are back in the pool, in the store and in the book.
    coverage = client.get("/api/runs/shapes/coverage").json()["shards"]
    assert {s["shard"] for s in coverage if s["state"] == "pending"} >= {
        lease.shard_id for lease in held
    }
    bans = client.get("/api/admin/runs/shapes/bans", headers=_admin()).json()
    assert [b["peer_id"] for b in bans] == [session.peer_id]
    assert client.get("/api/admin/runs/nope/bans", headers=_admin()).status_code == 404

    again = client.post(
        "/api/admin/runs",
        json={"spec_toml": SPEC, "data_path": str(get_run(store, "shapes").data_path)},
        headers=_admin(),
    )
    assert again.status_code == 201
    assert again.json() == {
        "run_id": "shapes",
        "spec_hash": get_run(store, "shapes").row["spec_hash"],
        "manifest_hash": get_run(store, "shapes").row["manifest_hash"],
        "num_train_shards": len(get_run(store, "shapes").manifest.train_shards),
        "already_published": True,
    }
    bad = client.post(
        "/api/admin/runs", json={"spec_toml": "[run", "data_path": "/x"}, headers=_admin()
    )
    assert bad.status_code == 400
