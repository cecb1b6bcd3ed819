"""crowdtrain.coordinator.client.Client against a real coordinator process."""

from __future__ import annotations

import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from crowdtrain.coordinator.client import Client, ClientError, Records
from crowdtrain.coordinator.store import Store
from crowdtrain.model import GPT, GPTConfig, params_sha256, save_checkpoint
from tests.coordinator.registration import join_peer
from tests.cutting_proxy import CuttingProxy
from tests.swarm import Swarm, write_spec

pytestmark = pytest.mark.slow

STEP = 3
MODEL = GPTConfig(vocab_size=256, seq_len=64, num_layers=2, num_heads=2, d_model=64)


@pytest.fixture(scope="module")
def coordinator(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """A coordinator with run ``tiny``: one registered peer, throughput samples and one
    checkpoint written the way the keeper writes them."""
    swarm = Swarm(root=tmp_path_factory.mktemp("client"))
    try:
        published = swarm.publish(write_spec(swarm.root / "tiny.toml"), prepared)
        assert published.returncode == 0, published.stderr
        store = Store(swarm.coord_dir)
        try:
            now = time.time()
            for i in range(3):
                store.insert_sample(
                    {
                        "run_id": "tiny",
                        "time": now - 30 + 10 * i,
                        "step": i,
                        "num_tokens": 1000 * i,
                        "tokens_per_s": 100.0 + i,
                        "num_peers": 1,
                    }
                )
            torch.manual_seed(0)
            state = GPT(MODEL).state_dict()
            folder = swarm.coord_dir / "checkpoints" / "tiny"
            folder.mkdir(parents=True)
            path = folder / f"step-{STEP:08d}.safetensors"
            run_spec_hash = store.get_run("tiny")["spec_hash"]
            sha256 = params_sha256(state)
            metadata = {"run_id": "tiny", "spec_hash": run_spec_hash, "step": str(STEP)}
            file_sha256 = save_checkpoint(path, state, {**metadata, "params_sha256": sha256})
            store.insert_checkpoint(
                {
                    "run_id": "tiny",
                    "step": STEP,
                    "sha256": sha256,
                    "file": path.name,
                    "file_sha256": file_sha256,
                    "num_bytes": path.stat().st_size,
                    "spec_hash": run_spec_hash,
                    "created_at": now,
                    "cpu_s": 0.1,
                }
            )
        finally:
            store.close()
        swarm.start_coordinator()
        # Joined once the coordinator is up: a peer is active for PEER_TIMEOUT_S (20 s)
        # after its last heartbeat, and starting the coordinator took 29 s in one CI run.
        store = Store(swarm.coord_dir)
        try:
            join_peer(store, "tiny", name="laptop")
        finally:
            store.close()
        yield swarm
    finally:
        swarm.stop_all()


@pytest.fixture
def client(coordinator: Swarm) -> Iterator[Client]:
    with Client(coordinator.url) as c:
        yield c


def test_runs_peers_and_metrics_as_records_and_frames(client: Client) -> None:
    runs = client.runs()
    assert isinstance(runs, Records) and [r["id"] for r in runs] == ["tiny"]
    assert client.run("tiny")["spec"]["model"]["d_model"] == 64
    peers = client.peers("tiny").to_pandas()
    assert list(peers["name"]) == ["laptop"] and list(peers["state"]) == ["active"]
    assert str(peers["last_seen"].dtype).startswith("datetime64"), peers.dtypes
    metrics = client.metrics("tiny")
    assert [m["tokens_per_s"] for m in metrics[:3]] == [100.0, 101.0, 102.0], metrics
    frame = metrics[-2:].to_pandas()
    assert {"time", "step", "num_tokens", "tokens_per_s", "num_peers"} <= set(frame.columns)
    assert len(frame) == 2 and str(frame["time"].dtype).startswith("datetime64")
    later = client.metrics("tiny", since=metrics[1]["time"])
    assert later and all(m["time"] > metrics[1]["time"] for m in later)
    assert client.evals("tiny") == [] and client.evals("tiny").to_pandas().empty
    assert [p["name"] for p in client.leaderboard("tiny")] in (["laptop"], [])
    assert [c["step"] for c in client.checkpoints("tiny")] == [STEP]


def test_records_without_pandas_say_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        Records([{"a": 1}]).to_pandas()


def test_unknown_run_and_unreachable_coordinator(client: Client) -> None:
    for read in (client.run, client.peers, client.metrics, client.evals, client.checkpoints):
        with pytest.raises(ClientError, match=r"no run 'nope' on the coordinator .*runs: 'tiny'"):
            read("nope")
    with pytest.raises(ClientError, match="must start with http"):
        Client("127.0.0.1:8470")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        ClientError, match=rf"cannot reach the coordinator at http://127.0.0.1:{port}"
    ):
        Client(f"http://127.0.0.1:{port}", timeout_s=2).runs()
    with pytest.raises(ClientError, match=rf"no checkpoint of step 7 .*steps kept: {STEP}"):
        client.download_checkpoint("tiny", step=7)


