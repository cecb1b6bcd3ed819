"""The coordinator's HTTP API under schemathesis, with and without the admin key.

Every answer must be below 500 and match the response schema its route declares
(the :mod:`crowdtrain.protocol.api` models), and the database may change only as
valid admin requests change it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from schemathesis.checks import response_schema_conformance

from tests.fuzz.live import (
    RUN_IDS,
    SEED,
    Target,
)
from tests.swarm import Swarm, db_rows

pytestmark = pytest.mark.slow

# The HTTP API under schemathesis


@dataclass
class HttpLog:
    statuses: Counter = field(default_factory=Counter)  # (who, operation, status) -> count
    before: dict[str, list] = field(default_factory=dict)


@pytest.fixture(scope="module")
def http_log(live: Swarm, target: Target) -> HttpLog:
    return HttpLog(before=db_rows(live.coord_dir))


@pytest.fixture(scope="module")
def http_schema(live: Swarm, target: Target) -> Any:
    """The coordinator's OpenAPI schema, with half the run ids and peer ids real ones so
    generated requests get past the lookups."""
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            # Requests take milliseconds; under a loaded machine generation may not.
            "suppress-health-check": ["all"],
            "dictionaries": {
                "runs": {"values": list(RUN_IDS)},
                "peers": {"values": [target.banned.peer_id]},
            },
            "parameters": {
                "path.run_id": {"dictionary": "runs", "probability": 0.5},
                "path.peer_id": {"dictionary": "peers", "probability": 0.5},
                "body.peer_id": {"dictionary": "peers", "probability": 0.5},
            },
            "generation": {"mode": "all", "max-examples": 30, "database": "none"},
            "phases": {"stateful": {"enabled": False}},
            "request-timeout": 10,
        }
    )
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json", config=config)


@pytest.fixture(autouse=True)
def _schemathesis_node_id(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's lazy schemas read ``node._nodeid``, which pytest 9.2 renamed."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


anonymous_api = schemathesis.pytest.from_fixture("http_schema")
admin_api = schemathesis.pytest.from_fixture("http_schema").include(path_regex="^/api/admin/")


def call(case: Any, log: HttpLog, who: str, headers: dict[str, str] | None = None) -> Any:
    response = case.call(headers=headers)
    log.statuses[who, f"{case.method} {case.path}", response.status_code] += 1
    assert response.status_code < 500, case.as_curl_command()
    case.validate_response(response, checks=[response_schema_conformance], headers=headers)
    return response


@anonymous_api.parametrize()
def test_http_api_without_admin_key(case: Any, http_log: HttpLog) -> None:
    response = call(case, http_log, "anonymous")
    if case.path.startswith("/api/admin/"):
        assert response.status_code >= 400, case.as_curl_command()


@admin_api.parametrize()
def test_http_admin_api_with_admin_key(case: Any, http_log: HttpLog, target: Target) -> None:
    call(case, http_log, "admin", {"Authorization": f"Bearer {target.admin_key}"})


def test_http_fuzz_left_the_coordinator_up_and_its_state_as_allowed(
    live: Swarm, http_log: HttpLog, target: Target, record_property: Callable[[str, Any], None]
) -> None:
    """What the HTTP fuzz may have changed: only what the admin key exists to do.

    Without the key, nothing. With it, a generated request can be a valid admin
    request: an invite code for the invite-only run ``locked`` (each one answered
    201), or a ban, re-ban or unban of the one peer id it is given (the already
    banned one, whose sessions and leases are gone, so only its ``bans`` row and its
    ``peers.state`` can move). Publishing needs a run spec and a data folder on the
    coordinator's disk, which random text never is. Every other table must be
    exactly as before.
    """
    assert live.processes[0].popen.poll() is None, live.processes[0].output()[-3000:]
    assert live.get("/healthz") == {"status": "ok"}
    before, after = http_log.before, db_rows(live.coord_dir)
    for table in sorted(before):
        if table not in ("invites", "bans", "peers"):
            assert after[table] == before[table], table
    new_invites = set(after["invites"]) - set(before["invites"])
    created = sum(
        n
        for (who, op, status), n in http_log.statuses.items()
        if who == "admin" and op == "POST /api/admin/runs/{run_id}/invites" and status == 201
    )
    assert len(new_invites) == created
    assert all("locked" in row for row in new_invites)
    assert set(before["invites"]) <= set(after["invites"])
    banned = target.banned.peer_id
    assert {row for row in after["bans"] if banned not in row} == {
        row for row in before["bans"] if banned not in row
    }
    peers_before = {row for row in before["peers"] if banned not in row}
    assert {row for row in after["peers"] if banned not in row} == peers_before
    statuses: Counter = Counter()
    for (who, _, status), n in http_log.statuses.items():
        statuses[who, f"{status // 100}xx"] += n
    parts = []
    for who in ("anonymous", "admin"):
        mine = {k: n for (w, k), n in sorted(statuses.items()) if w == who}
        details = ", ".join(f"{k} {n}" for k, n in mine.items())
        parts.append(f"{sum(mine.values())} {who} requests ({details})")
    summary = f"HTTP fuzz (schemathesis, seed {SEED}): " + "; ".join(parts)
    print(f"\n{summary}")
    record_property("http_fuzz", summary)
    assert statuses["anonymous", "5xx"] == statuses["admin", "5xx"] == 0
