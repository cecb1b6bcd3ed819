"""The keeper's checkpoint files: atomic saves that survive a full disk and a crash,
their metadata and sidecars, pruning to ``[verify] keep_checkpoints``, and the clean-up of
what a crashed keeper left. Saves run through ``Keeper.save``, the path ``follow`` takes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from crowdtrain.coordinator.records import get_run
from crowdtrain.coordinator.runs.publish import prepare_publication, publish
from crowdtrain.coordinator.swarm.checkpoints import checkpoint_name, sidecar_path
from crowdtrain.coordinator.swarm.keeper import Keeper
from crowdtrain.model import load_checkpoint, params_sha256
from tests.coordinator.registration import COORDINATOR_KEY
from tests.specs import small_spec
from tests.swarm import db_rows

SPEC = small_spec(run={"id": "keep-run", "seed": None}, verify={"keep_checkpoints": 3})

# Runs Keeper.save in a child process: argv is data_dir, run_id, step, num_floats, and
# a file size limit in bytes (0: none). Exit code 3 means the save raised CheckpointError.
SAVE_SCRIPT = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    import torch
    from crowdtrain.coordinator.swarm.keeper import Keeper
    from crowdtrain.coordinator.records import get_run
    from crowdtrain.coordinator.store import Store
    from crowdtrain.model import params_sha256
    from crowdtrain.model.checkpoint import CheckpointError

    data_dir, run_id, step, size, limit = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
    store = Store(Path(data_dir), create=False)
    keeper = Keeper(store)
    run = get_run(store, run_id)
    state = {"weight": torch.full((size,), float(step))}
    digest = params_sha256(state)
    if limit:
        # A full disk, for real: writes past the limit fail with EFBIG (not a signal).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    print("saving", flush=True)
    try:
        keeper.save(run, step, state, digest)
    except CheckpointError as e:
        print(f"refused: {e}", flush=True)
        sys.exit(3)
    print("saved", flush=True)
    """
)


@pytest.fixture
def run(store, prepared, tmp_path):
    spec = tmp_path / "keep.toml"
    spec.write_text(SPEC)
    result = publish(store, prepare_publication(spec, prepared), COORDINATOR_KEY)
    return get_run(store, result.run_id)


def _add_tokens(store, run_id: str, num_tokens: int) -> None:
    store.record_heartbeat(
        {
            "run_id": run_id,
            "peer_id": "peer-a",
            "session_key": "s1",
            "num_tokens": num_tokens,
            "num_sequences": num_tokens // 32,
            "now": time.time(),
            "tokens_per_s": 1.0,
            "loss": 1.0,
            "step": 0,
            "device": "cpu",
            "num_skipped_steps": 0,
        },
        [],
    )


def _state(step: int, size: int = 64) -> dict[str, torch.Tensor]:
    return {"weight": torch.full((size,), float(step)), "bias": torch.arange(3.0) + step}


