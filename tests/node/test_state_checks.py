"""Downloaded state is checked before it is loaded: its step against the coordinator's,
its parameters against the keeper's checkpoint (hash, distance, held-out loss), and a
refused download moves on to the next peer. The download tests run hivemind's real
averagers (each with its DHT and forked averager process), one peer hostile.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import AsyncIterator  # noqa: UP035 (hivemind tells a stream by typing's name)

import hivemind
import numpy as np
import pytest
import torch
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2

from crowdtrain.model import (
    GPT,
    GPTConfig,
    load_checkpoint,
    params_sha256,
    save_checkpoint,
    sequence_losses,
)
from crowdtrain.node.swarm.averagers import GuardedStateAverager
from crowdtrain.node.swarm.diloco_state import GlobalState, StateExchange, served_state
from crowdtrain.node.swarm.following import seeded_model
from crowdtrain.node.swarm.guard import (
    LOSS_MARGIN,
    STEP_TOLERANCE,
    SwarmGuard,
    state_distance,
    state_problem,
)
from crowdtrain.node.swarm.heldout import HeldoutLoss
from crowdtrain.protocol.runspec import parse_spec
from crowdtrain.protocol.shards import write_shard
from tests.specs import small_spec


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=256, seq_len=16, num_layers=1, num_heads=2, d_model=16))


def test_params_sha256_matches_a_checkpoint_and_changes_with_any_value(tmp_path: Path) -> None:
    model = _model()
    state = model.state_dict()
    digest = params_sha256(state)
    path = tmp_path / "step-3.safetensors"
    save_checkpoint(path, state, {"step": "3"})
    assert params_sha256(load_checkpoint(path)[0]) == digest
    assert params_sha256(dict(reversed(list(state.items())))) == digest

    changed = {k: v.clone() for k, v in state.items()}
    name = next(iter(changed))
    changed[name].view(-1)[0] += 1e-6
    assert params_sha256(changed) != digest
    renamed = dict(state)
    renamed["extra." + name] = renamed.pop(name)
    assert params_sha256(renamed) != digest
    assert params_sha256({k: v.double() for k, v in state.items()}) != digest


def test_downloaded_parameters_hash_like_the_checkpoint(tmp_path: Path) -> None:
    """State arrives as a flat list in the optimizer's order; tied weights count under each name."""
    model = _model()
    guard = SwarmGuard(tmp_path, target_batch_size=32)
    guard.named_parameters = list(model.named_parameters(remove_duplicate=False))
    main = list(reversed(list(model.parameters())))  # any order the optimizer uses
    downloaded = [p.detach().clone() for p in main]
    assert params_sha256(guard.named_state(main, downloaded)) == params_sha256(model.state_dict())


class Coordinator:
    """What the coordinator says, step by step, and the checkpoints it keeps."""

    def __init__(self, *steps: int | None, checkpoints: dict[int, dict] | None = None):
        self.steps = list(steps)
        self.states = checkpoints or {}
        self.checkpoints = {step: params_sha256(state) for step, state in self.states.items()}

    def step(self) -> int | None:
        return self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]


def _state_guard(tmp_path: Path, model: GPT, coordinator: Coordinator) -> SwarmGuard:
    guard = SwarmGuard(tmp_path, target_batch_size=32)
    guard.named_parameters = list(model.named_parameters(remove_duplicate=False))
    guard.coordinator_step = coordinator.step
    guard.checkpoint_sha256 = coordinator.checkpoints.get
    guard.checkpoint_state = coordinator.states.get
    guard.coordinator_lag_s = 0.0
    return guard


def _download(model: GPT, epoch: int) -> tuple[dict, list[torch.Tensor]]:
    """What a peer serves: metadata and parameters, then optimizer statistics."""
    params = [p.detach().clone() for p in model.parameters()]
    return {"epoch": epoch}, params + [torch.zeros(3)]


def test_state_at_the_coordinators_step_is_accepted(tmp_path: Path) -> None:
    model = _model()
    main = list(model.parameters())
    guard = _state_guard(tmp_path, model, Coordinator(40, checkpoints={41: model.state_dict()}))
    assert state_problem(guard, main, *_download(model, 41)) is None
    assert state_problem(guard, main, *_download(model, 40 + STEP_TOLERANCE)) is None
    # without a coordinator step or a checkpoint there is nothing to compare with
    guard.coordinator_step = lambda: None
    assert state_problem(guard, main, *_download(model, 10_000)) is None


