"""How much a DiLoCo pseudo-gradient tells about the data it was trained on, at our scale.

Templar's gauntlet scores a peer's update by the loss it removes on the peer's own
data against data the peer was not given. Whether that can tell a free rider (who
copies another peer's update, or sends noise) from an honest peer depends on how
much one pass over a shard is remembered, against how much shards differ. This
measures both for the demo's model (4 layers, d_model 192, byte-level, 128 tokens)
on Python's standard library (the bundled corpus's source), on one CPU:

1. train the model ``--warmup`` AdamW steps (batch 16) to a mid-training point
   (the round's global parameters);
2. two peers each train ``--inner-steps`` inner steps from there (a copy of the
   AdamW state each) on shards of their own, one pass: pseudo-gradients A and B;
3. for each update applied to the global parameters, the loss it removes on 32
   sequences of the peer's own shard, and the same minus what it removes on 32
   held-out sequences (the gauntlet's score), over 4 draws.

    python bench/gauntlet_signal.py --inner-steps 100 --warmup 150 --out bench/results/gauntlet_signal.md
"""

from __future__ import annotations

import argparse
import copy
import glob
import random
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from crowdtrain.model import GPT, GPTConfig, sequence_losses

BATCH = 16
SEQ = 129  # 128 targets


def sequences(files: list[str], n: int) -> torch.Tensor:
    data = b"".join(open(f, "rb").read() for f in files)
    tokens = np.frombuffer(data, dtype=np.uint8)
    k = min(n, len(tokens) // SEQ)
    return torch.tensor(tokens[: k * SEQ].reshape(k, SEQ).astype(np.int64))


def mean_loss(model: GPT, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(sequence_losses(model(x[:, :-1])[0], x[:, 1:]).mean())


def train(model: GPT, opt: torch.optim.Optimizer, data: torch.Tensor, steps: int) -> None:
    for i in range(steps):
        x = data[(i * BATCH) % len(data) :][:BATCH]
        loss = sequence_losses(model(x[:, :-1])[0], x[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inner-steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args()
    torch.manual_seed(0)
    files = sorted(glob.glob(f"{sysconfig.get_paths()['stdlib']}/**/*.py", recursive=True))
    random.Random(0).shuffle(files)
    need = args.inner_steps * BATCH
    pretrain, shard_a = sequences(files[:300], 300 * BATCH), sequences(files[300:340], need)
    shard_b, held = sequences(files[340:380], need), sequences(files[400:440], 256)
    model = GPT(
        GPTConfig(
            vocab_size=256, seq_len=128, num_layers=4, num_heads=4, d_model=192, positions="rotary"
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    started = time.monotonic()
    train(model, opt, pretrain, args.warmup)
    lines = [
        f"Global parameters after {args.warmup} AdamW steps "
        f"({time.monotonic() - started:.0f} s); each peer {args.inner_steps} inner steps of "
        f"{BATCH} on its own shard; 4 draws of 32 sequences per score.",
        "",
    ]
    print(lines[0])
    global_ = [p.detach().clone() for p in model.parameters()]

    def pseudo_gradient(shard: torch.Tensor) -> list[torch.Tensor]:
        local = copy.deepcopy(model)
        inner = torch.optim.AdamW(local.parameters(), lr=3e-3, weight_decay=0.1)
        inner.load_state_dict(opt.state_dict())
        train(local, inner, shard, args.inner_steps)
        return [g - p.detach() for g, p in zip(global_, local.parameters(), strict=True)]

    def applied(delta: list[torch.Tensor]) -> GPT:
        out = copy.deepcopy(model)
        with torch.no_grad():
            for p, g, d in zip(out.parameters(), global_, delta, strict=True):
                p.copy_(g - d)
        return out

    def scores(delta: list[torch.Tensor], own: torch.Tensor) -> list[tuple[float, float]]:
        after = applied(delta)
        found = []
        for draw in range(4):
            g = torch.Generator().manual_seed(draw)
            o = own[torch.randperm(len(own), generator=g)[:32]]
            h = held[torch.randperm(len(held), generator=g)[:32]]
            removed_own = mean_loss(model, o) - mean_loss(after, o)
            removed_held = mean_loss(model, h) - mean_loss(after, h)
            found.append((removed_own, removed_own - removed_held))
        return found

    a, b = pseudo_gradient(shard_a), pseudo_gradient(shard_b)
    norm = float(torch.sqrt(sum((x**2).sum() for x in a)))
    noise = [torch.randn_like(x) for x in a]
    noise_norm = float(torch.sqrt(sum((x**2).sum() for x in noise)))
    noise = [x * norm / noise_norm for x in noise]
    lines += [
        "| update, scored on the shard of | loss removed on own data | gauntlet score |",
        "| --- | --- | --- |",
    ]
    for name, delta, own in (
        ("A's own, on A", a, shard_a),
        ("B's own, on B", b, shard_b),
        ("B's, copied by A, on A", b, shard_a),
        ("noise of A's norm, on A", noise, shard_a),
        ("the average of A and B, on A", [(x + y) / 2 for x, y in zip(a, b, strict=True)], shard_a),
    ):
        found = scores(delta, own)
        removed = ", ".join(f"{r:+.3f}" for r, _ in found)
        score = ", ".join(f"{s:+.3f}" for _, s in found)
        lines.append(f"| {name} | {removed} | {score} |")
        print(lines[-1])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
