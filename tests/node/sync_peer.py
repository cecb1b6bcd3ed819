"""One sync peer for tests: the node's own optimizer (GuardedOptimizer, built as a run's
spec says) on a tiny GPT and random tokens, its own DHT on 127.0.0.1.

``--spec`` is the run's spec (sync mode). Writes ``--out`` (JSON, atomically) when ready and at every step: its DHT addresses,
its step, and the hash of its parameters at each step it holds the swarm's
(``steps``; not while out of step), with the steps it skipped and the times it
loaded a peer's state. Trains once ``--go`` exists (a peer given
``--initial-peers-from`` first loads the state of a peer past step 0), until ``--steps`` steps (then
leaves) or it is killed. ``--lose-round N`` makes its Nth gradient round fail for it
alone, after the round: the others got their results, it did not.
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
from typing import Any

import torch
from hivemind.averaging.partition import AllreduceException
from peer_script import start_dht, write_record

from crowdtrain.model import GPT, GPTConfig, params_sha256
from crowdtrain.node.swarm.averagers import GuardedGradientAverager
from crowdtrain.node.swarm.guard import SwarmGuard
from crowdtrain.node.swarm.optimizer import sync_options
from crowdtrain.node.swarm.sync import GuardedOptimizer
from crowdtrain.protocol.runspec import parse_spec

MICRO_BATCH = 4


class LosingAverager(GuardedGradientAverager):
    """Loses the result of its ``lose_round``-th round (counted in the averager's process)."""

    lose_round = 0  # set before the averager forks
    rounds = 0

    async def _run_allreduce_inplace_(
        self, tensors: Any, group_info: Any, *args: Any, **kwargs: Any
    ):
        await super()._run_allreduce_inplace_(tensors, group_info, *args, **kwargs)
        self.rounds += 1
        if self.rounds == self.lose_round:
            self._no_retries()
            raise AllreduceException("test: this peer lost the round's result")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, required=True, help="a sync run's spec")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--go", type=Path, required=True)
    parser.add_argument("--initial-peers-from", type=Path, help="another peer's --out")
    parser.add_argument("--lose-round", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1_000_000)
    args = parser.parse_args()
    mp.set_start_method("fork", force=True)
    torch.set_num_threads(1)

    spec = parse_spec(args.spec.read_text(), source=str(args.spec))
    dht = start_dht(args.initial_peers_from)
    torch.manual_seed(0)  # every peer starts from the same parameters
    model = GPT(GPTConfig.from_spec(spec.model))
    guard = SwarmGuard(args.out.parent / f"{args.out.stem}-guard", spec.optimizer.target_batch_size)
    options = sync_options(spec, model, dht, guard, MICRO_BATCH)
    LosingAverager.lose_round = args.lose_round
    options["grad_averager_factory"] = partial(
        LosingAverager,
        guard=guard.config,
        exact=spec.swarm.strict_steps,
        request_timeout=spec.swarm.request_timeout_s,
    )
    options["verbose"] = True  # what each step did, in the peer's log
    opt = GuardedOptimizer(**options)

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    record: dict = {
        "maddrs": [str(m) for m in dht.get_visible_maddrs()],
        "steps": {},
        "loaded_steps": [],
        "step": 0,
        "skipped": 0,
        "resyncs": 0,
    }
    try:
        write_record(args.out, record)
        while not args.go.exists():
            time.sleep(0.05)
        if args.initial_peers_from is not None:  # a newcomer: the swarm's state first
            while opt.local_epoch == 0:
                opt.load_state_from_peers()
                time.sleep(0.2)
        generator = torch.Generator().manual_seed(os.getpid())
        seen, loads = None, opt.loads
        while opt.local_epoch < args.steps:
            batch = torch.randint(0, 256, (MICRO_BATCH, 17), generator=generator)
            _, loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            opt.step(batch_size=MICRO_BATCH)
            opt.zero_grad()
            state = (opt.local_epoch, opt.out_of_step)
            if state != seen:
                seen = state
                if not opt.out_of_step:
                    record["steps"][str(opt.local_epoch)] = params_sha256(model.state_dict())
                if opt.loads != loads:  # a step entered by loading a peer's state
                    loads = opt.loads
                    record["loaded_steps"].append(opt.local_epoch)
                if opt.skipped_steps and "skipped_at" not in record:
                    record["skipped_at"] = opt.local_epoch
                record.update(step=opt.local_epoch, skipped=opt.skipped_steps)
                record["resyncs"] = opt.resyncs
                write_record(args.out, record)
            time.sleep(0.05)
    finally:
        opt.shutdown()
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
