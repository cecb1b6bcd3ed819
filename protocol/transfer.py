"""One streamed download over HTTP that resumes where a broken connection left it.

:func:`download` streams a URL into a temporary file beside the destination
(:func:`crowdtrain.protocol.files.atomic_path`). When the connection breaks
mid-body, it asks again for the rest with ``Range: bytes=<received>-`` (and
``If-Range``, so a file that changed meanwhile comes back whole); a server that
answers ``200`` instead of ``206`` sends the whole file again and the download
starts over. The size cap is checked as bytes arrive and the sha256 over the
whole file at the end; only a complete and correct file takes the destination's
name, and every failure raises :class:`TransferError` and leaves nothing behind.

Retry policy: a request that gets no answer at all (the server is down, the
name does not resolve) and an answer that is an HTTP error are not retried:
the caller decides (a node retries a shard later; a person runs again). Once
the server has answered, a connection that breaks or stalls is resumed at most
:data:`MAX_RESUMES` times per download, after a short pause that doubles each
time (:data:`FIRST_PAUSE_S` up to :data:`MAX_PAUSE_S`).

Progress goes to a callback, so each caller draws its own bar or log lines.
The node and ``crowdtrain.coordinator.Client`` both download through here. httpx
only: nothing of hivemind or a server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import httpx

from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.files import atomic_path

logger = logging.getLogger(__name__)

MAX_RESUMES = 5
"""How many times one download resumes after its connection broke, at most."""
FIRST_PAUSE_S = 0.25
MAX_PAUSE_S = 2.0
_READ_BYTES = 1 << 20

Progress = Callable[[int, int | None], None]
"""Told ``(bytes of the file received so far, the file's size or None when unknown)``
as bytes arrive. The count goes back to 0 when a server ignores a range request and
the download starts over."""

# Worth resuming: the connection broke, stalled or ended before the body did.
_BROKEN = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")
_DETAIL_BYTES = 4096


class TransferError(CrowdtrainError):
    """A download that failed or whose bytes were not the ones expected; it left no file.

    ``status`` is the HTTP status of a refusal (None when the server never
    refused); ``received_sha256`` is set when the whole body arrived but hashed
    to something other than the sha256 expected.
    """

    def __init__(self, message: str, status: int | None = None, received_sha256: str | None = None):
        super().__init__(message)
        self.status = status
        self.received_sha256 = received_sha256


class _Broken(Exception):
    """This attempt ended before the file did, in a way worth resuming."""


def download(
    http: httpx.Client,
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    max_bytes: int | None = None,
    progress: Progress | None = None,
    max_resumes: int = MAX_RESUMES,
) -> None:
    """Stream ``url`` into ``dest``, resuming a broken connection (see the module's doc).

    ``dest`` takes the bytes only once the whole body arrived and, given
    ``sha256``, hashes to it; a body over ``max_bytes`` is refused as soon as it
    says so or sends more. ``dest``'s folder must exist; a file already at
    ``dest`` is replaced only by a complete and correct download. Raises
    :class:`TransferError`.
    """
    with atomic_path(dest) as part, open(part, "r+b") as out:
        _Transfer(http, url, out, max_bytes, progress).run(max_resumes)
        if sha256 is not None and sha256 != (received := _file_sha256(out)):
            raise TransferError(
                f"{url} sent bytes with sha256 {received[:16]}..., not the {sha256[:16]}... "
                "expected: they were damaged or altered on the way; refusing it",
                received_sha256=received,
            )


class _Transfer:
    """One download's attempts into one open partial file."""

    def __init__(
        self,
        http: httpx.Client,
        url: str,
        out: BinaryIO,
        max_bytes: int | None,
        progress: Progress | None,
    ):
        self.http = http
        self.url = url
        self.out = out
        self.max_bytes = max_bytes
        self.progress = progress
        self.received = 0  # bytes in ``out``, all of them from the same version of the file
        self.total: int | None = None
        self.validator: str | None = None  # what If-Range sends: the file's ETag or date
        self.answered = False

    def run(self, max_resumes: int) -> None:
        resumes = 0
        while True:
            try:
                if self._attempt():
                    return
                reason = f"the body ended at byte {self.received} of {self.total}"
            except (_Broken, *_BROKEN) as e:
                if not self.answered:
                    raise TransferError(f"downloading {self.url} failed: {e}") from None
                reason = str(e) or type(e).__name__
            except (httpx.HTTPError, httpx.InvalidURL) as e:
                raise TransferError(f"downloading {self.url} failed: {e}") from None
            if resumes == max_resumes:
                raise TransferError(
                    f"downloading {self.url} failed: the connection broke {resumes + 1} times, "
                    f"the last at byte {self.received} ({reason}); try again later"
                )
            resumes += 1
            pause_s = min(FIRST_PAUSE_S * 2 ** (resumes - 1), MAX_PAUSE_S)
            logger.info(
                "download of %s broke at byte %d (%s); resuming in %.2fs (%d of %d)",
                self.url,
                self.received,
                reason,
                pause_s,
                resumes,
                max_resumes,
            )
            time.sleep(pause_s)

    def _attempt(self) -> bool:
        """One request for what is missing; True once the file is whole."""
        # Ranges count the bytes of the file itself, never of a compressed body.
        headers = {"Accept-Encoding": "identity"}
        if self.received:
            headers["Range"] = f"bytes={self.received}-"
            if self.validator is not None:
                headers["If-Range"] = self.validator
        with self.http.stream("GET", self.url, headers=headers) as response:
            self.answered = True
            if not self._take_answer(response):
                return True
            # Each piece as it arrives: a broken connection loses nothing already received.
            for chunk in response.iter_bytes():
                self._write(chunk)
        return self.total is None or self.received == self.total

    def _take_answer(self, response: httpx.Response) -> bool:
        """Check an answer's status and headers; False when nothing more is needed."""
        status = response.status_code
        if status == 206 and self.received:
            found = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
            if found is None or int(found[1]) != self.received:
                asked = self.received
                self._restart()
                raise _Broken(f"asked for bytes from {asked}, got another range; starting over")
            self.total = int(found[3]) if found[3] != "*" else None
        elif status == 200:
            if self.received:
                logger.info("%s ignored the range asked for; starting over", self.url)
                self._restart()
            self.total = _content_length(response)
            self.validator = _validator(response)
        elif status == 416 and self.received:
            size = _UNSATISFIED_RANGE.fullmatch(response.headers.get("content-range", ""))
            if size is not None and int(size[1]) == self.received:
                self.total = self.received  # everything had arrived already
                return False
            self._restart()
            raise _Broken("the file changed on the server; starting over")
        else:
            raise TransferError(
                f"downloading {self.url} failed: HTTP {status}{_detail(response)}", status=status
            )
        if self.max_bytes is not None and self.total is not None and self.total > self.max_bytes:
            raise TransferError(
                f"{self.url} announces {self.total} bytes, more than the {self.max_bytes} "
                "expected; refusing it"
            )
        return True

    def _write(self, chunk: bytes) -> None:
        if self.max_bytes is not None and self.received + len(chunk) > self.max_bytes:
            raise TransferError(
                f"{self.url} sent more than the {self.max_bytes} bytes expected; refusing it"
            )
        self.out.write(chunk)
        self.received += len(chunk)
        if self.progress is not None:
            self.progress(self.received, self.total)

    def _restart(self) -> None:
        self.out.seek(0)
        self.out.truncate()
        self.received = 0
        self.total = None
        if self.progress is not None:
            self.progress(0, None)


def _file_sha256(out: BinaryIO) -> str:
    """The sha256 of the whole partial file, read back from disk: what takes the name."""
    out.flush()
    out.seek(0)
    digest = hashlib.sha256()
    while chunk := out.read(_READ_BYTES):
        digest.update(chunk)
    return digest.hexdigest()


def _content_length(response: httpx.Response) -> int | None:
    size = response.headers.get("content-length", "")
    return int(size) if size.isdigit() else None


def _validator(response: httpx.Response) -> str | None:
    """What identifies this version of the file for If-Range: a strong ETag, or the date."""
    etag = response.headers.get("etag")
    if etag and not etag.startswith("W/"):
        return str(etag)
    modified = response.headers.get("last-modified")
    return str(modified) if modified else None


def _detail(response: httpx.Response) -> str:
    """A refusal's reason, from the start of its body (FastAPI's ``detail``, or its text)."""
    body = b""
    try:
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) >= _DETAIL_BYTES:
                break
    except httpx.HTTPError:
        pass
    text = body[:_DETAIL_BYTES].decode("utf-8", "replace").strip()
    try:
        detail = json.loads(text).get("detail")
        text = str(detail) if detail else text
    except (ValueError, AttributeError):
        pass
    return f" ({text[:200]})" if text else ""


__all__ = [
    "FIRST_PAUSE_S",
    "MAX_PAUSE_S",
    "MAX_RESUMES",
    "Progress",
    "TransferError",
    "download",
]
