"""One process training alone: the efficiency bench's baseline and its solo-speed loop.

``baseline`` trains the run's model with plain PyTorch at the swarm's global
batch (same init seed, AdamW with the spec's lr, betas, weight decay, warm-up
and clipping, batches from the same shards) and evaluates it at given steps.
``solo`` measures the tokens/s of one node-sized loop (micro-batch, threads)
with no averaging at all. Each writes a JSON file; the harness runs them as
separate processes so their thread settings are their own.

    python -m bench.efficiency.baseline baseline --data D --spec S.json --threads 2 \
        --eval-steps 200,300 --out baseline.json
    python -m bench.efficiency.baseline solo --data D --spec S.json --threads 1 --seconds 40 --out solo.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.efficiency.data import NUM_VAL_SEQUENCES, train_batches, val_sequences
from bench.efficiency.specs import gpt_config


def _optimizer(model: torch.nn.Module, opt: dict[str, Any]) -> tuple[Any, Any]:
    from crowdtrain.model import param_groups

    optimizer = torch.optim.AdamW(
        param_groups(model, opt.get("weight_decay", 0.1)),
        lr=opt.get("lr", 3e-3),
        betas=tuple(opt.get("betas", (0.9, 0.95))),
    )
    warmup = max(1, opt.get("warmup_steps", 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup)
    )
    return optimizer, scheduler


def _step(model: torch.nn.Module, optimizer: Any, scheduler: Any, clip: float) -> None:
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def baseline(args: argparse.Namespace) -> dict[str, Any]:
    """Train at the global batch; evaluate every ``curve_every`` steps and at ``eval_steps``."""
    from crowdtrain.model import GPT, evaluate

    torch.set_num_threads(args.threads)
    spec = json.loads(args.spec.read_text())
    opt, seq_len = spec["optimizer"], spec["model"]["seq_len"]
    device = torch.device(args.device)
    torch.manual_seed(spec["run"].get("seed", 0))
    model = GPT(gpt_config(spec)).to(device)
    optimizer, scheduler = _optimizer(model, opt)
    global_batch = opt["target_batch_size"]
    micro = min(opt.get("micro_batch_size", 16), global_batch)
    curve_seqs = val_sequences(args.data, seq_len, spec.get("eval", {}).get("num_sequences", 64))
    final_seqs = val_sequences(args.data, seq_len, NUM_VAL_SEQUENCES)
    eval_steps = sorted({int(s) for s in args.eval_steps.split(",") if s.strip()})
    max_steps = max(eval_steps) if eval_steps else args.max_steps
    batches = train_batches(args.data, spec["run"].get("seed", 0), seq_len, global_batch)
    curve: list[dict[str, float]] = []
    finals: dict[str, float] = {}
    train_s = 0.0

    def point(step: int) -> None:
        loss = evaluate(model, curve_seqs, batch_size=16, device=device).loss
        curve.append({"step": step, "num_tokens": step * global_batch * seq_len, "loss": loss})

    point(0)
    for step in range(1, max_steps + 1):
        started = time.perf_counter()
        batch = torch.from_numpy(next(batches)).to(device)
        for chunk in batch.split(micro):
            _, loss = model(chunk[:, :-1], chunk[:, 1:])
            (loss * chunk.shape[0] / batch.shape[0]).backward()
        _step(model, optimizer, scheduler, opt.get("grad_clip", 1.0))
        train_s += time.perf_counter() - started
        if step % args.curve_every == 0:
            point(step)
        if step in eval_steps:
            finals[str(step)] = evaluate(model, final_seqs, batch_size=16, device=device).loss
            print(f"step {step}: val loss {finals[str(step)]:.4f}", flush=True)
    return {
        "threads": args.threads,
        "device": args.device,
        "global_batch": global_batch,
        "micro_batch": micro,
        "num_steps": max_steps,
        "tokens_per_s": max_steps * global_batch * seq_len / max(train_s, 1e-9),
        "curve": curve,
        "final": finals,
        "num_val_sequences": int(final_seqs.shape[0]),
    }


def solo(args: argparse.Namespace) -> dict[str, Any]:
    """Tokens/s of micro-batches of the run's size, an AdamW step each ``step_every``."""
    from crowdtrain.model import GPT

    torch.set_num_threads(args.threads)
    spec = json.loads(args.spec.read_text())
    opt, seq_len = spec["optimizer"], spec["model"]["seq_len"]
    device = torch.device(args.device)
    torch.manual_seed(spec["run"].get("seed", 0))
    model = GPT(gpt_config(spec)).to(device)
    optimizer, scheduler = _optimizer(model, opt)
    micro = (
        opt.get("inner_batch_size", 16)
        if opt.get("mode") == "diloco"
        else opt.get("micro_batch_size", 16)
    )
    batches = train_batches(args.data, spec["run"].get("seed", 0) + 1, seq_len, micro)
    throttle = None
    if args.slowdown > 1:
        # The node's own test hook: after each micro-batch, sleep (factor - 1) times its compute.
        from crowdtrain.node.device.hooks import Throttle

        throttle = Throttle(args.slowdown)
    started = time.monotonic()
    measured_from, num_tokens, num_micro = None, 0, 0
    while time.monotonic() - started < args.warmup_s + args.seconds:
        t0 = time.perf_counter()
        batch = torch.from_numpy(next(batches)).to(device)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        num_micro += 1
        if num_micro % args.step_every == 0:
            _step(model, optimizer, scheduler, opt.get("grad_clip", 1.0))
        if throttle is not None:
            throttle.wrap(time.perf_counter() - t0)
        if measured_from is None:
            if time.monotonic() - started >= args.warmup_s:
                measured_from = time.monotonic()
            continue
        num_tokens += batch.shape[0] * seq_len
    span = time.monotonic() - (measured_from or started)
    return {
        "threads": args.threads,
        "micro_batch": micro,
        "step_every": args.step_every,
        "slowdown": args.slowdown,
        "seconds": span,
        "num_tokens": num_tokens,
        "tokens_per_s": num_tokens / max(span, 1e-9),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.efficiency.baseline", description=__doc__
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("baseline", "solo"):
        p = sub.add_parser(name)
        p.add_argument("--data", type=Path, required=True)
        p.add_argument("--spec", type=Path, required=True, help="the run spec as JSON")
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--device", default="cpu")
        p.add_argument("--out", type=Path, required=True)
    b = sub.choices["baseline"]
    b.add_argument("--eval-steps", default="", help="steps to evaluate on the full val set")
    b.add_argument("--max-steps", type=int, default=100)
    b.add_argument("--curve-every", type=int, default=20)
    s = sub.choices["solo"]
    s.add_argument("--seconds", type=float, default=30.0)
    s.add_argument("--warmup-s", type=float, default=5.0)
    s.add_argument("--step-every", type=int, default=1)
    s.add_argument("--slowdown", type=float, default=1.0)
    args = parser.parse_args()
    result = baseline(args) if args.command == "baseline" else solo(args)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
