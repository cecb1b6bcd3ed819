"""A joining node starting from the keeper's checkpoint over HTTP (node/joining/bootstrap.py), against
a real coordinator whose checkpoint is written the way its keeper writes it; and where the
node's parameters come from under --start-from."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import pytest
import torch

from crowdtrain.coordinator.records import get_run
from crowdtrain.coordinator.store import Store
from crowdtrain.coordinator.swarm.checkpoints import checkpoint_name
from crowdtrain.coordinator.swarm.keeper import Keeper
from crowdtrain.model import GPT, GPTConfig, params_sha256
from crowdtrain.node.joining.bootstrap import (
    BootstrapError,
    KeptCheckpoint,
    download_checkpoint,
    fall_back,
    latest_checkpoint,
    load_kept_checkpoint,
    plan_start,
    start_from_checkpoint,
)
from tests.cutting_proxy import CuttingProxy
from tests.specs import small_spec
from tests.swarm import Swarm, write_spec

STEP = 5


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """A coordinator serving run "tiny" at step 5, with the keeper's checkpoint of step 5
    (written by Keeper.save) of parameters unlike a fresh model's. Yields (swarm, run, state).
    Shared by this module's tests (a coordinator takes seconds to start); a test that damages
    the checkpoint puts it back."""
    swarm = Swarm(root=tmp_path_factory.mktemp("bootstrap"))
    try:
        yield _serve(swarm)
    finally:
        swarm.stop_all()


def _serve(swarm: Swarm):
    data = swarm.prepare()
    result = swarm.publish(write_spec(swarm.root / "tiny.toml"), data)
    assert result.returncode == 0, result.stderr
    coordinator = swarm.start_coordinator()
    # The verifier's keeper cleans the checkpoint folder as it starts: let it finish first.
    swarm.wait_for(lambda: "verifier ready" in coordinator.output(), 90, "the verifier")
    store = Store(swarm.coord_dir, create=False)
    try:
        run = get_run(store, "tiny")
        torch.manual_seed(123)
        model = GPT(GPTConfig.from_spec(run.spec.model))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        store.raise_run_step("tiny", STEP)
        Keeper(store).save(run, STEP, model.state_dict(), params_sha256(state))
    finally:
        store.close()
    return swarm, run, state


def _fresh_model(run) -> GPT:
    torch.manual_seed(run.spec.run.seed)
    return GPT(GPTConfig.from_spec(run.spec.model))


def _same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return set(own) == set(state) and all(torch.equal(own[k], state[k]) for k in own)


def test_a_node_starts_from_the_keepers_checkpoint_of_the_runs_step(
    served, tmp_path, caplog, monkeypatch
):
    swarm, run, state = served
    monkeypatch.setattr("crowdtrain.node.link.http._LOG_EVERY_S", 0.0)  # log every chunk
    checkpoint = latest_checkpoint(swarm.url, "tiny")
    assert checkpoint is not None and checkpoint.step == STEP
    assert checkpoint.params_sha256 == params_sha256(state)
    run_step = swarm.get("/api/runs/tiny")["step"]
    assert run_step == STEP
    plan = plan_start("auto", run_step, checkpoint, mode=run.spec.optimizer.mode)
    assert plan.source == "checkpoint", plan

    model = _fresh_model(run)
    assert not _same(model, state)
    folder = tmp_path / "node"
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        step = start_from_checkpoint(
            model, None, run.spec, swarm.url, checkpoint, folder, None, "log"
        )
    print(f"started from the checkpoint in {time.monotonic() - started:.2f}s")
    lines = [r.getMessage() for r in caplog.records]
    total = f"of {checkpoint.num_bytes / 1e6:.1f} MB"
    assert any(f"downloading checkpoint {STEP}: " in m and total in m for m in lines), lines
    assert any(f"started from the keeper's checkpoint of step {STEP}" in m for m in lines)
    assert step == STEP
    assert _same(model, state)
    assert model.lm_head.weight is model.token_embedding.weight  # still tied
    assert list(folder.iterdir()) == []  # the downloaded file is not kept


def test_a_tampered_checkpoint_is_refused_and_the_model_left_unchanged(served, tmp_path):
    swarm, run, _ = served
    checkpoint = latest_checkpoint(swarm.url, "tiny")
    assert checkpoint is not None
    path = swarm.coord_dir / "checkpoints" / "tiny" / checkpoint_name(STEP)
    original = path.read_bytes()
    data = bytearray(original)
    data[-10] ^= 0xFF  # a value in the last tensor
    path.write_bytes(bytes(data))
    try:
        model = _fresh_model(run)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        folder = tmp_path / "node"
        with pytest.raises(BootstrapError, match="damaged or altered on the way; refusing it"):
            start_from_checkpoint(
                model, None, run.spec, swarm.url, checkpoint, folder, None, "none"
            )
        assert _same(model, before)
        assert list(folder.iterdir()) == []  # no partial file left
    finally:
        path.write_bytes(original)


def test_parameters_that_do_not_hash_to_the_record_are_refused(served, tmp_path):
    """A file that matches its row but whose parameters do not (a keeper's row and file from
    different states): refused before the model is touched. A removed checkpoint: a 404."""
    swarm, run, _ = served
    checkpoint = latest_checkpoint(swarm.url, "tiny")
    assert checkpoint is not None
    lying = KeptCheckpoint(checkpoint.step, "0" * 64, checkpoint.file_sha256, checkpoint.num_bytes)
    path = download_checkpoint(swarm.url, "tiny", lying, tmp_path, progress="none")
    model = _fresh_model(run)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BootstrapError, match="hash to .* not the 0000000000000000"):
        load_kept_checkpoint(model, path, lying, run.spec)
    assert _same(model, before)
    # A checkpoint the keeper no longer has: the message names the way out.
    gone = KeptCheckpoint(STEP + 1, "a" * 64, "b" * 64, 1000)
    with pytest.raises(BootstrapError, match="HTTP 404.*--start-from peers"):
        download_checkpoint(swarm.url, "tiny", gone, tmp_path / "gone", progress="none")
    assert list((tmp_path / "gone").iterdir()) == []


def test_a_checkpoint_download_cut_mid_file_resumes(served, tmp_path, monkeypatch):
    """Through a link that breaks mid-file, the node resumes with a range request and
    ends with the keeper's file, its sha256 checked."""
    swarm, _, _ = served
    monkeypatch.setattr("crowdtrain.protocol.transfer.FIRST_PAUSE_S", 0.0)
    checkpoint = latest_checkpoint(swarm.url, "tiny")
    assert checkpoint is not None and checkpoint.num_bytes > 100_000
    proxy = CuttingProxy(("127.0.0.1", swarm.ports["http_port"]), cuts=[80_000])
    try:
        path = download_checkpoint(proxy.url, "tiny", checkpoint, tmp_path, progress="log")
    finally:
        proxy.close()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == checkpoint.file_sha256
    files = [e for e in proxy.exchanges if "/file " in e.request.split("\r\n", 1)[0]]
    assert [e.status.split(" ", 2)[1] for e in files] == ["200", "206"], files
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def _kept(step: int) -> KeptCheckpoint:
    return KeptCheckpoint(step, "a" * 64, "b" * 64, 1000, num_tokens=step * 100)