def test_state_of_the_leading_peers_is_accepted_while_the_run_step_lags(tmp_path: Path) -> None:
    # Two peers: one at step 2 (catching up: it holds the run's lower-median step down),
    # one at 16. The laggard must accept the leader's state, or both stay apart for good.
    model = _model()
    main = list(model.parameters())
    guard = _state_guard(tmp_path, model, Coordinator(2))
    guard.coordinator_leading_step = lambda: 16
    assert state_problem(guard, main, *_download(model, 16)) is None
    assert "ahead" in state_problem(guard, main, *_download(model, 16 + STEP_TOLERANCE + 1))
    assert "behind" not in (state_problem(guard, main, *_download(model, 2)) or "")


def test_state_the_coordinator_disagrees_with_is_refused(tmp_path: Path) -> None:
    model = _model()
    main = list(model.parameters())
    guard = _state_guard(tmp_path, model, Coordinator(40, checkpoints={40: model.state_dict()}))
    assert "ahead" in state_problem(guard, main, *_download(model, 1_000_000))
    assert "behind" in state_problem(guard, main, *_download(model, 40 - STEP_TOLERANCE - 1))
    assert "no step" in state_problem(guard, main, {}, _download(model, 40)[1])

    metadata, tensors = _download(model, 40)
    tensors[0] = -tensors[0]
    assert "away from the coordinator's checkpoint of step 40" in state_problem(
        guard, main, metadata, tensors
    )
    tensors[0] = torch.full_like(tensors[0], math.nan)
    assert "not finite" in state_problem(guard, main, metadata, tensors)
    tensors[0] = tensors[0][:1]
    assert "do not fit" in state_problem(guard, main, metadata, tensors)
    assert "fewer" in state_problem(guard, main, metadata, tensors[:2])


def test_honest_drift_from_the_keepers_checkpoint_is_accepted(tmp_path: Path) -> None:
    """Honest peers are never bit-identical: a different hash alone refuses nothing."""
    model = _model()
    main = list(model.parameters())
    guard = _state_guard(tmp_path, model, Coordinator(40, checkpoints={40: model.state_dict()}))
    metadata, tensors = _download(model, 40)
    tensors = [t * 1.01 for t in tensors]  # 1% apart, as two honest peers at one step were
    assert state_distance(guard.named_state(main, tensors), model.state_dict()) == pytest.approx(
        0.01, rel=1e-3
    )
    assert state_problem(guard, main, metadata, tensors) is None
    tensors = [t * 1.5 for t in tensors]
    assert "away from" in state_problem(guard, main, metadata, tensors)
    guard.checkpoint_state = lambda step: None  # the file is gone: only the hash is known
    assert state_problem(guard, main, metadata, tensors) is None
    assert state_distance({"a": torch.ones(2)}, {"b": torch.ones(2)}) == math.inf


def test_state_ahead_of_a_lagging_coordinator_is_asked_about_again(tmp_path: Path) -> None:
    model = _model()
    main = list(model.parameters())
    # The coordinator read the DHT a few seconds ago (step 40); the swarm is at 75.
    guard = _state_guard(tmp_path, model, Coordinator(40, 80))
    assert state_problem(guard, main, *_download(model, 75)) is None
    guard = _state_guard(tmp_path, model, Coordinator(40, 41))
    assert "ahead" in state_problem(guard, main, *_download(model, 75))


# The all-reduce between real peers.


