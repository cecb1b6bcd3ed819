"""The node's view of a run's public routes, against a real HTTP server on 127.0.0.1.

The state check fetches the keeper's checkpoint of a step to compare served state
with: the file must hash to the sha256 the coordinator lists for it and be no
larger than its listed size, or it is not used (a coordinator, or something in
between, serving a wrong or endless file cannot make a node load it or fill its
disk).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import torch

from crowdtrain.model import params_sha256, save_checkpoint
from crowdtrain.node.link.http import RunView, download_file


class Served:
    """What the server answers: the checkpoint's listing and the file's bytes."""

    def __init__(self, listing: dict, body: bytes):
        self.listing, self.body = listing, body


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Served]]:
    state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    path = tmp_path / "kept.safetensors"
    save_checkpoint(path, state, {"step": "5"})
    body = path.read_bytes()
    served = Served(
        {
            "step": 5,
            "sha256": params_sha256(state),
            "file_sha256": hashlib.sha256(body).hexdigest(),
            "num_bytes": len(body),
            "available": True,
        },
        body,
    )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/api/runs/r/checkpoints/5":
                data, kind = json.dumps(served.listing).encode(), "application/json"
            elif self.path == "/api/runs/r/checkpoints/5/file":
                data, kind = served.body, "application/octet-stream"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    finally:
        httpd.shutdown()
        httpd.server_close()


def view(url: str, folder: Path, http: httpx.Client) -> RunView:
    def download(
        url: str, dest: Path, max_bytes: int | None = None, sha256: str | None = None
    ) -> None:
        download_file(http, url, dest, dest.name, "off", sha256=sha256, max_bytes=max_bytes)

    return RunView(url, "r", folder, download)


def test_the_checkpoint_to_compare_with_is_checked_before_it_is_loaded(
    server: tuple[str, Served], tmp_path: Path
) -> None:
    url, served = server
    with httpx.Client() as http:
        runs = view(url, tmp_path / "guard", http)
        (tmp_path / "guard").mkdir()
        good = runs.checkpoint_state(5)
        assert good is not None and torch.equal(good["w"], torch.arange(12.0).reshape(3, 4))

        original = served.body
        served.body = original.replace(b"\x00\x00\x80?", b"\x00\x00\x80\xbf", 1)  # 1.0 -> -1.0
        assert served.body != original
        assert runs.checkpoint_state(5) is None  # not the file the coordinator listed

        served.body = original + b"\x00" * 4096
        served.listing["file_sha256"] = hashlib.sha256(served.body).hexdigest()
        assert runs.checkpoint_state(5) is None  # more than its listed size

        served.body, served.listing["available"] = original, False
        assert runs.checkpoint_state(5) is None  # listed, but its file is gone
        assert runs.checkpoint_state(6) is None  # not kept at all
    assert not list((tmp_path / "guard").iterdir()), "nothing is left behind"
