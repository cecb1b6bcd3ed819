"""One DiLoCo peer on a CUDA GPU for tests/node/test_cuda_paths.py.

Like diloco_peer.py (same spec, same JSON records), but the model lives on
``--device`` and trains under the node's autocast; after every outer step it
also records where the model's parameters, the inner optimizer's state and the
global parameters live, and how far the local parameters are from the global
ones, so the test can catch copies between CPU and GPU that go astray.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

import torch
from hivemind.compression import NoCompression, Uniform8BitQuantization
from peer_script import start_dht, write_record

from crowdtrain.model import GPT, GPTConfig, param_groups
from crowdtrain.node.device.precision import autocast
from crowdtrain.node.swarm.compression import install_decoders
from crowdtrain.node.swarm.diloco import DiLoCoConfig, DiLoCoOptimizer
from crowdtrain.protocol.runspec import OptimizerSection, SwarmSection

SEQ_LEN = 32
MICRO_BATCH = 4


def _placement(model: torch.nn.Module, opt: DiLoCoOptimizer) -> dict:
    """Devices and dtypes of the model, the inner optimizer's state and the global params."""
    inner_state = [
        t for state in opt.inner.state.values() for t in state.values() if torch.is_tensor(t)
    ]
    with torch.no_grad():
        gap = max(
            float((p.detach().float().cpu() - g).abs().max())
            for p, g in zip(model.parameters(), opt.global_params, strict=True)
        )
    return {
        "param_devices": sorted({str(p.device) for p in model.parameters()}),
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "inner_state_devices": sorted({str(t.device) for t in inner_state if t.dim() > 0}),
        "grad_sum_devices": sorted({str(g.device) for g in opt._grad_sums}),
        "global_devices": sorted({str(g.device) for g in opt.global_params}),
        "global_finite": all(bool(torch.isfinite(g).all()) for g in opt.global_params),
        "local_finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "local_minus_global": gap if math.isfinite(gap) else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--go", type=Path, required=True)
    parser.add_argument("--initial-peers-from", type=Path, help="another peer's --out")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-overlap", action="store_true")
    parser.add_argument("--join-late", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delay-s", type=float, default=0.05, help="sleep per micro-batch")
    parser.add_argument("--seed", type=int, default=0, help="of the model's initialization")
    args = parser.parse_args()
    mp.set_start_method("fork", force=True)
    install_decoders()
    device = torch.device(args.device)

    spec = OptimizerSection(
        target_batch_size=8,
        mode="diloco",
        inner_steps=5,
        inner_batch_size=4,
        lr=1e-3,
        outer_overlap=not args.no_overlap,
    )
    swarm = SwarmSection(
        matchmaking_time_s=2.0,
        averaging_timeout_s=8.0,
        request_timeout_s=1.0,
        metadata_expiration_s=5.0,
        load_state_timeout_s=10.0,
    )
    dht = start_dht(args.initial_peers_from)
    torch.manual_seed(args.seed)
    config = GPTConfig(vocab_size=256, seq_len=SEQ_LEN, num_layers=2, num_heads=2, d_model=64)
    model = GPT(config).to(device)
    config = DiLoCoConfig(
        run_id="cudatest",
        optimizer=spec,
        swarm=swarm,
        client_mode=False,
        pseudo_grad_compression=Uniform8BitQuantization(),
        state_compression=NoCompression(),
    )
    opt = DiLoCoOptimizer(
        config,
        dht=dht,
        model=model,
        params=param_groups(model, 0.1),
        inner_optimizer=partial(torch.optim.AdamW, lr=spec.lr),
        scheduler=None,
    )

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    record: dict = {
        "maddrs": [str(m) for m in dht.get_visible_maddrs()],
        "rounds": {},
        "placement": {},
        "loaded": None,
        "losses": [],
    }
    try:
        write_record(args.out, record)
        while not args.go.exists():
            time.sleep(0.05)
        if args.join_late:
            record["loaded"] = opt.load_state_from_peers(timeout=20)
            record["rounds"][str(opt.global_round)] = opt.global_params_sha256()
            record["placement"][str(opt.global_round)] = _placement(model, opt)
            write_record(args.out, record)
        generator = torch.Generator().manual_seed(os.getpid())
        seen = opt.global_round
        while opt.global_round < args.rounds:
            batch = torch.randint(0, 256, (MICRO_BATCH, SEQ_LEN + 1), generator=generator)
            batch = batch.to(device)
            with autocast(device):
                _, loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            opt.step(MICRO_BATCH)
            if opt.global_round != seen:
                seen = opt.global_round
                record["rounds"][str(seen)] = opt.global_params_sha256()
                record["placement"][str(seen)] = _placement(model, opt)
                record["losses"].append(float(loss))
                write_record(args.out, record)
            time.sleep(args.delay_s)
    finally:
        opt.shutdown()
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