def test_a_joining_peer_refuses_state_the_coordinator_disagrees_with(tmp_path: Path) -> None:
    """hivemind's own download, through our state averager: refused, then accepted."""
    handler = signal.getsignal(signal.SIGINT)
    dhts: list = []
    averagers: list = []
    try:
        dhts.append(hivemind.DHT(start=True))
        dhts.append(hivemind.DHT(initial_peers=dhts[0].get_visible_maddrs(), start=True))
        models = [_model(), _model()]
        with torch.no_grad():
            for p in models[1].parameters():
                p.add_(1.0)  # the joiner starts elsewhere
        guards = []
        for index, (dht, model) in enumerate(zip(dhts, models, strict=True)):
            guard = _state_guard(tmp_path / str(index), model, Coordinator(40))
            guards.append(guard)
            averagers.append(
                GuardedStateAverager(
                    swarm_guard=guard,
                    dht=dht,
                    prefix="guardtest_state_averager",
                    optimizer=torch.optim.AdamW,
                    params=model.parameters(),
                    request_timeout=1.0,
                    start=True,
                )
            )
        server, joiner = averagers
        server.local_epoch = 42
        server.state_sharing_priority = 42
        # (fresh-clone CI: loading before the announcement reached the joiner found no
        # peer to load from, and nothing was refused)
        _wait_announced(dhts[1], f"{server.prefix}.all_averagers", 42)

        guards[1].coordinator_step = lambda: 5  # the coordinator recorded step 5
        joiner.load_state_from_peers(timeout=20)
        assert "ahead of the coordinator's step 5" in joiner.last_refusal
        assert joiner.local_epoch == 0
        assert not torch.equal(models[1].token_embedding.weight, models[0].token_embedding.weight)

        guards[1].coordinator_step = lambda: 41
        joiner.load_state_from_peers(timeout=20)
        assert joiner.last_refusal is None
        assert joiner.local_epoch == 42
        assert torch.equal(models[1].token_embedding.weight, models[0].token_embedding.weight)
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()
        signal.signal(signal.SIGINT, handler)


class StallingServer(GuardedStateAverager):
    """Serves its state as hivemind does, its second chunk 1.5 s after the first: a
    64 KiB chunk on a slow or saturated uplink (the lab's scaled 10 Mbit/s: 2.8 s)."""

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        index = 0
        async for message in super().rpc_download_state(request, context):
            if index == 1:
                await asyncio.sleep(1.5)
            index += 1
            yield message


def test_a_state_download_waits_for_a_slow_chunk(tmp_path: Path) -> None:
    """The averaging request timeout is 1 s; hivemind gave up a download whose next chunk
    took longer, after the server had sent part of its state for nothing (the keeper's
    step follower gave up all 21 of its downloads in 75 s on the lab's slow links). A
    chunk may now take STATE_CHUNK_TIMEOUT_S."""
    models = [_model(), _model()]
    with torch.no_grad():
        for p in models[1].parameters():
            p.mul_(0.5)  # the joiner starts elsewhere
    guards = [_state_guard(tmp_path / str(i), m, Coordinator(42)) for i, m in enumerate(models)]
    with _state_peers(guards, models, server=StallingServer) as (server, joiner):
        server.local_epoch = 42
        server.state_sharing_priority = 42
        _wait_announced(joiner.dht, f"{server.prefix}.all_averagers", 42)
        joiner.load_state_from_peers(timeout=30)
        assert joiner.local_epoch == 42
        for ours, theirs in zip(models[1].parameters(), models[0].parameters(), strict=True):
            assert torch.equal(ours, theirs)


@contextlib.contextmanager
def _state_peers(
    guards: list[SwarmGuard], models: list[GPT], server: type = GuardedStateAverager
) -> Iterator[list]:
    """One DHT and GuardedStateAverager per guard and model (the first DHT the others'
    bootstrap; the first averager a ``server``); shut down, and SIGINT's handler
    restored, on the way out."""
    handler = signal.getsignal(signal.SIGINT)
    dhts: list = []
    averagers: list = []
    try:
        dhts.append(hivemind.DHT(start=True))
        for _ in guards[1:]:
            dhts.append(hivemind.DHT(initial_peers=dhts[0].get_visible_maddrs(), start=True))
        for index, (guard, dht, model) in enumerate(zip(guards, dhts, models, strict=True)):
            averagers.append(
                (server if index == 0 else GuardedStateAverager)(
                    swarm_guard=guard,
                    dht=dht,
                    prefix="guardtest_state_averager",
                    optimizer=torch.optim.AdamW,
                    params=model.parameters(),
                    request_timeout=1.0,
                    start=True,
                )
            )
        yield averagers
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()
        signal.signal(signal.SIGINT, handler)


