"""Where an honest reducer's result points, seen from each sender's own part, at our scale.

A sender gets back its slice's result from a reducer it cannot check by recomputing
(it holds only its own part). What it can check is the direction: the result of the
mean, a trimmed mean or CenteredClip over parts that include its own weighs its own
part in, and honest gradients of one model share a direction, so the cosine between
the result and its own part should stay positive; a reducer that returns the result
flipped (-100x, say) gives a negative one. This measures that cosine for honest groups
of 2 to 4 peers, with real gradients of the demo's model (4 layers, d_model 192,
byte-level, 128 tokens) on Python's standard library, at several points of training,
per all-reduce part (hivemind's 2**19-byte parts of the flattened gradients):

    python bench/result_direction.py --out bench/results/result_direction.md
"""

from __future__ import annotations

import argparse
import glob
import random
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from crowdtrain.model import GPT, GPTConfig, sequence_losses
from crowdtrain.node.swarm.robust import aggregate
from crowdtrain.protocol.runspec import TrustSection

SEQ = 129  # 128 targets
PART = 2**19 // 4  # float32 values in one of hivemind's all-reduce parts


def sequences(files: list[str], n: int) -> torch.Tensor:
    data = b"".join(open(f, "rb").read() for f in files)
    tokens = np.frombuffer(data, dtype=np.uint8)
    k = min(n, len(tokens) // SEQ)
    return torch.tensor(tokens[: k * SEQ].reshape(k, SEQ).astype(np.int64))


def gradient(model: GPT, batch: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    loss = sequence_losses(model(batch[:, :-1])[0], batch[:, 1:]).mean()
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


_cursor = [0]


def measure(
    model: GPT, data: torch.Tensor, sizes: list[int], rule: str, draws: int
) -> tuple[float, float, float, float, float]:
    """Over ``draws`` groups (one gradient per peer, of ``sizes`` sequences): the smallest
    cosine between a part's result and a sender's own part, the smallest and the median
    over whole slices (each reducer's contiguous 1/n of the vector: what it returns in one
    round), the largest ratio of a slice's result norm to the sender's own, and the smallest
    projection of a slice's result on the sender's own, in units of its own (how far the
    result pulls against it)."""
    trust = TrustSection(aggregation=rule)
    part_cosines, slice_cosines, ratios, projections = [], [], [], []
    for _ in range(draws):
        grads = []
        for size in sizes:
            start = _cursor[0]
            grads.append(gradient(model, data[start : start + size]))
            _cursor[0] = (start + size) % (len(data) - 64)
        weights = [float(size) for size in sizes]
        results = torch.empty_like(grads[0])
        for start in range(0, grads[0].numel(), PART):
            parts = [g[start : start + PART] for g in grads]
            result = aggregate(parts, weights, trust).value
            results[start : start + PART] = result
            for own in parts:
                if own.norm() > 0:
                    part_cosines.append(cosine(result, own))
        bounds = np.linspace(0, grads[0].numel(), len(sizes) + 1).astype(int)
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            for g in grads:
                slice_cosines.append(cosine(results[lo:hi], g[lo:hi]))
                if g[lo:hi].norm() > 0:
                    ratios.append(float(results[lo:hi].norm() / g[lo:hi].norm()))
                    projections.append(
                        float(torch.dot(results[lo:hi], g[lo:hi]) / g[lo:hi].norm() ** 2)
                    )
    return (
        min(part_cosines),
        min(slice_cosines),
        float(np.median(slice_cosines)),
        max(ratios),
        min(projections),
    )


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8, help="sequences per peer's gradient")
    parser.add_argument("--draws", type=int, default=8, help="groups per point of training")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args()
    torch.manual_seed(0)
    files = sorted(glob.glob(f"{sysconfig.get_paths()['stdlib']}/**/*.py", recursive=True))
    random.Random(0).shuffle(files)
    data = sequences(files[:400], 6000)
    model = GPT(
        GPTConfig(
            vocab_size=256, seq_len=128, num_layers=4, num_heads=4, d_model=192, positions="rotary"
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    rows = []
    started, trained = time.monotonic(), 0
    for point in (0, 50, 300):
        while trained < point:
            batch = data[_cursor[0] : _cursor[0] + 16]
            _cursor[0] += 16
            gradient(model, batch)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            trained += 1
        for peers in (2, 3, 4):
            # equal batches, and one peer with a batch 8 times smaller (a noisier, longer part)
            for sizes in (
                [args.batch] * peers,
                [max(1, args.batch // 8)] + [args.batch] * (peers - 1),
            ):
                for rule in ("mean", "centered_clip"):
                    rows.append(
                        (
                            point,
                            peers,
                            "/".join(map(str, sizes)),
                            rule,
                            *measure(model, data, sizes, rule, args.draws),
                        )
                    )
                    print(rows[-1], f"{time.monotonic() - started:.0f} s", flush=True)
    lines = [
        "| training steps | peers | batches | rule | smallest cosine, per part | per slice "
        "| median, per slice | largest norm ratio result/own, per slice "
        "| smallest projection on own, per slice |",
        "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for point, peers, sizes, rule, low_part, low, mid, ratio, projection in rows:
        lines.append(
            f"| {point} | {peers} | {sizes} | {rule} | {low_part:+.3f} | {low:+.3f} | {mid:+.3f} "
            f"| {ratio:.2f} | {projection:+.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