def test_checkpoint_downloads_checked_and_loads(client: Client, tmp_path: Path) -> None:
    path = client.download_checkpoint("tiny", dest=tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / f"tiny-step-{STEP:08d}.safetensors"
    mtime = path.stat().st_mtime_ns
    assert client.download_checkpoint("tiny", step=STEP, dest=tmp_path / "ckpt") == path
    assert path.stat().st_mtime_ns == mtime, "an intact file is not downloaded again"
    model = client.load_model("tiny")
    torch.manual_seed(0)
    assert params_sha256(model.state_dict()) == params_sha256(GPT(MODEL).state_dict())
    assert not model.training
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), 4)
    assert out.shape == (1, 5)


def test_a_tampered_checkpoint_is_refused_and_the_old_file_kept(
    coordinator: Swarm, client: Client, tmp_path: Path
) -> None:
    served = coordinator.coord_dir / "checkpoints" / "tiny" / f"step-{STEP:08d}.safetensors"
    original = served.read_bytes()
    dest = tmp_path / "ckpt"
    dest.mkdir()
    existing = dest / f"tiny-step-{STEP:08d}.safetensors"
    existing.write_bytes(b"what was there before")
    tampered = bytearray(original)
    tampered[-1] ^= 0xFF
    served.write_bytes(bytes(tampered))
    try:
        with pytest.raises(ClientError, match=r"has sha256 .*refused it"):
            client.download_checkpoint("tiny", dest=dest)
    finally:
        served.write_bytes(original)
    assert existing.read_bytes() == b"what was there before"
    assert sorted(p.name for p in dest.iterdir()) == [existing.name], "no partial file left"


def test_a_download_cut_mid_body_resumes_with_a_range_request(
    coordinator: Swarm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a proxy that breaks the first two answers mid-file, the real coordinator
    answers the resumed requests 206 from where each stopped, and the file is whole."""
    monkeypatch.setattr("crowdtrain.protocol.transfer.FIRST_PAUSE_S", 0.0)
    served = coordinator.coord_dir / "checkpoints" / "tiny" / f"step-{STEP:08d}.safetensors"
    size = served.stat().st_size
    assert size > 100_000, size
    proxy = CuttingProxy(("127.0.0.1", coordinator.ports["http_port"]), cuts=[60_000, 50_000])
    try:
        with Client(proxy.url) as through:
            path = through.download_checkpoint("tiny", dest=tmp_path, progress=False)
    finally:
        proxy.close()
    assert path.read_bytes() == served.read_bytes()
    files = [e for e in proxy.exchanges if e.request.split(" ", 2)[1].endswith("/file")]
    assert [e.cut for e in files] == [True, True, False]
    assert files[0].status.startswith("HTTP/1.1 200")
    assert all(e.status.startswith("HTTP/1.1 206") for e in files[1:]), files
    ranges = [re.search(r"(?im)^range: bytes=(\d+)-\r$", e.request) for e in files]
    assert ranges[0] is None and all(r is not None for r in ranges[1:])
    first, second = (int(r[1]) for r in ranges[1:] if r is not None)
    assert 0 < first < second < size
    assert all(re.search(r"(?im)^if-range: ", e.request) for e in files[1:])
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
