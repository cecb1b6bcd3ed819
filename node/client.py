"""A node's connection to its coordinator: HTTP for discovery and files, gRPC for control.

Every call has a deadline and turns failures into :class:`CoordinatorError`
with a message a person can act on. Nothing here retries on its own; the
caller decides whether to keep training and try again later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
from tqdm import tqdm

from crowdtrain.protocol import coordinator_pb2 as pb
from crowdtrain.protocol import coordinator_pb2_grpc as pb_grpc
from crowdtrain.protocol.errors import CrowdtrainError, IdentityError, SpecError
from crowdtrain.protocol.identity import Identity, run_statement, seal, verify_signature
from crowdtrain.protocol.rpc import (
    CALL_DEADLINE_S,
    CHANNEL_OPTIONS,
    KIND_HEARTBEAT,
    KIND_RECEIPT,
    KIND_REGISTER,
    envelope_to_pb,
)
from crowdtrain.protocol.runspec import RunSpec, parse_spec
from crowdtrain.protocol.shards import ShardManifest

logger = logging.getLogger(__name__)

_HTTP_TIMEOUT = httpx.Timeout(10.0, read=60.0)
# Smaller downloads end before a bar is worth drawing.
_BAR_MIN_BYTES = 1 << 20
# Off a terminal, a download says how far it got at most this often (and a quicker
# one says nothing).
_LOG_EVERY_S = 5.0
PROGRESS_MODES = ("auto", "bar", "notebook", "log", "none")


class TransferProgress:
    """How far one download got: a bar of bytes on a terminal, log lines otherwise.

    ``mode`` ``auto`` draws a bar (removed when done) when stderr is a terminal
    and the download has at least 1 MiB, else logs a line every few seconds
    while a download lasts longer than that; ``log`` always logs so,
    ``none`` shows nothing; ``notebook`` logs (a second bar under the node's
    would garble it). ``total`` may be None when the size is unknown.
    """

    def __init__(self, label: str, total: int | None, mode: str = "auto"):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        if mode not in ("bar", "none"):
            mode = "log"
        self.label, self.total, self.mode = label, total, mode
        self.done = 0
        self._started = self._last_log = time.monotonic()
        self._bar: tqdm | None = None
        if mode == "bar" and (total is None or total >= _BAR_MIN_BYTES):
            self._bar = tqdm(
                total=total,
                desc=label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                leave=False,
                dynamic_ncols=True,
                mininterval=0.5,
                file=sys.stderr,
            )

    def update(self, num_bytes: int) -> None:
        self.done += num_bytes
        if self._bar is not None:
            self._bar.update(num_bytes)
            return
        now = time.monotonic()
        if self.mode != "none" and now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            of = f" of {self.total / 1e6:.1f}" if self.total else ""
            rate = self.done / max(now - self._started, 1e-9) / 1e6
            logger.info(
                "downloading %s: %.1f%s MB (%.1f MB/s)", self.label, self.done / 1e6, of, rate
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class CoordinatorError(CrowdtrainError):
    """The coordinator could not be reached or refused a request."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code

    @property
    def unauthenticated(self) -> bool:
        return self.code == grpc.StatusCode.UNAUTHENTICATED

    @property
    def denied(self) -> bool:
        return self.code == grpc.StatusCode.PERMISSION_DENIED

    @property
    def unreachable(self) -> bool:
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class Registration:
    peer_id: str
    session_token: str
    heartbeat_interval_s: float
    run: pb.RunInfo
    initial_peers: list[str]


KNOWN_COORDINATORS_FILE = "known_coordinators.json"


class KeyPins:
    """Coordinator keys this node trusted on first contact (like ssh's known_hosts).

    A coordinator whose key differs from the pinned one is refused: it may be
    an impostor. The file maps each coordinator URL to its key in hex.
    """

    def __init__(self, home: Path):
        self.path = Path(home) / KNOWN_COORDINATORS_FILE

    def _load(self) -> dict[str, str]:
        try:
            pins = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise CrowdtrainError(
                f"{self.path} is damaged ({e}); fix or delete it (its keys are then "
                "trusted again on first contact)"
            ) from None
        if not isinstance(pins, dict):
            raise CrowdtrainError(f"{self.path} is damaged; fix or delete it")
        return {str(k): str(v) for k, v in pins.items()}

    def check(self, url: str, public_key: bytes) -> None:
        """Pin ``public_key`` for ``url`` on first contact; refuse a changed key."""
        if len(public_key) != 32:
            raise CrowdtrainError(f"the coordinator at {url} presented no valid key")
        pins = self._load()
        key = public_key.hex()
        pinned = pins.get(url)
        if pinned is None:
            pins[url] = key
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(pins, indent=2, sort_keys=True))
            os.replace(tmp, self.path)
            logger.info("trusting coordinator %s with key %s (first contact)", url, key[:16])
            return
        if pinned != key:
            raise CrowdtrainError(
                f"WARNING: the coordinator at {url} presents key {key[:16]}..., not the "
                f"{pinned[:16]}... this node pinned on first contact. Someone may be "
                "impersonating it. If its operator really replaced the key, remove the "
                f"line for {url} from {self.path} and join again."
            )


