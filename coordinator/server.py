"""``crowdtrain-coordinator serve``: gRPC, HTTP and a DHT peer in one process tree.

Start-up order matters: ports are claimed first (a port in use is a clear
error before anything starts), then hivemind forks its DHT process, and only
then do the event loop, gRPC and uvicorn start. SIGINT and SIGTERM stop all
three; the chosen ports are written to ``ports.json`` in the data folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import uvicorn

from crowdtrain.coordinator.api.auth import SessionInterceptor
from crowdtrain.coordinator.api.grpc_service import CoordinatorService
from crowdtrain.coordinator.api.http_app import Endpoints, create_app
from crowdtrain.coordinator.api.http_limits import uvicorn_limits
from crowdtrain.coordinator.api.refusals import Refusals
from crowdtrain.coordinator.ledger.ledger import Ledger
from crowdtrain.coordinator.ledger.verifier import start_verifier, stop_verifier
from crowdtrain.coordinator.records import get_run
from crowdtrain.coordinator.runs.access import admin_key, coordinator_identity
from crowdtrain.coordinator.runs.leases import LeaseBook
from crowdtrain.coordinator.runs.peers import PeerConfig, authenticate
from crowdtrain.coordinator.runs.samples import take_samples
from crowdtrain.coordinator.store import Store
from crowdtrain.coordinator.swarm.dht import SwarmPeer, SwarmProgress, poll_progress
from crowdtrain.protocol import coordinator_pb2_grpc as pb_grpc
from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.files import atomic_write
from crowdtrain.protocol.rpc import SERVER_OPTIONS

logger = logging.getLogger(__name__)

PORTS_FILE = "ports.json"


@dataclass(frozen=True)
class ServeConfig:
    """Where the coordinator listens. Port 0 picks a free port."""

    data_dir: Path
    host: str = "127.0.0.1"
    http_port: int = 8470
    grpc_port: int = 8471
    dht_port: int = 8472
    public_host: str | None = None
    peers: PeerConfig = PeerConfig()
    # PEM files; with both, gRPC and HTTP speak TLS only.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Serve a non-loopback --host without TLS (a TLS proxy in front, or a private network).
    insecure: bool = False
    # A verifier process beside the coordinator: checkpoints and spot checks.
    verifier: bool = True
    # How often each run with live peers gets a sample (the dashboard's throughput chart).
    sample_every_s: float = 5.0


class PortInUseError(CrowdtrainError):
    pass


def _bind(host: str, port: int, what: str, flag: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"{what} port {port} on {host} is already in use; stop what uses it or pass "
                f"{flag} with another port (0 picks a free one)"
            ) from None
        raise CrowdtrainError(f"cannot listen on {host}:{port} for {what}: {e.strerror}") from None
    return sock


def _read_tls(config: ServeConfig) -> tuple[bytes, bytes] | None:
    """(certificate chain, private key) PEM bytes, or None without TLS."""
    if config.tls_cert is None and config.tls_key is None:
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise CrowdtrainError("TLS needs both --tls-cert and --tls-key")
    try:
        return config.tls_cert.read_bytes(), config.tls_key.read_bytes()
    except OSError as e:
        raise CrowdtrainError(f"cannot read the TLS certificate or key: {e}") from None


def _free_port(host: str, port: int, what: str, flag: str) -> int:
    """Check a port can be bound (or pick one for port 0) and release it for its real owner."""
    sock = _bind(host, port, what, flag)
    chosen = sock.getsockname()[1]
    sock.close()
    return chosen


@contextlib.contextmanager
def _ports_file(data_dir: Path, ports: dict) -> Iterator[None]:
    path = data_dir / PORTS_FILE
    atomic_write(path, json.dumps(ports, indent=2))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: ``serve`` owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


ReadyCallback = Callable[[dict], None]


def _check_exposure(config: ServeConfig, tls: bool) -> None:
    """Refuse to serve beyond this machine in clear text unless told to (``--insecure``)."""
    if tls:
        return
    try:
        loopback = ipaddress.ip_address(config.host).is_loopback
    except ValueError:
        loopback = config.host == "localhost"
    if loopback:
        return
    why = (
        f"--host {config.host} serves beyond this machine without TLS: the admin key and "
        "every session token would cross the network in clear"
    )
    if not config.insecure:
        raise CrowdtrainError(
            f"{why}. Pass --tls-cert and --tls-key, or --insecure when a TLS proxy in front "
            "of this coordinator ends TLS (or on a network you trust)"
        )
    logger.warning("%s (--insecure)", why)


def serve(config: ServeConfig, on_ready: ReadyCallback | None = None) -> None:
    """Run the coordinator until SIGINT or SIGTERM.

    ``on_ready`` receives what ``ports.json`` holds once every server listens.
    """
    data_dir = config.data_dir
    if data_dir.exists() and not data_dir.is_dir():
        raise CrowdtrainError(f"--data-dir {data_dir} is a file, not a folder")
    tls = _read_tls(config)
    _check_exposure(config, tls is not None)
    store = Store(data_dir)
    (data_dir / PORTS_FILE).unlink(missing_ok=True)
    http_sock = _bind(config.host, config.http_port, "HTTP", "--http-port")
    try:
        grpc_port = _free_port(config.host, config.grpc_port, "gRPC", "--grpc-port")
        dht_port = _free_port(config.host, config.dht_port, "DHT", "--dht-port")
        swarm = SwarmPeer(config.host, dht_port, announce_host=config.public_host)
    except BaseException:
        http_sock.close()
        store.close()
        raise
    try:
        for run in store.list_runs():
            swarm.watch(run["id"])
        asyncio.run(_serve_async(config, store, swarm, http_sock, grpc_port, tls, on_ready))
    finally:
        swarm.shutdown()
        http_sock.close()
        store.close()


async def _serve_async(
    config: ServeConfig,
    store: Store,
    swarm: SwarmPeer,
    http_sock: socket.socket,
    grpc_port: int,
    tls: tuple[bytes, bytes] | None,
    on_ready: ReadyCallback | None,
) -> None:
    public = config.public_host or config.host
    http_port = http_sock.getsockname()[1]
    http_url = f"{'https' if tls else 'http'}://{public}:{http_port}"
    grpc_target = f"{public}:{grpc_port}"
    identity = coordinator_identity(config.data_dir)
    admin = admin_key(config.data_dir)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    leases = LeaseBook(store)
    ledger = Ledger(store, swarm.history)
    refusals = Refusals()
    grpc_server = grpc.aio.server(
        options=SERVER_OPTIONS,
        interceptors=[SessionInterceptor(lambda token: authenticate(store, token), refusals)],
    )
    pb_grpc.add_CoordinatorServicer_to_server(
        CoordinatorService(
            store,
            config.peers,
            lambda: swarm.initial_peers,
            http_url,
            leases,
            refusals,
            identity,
            ledger=ledger,
        ),
        grpc_server,
    )
    address = f"{config.host}:{grpc_port}"
    try:
        if tls:
            bound = grpc_server.add_secure_port(
                address, grpc.ssl_server_credentials([(tls[1], tls[0])])
            )
        else:
            bound = grpc_server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound != grpc_port:
        raise PortInUseError(
            f"gRPC port {grpc_port} on {config.host} could not be bound; pass --grpc-port 0"
        )
    await grpc_server.start()

    endpoints = Endpoints(
        http_url,
        grpc_target,
        lambda: swarm.initial_peers,
        grpc_tls=tls is not None,
        coordinator_public_key=identity.public_key.hex(),
    )
    app = create_app(store, endpoints, leases, refusals, admin_key=admin, identity=identity)
    http_server = _Uvicorn(
        uvicorn.Config(
            app,
            log_level="warning",
            # No handlers of uvicorn's own: its records reach the root logger's handler,
            # so --log-json covers them (protocol/logs.py's setup_logging).
            log_config=None,
            lifespan="off",
            ssl_certfile=str(config.tls_cert) if tls else None,
            ssl_keyfile=str(config.tls_key) if tls else None,
            **uvicorn_limits(),
        )
    )
    http_task = asyncio.create_task(http_server.serve(sockets=[http_sock]))

    poll_stop = threading.Event()

    def on_progress(run_id: str, progress: SwarmProgress) -> None:
        store.raise_run_step(run_id, progress.step)

    poller = threading.Thread(
        target=poll_progress,
        args=(swarm, lambda: [r["id"] for r in store.list_runs()], on_progress, poll_stop),
        kwargs={"after_read": lambda run_id: ledger.recheck_waiting(get_run(store, run_id))},
        name="swarm-progress",
        daemon=True,
    )
    poller.start()
    sampler = threading.Thread(
        target=_sample_runs,
        args=(store, config.sample_every_s, poll_stop),
        name="run-samples",
        daemon=True,
    )
    sampler.start()

    while not http_server.started and not http_task.done():
        await asyncio.sleep(0.05)
    if http_task.done():
        await http_task
        raise CrowdtrainError("the HTTP server stopped during start-up; see the log above")

    ports = {
        "pid": os.getpid(),
        "host": config.host,
        "http_port": http_port,
        "grpc_port": grpc_port,
        "dht_port": swarm.port,
        "http_url": http_url,
        "grpc_target": grpc_target,
        "grpc_tls": tls is not None,
        "initial_peers": swarm.initial_peers,
        "coordinator_public_key": identity.public_key.hex(),
    }
    verifier = (
        start_verifier(config.data_dir, swarm.initial_peers, config.host)
        if config.verifier
        else None
    )
    with _ports_file(config.data_dir, ports):
        logger.info(
            "coordinator ready: http %s, grpc %s, dht %s", http_url, grpc_target, swarm.port
        )
        if on_ready is not None:
            on_ready(ports)
        await stop.wait()
        logger.info("shutting down")
        http_server.should_exit = True
        poll_stop.set()
        await grpc_server.stop(grace=2.0)
        await http_task
        poller.join(timeout=_POLL_JOIN_S)
        sampler.join(timeout=_POLL_JOIN_S)
        if verifier is not None:
            stop_verifier(verifier)


_POLL_JOIN_S = 6.0


def _sample_runs(store: Store, every_s: float, stop: threading.Event) -> None:
    """Sample every run with live peers each ``every_s`` until ``stop``; a thread, so a
    slow write never holds up a request."""
    while not stop.wait(every_s):
        try:
            take_samples(store)
        except Exception:
            logger.exception("sampling the runs failed; trying again in %.0f s", every_s)
