"""The coordinator's HTTP routes and the JSON shapes that cross them, written once for the
server that serves them and for every client that calls them (nodes,
``crowdtrain.coordinator.Client``, the admin commands).

Each route is a template in FastAPI's syntax (``/api/runs/{run_id}``): the server
declares it as it is, clients fill it in with :func:`path` or :func:`url`, which
quote every value as one path segment. The dashboard's scripts under
``coordinator/api/static`` spell the public read routes again in JavaScript.

The shapes are strict pydantic models. The server declares each as the response
model of its route (so the OpenAPI schema documents it and every answer is
checked against it); a client parses the answer with the same model before it
uses a value. Answers (:class:`Reply`) ignore fields they do not name, so a newer
coordinator that adds a field does not break an older node, and give a default
to each field an older coordinator did not send; requests (:class:`Request`)
refuse unknown fields, so a typo is an error, not a silently ignored option.
No HTTP here: the models know nothing of who sends them.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field

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
CHECKPOINT_OUTER = CHECKPOINT + "/outer"
"""A DiLoCo checkpoint's outer momentum (safetensors, one tensor per parameter name)."""

ADMIN_RUNS = "/api/admin/runs"
ADMIN_INVITES = ADMIN_RUNS + "/{run_id}/invites"
ADMIN_BANS = ADMIN_RUNS + "/{run_id}/bans"
ADMIN_BAN = ADMIN_BANS + "/{peer_id}"
ADMIN_FLAG = ADMIN_RUNS + "/{run_id}/flags/{peer_id}"


MAX_BODY_BYTES = 64 * 1024
"""The largest request body the coordinator reads (admin requests are small JSON)."""

SHA256_HEX = r"^[0-9a-f]{64}$"

Count = Annotated[int, Field(ge=0)]
Sha256 = Annotated[str, Field(pattern=SHA256_HEX)]


class Reply(BaseModel):
    """A JSON answer of the coordinator: strict about the type of each field it names,
    ignoring the fields it does not name (see the module's docstring)."""

    model_config = ConfigDict(
        strict=True, extra="ignore", frozen=True, use_attribute_docstrings=True
    )


class Request(BaseModel):
    """A JSON request body: strict, and unknown fields are refused."""

    model_config = ConfigDict(
        strict=True, extra="forbid", frozen=True, use_attribute_docstrings=True
    )


# Answers


class CoordinatorEndpoints(Reply):
    """Where a node reaches the coordinator's other planes (:data:`ENDPOINTS`)."""

    http_url: str
    grpc_target: Annotated[str, Field(min_length=1)]
    """``host:port`` of the gRPC server."""
    grpc_tls: bool = False
    """Whether the gRPC server speaks TLS only."""
    initial_peers: list[str] = []
    """Multiaddrs of the coordinator's DHT peer: a node's way into the swarm."""
    coordinator_public_key: str = ""
    """The hex Ed25519 key that signs the coordinator's runs (nodes pin it)."""
    version: str = ""
    """The coordinator's crowdtrain version."""


class ShardCounts(Reply):
    """The shards of a run's current epoch, by state."""

    total: Count
    pending: Count
    leased: Count
    done: Count


class RunHead(Reply):
    """What a node reads of a run (:data:`RUN`, or a row of :data:`RUNS`): its id, the
    step the coordinator records and how far ahead live peers may be (``leading_step``;
    absent from older coordinators). Parsing only these, a node is not tied to the rest."""

    id: str
    step: Count
    leading_step: Count | None = None


class RunSummary(Reply):
    """One run, as :data:`RUNS` lists it: its progress, validation loss and peers."""

    id: str
    description: str
    step: Count
    # The upper median of live peers' steps (the run's step is the lower): state a peer
    # serves may be this new.
    leading_step: Count
    num_tokens: Count
    num_sequences: Count
    val_loss: float | None
    val_bits_per_byte: float | None
    val_step: int | None
    first_val_loss: float | None
    num_peers: Count
    tokens_per_s: float
    epoch: Count
    shards: ShardCounts
    spec_hash: str
    manifest_hash: str
    published_at: float


