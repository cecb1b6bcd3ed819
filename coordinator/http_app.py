"""The coordinator's HTTP API for people, notebooks and bulk files.

Routes only translate: they call the view functions in :mod:`runs` and
return JSON, or stream a shard file named by the run's manifest (never a
path from the request).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse

from crowdtrain.coordinator import runs
from crowdtrain.coordinator.leases import LeaseBook
from crowdtrain.coordinator.metrics import Refusals
from crowdtrain.coordinator.store import Store
from crowdtrain.protocol.errors import CrowdtrainError


@dataclass(frozen=True)
class Endpoints:
    """Where nodes reach the other planes; served at ``/api/endpoints``."""

    http_url: str
    grpc_target: str
    initial_peers: Callable[[], list[str]]


def create_app(
    store: Store, endpoints: Endpoints, leases: LeaseBook, refusals: Refusals
) -> FastAPI:
    app = FastAPI(
        title="crowdtrain coordinator",
        version=version("crowdtrain"),
        description="Runs, peers and shards of a crowdtrain coordinator.",
    )

    def run_or_404(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except runs.UnknownRunError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/endpoints")
    def get_endpoints() -> dict[str, Any]:
        """What a node needs besides this URL: the gRPC target and the DHT's first peers."""
        return {
            "http_url": endpoints.http_url,
            "grpc_target": endpoints.grpc_target,
            "initial_peers": endpoints.initial_peers(),
            "version": version("crowdtrain"),
        }

    @app.get("/api/runs")
    def list_runs() -> list[dict[str, Any]]:
        return runs.list_runs_view(store)

    @app.get("/api/runs/{run_id}")
    def get_run(run_id: str) -> dict[str, Any]:
        return run_or_404(lambda: runs.run_view(store, run_id))

    @app.get("/api/runs/{run_id}/peers")
    def get_peers(run_id: str) -> list[dict[str, Any]]:
        return run_or_404(lambda: runs.peers_view(store, run_id))

    @app.get("/api/runs/{run_id}/evals")
    def get_evals(run_id: str) -> list[dict[str, Any]]:
        """Validation loss over steps and tokens, oldest first."""
        return run_or_404(lambda: runs.evals_view(store, run_id))

    @app.get("/api/runs/{run_id}/coverage")
    def get_coverage(run_id: str, epoch: int | None = None) -> dict[str, Any]:
        """Each shard of an epoch (the current one unless ``?epoch=N``): pending, leased or done."""
        run = run_or_404(lambda: runs.get_run(store, run_id))
        try:
            return leases.coverage(run, epoch)
        except CrowdtrainError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None

    @app.get("/api/runs/{run_id}/tokenizer")
    def get_tokenizer(run_id: str) -> FileResponse:
        """The run's BPE tokenizer (tokenizer.json), pinned by the manifest's sha256."""
        run = run_or_404(lambda: runs.get_run(store, run_id))
        name = run.manifest.tokenizer_file
        if name is None:
            raise HTTPException(status_code=404, detail=f"run {run_id!r} uses byte tokens")
        path = run.data_path / name
        if not path.is_file():
            raise HTTPException(
                status_code=410, detail="the tokenizer is missing on the coordinator"
            )
        return FileResponse(path, media_type="application/json", filename=name)

    @app.get("/api/refusals")
    def get_refusals() -> list[dict[str, Any]]:
        """Requests from nodes that were refused since this coordinator started, by reason."""
        return refusals.snapshot()

    @app.get("/api/runs/{run_id}/shards/{shard_id}")
    def get_shard(run_id: str, shard_id: str) -> FileResponse:
        run = run_or_404(lambda: runs.get_run(store, run_id))
        entry = next((s for s in run.manifest.shards if s.id == shard_id), None)
        if entry is None:
            raise HTTPException(status_code=404, detail=f"no shard {shard_id!r} in run {run_id!r}")
        path = run.data_path / entry.file
        if not path.is_file():
            raise HTTPException(
                status_code=410, detail=f"shard {shard_id!r} is missing from the coordinator's data"
            )
        return FileResponse(path, media_type="application/octet-stream", filename=entry.file)

    return app
