"""The coordinator's HTTP API for people, notebooks and bulk files.

Routes only translate: they call the domain and view functions in
:mod:`~crowdtrain.coordinator.runs`, :mod:`~crowdtrain.coordinator.ledger` and
:mod:`~crowdtrain.coordinator.swarm` and return JSON, or stream a file the run's
manifest or the keeper names (never a path from the request). The JSON shapes
nodes and clients parse are :mod:`crowdtrain.protocol.api` models, declared as
the routes' response models. Routes under ``/api/admin`` need the admin key as a
bearer token. No request body may exceed :data:`MAX_BODY_BYTES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crowdtrain.coordinator import records
from crowdtrain.coordinator.api import dashboard, prometheus
from crowdtrain.coordinator.api.refusals import Refusals
from crowdtrain.coordinator.ledger import views as ledger_views
from crowdtrain.coordinator.runs import access, files, samples
from crowdtrain.coordinator.runs import publish as publishing
from crowdtrain.coordinator.runs import views as run_views
from crowdtrain.coordinator.runs.leases import LeaseBook
from crowdtrain.coordinator.store import Store
from crowdtrain.coordinator.swarm import checkpoints
from crowdtrain.protocol import api
from crowdtrain.protocol.errors import AccessError, CrowdtrainError
from crowdtrain.protocol.identity import Identity
from crowdtrain.protocol.version import crowdtrain_version

# Admin requests are small JSON; a run spec is a few KiB.
MAX_BODY_BYTES = api.MAX_BODY_BYTES
_ADMIN_BEARER = HTTPBearer(auto_error=False, description="the coordinator's admin key")


@dataclass(frozen=True)
class Endpoints:
    """Where nodes reach the other planes; served at ``/api/endpoints``."""

    http_url: str
    grpc_target: str
    initial_peers: Callable[[], list[str]]
    grpc_tls: bool = False
    coordinator_public_key: str = ""


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413, unread."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body over {self.limit} bytes"}, status_code=413
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(
    store: Store,
    endpoints: Endpoints,
    leases: LeaseBook,
    refusals: Refusals,
    admin_key: str,
    identity: Identity,
) -> FastAPI:
    app = FastAPI(
        title="crowdtrain coordinator",
        version=crowdtrain_version(),
        description="Runs, peers and shards of a crowdtrain coordinator.",
    )
    app.add_middleware(BodyLimit)

    def require_admin(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_ADMIN_BEARER)],
    ) -> None:
        try:
            access.check_admin(credentials.credentials if credentials else None, admin_key)
        except AccessError as e:
            refusals.count("http-admin", "UNAUTHENTICATED" if not credentials else "DENIED")
            status = 401 if credentials is None else 403
            raise HTTPException(status_code=status, detail=str(e)) from None

    def admin_call(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except records.UnknownRunError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None
        except CrowdtrainError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

    def run_or_404(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except records.UnknownRunError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None

    def file_or_404(fn: Callable[[], Any]) -> Any:
        try:
            return run_or_404(fn)
        except files.NoSuchFileError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None
        except files.FileGoneError as e:
            raise HTTPException(status_code=410, detail=str(e)) from None

    registry = prometheus.coordinator_registry(store, refusals)

    @app.get(api.PROMETHEUS, include_in_schema=False)
    def prometheus_metrics() -> Response:
        """Prometheus' scrape target: runs, peers, shards, the ledger, refusals."""
        return Response(prometheus.exposition(registry), media_type=prometheus.CONTENT_TYPE)

    dashboard.mount(app, store)

    @app.get(api.HEALTH)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(api.ENDPOINTS)
    def get_endpoints() -> api.CoordinatorEndpoints:
        """What a node needs besides this URL: the gRPC target and the DHT's first peers."""
        return api.CoordinatorEndpoints(
            http_url=endpoints.http_url,
            grpc_target=endpoints.grpc_target,
            grpc_tls=endpoints.grpc_tls,
            initial_peers=endpoints.initial_peers(),
            coordinator_public_key=endpoints.coordinator_public_key,
            version=crowdtrain_version(),
        )

    @app.get(api.RUNS, response_model=list[api.RunSummary])
    def list_runs() -> list[dict[str, Any]]:
        return run_views.list_runs_view(store)

    @app.get(api.RUN, response_model=api.RunView)
    def get_run(run_id: str) -> dict[str, Any]:
        return run_or_404(lambda: run_views.run_view(store, run_id))

    @app.get(api.PEERS)
    def get_peers(run_id: str) -> list[dict[str, Any]]:
        return run_or_404(lambda: run_views.peers_view(store, run_id))

    @app.get(api.EVALS)
    def get_evals(run_id: str) -> list[dict[str, Any]]:
        """Validation loss over steps and tokens, oldest first."""
        return run_or_404(lambda: run_views.evals_view(store, run_id))

    @app.get(api.RUN_METRICS)
    def get_metrics(
        run_id: str,
        since: Annotated[
            float | None,
            Query(ge=0, le=1e11, allow_inf_nan=False, description="unix seconds; only later"),
        ] = None,
    ) -> list[dict[str, Any]]:
        """The run over time, oldest first: samples of its step, tokens, the swarm's
        tokens/s and its active peers, taken every few seconds while peers are live."""
        return run_or_404(lambda: samples.metrics_view(store, run_id, since))

    @app.get(api.COVERAGE)
    def get_coverage(run_id: str, epoch: int | None = None) -> dict[str, Any]:
        """Each shard of an epoch (the current one unless ``?epoch=N``): pending, leased or done."""
        run = run_or_404(lambda: records.get_run(store, run_id))
        try:
            return leases.coverage(run, epoch)
        except CrowdtrainError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None

    @app.get(api.TOKENIZER)
    def get_tokenizer(run_id: str) -> FileResponse:
        """The run's BPE tokenizer (tokenizer.json), pinned by the manifest's sha256."""
        path = file_or_404(lambda: files.tokenizer_file(records.get_run(store, run_id)))
        return FileResponse(path, media_type="application/json", filename=path.name)

    @app.get(api.REFUSALS)
    def get_refusals() -> list[dict[str, Any]]:
        """Requests from nodes that were refused since this coordinator started, by reason."""
        return refusals.snapshot()

    @app.get(api.SHARD)
    def get_shard(run_id: str, shard_id: str) -> FileResponse:
        path = file_or_404(lambda: files.shard_file(records.get_run(store, run_id), shard_id))
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)

    @app.post(api.ADMIN_RUNS, dependencies=[Depends(require_admin)], status_code=201)
    def admin_publish(body: api.PublishRequest) -> dict[str, Any]:
        """Publish a run: its spec (TOML text) and a data folder on the coordinator's disk."""

        result = admin_call(
            lambda: publishing.publish_text(
                store, body.spec_toml, body.data_path, identity, "the published spec"
            )
        )
        return asdict(result)

    @app.post(api.ADMIN_INVITES, dependencies=[Depends(require_admin)], status_code=201)
    def admin_invite(run_id: str, body: api.InviteRequest) -> api.InviteCreated:
        """A new invite code for an invite-only run; shown once, stored only as a hash."""
        invite = admin_call(
            lambda: access.create_invite(store, run_id, body.uses, body.expires_in_s, body.note)
        )
        return api.InviteCreated(
            code=invite.code,
            run_id=invite.run_id,
            uses=invite.max_uses,
            expires_at=invite.expires_at,
        )

    @app.get(api.ADMIN_INVITES, dependencies=[Depends(require_admin)])
    def admin_invites(run_id: str) -> list[dict[str, Any]]:
        return admin_call(lambda: access.list_invites(store, run_id))

    @app.post(api.ADMIN_BANS, dependencies=[Depends(require_admin)], status_code=201)
    def admin_ban(run_id: str, body: api.BanRequest) -> dict[str, Any]:
        """Ban a peer: its sessions end, its leases return, it is no longer credited."""
        return admin_call(lambda: access.ban(store, leases, run_id, body.peer_id, body.reason))

    @app.get(api.ADMIN_BANS, dependencies=[Depends(require_admin)])
    def admin_bans(run_id: str) -> list[dict[str, Any]]:
        return admin_call(lambda: access.list_bans(store, run_id))

    @app.delete(api.ADMIN_BAN, dependencies=[Depends(require_admin)])
    def admin_unban(run_id: str, peer_id: str) -> dict[str, Any]:
        admin_call(lambda: access.unban(store, run_id, peer_id))
        return {"run_id": run_id, "peer_id": peer_id, "banned": False}

    @app.delete(api.ADMIN_FLAG, dependencies=[Depends(require_admin)])
    def admin_unflag(run_id: str, peer_id: str) -> dict[str, Any]:
        """Clear a peer's flag once checked: it averages and is credited again."""
        admin_call(lambda: access.unflag(store, run_id, peer_id))
        return {"run_id": run_id, "peer_id": peer_id, "flagged": None}

    # The contribution ledger and the keeper's checkpoints

    @app.get(api.LEADERBOARD)
    def get_leaderboard(run_id: str) -> list[dict[str, Any]]:
        """Peers ranked by verified compute (FLOPs of receipts that passed every check),
        with their flags; a banned peer is credited nothing."""
        run = run_or_404(lambda: records.get_run(store, run_id))
        return ledger_views.leaderboard_view(store, run)

    @app.get(api.LEDGER)
    def get_ledger(
        run_id: str, limit: Annotated[int, Query(ge=1, le=100_000)] = 1000
    ) -> dict[str, Any]:
        """Per peer: claimed and verified work; per receipt (the latest ``limit``): its
        status and why; and what verifying the run cost the coordinator."""
        run = run_or_404(lambda: records.get_run(store, run_id))
        return ledger_views.ledger_view(store, run, limit)

    @app.get(api.CHECKPOINTS, response_model=list[api.CheckpointInfo])
    def get_checkpoints(run_id: str) -> list[dict[str, Any]]:
        """The keeper's checkpoints, oldest step first, with the sha256 of their parameters."""
        run_or_404(lambda: records.get_run(store, run_id))
        return checkpoints.checkpoints_view(store, run_id)

    @app.get(api.CHECKPOINT, response_model=api.CheckpointInfo)
    def get_checkpoint(
        run_id: str, step: Annotated[int, PathParam(ge=0, le=2**62)]
    ) -> dict[str, Any]:
        """The keeper's checkpoint of one step: the sha256 of its parameters (what a node
        checks downloaded state against) and whether its file can be downloaded."""
        run_or_404(lambda: records.get_run(store, run_id))
        found = checkpoints.checkpoint_view(store, run_id, step)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no checkpoint of step {step}")
        return found

    def kept_file(run_id: str, path: Path | None, missing: str) -> FileResponse:
        run_or_404(lambda: records.get_run(store, run_id))
        if path is None:
            raise HTTPException(status_code=404, detail=missing)
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)

    @app.get(api.CHECKPOINT_FILE)
    def get_checkpoint_file(
        run_id: str, step: Annotated[int, PathParam(ge=0, le=2**62)]
    ) -> FileResponse:
        """A kept checkpoint as a safetensors file (parameters only)."""
        path = checkpoints.checkpoint_file(store, run_id, step)
        return kept_file(run_id, path, f"no file of step {step} is kept")

    @app.get(api.CHECKPOINT_OUTER)
    def get_checkpoint_outer(
        run_id: str, step: Annotated[int, PathParam(ge=0, le=2**62)]
    ) -> FileResponse:
        """A kept DiLoCo checkpoint's outer momentum (safetensors, by parameter name)."""
        path = checkpoints.outer_file(store, run_id, step)
        return kept_file(run_id, path, f"no outer momentum of step {step}")

    return app
