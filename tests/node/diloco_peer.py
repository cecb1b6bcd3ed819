"""One DiLoCo peer for tests: a tiny GPT on random tokens, its own DHT on 127.0.0.1.

Writes ``--out`` (JSON, atomically) when ready and after every outer step:
its DHT addresses, its round, and the hash of its global parameters at each
round. Trains once ``--go`` exists, until its global parameters reach
``--rounds`` outer steps (then leaves cleanly) or it is killed.
"""

from __future__ import annotations

import argparse
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
from crowdtrain.node.swarm.compression import FEEDBACK_KINDS, feedback_codec, install_decoders
from crowdtrain.node.swarm.compression import compression as crowdtrain_compression
from crowdtrain.node.swarm.diloco import DiLoCoConfig, DiLoCoOptimizer
from crowdtrain.protocol.runspec import OptimizerSection, SwarmSection

SEQ_LEN = 16
MICRO_BATCH = 4


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--go", type=Path, required=True)
    parser.add_argument("--initial-peers-from", type=Path, help="another peer's --out")
    parser.add_argument("--client-mode", action="store_true")
    parser.add_argument(
        "--compression", default="8bit", choices=("none", "8bit", "topk-2bit", "4bit")
    )
    parser.add_argument("--no-overlap", action="store_true")
    parser.add_argument("--rounds", type=int, default=1_000_000)
    parser.add_argument("--delay-s", type=float, default=0.05, help="sleep per micro-batch")
    parser.add_argument("--join-late", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="of the model's initialization")
    args = parser.parse_args()
    mp.set_start_method("fork", force=True)
    install_decoders()  # hivemind's own 8-bit decoders fail under numpy 2
    torch.set_num_threads(1)

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
    dht = start_dht(args.initial_peers_from, client_mode=args.client_mode)
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(vocab_size=256, seq_len=SEQ_LEN, num_layers=2, num_heads=2, d_model=32))
    if args.compression in FEEDBACK_KINDS:
        compression = crowdtrain_compression(args.compression)
    else:
        compression = Uniform8BitQuantization() if args.compression == "8bit" else NoCompression()
    config = DiLoCoConfig(
        run_id="dilocotest",
        optimizer=spec,
        swarm=swarm,
        client_mode=args.client_mode,
        pseudo_grad_compression=compression,
        state_compression=NoCompression(),
        feedback=feedback_codec(args.compression, 1 / 64),
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
        "times": {},
        "outcomes": {},
        "loaded": None,
        "epoch": 0,
    }
    try:
        write_record(args.out, record)
        while not args.go.exists():
            time.sleep(0.05)
        if args.join_late:
            record["loaded"] = opt.load_state_from_peers(timeout=20)
            record["rounds"][str(opt.global_round)] = opt.global_params_sha256()
            record["epoch"] = opt.local_epoch
            write_record(args.out, record)
        generator = torch.Generator().manual_seed(os.getpid())
        seen = opt.global_round
        while opt.global_round < args.rounds:
            batch = torch.randint(0, 256, (MICRO_BATCH, SEQ_LEN + 1), generator=generator)
            _, loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            opt.step(MICRO_BATCH)
            if opt.global_round != seen:
                seen = opt.global_round
                record["rounds"][str(seen)] = opt.global_params_sha256()
                record["times"][str(seen)] = time.time()
                record["outcomes"][str(seen)] = opt.last_round_outcome
                record["epoch"] = opt.local_epoch
                write_record(args.out, record)
            time.sleep(args.delay_s)
    finally:
        opt.shutdown()
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
