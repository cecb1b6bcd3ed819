"""The coordinator's HTTP routes, written once for the server that serves them and for
every client that calls them (nodes, ``crowdtrain.coordinator.Client``, the admin
commands).

Each route is a template in FastAPI's syntax (``/api/runs/{run_id}``): the server
declares it as it is, clients fill it in with :func:`path` or :func:`url`, which
quote every value as one path segment. The dashboard's scripts under
``coordinator/api/static`` spell the public read routes again in JavaScript.
"""

from __future__ import annotations

from urllib.parse import quote

HEALTH = "/healthz"
PROMETHEUS = "/metrics"

ENDPOINTS = "/api/endpoints"
"""Where nodes reach the other planes: the gRPC target, the DHT's first peers, the key."""
REFUSALS = "/api/refusals"

RUNS = "/api/runs"
RUN = "/api/runs/{run_id}"
PEERS = RUN + "/peers"
EVALS = RUN + "/evals"
RUN_METRICS = RUN + "/metrics"
"""A run's samples over time (step, tokens, tokens/s, peers); not Prometheus' ``/metrics``."""
COVERAGE = RUN + "/coverage"
TOKENIZER = RUN + "/tokenizer"
SHARDS = RUN + "/shards"
"""The base of shard downloads (``SHARDS/<shard id>``), handed to nodes as a URL."""
SHARD = SHARDS + "/{shard_id}"
LEADERBOARD = RUN + "/leaderboard"
LEDGER = RUN + "/ledger"
CHECKPOINTS = RUN + "/checkpoints"
CHECKPOINT = CHECKPOINTS + "/{step}"
CHECKPOINT_FILE = CHECKPOINT + "/file"

ADMIN_RUNS = "/api/admin/runs"
ADMIN_INVITES = ADMIN_RUNS + "/{run_id}/invites"
ADMIN_BANS = ADMIN_RUNS + "/{run_id}/bans"
ADMIN_BAN = ADMIN_BANS + "/{peer_id}"


def path(route: str, **values: object) -> str:
    """``route`` with each ``{name}`` filled in by ``values[name]``, quoted as one path
    segment (a ``/`` in a value cannot reach another route)."""
    return route.format(**{name: quote(str(value), safe="") for name, value in values.items()})


def url(base_url: str, route: str, **values: object) -> str:
    """The full URL of ``route`` on the coordinator at ``base_url`` (see :func:`path`)."""
    return base_url.rstrip("/") + path(route, **values)


__all__ = [
    "ADMIN_BAN",
    "ADMIN_BANS",
    "ADMIN_INVITES",
    "ADMIN_RUNS",
    "CHECKPOINT",
    "CHECKPOINTS",
    "CHECKPOINT_FILE",
    "COVERAGE",
    "ENDPOINTS",
    "EVALS",
    "HEALTH",
    "LEADERBOARD",
    "LEDGER",
    "PEERS",
    "PROMETHEUS",
    "REFUSALS",
    "RUN",
    "RUNS",
    "RUN_METRICS",
    "SHARD",
    "SHARDS",
    "TOKENIZER",
    "path",
    "url",
]