def _save(keeper: Keeper, run, step: int) -> dict:
    state = _state(step)
    return keeper.save(run, step, state, params_sha256(state))


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _save_in_child(store, run, step: int, size: int, limit: int = 0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SAVE_SCRIPT, str(store.data_dir), run.id, str(step)]
        + [str(size), str(limit)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_a_checkpoint_carries_its_metadata_sidecar_and_row(store, run):
    _add_tokens(store, run.id, 12_345)
    keeper = Keeper(store)
    state = _state(7)
    row = keeper.save(run, 7, state, params_sha256(state))

    path = keeper.folder / run.id / checkpoint_name(7)
    loaded, metadata = load_checkpoint(path)
    assert metadata == {
        "run_id": run.id,
        "spec_hash": run.spec.hash,
        "step": "7",
        "params_sha256": params_sha256(state),
        "num_tokens": "12345",
    }
    assert params_sha256(loaded) == row["sha256"] == params_sha256(state)
    file_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    assert row["file_sha256"] == file_sha256 and row["num_tokens"] == 12_345
    assert store.get_checkpoint(run.id, 7)["num_tokens"] == 12_345
    # sha256sum's own format, so `sha256sum -c` checks a copied-out file.
    assert sidecar_path(path).read_text() == f"{file_sha256}  {path.name}\n"
    checked = subprocess.run(
        ["sha256sum", "-c", sidecar_path(path).name],
        cwd=path.parent,
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0 and "OK" in checked.stdout

    from crowdtrain.coordinator.swarm.checkpoints import checkpoints_view

    assert checkpoints_view(store, run.id)[0]["num_tokens"] == 12_345


def test_pruning_keeps_exactly_the_newest_k_files_and_every_hash(store, run):
    keeper = Keeper(store)  # the spec keeps 3
    rows = [_save(keeper, run, step) for step in range(1, 7)]
    folder = keeper.folder / run.id
    names = sorted(p.name for p in folder.iterdir())
    kept = [checkpoint_name(s) for s in (4, 5, 6)]
    assert names == sorted(kept + [n + ".sha256" for n in kept])
    listed = store.list_checkpoints(run.id)
    assert [c["step"] for c in listed] == [1, 2, 3, 4, 5, 6]
    assert [c["sha256"] for c in listed] == [r["sha256"] for r in rows]
    assert [c["file"] for c in listed] == [None, None, None, *kept]
    # An explicit keep overrides the spec's.
    _save(Keeper(store, keep=1), run, 7)
    assert sorted(p.name for p in folder.iterdir()) == [
        checkpoint_name(7),
        checkpoint_name(7) + ".sha256",
    ]


def test_a_full_disk_leaves_the_previous_checkpoint_and_the_store_as_they_were(store, run):
    keeper = Keeper(store)
    _save(keeper, run, 1)
    folder = keeper.folder / run.id
    before_files, before_rows = _folder_bytes(folder), db_rows(store.data_dir)

    # 4 MB of parameters against a 1 MB file size limit.
    child = _save_in_child(store, run, step=2, size=1 << 20, limit=1 << 20)
    output, _ = child.communicate(timeout=120)
    assert child.returncode == 3, output
    assert "cannot write checkpoint" in output and "File too large" in output, output

    assert _folder_bytes(folder) == before_files  # no temp file, no new file
    assert db_rows(store.data_dir) == before_rows
    assert store.get_checkpoint(run.id, 2) is None


def test_a_crash_mid_write_leaves_the_previous_checkpoint_and_a_restart_cleans_up(store, run):
    keeper = Keeper(store)
    first = _save(keeper, run, 1)
    folder = keeper.folder / run.id
    before_files, before_rows = _folder_bytes(folder), db_rows(store.data_dir)

    child = _save_in_child(store, run, step=2, size=100 << 20)  # a 400 MB write
    try:
        deadline = time.monotonic() + 120
        temp: list[Path] = []
        while not temp:
            assert child.poll() is None, child.communicate()[0]
            assert time.monotonic() < deadline, "the child never started writing"
            temp = [p for p in folder.glob(".step-*.tmp") if p.stat().st_size > 0]
            time.sleep(0.01)
        os.killpg(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert not (folder / checkpoint_name(2)).exists()
    left = _folder_bytes(folder)
    assert {n: b for n, b in left.items() if not n.endswith(".tmp")} == before_files
    assert any(n.startswith(".step-00000002") for n in left)  # what the crash left
    assert db_rows(store.data_dir) == before_rows

    Keeper(store)  # the next keeper's start removes the temp file
    assert _folder_bytes(folder) == before_files
    state, metadata = load_checkpoint(folder / checkpoint_name(1))
    assert params_sha256(state) == first["sha256"] and metadata["step"] == "1"


def test_a_file_no_row_names_is_removed_at_start(store, run):
    """A crash after the rename but before the row: the file is not a kept checkpoint."""
    keeper = Keeper(store)
    _save(keeper, run, 1)
    folder = keeper.folder / run.id
    orphan = folder / checkpoint_name(9)
    orphan.write_bytes(b"not recorded")
    sidecar_path(orphan).write_text("x  y\n")
    Keeper(store)
    assert sorted(p.name for p in folder.iterdir()) == [
        checkpoint_name(1),
        checkpoint_name(1) + ".sha256",
    ]


def test_a_diloco_rounds_outer_momentum_is_kept_served_listed_and_pruned_with_it(store, run):
    from fastapi.testclient import TestClient

    from crowdtrain.coordinator.api.http_app import Endpoints, create_app
    from crowdtrain.coordinator.api.refusals import Refusals
    from crowdtrain.coordinator.runs.leases import LeaseBook
    from crowdtrain.coordinator.swarm.checkpoints import checkpoints_view, outer_path

    keeper = Keeper(store)  # the spec keeps 3
    for step in range(1, 5):
        state = _state(step)
        momentum = {name: torch.full_like(t, -step) for name, t in state.items()}
        keeper.save(run, step, state, params_sha256(state), outer=momentum)
    folder = keeper.folder / run.id
    outer = outer_path(folder / checkpoint_name(4))
    loaded, _ = load_checkpoint(outer)
    assert torch.equal(loaded["weight"], torch.full((64,), -4.0))
    outer_sha256 = hashlib.sha256(outer.read_bytes()).hexdigest()
    assert sidecar_path(outer).read_text() == f"{outer_sha256}  {outer.name}\n"
    listed = {c["step"]: c for c in checkpoints_view(store, run.id)}
    assert listed[4]["outer_sha256"] == outer_sha256
    # Pruned with its parameters: steps 2..4 are kept, step 1 went with its momentum.
    assert (
        listed[1]["outer_sha256"] is None and not outer_path(folder / checkpoint_name(1)).exists()
    )
    assert sorted(p.name for p in folder.glob("*.outer.safetensors")) == [
        outer_path(folder / checkpoint_name(s)).name for s in (2, 3, 4)
    ]
    # A restart keeps them (their parameters' rows name them) and removes an orphan.
    orphan = outer_path(folder / checkpoint_name(9))
    orphan.write_bytes(b"left by a crash")
    assert keeper.remove_stale_files() == [orphan]

    endpoints = Endpoints("http://127.0.0.1:1", "127.0.0.1:2", initial_peers=list)
    app = create_app(store, endpoints, LeaseBook(store), Refusals(), "k" * 43, COORDINATOR_KEY)
    client = TestClient(app)
    served = client.get(f"/api/runs/{run.id}/checkpoints/4/outer")
    assert served.status_code == 200 and served.content == outer.read_bytes()
    assert client.get(f"/api/runs/{run.id}/checkpoints/4").json()["outer_sha256"] == outer_sha256
    assert client.get(f"/api/runs/{run.id}/checkpoints/1/outer").status_code == 404
