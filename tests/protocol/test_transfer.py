"""protocol/transfer.py against a tiny HTTP server on 127.0.0.1 that can cut a body short,
ignore ranges, change its file or tamper with it."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from crowdtrain.protocol import transfer
from crowdtrain.protocol.transfer import TransferError, download

BODY = os.urandom(3 * 1024 * 1024 + 123)
SHA256 = hashlib.sha256(BODY).hexdigest()


@dataclass
class Served:
    """What the server sends. ``cuts``: for each request in turn, the bytes of its body
    sent before the connection is closed (None: all of it)."""

    body: bytes = BODY
    cuts: list[int | None] = field(default_factory=list)
    honour_range: bool = True
    status: int = 200
    etag: str = '"v1"'
    after_first: bytes | None = None  # the file as it is from the second request on
    wrong_range: bool = False  # answer a range request with bytes from 0, marked as such
    requests: list[dict[str, str]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    served: Served

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        served = self.served
        served.requests.append(dict(self.headers))
        if len(served.requests) == 2 and served.after_first is not None:
            served.body, served.etag = served.after_first, '"v2"'
        body = served.body
        if served.status != 200:
            self._send(served.status, b'{"detail": "no such file here"}', {})
            return
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if_range = self.headers.get("If-Range")
        if wanted and served.honour_range and if_range in (None, served.etag):
            start = 0 if served.wrong_range else int(wanted[1])
            if start >= len(body):
                self._send(416, b"", {"Content-Range": f"bytes */{len(body)}"})
                return
            span = f"bytes {start}-{len(body) - 1}/{len(body)}"
            self._send(206, body[start:], {"Content-Range": span})
            return
        self._send(200, body, {})

    def _send(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {"ETag": self.served.etag, **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        cut = self.served.cuts.pop(0) if self.served.cuts else None
        self.wfile.write(payload if cut is None else payload[:cut])
        self.wfile.flush()
        if cut is not None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def served() -> Iterator[tuple[Served, str]]:
    state = Served()
    handler = type("Handler", (_Handler,), {"served": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/file"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _no_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfer, "FIRST_PAUSE_S", 0.0)


def _fetch(url: str, dest: Path, **options: object) -> list[tuple[int, int | None]]:
    seen: list[tuple[int, int | None]] = []
    with httpx.Client(timeout=10.0) as http:
        download(http, url, dest, progress=lambda n, total: seen.append((n, total)), **options)
    return seen


def test_a_download_cut_mid_body_resumes_where_it_stopped(served, tmp_path: Path) -> None:
    state, url = served
    state.cuts = [1_000_000, 700_000]
    dest = tmp_path / "file.bin"
    seen = _fetch(url, dest, sha256=SHA256)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == SHA256
    assert [r.get("Range") for r in state.requests] == [None, "bytes=1000000-", "bytes=1700000-"]
    assert [r.get("If-Range") for r in state.requests[1:]] == ['"v1"', '"v1"']
    assert all(r.get("Accept-Encoding") == "identity" for r in state.requests)
    counts = [n for n, _ in seen]
    assert counts == sorted(counts) and counts[-1] == len(BODY), "progress never went back"
    assert seen[-1][1] == len(BODY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_a_server_that_ignores_ranges_starts_over(served, tmp_path: Path) -> None:
    state, url = served
    state.cuts = [1_500_000]
    state.honour_range = False
    dest = tmp_path / "file.bin"
    seen = _fetch(url, dest, sha256=SHA256)
    assert dest.read_bytes() == BODY
    assert [r.get("Range") for r in state.requests] == [None, "bytes=1500000-"]
    assert (0, None) in seen, "the progress went back to 0 when the download started over"
    assert seen[-1] == (len(BODY), len(BODY))


def test_a_file_that_changed_between_attempts_comes_back_whole(served, tmp_path: Path) -> None:
    """If-Range: the server sends the new file whole rather than its tail after the old."""
    state, url = served
    new = os.urandom(2 * 1024 * 1024)
    state.cuts, state.after_first = [900_000], new
    dest = tmp_path / "file.bin"
    _fetch(url, dest, sha256=hashlib.sha256(new).hexdigest())
    assert dest.read_bytes() == new
    assert state.requests[1].get("If-Range") == '"v1"'


def test_a_file_that_shrank_is_answered_416_and_fetched_again(served, tmp_path: Path) -> None:
    state, url = served
    small = os.urandom(500_000)
    state.cuts, state.after_first, state.etag = [1_000_000], small, "W/weak"
    dest = tmp_path / "file.bin"
    _fetch(url, dest, sha256=hashlib.sha256(small).hexdigest())
    assert dest.read_bytes() == small
    # A weak ETag cannot guard a range: no If-Range, so the range meets the shorter file.
    assert [r.get("Range") for r in state.requests] == [None, "bytes=1000000-", None]
    assert "If-Range" not in state.requests[1]


def test_a_range_answered_from_elsewhere_starts_over(served, tmp_path: Path) -> None:
    state, url = served
    state.cuts, state.wrong_range = [1_200_000], True
    dest = tmp_path / "file.bin"
    _fetch(url, dest, sha256=SHA256)
    assert dest.read_bytes() == BODY
    assert [r.get("Range") for r in state.requests] == [None, "bytes=1200000-", None]


def test_a_tampered_body_is_refused_and_leaves_nothing(served, tmp_path: Path) -> None:
    state, url = served
    tampered = bytearray(BODY)
    tampered[-1] ^= 0xFF
    state.body, state.cuts = bytes(tampered), [2_000_000]
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"what was there before")
    with pytest.raises(TransferError, match="damaged or altered on the way; refusing it") as e:
        _fetch(url, dest, sha256=SHA256)
    assert e.value.received_sha256 == hashlib.sha256(tampered).hexdigest()
    assert dest.read_bytes() == b"what was there before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"], "no partial file left"


def test_a_connection_that_keeps_breaking_is_given_up(served, tmp_path: Path) -> None:
    state, url = served
    state.cuts = [100_000] * 10
    with pytest.raises(TransferError, match="the connection broke 3 times, the last at byte"):
        _fetch(url, tmp_path / "file.bin", sha256=SHA256, max_resumes=2)
    assert len(state.requests) == 3
    assert list(tmp_path.iterdir()) == []


def test_more_than_the_size_cap_is_refused(served, tmp_path: Path) -> None:
    state, url = served
    with pytest.raises(TransferError, match=f"announces {len(BODY)} bytes, more than the 1000"):
        _fetch(url, tmp_path / "file.bin", max_bytes=1000)
    assert list(tmp_path.iterdir()) == []


def test_a_refusal_is_not_retried_and_names_the_status(served, tmp_path: Path) -> None:
    state, url = served
    state.status = 404
    with pytest.raises(TransferError, match=r"HTTP 404 \(no such file here\)") as e:
        _fetch(url, tmp_path / "file.bin")
    assert e.value.status == 404 and len(state.requests) == 1
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_server_is_not_retried(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransferError, match=f"downloading http://127.0.0.1:{port}/file failed"):
        _fetch(f"http://127.0.0.1:{port}/file", tmp_path / "file.bin")
    assert list(tmp_path.iterdir()) == []