def _kept_outer(step: int) -> KeptCheckpoint:
    return KeptCheckpoint(step, "a" * 64, "b" * 64, 1000, step * 100, outer_sha256="c" * 64)


@pytest.mark.parametrize(
    "start_from, run_step, checkpoint, mode, source",
    [
        ("auto", 5, _kept(5), "sync", "checkpoint"),  # the run's own step: nothing lost
        ("auto", 6, _kept(5), "sync", "peers"),  # the swarm moved on: peers hold step 6
        ("auto", 5, None, "sync", "peers"),  # no checkpoint yet
        ("auto", 5, _kept(5), "diloco", "peers"),  # no outer momentum kept: peers hold it
        ("auto", 5, _kept_outer(5), "diloco", "checkpoint"),  # the round, with its momentum
        ("auto", 6, _kept_outer(5), "diloco", "checkpoint"),  # the next: from the follower
        ("auto", 7, _kept_outer(5), "diloco", "peers"),  # the swarm moved on two rounds
        ("auto", 0, None, "sync", "fresh"),  # nothing trained yet
        ("peers", 5, _kept(5), "sync", "peers"),
        ("checkpoint", 9, _kept(5), "sync", "checkpoint"),
        ("checkpoint", 5, _kept(5), "diloco", "checkpoint"),
    ],
)
def test_where_the_parameters_come_from(start_from, run_step, checkpoint, mode, source):
    assert plan_start(start_from, run_step, checkpoint, mode).source == source


def test_auto_falls_back_to_the_checkpoint_when_no_peer_served_state():
    behind = plan_start("auto", 6, _kept(5))
    assert fall_back(behind, loaded_step=0)  # peers served nothing: step 5 beats 0
    assert not fall_back(behind, loaded_step=6)  # peers served the run's step
    diloco = plan_start("auto", 5, _kept(5), mode="diloco")
    assert fall_back(diloco, loaded_step=0)
    assert not fall_back(plan_start("peers", 6, _kept(5)), loaded_step=0)  # asked for peers
    assert not fall_back(plan_start("auto", 6, None), loaded_step=0)


