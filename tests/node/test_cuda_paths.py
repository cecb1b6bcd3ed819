"""The node's CUDA paths on a real GPU: micro-batch probing, bf16 autocast, DiLoCo and sync.

Skipped where ``torch.cuda.is_available()`` is False (CI, CPU machines). On a
GPU: the micro-batch probe of a ~20M-parameter GPT and a training step at the
chosen size; two DiLoCo peers as real processes (tests/node/cuda_peer.py) with
their models on the GPU, plus a late joiner, agreeing bit for bit on the
global parameters after every round while their models stay on the GPU; and
hivemind's Optimizer as build_optimizer makes it for a sync run, with and
without the delayed optimizer step. Every process group started is killed,
pass or fail.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.specs import small_spec
from tests.swarm import ScriptPeers

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)

PEER = Path(__file__).parent / "cuda_peer.py"
ROUNDS = 4


def test_micro_batch_probe_beats_the_cpu_default_and_trains_in_bf16() -> None:
    from crowdtrain.model import GPT, GPTConfig
    from crowdtrain.node.device.micro_batch import choose_micro_batch
    from crowdtrain.node.device.precision import autocast
    from crowdtrain.protocol.runspec import OptimizerSection

    device = torch.device("cuda")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=16384, seq_len=256, num_layers=8, num_heads=6, d_model=384)
    model = GPT(config).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    assert 15e6 < num_params < 30e6, num_params
    default = OptimizerSection(target_batch_size=512).micro_batch_size
    upper = 512
    choice = choose_micro_batch(
        model,
        device,
        seq_len=config.seq_len,
        vocab_size=config.vocab_size,
        upper=upper,
        default=default,
    )
    print(f"{num_params / 1e6:.1f}M parameters: micro-batch {choice.size} ({choice.reason})")
    assert default < choice.size <= upper
    assert all(p.grad is None for p in model.parameters())

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, config.vocab_size, (choice.size, config.seq_len + 1), device=device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):  # two steps: the second runs with AdamW's statistics allocated
        with autocast(device):
            logits, loss = model(batch[:, :-1], batch[:, 1:])
        assert logits.dtype == torch.bfloat16
        assert loss is not None and math.isfinite(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del logits, loss
    torch.cuda.synchronize(device)
    _, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    print(f"peak {peak / 2**30:.1f} GiB of {total / 2**30:.1f} GiB")
    assert peak < total
    for param in model.parameters():
        assert param.device.type == "cuda" and param.dtype == torch.float32
        assert bool(torch.isfinite(param).all())
    del model, optimizer, batch
    torch.cuda.empty_cache()


class _Peers(ScriptPeers):
    """cuda_peer.py processes; a peer that exits with an error fails the test at once."""

    def __init__(self, folder: Path):
        super().__init__(folder, PEER, allowed_exits=(0,))

    def log(self, name: str, tail_chars: int = 3000) -> str:
        return "\n".join(self.named(name).output().splitlines()[-60:])


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[_Peers]:
    p = _Peers(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


def test_diloco_peers_on_the_gpu_agree_bit_for_bit_and_keep_their_models_there(
    peers: _Peers,
) -> None:
    """One peer overlaps the all-reduce with the next round, the other waits for it; a late
    joiner loads the global state onto its GPU model. After every round all hold the same
    global parameters (CPU, fp32) while models, gradient sums and AdamW state stay on CUDA."""
    go, late_go = peers.root / "go", peers.root / "late-go"
    rounds = ("--rounds", str(ROUNDS))
    peers.start("overlap", *rounds, "--go", str(go))
    peers.start("waits", "--no-overlap", *rounds, "--go", str(go), initial="overlap")
    peers.start(
        "late", "--join-late", "--seed", "2", *rounds, "--go", str(late_go), initial="overlap"
    )
    ready = ("overlap", "waits", "late")
    peers.wait_for("the peers to start", lambda: all(peers.read(n) for n in ready), 120)
    go.touch()
    peers.wait_for("round 1", lambda: 1 in peers.rounds("overlap"), 120)
    late_go.touch()
    for name in ready:
        peers.wait_for(f"{name} to finish", lambda n=name: peers.procs[n].poll() == 0, 180)

    overlap, waits, late = (peers.rounds(n) for n in ready)
    assert set(range(1, ROUNDS + 1)) <= set(overlap) & set(waits), peers.logs()
    for round_ in range(1, ROUNDS + 1):
        assert overlap[round_] == waits[round_], f"round {round_}:\n{peers.logs()}"
    late_record = peers.read("late")
    assert late_record["loaded"] is True, peers.logs()
    assert late and all(overlap[r] == sha for r, sha in late.items()), peers.logs()
    assert len(set(overlap.values())) == len(overlap)  # every round moved the parameters

    for name in ready:
        record = peers.read(name)
        for round_, placement in record["placement"].items():
            where = f"{name}, round {round_}: {placement}"
            assert placement["param_devices"] == ["cuda:0"], where
            assert placement["param_dtypes"] == ["torch.float32"], where
            assert placement["grad_sum_devices"] == ["cuda:0"], where
            assert placement["inner_state_devices"] in ([], ["cuda:0"]), where
            assert placement["global_devices"] == ["cpu"], where
            assert placement["global_finite"] and placement["local_finite"], where
        assert all(math.isfinite(loss) for loss in record["losses"])
    # Waiting for the average copies the global parameters into the model exactly.
    for round_, placement in peers.read("waits")["placement"].items():
        assert placement["local_minus_global"] == 0.0, (round_, placement)
    # The late joiner's model is the state it loaded, before it trained.
    first = min(late)
    assert peers.read("late")["placement"][str(first)]["local_minus_global"] == 0.0


def _sync_spec(delay: bool) -> str:
    return small_spec(
        run={"id": "cudasync", "seed": None},
        model={"d_model": 64},
        optimizer={
            "mode": "sync",
            "target_batch_size": 8,
            "micro_batch_size": 4,
            "lr": 1e-3,
            "delay_optimizer_step": delay,
        },
        swarm={"matchmaking_time_s": 1.5, "averaging_timeout_s": 5.0, "request_timeout_s": 1.0},
    )


@pytest.mark.parametrize("delay", [False, True], ids=["plain", "delayed-step"])
def test_sync_optimizer_trains_a_gpu_model_alone(tmp_path: Path, delay: bool) -> None:
    """build_optimizer's hivemind Optimizer (alone in its swarm: each step averages with
    nobody) steps a CUDA model; with the delayed step the update comes from the offloaded
    CPU copy in the background and must land back on the GPU parameters."""
    import hivemind

    from crowdtrain.model import GPT, GPTConfig
    from crowdtrain.node.device.precision import autocast
    from crowdtrain.node.swarm.guard import SwarmGuard
    from crowdtrain.node.swarm.optimizer import build_optimizer
    from crowdtrain.protocol.runspec import parse_spec

    spec = parse_spec(_sync_spec(delay))
    device = torch.device("cuda")
    handler = signal.getsignal(signal.SIGINT)
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    opt = None
    try:
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_spec(spec.model)).to(device)
        before = [p.detach().clone() for p in model.parameters()]
        guard = SwarmGuard(tmp_path / "guard", target_batch_size=spec.optimizer.target_batch_size)
        opt = build_optimizer(spec, model, dht, guard, micro_batch_size=4)
        generator = torch.Generator().manual_seed(0)
        for _ in range(8):  # 4 collaborative steps of 2 micro-batches
            batch = torch.randint(0, 256, (4, 33), generator=generator).to(device)
            with autocast(device):
                _, loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            opt.step(batch_size=4)
        deadline = time.monotonic() + 30
        while opt.local_epoch < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert opt.local_epoch >= 3, opt.local_epoch
        if delay:  # let the last background step land
            time.sleep(2.0)
        for param in model.parameters():
            assert param.device.type == "cuda" and param.dtype == torch.float32
            assert bool(torch.isfinite(param).all())
        moved = sum(
            not torch.equal(p.detach(), o) for p, o in zip(model.parameters(), before, strict=True)
        )
        assert moved == len(before), f"{moved} of {len(before)} parameters changed"
        assert math.isfinite(float(loss.detach()))
    finally:
        if opt is not None:
            opt.shutdown()
        dht.shutdown()
        signal.signal(signal.SIGINT, handler)