class RunView(RunSummary):
    """One run (:data:`RUN`): its summary and its resolved spec as a table."""

    spec: dict[str, Any]


class CheckpointInfo(Reply):
    """One of the keeper's checkpoints (:data:`CHECKPOINTS`, :data:`CHECKPOINT`)."""

    step: Count
    sha256: Sha256
    """The sha256 of its parameters (``model.params_sha256``); kept after its file is
    removed, so state of that step from peers can still be checked."""
    file_sha256: Sha256
    """The sha256 of the safetensors file: what a download is checked against."""
    num_bytes: Count
    num_tokens: Count = 0
    """The run's tokens when it was taken (0 from a coordinator too old to say)."""
    created_at: float = 0.0
    """Unix seconds (0 from a coordinator too old to say)."""
    available: bool
    """Whether its file can be downloaded (:data:`CHECKPOINT_FILE`)."""
    outer_sha256: Sha256 | None = None
    """A DiLoCo round's outer momentum file (:data:`CHECKPOINT_OUTER`): its sha256, or
    None when none is kept (a sync run, or a coordinator too old to keep one)."""


class InviteCreated(Reply):
    """A new invite code (:data:`ADMIN_INVITES`); shown once, stored only as a hash."""

    code: str
    run_id: str
    uses: Count
    """How many registrations it admits; 0: any number."""
    expires_at: float | None


# Requests


class PublishRequest(Request):
    """Publish a run: its spec as TOML text and a data folder on the coordinator's disk."""

    spec_toml: str = Field(min_length=1, max_length=MAX_BODY_BYTES)
    data_path: str = Field(min_length=1, max_length=4096)


class InviteRequest(Request):
    """Make an invite code for an invite-only run."""

    uses: int = Field(default=1, ge=0, le=1_000_000, description="0: any number of uses")
    expires_in_s: float | None = Field(default=None, gt=0, le=10 * 365 * 86400)
    note: str = Field(default="", max_length=200)


class BanRequest(Request):
    """Ban a peer from a run, for a reason the operator gives."""

    peer_id: str = Field(min_length=1, max_length=64)
    reason: str = Field(min_length=1, max_length=200)


def path(route: str, **values: object) -> str:
    """``route`` with each ``{name}`` filled in by ``values[name]``, quoted as one path
    segment (a ``/`` in a value cannot reach another route)."""
    return route.format(**{name: quote(str(value), safe="") for name, value in values.items()})


def url(base_url: str, route: str, **values: object) -> str:
    """The full URL of ``route`` on the coordinator at ``base_url`` (see :func:`path`)."""
    return base_url.rstrip("/") + path(route, **values)


__all__ = [
    "ADMIN_BAN",
    "ADMIN_FLAG",
    "ADMIN_BANS",
    "ADMIN_INVITES",
    "ADMIN_RUNS",
    "CHECKPOINT",
    "CHECKPOINTS",
    "CHECKPOINT_FILE",
    "CHECKPOINT_OUTER",
    "COVERAGE",
    "ENDPOINTS",
    "EVALS",
    "HEALTH",
    "LEADERBOARD",
    "LEDGER",
    "MAX_BODY_BYTES",
    "PEERS",
    "PROMETHEUS",
    "REFUSALS",
    "RUN",
    "RUNS",
    "RUN_METRICS",
    "SHARD",
    "SHARDS",
    "TOKENIZER",
    "BanRequest",
    "CheckpointInfo",
    "CoordinatorEndpoints",
    "InviteCreated",
    "InviteRequest",
    "PublishRequest",
    "Reply",
    "Request",
    "RunHead",
    "RunSummary",
    "RunView",
    "ShardCounts",
    "path",
    "url",
]