def _wait_announced(dht, key: str, priority: float, timeout_s: float = 30.0) -> None:
    """Until some peer's state-sharing priority ``priority`` is in the DHT under ``key``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = dht.get(key, latest=True)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        if any(getattr(e, "value", None) == priority for e in entries.values()):
            return
        time.sleep(0.2)
    raise AssertionError(f"no peer announced priority {priority} under {key} in {timeout_s} s")


def _serve_honest_and_hostile(honest, hostile, step: int) -> None:
    """Both serve ``step``; the hostile peer announces the top priority."""
    honest.local_epoch = hostile.local_epoch = step
    honest.state_sharing_priority = step
    hostile.state_sharing_priority = 1e9
    time.sleep(2.0)  # both announcements in the DHT


def test_a_refused_top_priority_server_does_not_stop_a_newcomer(tmp_path: Path) -> None:
    """A hostile peer announces the highest state-sharing priority and serves poisoned
    parameters labelled with the keeper's checkpointed step (the checkpoint says
    otherwise); an honest peer serves the checkpoint's parameters at a lower priority.
    hivemind took the first peer's state and, refused, the newcomer loaded nothing; it
    now moves on to the honest peer's."""
    models = [_model(), _model(), _model()]  # honest, hostile, newcomer
    with torch.no_grad():
        for p in models[1].parameters():
            p.add_(torch.randn_like(p))  # far from the checkpoint
        for p in models[2].parameters():
            p.mul_(0.5)  # the newcomer starts elsewhere
    keeper = Coordinator(7, checkpoints={7: dict(models[0].state_dict())})
    guards = [_state_guard(tmp_path / str(i), m, keeper) for i, m in enumerate(models)]
    with _state_peers(guards, models) as (honest, hostile, newcomer):
        _serve_honest_and_hostile(honest, hostile, 7)
        newcomer.load_state_from_peers(timeout=20)
        assert newcomer.last_refusal is None
        assert newcomer.local_epoch == 7
        for ours, theirs in zip(models[2].parameters(), models[0].parameters(), strict=True):
            assert torch.equal(ours, theirs)


def test_the_keepers_follower_refuses_state_that_breaks_the_model(tmp_path: Path) -> None:
    """No checkpoint vouches for the state the keeper's follower loads (it makes them):
    it judges a download by its loss on held-out sequences against its own parameters'.
    A hostile peer announcing the top priority serves parameters pushed off the model
    (nats worse); the follower refuses them and loads the honest peer's (a few hundredths
    apart). Without the judge, the poisoned state was loaded (and became a checkpoint)."""
    spec = parse_spec(small_spec())
    tokens = np.frombuffer(b"def f(x):\n    return x + 1\n" * 40, dtype=np.uint8)
    shard = tmp_path / "val.bin"
    write_shard(shard, tokens.astype(np.int64), "uint8")
    models = [seeded_model(spec) for _ in range(3)]  # honest, hostile, keeper's
    with torch.no_grad():
        for p in models[0].parameters():
            p.add_(1e-3 * torch.randn_like(p))  # a few steps on
        for p in models[1].parameters():
            p.add_(torch.randn_like(p))  # pushed off the model
    judge = HeldoutLoss.from_shard(spec, shard)
    honest_loss, hostile_loss = judge(models[0].state_dict()), judge(models[1].state_dict())
    assert hostile_loss > judge(models[2].state_dict()) + LOSS_MARGIN
    guards = []
    for index, model in enumerate(models):
        guard = SwarmGuard(tmp_path / str(index), target_batch_size=16)
        guard.named_parameters = list(model.named_parameters(remove_duplicate=False))
        guards.append(guard)
    guards[2].heldout_loss = judge
    guards[2].reference_state = lambda epoch: dict(models[2].state_dict())
    with _state_peers(guards, models) as (honest, hostile, keeper):
        _serve_honest_and_hostile(honest, hostile, 9)
        keeper.load_state_from_peers(timeout=20)
        assert keeper.last_refusal is None
        assert keeper.local_epoch == 9
        assert judge(models[2].state_dict()) == pytest.approx(honest_loss)
        for ours, theirs in zip(models[2].parameters(), models[0].parameters(), strict=True):
            assert torch.equal(ours, theirs)


