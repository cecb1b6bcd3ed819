"""A node's HTTP calls to its coordinator: discovery, file downloads and the run's public view.

Every call has a deadline and turns failures into :class:`CoordinatorError`
with a message a person can act on. Answers are parsed with the
:mod:`crowdtrain.protocol.api` models the coordinator declares. Downloads go
through :func:`crowdtrain.protocol.transfer.download`, which resumes a
connection that broke mid-file; nothing else here retries on its own.
"""

from __future__ import annotations

import logging
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from pydantic import ValidationError
from tqdm import tqdm

from crowdtrain.model import load_checkpoint
from crowdtrain.node.link.errors import CoordinatorError
from crowdtrain.node.stats.traffic import Traffic
from crowdtrain.protocol import api, transfer
from crowdtrain.protocol.errors import CrowdtrainError

logger = logging.getLogger(__name__)


HTTP_TIMEOUT = httpx.Timeout(10.0, read=60.0)


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


def tls_verify(ca_cert: Path | None) -> ssl.SSLContext | bool:
    """What httpx should trust: the given authority, or the system's roots."""
    return ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else True


def fetch_endpoints(url: str, ca_cert: Path | None = None) -> api.CoordinatorEndpoints:
    """Ask the coordinator's HTTP server where its gRPC server and DHT are."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise CoordinatorError(
            f"coordinator URL {url!r} must start with http:// or https:// "
            "(the address you open in a browser)"
        )
    try:
        response = httpx.get(
            api.url(url, api.ENDPOINTS), timeout=HTTP_TIMEOUT, verify=tls_verify(ca_cert)
        )
    except httpx.HTTPError as e:
        raise CoordinatorError(
            f"cannot reach the coordinator at {url} ({type(e).__name__}: {e}); check the "
            "address and that `crowdtrain-coordinator serve` is running there"
        ) from None
    if response.status_code != 200:
        raise CoordinatorError(
            f"{url} answered HTTP {response.status_code} for {api.ENDPOINTS}; "
            "is this a crowdtrain coordinator?"
        )
    try:
        return api.CoordinatorEndpoints.model_validate_json(response.content)
    except ValidationError:
        raise CoordinatorError(f"{url} is not a crowdtrain coordinator") from None


def discover(url: str, ca_cert: Path | None = None) -> dict[str, Any]:
    """:func:`fetch_endpoints` as a dict of :class:`~crowdtrain.protocol.api.CoordinatorEndpoints`'
    fields, for callers that index it by name (checked all the same)."""
    return fetch_endpoints(url, ca_cert).model_dump()


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

    :func:`crowdtrain.protocol.transfer.download` does the work: the bytes go to
    a temporary file that takes ``dest``'s name only when the whole body arrived
    and, given ``sha256``, hashes to it; more than ``max_bytes`` is refused as it
    arrives; a connection that breaks mid-file is resumed where it stopped (a few
    times at most). Any failure raises :class:`CoordinatorError` and leaves no
    file behind.
    """
    bar: TransferProgress | None = None

    def shown(received: int, total: int | None) -> None:
        nonlocal bar
        if bar is None:
            bar = TransferProgress(label, total if total is not None else max_bytes, progress)
        bar.update(received - bar.done)

    try:
        transfer.download(http, url, dest, sha256=sha256, max_bytes=max_bytes, progress=shown)
    except transfer.TransferError as e:
        raise CoordinatorError(str(e)) from None
    finally:
        if bar is not None:
            bar.close()


@dataclass
class RunView:
    """One run's public routes on one coordinator; ``download(url, path)`` fetches files
    (the node's checked, retried download), into ``folder``."""

    url: str
    run_id: str
    folder: Path
    download: Callable[..., None]  # (url, path, max_bytes=, sha256=)
    ca_cert: Path | None = None
    traffic: Traffic | None = None  # counts each GET as control
    _newest: tuple[int, dict[str, torch.Tensor]] | None = None  # newest_checkpoint_state's

    def get(self, route: str, **values: object) -> Any:
        """GET one of the run's public JSON routes (a :mod:`crowdtrain.protocol.api` route,
        filled with this run's id and ``values``); None when it answers 404."""
        response = httpx.get(
            api.url(self.url, route, run_id=self.run_id, **values),
            timeout=5.0,
            verify=str(self.ca_cert) if self.ca_cert else True,
        )
        if self.traffic is not None:
            self.traffic.add(
                "control", sent=len(str(response.request.url)), received=len(response.content)
            )
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def fresh_step(self) -> int | None:
        """The step the coordinator records now (the heartbeat's may be seconds old)."""
        head = self._head()
        return head.step if head is not None else None

    def fresh_leading_step(self) -> int | None:
        """How far ahead of its step the coordinator sees live peers now (None: unknown)."""
        head = self._head()
        if head is None:
            return None
        return head.leading_step if head.leading_step is not None else head.step

    def _head(self) -> api.RunHead | None:
        try:
            return api.RunHead.model_validate(self.get(api.RUN))
        except (httpx.HTTPError, ValueError) as e:  # a ValidationError is a ValueError
            logger.info("could not ask the coordinator for its step (%s)", e)
            return None

    def checkpoint_sha256(self, step: int) -> str | None:
        """The params_sha256 of the coordinator's checkpoint of ``step``, if it keeps one."""
        try:
            found = self.get(api.CHECKPOINT, step=step)
            return api.CheckpointInfo.model_validate(found).sha256 if found is not None else None
        except (httpx.HTTPError, ValueError) as e:
            logger.info("could not ask the coordinator for its checkpoint of step %d (%s)", step, e)
            return None

    def newest_checkpoint_state(self, at_most: int) -> dict[str, torch.Tensor] | None:
        """The tensors of the coordinator's newest checkpoint of a step up to ``at_most``
        whose file it keeps (the last one fetched is kept for the next ask), or None."""
        try:
            listed = [api.CheckpointInfo.model_validate(c) for c in self.get(api.CHECKPOINTS) or []]
        except (httpx.HTTPError, ValueError) as e:
            logger.info("could not list the coordinator's checkpoints (%s)", e)
            return None
        steps = [c.step for c in listed if c.available and c.step <= at_most]
        if not steps:
            return None
        step = max(steps)
        if self._newest is None or self._newest[0] != step:
            state = self.checkpoint_state(step)
            if state is None:
                return None
            self._newest = (step, state)
        return self._newest[1]

    def checkpoint_state(self, step: int) -> dict[str, torch.Tensor] | None:
        """The tensors of the coordinator's checkpoint of ``step`` (safetensors: no pickle),
        no more bytes than its listed size and hashing to its listed sha256."""
        path = self.folder / f"checkpoint-{step}.safetensors"
        try:
            found = self.get(api.CHECKPOINT, step=step)
            info = api.CheckpointInfo.model_validate(found) if found is not None else None
        except (httpx.HTTPError, ValueError) as e:
            logger.info("could not ask the coordinator for its checkpoint of step %d (%s)", step, e)
            return None
        if info is None or not info.available:
            return None
        try:
            self.download(
                api.url(self.url, api.CHECKPOINT_FILE, run_id=self.run_id, step=step),
                path,
                max_bytes=info.num_bytes,
                sha256=info.file_sha256,
            )
            return load_checkpoint(path)[0]
        except CrowdtrainError as e:
            logger.info("could not fetch the coordinator's checkpoint of step %d (%s)", step, e)
            return None
        finally:
            path.unlink(missing_ok=True)
