"""protocol/api.py: routes filled in safely, and the JSON shapes a node or client parses:
strict about types, tolerant of fields a newer coordinator adds or an older one lacks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from crowdtrain.protocol import api

CHECKPOINT = {
    "step": 3,
    "sha256": "a" * 64,
    "file_sha256": "b" * 64,
    "num_bytes": 10,
    "num_tokens": 300,
    "created_at": 1.5,
    "available": True,
}
ENDPOINTS = {
    "http_url": "http://127.0.0.1:8470",
    "grpc_target": "127.0.0.1:8471",
    "grpc_tls": False,
    "initial_peers": ["/ip4/127.0.0.1/tcp/8472/p2p/x"],
    "coordinator_public_key": "ab" * 32,
    "version": "0.1.0",
}


def test_routes_quote_each_value_as_one_segment() -> None:
    assert (
        api.path(api.CHECKPOINT_FILE, run_id="a/b", step=3) == "/api/runs/a%2Fb/checkpoints/3/file"
    )
    assert api.url("http://h:1/", api.RUN, run_id="tiny") == "http://h:1/api/runs/tiny"


def test_a_newer_coordinators_extra_fields_are_ignored() -> None:
    info = api.CheckpointInfo.model_validate({**CHECKPOINT, "compressed": True})
    assert info.step == 3 and not hasattr(info, "compressed")
    endpoints = api.CoordinatorEndpoints.model_validate({**ENDPOINTS, "region": "eu"})
    assert endpoints.grpc_target == "127.0.0.1:8471"
    assert api.RunHead.model_validate({"id": "tiny", "step": 7, "num_peers": 2}).step == 7


def test_an_older_coordinators_missing_optional_fields_take_defaults() -> None:
    old = {k: v for k, v in CHECKPOINT.items() if k not in ("num_tokens", "created_at")}
    assert api.CheckpointInfo.model_validate(old).num_tokens == 0
    bare = api.CoordinatorEndpoints.model_validate({"http_url": "http://h", "grpc_target": "h:1"})
    assert (bare.grpc_tls, bare.initial_peers, bare.coordinator_public_key) == (False, [], "")


@pytest.mark.parametrize(
    "changes",
    [
        {"step": "3"},  # strict: no strings for numbers
        {"step": -1},
        {"available": 1},
        {"sha256": "A" * 64},
        {"file_sha256": "b" * 63},
        {"num_bytes": 1.5},
    ],
)
def test_wrong_types_and_values_are_refused(changes: dict) -> None:
    with pytest.raises(ValidationError):
        api.CheckpointInfo.model_validate({**CHECKPOINT, **changes})


def test_required_fields_are_required() -> None:
    with pytest.raises(ValidationError):
        api.CoordinatorEndpoints.model_validate({"http_url": "http://h"})
    with pytest.raises(ValidationError):
        api.CoordinatorEndpoints.model_validate({**ENDPOINTS, "grpc_target": ""})
    with pytest.raises(ValidationError):
        api.RunHead.model_validate({"id": "tiny"})


def test_requests_refuse_unknown_fields() -> None:
    assert api.InviteRequest(uses=0).model_dump() == {"uses": 0, "expires_in_s": None, "note": ""}
    with pytest.raises(ValidationError, match="extra"):
        api.InviteRequest.model_validate({"uses": 1, "usses": 2})
    with pytest.raises(ValidationError):
        api.BanRequest(peer_id="p", reason="")