def tls_verify(ca_cert: Path | None) -> ssl.SSLContext | bool:
    """What httpx should trust: the given authority, or the system's roots."""
    return ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else True


def discover(url: str, ca_cert: Path | None = None) -> dict[str, Any]:
    """Ask the coordinator's HTTP server where its gRPC server and DHT are."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise CoordinatorError(
            f"coordinator URL {url!r} must start with http:// or https:// "
            "(the address you open in a browser)"
        )
    try:
        response = httpx.get(
            f"{url}/api/endpoints", timeout=_HTTP_TIMEOUT, verify=tls_verify(ca_cert)
        )
    except httpx.HTTPError as e:
        raise CoordinatorError(
            f"cannot reach the coordinator at {url} ({type(e).__name__}: {e}); check the "
            "address and that `crowdtrain-coordinator serve` is running there"
        ) from None
    if response.status_code != 200:
        raise CoordinatorError(
            f"{url} answered HTTP {response.status_code} for /api/endpoints; "
            "is this a crowdtrain coordinator?"
        )
    try:
        endpoints = response.json()
        str(endpoints["grpc_target"])
    except (ValueError, KeyError, TypeError):
        raise CoordinatorError(f"{url} is not a crowdtrain coordinator") from None
    return endpoints


class CoordinatorClient:
    """One node's calls to one coordinator. Thread-safe (gRPC channels are).

    ``tls`` speaks TLS to the gRPC server (the coordinator says so at
    discovery); ``ca_cert`` is a PEM file of the authority to trust, for
    coordinators with a private certificate (default: the system's roots).
    ``pins`` checks the coordinator's key before anything is signed for it.
    ``progress`` (the node's progress mode) is how downloads show their progress
    (see :class:`TransferProgress`).
    """

    def __init__(
        self,
        url: str,
        grpc_target: str,
        identity: Identity,
        tls: bool = False,
        ca_cert: Path | None = None,
        pins: KeyPins | None = None,
        progress: str = "auto",
    ):
        if progress not in PROGRESS_MODES:
            raise ValueError(f"progress {progress!r} is not one of {', '.join(PROGRESS_MODES)}")
        self.progress = progress
        self.url = url.rstrip("/")
        self.grpc_target = grpc_target
        self.identity = identity
        self.tls = tls
        self.pins = pins
        self._root_certificates = ca_cert.read_bytes() if ca_cert else None
        self._channel = self._open_channel()
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._http = httpx.Client(timeout=_HTTP_TIMEOUT, verify=tls_verify(ca_cert))

    def _open_channel(self) -> grpc.Channel:
        if self.tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=self._root_certificates)
            return grpc.secure_channel(self.grpc_target, credentials, options=CHANNEL_OPTIONS)
        return grpc.insecure_channel(self.grpc_target, options=CHANNEL_OPTIONS)

    def suspend(self) -> None:
        """Close the gRPC channel (before a fork); :meth:`reopen` makes a new one."""
        self._channel.close()

    def reopen(self) -> None:
        self._channel = self._open_channel()
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()
        self._http.close()

    def _call(self, name: str, request: Any, token: str | None = None) -> Any:
        metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
        try:
            return getattr(self._stub, name)(request, timeout=CALL_DEADLINE_S, metadata=metadata)
        except grpc.RpcError as e:
            code = e.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                message = f"coordinator at {self.grpc_target} is unreachable ({code.name})"
            else:
                message = e.details() or code.name
            raise CoordinatorError(message, code) from None

    def register(
        self, run_id: str, name: str, device: str, versions: str, invite: str = ""
    ) -> Registration:
        """Answer a fresh challenge with a signed registration; returns the session."""
        challenge = self._call("Challenge", pb.ChallengeRequest(run_id=run_id))
        if self.pins is not None:
            self.pins.check(self.url, challenge.coordinator_public_key)
        payload = {
            "challenge": challenge.challenge,
            "name": name,
            "device": device,
            "versions": versions,
            "invite": invite,
        }
        envelope = seal(self.identity, KIND_REGISTER, payload)
        reply = self._call(
            "Register", pb.RegisterRequest(run_id=run_id, envelope=envelope_to_pb(envelope))
        )
        if reply.run.coordinator_public_key != challenge.coordinator_public_key:
            raise CoordinatorError("the coordinator's key changed during registration")
        return Registration(
            peer_id=reply.peer_id,
            session_token=reply.session_token,
            heartbeat_interval_s=reply.heartbeat_interval_s,
            run=reply.run,
            initial_peers=list(reply.initial_peers),
        )

    def heartbeat(self, token: str, payload: dict[str, Any]) -> pb.HeartbeatReply:
        envelope = seal(self.identity, KIND_HEARTBEAT, payload)
        return self._call(
            "Heartbeat", pb.HeartbeatRequest(envelope=envelope_to_pb(envelope)), token
        )

    def lease(self, token: str, max_shards: int, resume: bool = False) -> list[pb.Lease]:
        reply = self._call(
            "LeaseShards", pb.LeaseRequest(max_shards=max_shards, resume=resume), token
        )
        return list(reply.leases)

    def report(self, token: str, receipt: dict[str, Any]) -> bool:
        envelope = seal(self.identity, KIND_RECEIPT, receipt)
        reply = self._call("ReportShard", pb.ShardReport(envelope=envelope_to_pb(envelope)), token)
        return bool(reply.accepted)

    def leave(self, token: str) -> None:
        self._call("Leave", pb.LeaveRequest(), token)

    def download(self, url: str, dest: Path) -> None:
        """Stream ``url`` into ``dest`` (via a temporary file, so a partial file never shows)."""
        download_file(self._http, url, dest, dest.name, self.progress)


def download_file(
    http: httpx.Client,
    url: str,
    dest: Path,
    label: str,
    progress: str = "auto",
    sha256: str | None = None,
    max_bytes: int | None = None,
) -> None:
    """Stream ``url`` into ``dest`` with a progress bar (see :class:`TransferProgress`).

    The bytes go to a ``.part`` file that takes ``dest``'s name only when the
    whole body arrived and, given ``sha256``, hashes to it; more than
    ``max_bytes`` is refused as it arrives. Any failure raises
    :class:`CoordinatorError` and leaves no file behind.
    """
    tmp = dest.with_name(f".{dest.name}.part")
    digest = hashlib.sha256()
    received = 0
    bar: TransferProgress | None = None
    try:
        with http.stream("GET", url) as response:
            if response.status_code != 200:
                raise CoordinatorError(f"downloading {url} failed: HTTP {response.status_code}")
            size = response.headers.get("content-length")
            total = int(size) if size and size.isdigit() else max_bytes
            bar = TransferProgress(label, total, progress)
            with open(tmp, "wb") as f:
                for chunk in response.iter_bytes(1 << 20):
                    received += len(chunk)
                    if max_bytes is not None and received > max_bytes:
                        raise CoordinatorError(
                            f"{url} sent more than the {max_bytes} bytes expected; refusing it"
                        )
                    if sha256 is not None:
                        digest.update(chunk)
                    f.write(chunk)
                    bar.update(len(chunk))
        if sha256 is not None and digest.hexdigest() != sha256:
            raise CoordinatorError(
                f"{url} sent bytes with sha256 {digest.hexdigest()[:16]}..., not the "
                f"{sha256[:16]}... expected: they were damaged or altered on the way; "
                "refusing it"
            )
        tmp.replace(dest)
    except httpx.HTTPError as e:
        raise CoordinatorError(f"downloading {url} failed: {e}") from None
    finally:
        if bar is not None:
            bar.close()
        tmp.unlink(missing_ok=True)  # a failed download leaves nothing behind


def check_run(run: Any) -> tuple[RunSpec, ShardManifest]:
    """A registration's run (RunInfo), checked: the coordinator's signature of it, and
    its spec and manifest against their published hashes."""
    try:
        verify_signature(
            run.coordinator_public_key,
            run.run_signature,
            run_statement(run.run_id, run.spec_hash, run.manifest_hash),
        )
    except IdentityError:
        raise SpecError(
            f"run {run.run_id}: the coordinator's signature of the run does not verify; "
            "its spec or data may have been altered: do not train on it"
        ) from None
    spec = parse_spec(run.spec_toml, source=f"run {run.run_id} from the coordinator")
    if spec.hash != run.spec_hash:
        raise SpecError(
            f"run {run.run_id}: the spec's hash {spec.hash[:16]} does not match the "
            f"published {run.spec_hash[:16]}; this crowdtrain may be too old or too new "
            "for the coordinator"
        )
    manifest = ShardManifest.from_json(run.manifest_json)
    if manifest.hash != run.manifest_hash:
        raise SpecError(f"run {run.run_id}: the data manifest does not match its hash")
    return spec, manifest