def test_bad_start_from_choices_name_the_fix():
    with pytest.raises(BootstrapError, match="keeps no checkpoint .* use --start-from auto"):
        plan_start("checkpoint", 5, None)
    with pytest.raises(BootstrapError, match="must be one of auto, peers, checkpoint"):
        plan_start("disk", 5, None)


def test_malformed_checkpoint_rows_are_skipped():
    good = {"step": 3, "sha256": "a" * 64, "file_sha256": "b" * 64, "num_bytes": 10}
    assert KeptCheckpoint.from_row({**good, "available": True}) == KeptCheckpoint(
        3, "a" * 64, "b" * 64, 10
    )
    assert KeptCheckpoint.from_row({**good, "available": False}) is None
    assert KeptCheckpoint.from_row({**good, "available": True, "sha256": "xyz"}) is None
    assert KeptCheckpoint.from_row({**good, "available": True, "step": "many"}) is None
    assert KeptCheckpoint.from_row(["not", "a", "row"]) is None


def test_an_unreachable_coordinator_has_no_checkpoint(tmp_path: Path):
    assert latest_checkpoint("http://127.0.0.1:9", "tiny") is None


# The optimizer follows the checkpoint's step (real hivemind optimizers, alone in their swarm).


def _optimizer_spec(mode: str, delay: bool) -> str:
    return small_spec(
        run={"id": "bootopt", "seed": None},
        model={"seq_len": 16, "num_layers": 1},
        optimizer={
            "mode": mode,
            "target_batch_size": 8,
            "micro_batch_size": 4,
            "inner_batch_size": 4,
            "inner_steps": 2,
            "lr": 1e-3,
            "warmup_steps": 4,
            "delay_optimizer_step": delay,
        },
        swarm={"matchmaking_time_s": 1.5, "averaging_timeout_s": 5.0, "request_timeout_s": 1.0},
    )


@pytest.mark.parametrize(
    "mode, delay",
    [("sync", False), ("sync", True), ("diloco", False)],
    ids=["sync", "sync-offloaded", "diloco"],
)
def test_the_optimizer_takes_the_checkpoints_step_and_trains_on(tmp_path, mode, delay):
    import signal

    import hivemind

    from crowdtrain.node.swarm.guard import SwarmGuard
    from crowdtrain.node.swarm.optimizer import SwarmOptimizer, build_optimizer
    from crowdtrain.protocol.runspec import parse_spec

    spec = parse_spec(_optimizer_spec(mode, delay))
    torch.manual_seed(7)
    saved = GPT(GPTConfig.from_spec(spec.model))
    state = {k: v.detach().clone() for k, v in saved.state_dict().items()}
    handler = signal.getsignal(signal.SIGINT)
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    opt = None
    try:
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_spec(spec.model))
        guard = SwarmGuard(tmp_path / "guard", target_batch_size=8)
        opt = build_optimizer(spec, model, dht, guard, micro_batch_size=4)
        assert isinstance(opt, SwarmOptimizer)  # both modes: the interface the node drives
        with torch.no_grad():  # what load_kept_checkpoint does
            for name, tensor in model.state_dict().items():
                tensor.copy_(state[name])
        opt.set_step(STEP)
        assert opt.local_epoch == STEP
        assert opt.tracker.local_progress.epoch == STEP
        kept, metadata = opt.checkpoint_state()  # what the node's checkpoint holds
        assert params_sha256(kept) == params_sha256(state)
        assert metadata == ({"global_round": str(STEP)} if mode == "diloco" else {})
        if mode == "diloco":
            assert opt.global_round == STEP
            assert opt.global_params_sha256() == params_sha256(state)
        else:
            assert opt.state_averager.scheduler._step_count > STEP  # warmup fast-forwarded
            if delay:  # the offloaded copy the optimizer steps holds the loaded parameters
                offloaded = [p for g in opt.opt.param_groups for p in g["params"]]
                for main, copy in zip(opt.state_averager.main_parameters, offloaded, strict=True):
                    assert torch.equal(main.detach(), copy)
        generator = torch.Generator().manual_seed(0)
        deadline = time.monotonic() + 60
        drift = 0.0
        while time.monotonic() < deadline:
            batch = torch.randint(0, 256, (4, 17), generator=generator)
            _, loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            opt.step(batch_size=4)
            opt.zero_grad()
            drift = max(
                float((p.detach() - state[n]).abs().max()) for n, p in model.named_parameters()
            )
            if opt.local_epoch > STEP and drift > 0:  # a delayed step lands a step later
                break
            time.sleep(0.05)
        # Trained on from the checkpoint's step and parameters (a small lr stays near them).
        assert opt.local_epoch in (STEP + 1, STEP + 2), opt.local_epoch
        assert 0 < drift < 0.1, drift
    finally:
        if opt is not None:
            opt.shutdown()
        dht.shutdown()
        signal.signal(signal.SIGINT, handler)