def _trained_and_pushed(spec, sequences: torch.Tensor) -> tuple[GPT, GPT]:
    """A model trained on ``sequences`` and a copy pushed 9% of its norm along the loss's
    gradient (issue 15's poisoned state: within the distance bound, nats worse)."""
    model = seeded_model(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = sequence_losses(model(sequences[:, :-1])[0], sequences[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    pushed = seeded_model(spec)
    pushed.load_state_dict(model.state_dict())
    loss = sequence_losses(pushed(sequences[:, :-1])[0], sequences[:, 1:]).mean()
    pushed.zero_grad()
    loss.backward()
    with torch.no_grad():
        norm = torch.sqrt(sum((p**2).sum() for p in pushed.parameters()))
        grad = torch.sqrt(sum((p.grad**2).sum() for p in pushed.parameters()))
        for p in pushed.parameters():
            p.add_(p.grad * (0.09 * norm / grad))
    return model, pushed


def test_state_near_the_keepers_but_worse_on_held_out_data_is_refused(tmp_path: Path) -> None:
    """Within 10% of the keeper's checkpoint of its step, or at a step no checkpoint
    vouches for: a state pushed along the gradient (loss from about 0.4 to 4) is refused
    by its held-out loss; the keeper's own parameters, slightly moved, are not."""
    spec = parse_spec(small_spec())
    tokens = np.frombuffer(b"def f(x):\n    return x + 1\n" * 40, dtype=np.uint8)
    sequences = torch.from_numpy(
        np.stack([tokens[i * 32 : i * 32 + 33] for i in range(16)]).astype(np.int64)
    )
    model, pushed = _trained_and_pushed(spec, sequences)
    kept = dict(model.state_dict())
    guard = _state_guard(tmp_path, model, Coordinator(5, checkpoints={5: kept}))
    guard.heldout_loss = HeldoutLoss(spec, sequences)
    guard.reference_state = lambda epoch: kept if epoch >= 5 else None
    main = list(model.parameters())
    poisoned = [p.detach().clone() for p in pushed.parameters()]
    honest = [p.detach() + 1e-4 * torch.randn_like(p) for p in model.parameters()]
    assert state_distance(guard.named_state(main, poisoned), kept) < 0.1
    for step in (5, 6):  # the checkpoint's step, and one no checkpoint vouches for
        problem = state_problem(guard, main, {"epoch": step}, poisoned)
        assert problem is not None and "held-out" in problem, (step, problem)
        assert state_problem(guard, main, {"epoch": step}, honest) is None


def test_a_diloco_round_state_that_breaks_the_model_is_refused_by_the_follower(
    tmp_path: Path,
) -> None:
    """The keeper's DiLoCo round follower judges a round's global state a peer serves as
    its sync follower does (held-out loss against its own global parameters), through the
    same StateExchange check nodes use."""
    spec = parse_spec(small_spec())
    tokens = np.frombuffer(b"def f(x):\n    return x + 1\n" * 40, dtype=np.uint8)
    sequences = torch.from_numpy(
        np.stack([tokens[i * 32 : i * 32 + 33] for i in range(16)]).astype(np.int64)
    )
    model, pushed = _trained_and_pushed(spec, sequences)
    params = list(model.parameters())
    judge = SwarmGuard(tmp_path, target_batch_size=16)
    judge.named_parameters = list(model.named_parameters(remove_duplicate=False))
    judge.heldout_loss = HeldoutLoss(spec, sequences)
    judge.reference_state = lambda round_: dict(model.state_dict())
    like = [p.detach().clone() for p in params]
    exchange = StateExchange(
        SimpleNamespace(client_mode=True),
        None,
        "run",
        like=like,
        model_params=params,
        num_peers=lambda: 2,
        swarm_guard=judge,
    )
    momentum = [torch.zeros_like(p) for p in like]
    poisoned = GlobalState(4, [p.detach().clone() for p in pushed.parameters()], momentum)
    honest = GlobalState(4, [p.detach() + 1e-4 * torch.randn_like(p) for p in params], momentum)
    problem = exchange._problem(*served_state(poisoned, 4)[:2])
    assert problem is not None and "held-out" in problem, problem
    assert exchange._problem(*served_state(honest, 4)[:2]) is None


def test_a_models_heldout_loss_in_place_is_its_states() -> None:
    """The keeper's step follower judges its own parameters in place at every step it
    keeps (HeldoutLoss.of_model): the same loss as judging a copy of its state, and the
    model is left in the mode it was in."""
    spec = parse_spec(small_spec())
    sequences = torch.randint(0, 256, (40, spec.model.seq_len + 1))
    judge = HeldoutLoss(spec, sequences)
    model = seeded_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    for training in (True, False):
        model.train(training)
        assert judge.of_model(model) == pytest.approx(judge(model.state_dict()), rel=1e-6)
        assert model.training is training
