"""What each aggregation rule keeps of training when one peer of a sync round is hostile.

Data-parallel sync training of the demo's model (4 layers, d_model 192, byte-level,
128 tokens) on Python's standard library, simulated in one process: each step every
peer computes the gradient of its own batch of 16; the attacker replaces its gradient
with a hostile one; the parts go through the guard's norm checks
(:func:`~crowdtrain.node.swarm.guard.norm_problem`, ``clip_scale``) and the reducers'
rule (:func:`~crowdtrain.node.swarm.robust.aggregate`), slice by slice as hivemind
splits them; AdamW takes the step. The network is left out (the wire protocol's
attack test is tests/e2e/test_adversarial.py); the rules, checks and model are ours.

Attacks (the attacker may see the honest parts, as a colluding or eavesdropping peer
could): ``flip`` its own gradient times -9.9; ``alie`` ("a little is enough", Baruch et
al. 2019) the honest mean minus one standard deviation per coordinate; ``ipm`` (inner
product manipulation, Xie et al. 2020) minus the honest mean; ``sybils``: two
colluding flippers among six peers.

    python bench/robust.py --steps 60 --out bench/results/robust.md
"""

from __future__ import annotations

import argparse
import glob
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gauntlet_signal import BATCH, mean_loss, sequences  # noqa: E402
from crowdtrain.model import GPT, GPTConfig, sequence_losses  # noqa: E402
from crowdtrain.node.swarm.guard import clip_scale, norm_problem, reference_norm  # noqa: E402
from crowdtrain.node.swarm.robust import aggregate  # noqa: E402
from crowdtrain.protocol.runspec import TrustSection  # noqa: E402

PART = 2**17  # values per slice (hivemind's parts are of this order)
RULES = ("mean", "trimmed_mean", "centered_clip")
ATTACKS = {"none": (4, 0), "flip": (4, 1), "alie": (4, 1), "ipm": (4, 1), "sybils": (6, 2)}


def hostile(attack: str, own: torch.Tensor, honest: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(honest)
    if attack in ("flip", "sybils"):
        return -9.9 * own
    if attack == "alie":
        return stacked.mean(0) - stacked.std(0)
    return -stacked.mean(0)  # ipm


def combine(parts: list[torch.Tensor], trust: TrustSection) -> tuple[torch.Tensor, list[int]]:
    """The guard's checks and the rule, part by part of each peer's slice (each peer
    reduces a 1/len(parts) slice, in parts of PART values, as hivemind splits them):
    (the result, one sender per report a reducer would make: most of the sender's
    judged parts of its slice far)."""
    out, reports = torch.empty_like(parts[0]), []
    size = parts[0].numel()
    bounds = [size * k // len(parts) for k in range(len(parts) + 1)]
    for reducer, (begin, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
        far, judged = [0] * len(parts), [0] * len(parts)
        for start in range(begin, end, PART):
            chunk = [p[start : min(start + PART, end)] for p in parts]
            norms = [float(c.norm()) for c in chunk]
            reference = reference_norm(norms)
            kept, kept_index = [], []
            for i, (c, n) in enumerate(zip(chunk, norms, strict=True)):
                if norm_problem(n, reference) is None:
                    kept.append(c * clip_scale(n, reference))
                    kept_index.append(i)
            result = aggregate(kept, [1.0] * len(kept), trust)
            out[start : start + len(chunk[0])] = result.value
            if result.judged:
                for i, d in zip(kept_index, result.distances, strict=True):
                    judged[i] += 1
                    far[i] += d > trust.report_distance
        # (a reducer never reports itself)
        reports += [i for i in range(len(parts)) if i != reducer and 2 * far[i] > judged[i]]
    return out, reports


def run(
    rule: str, attack: str, steps: int, data: torch.Tensor, held: torch.Tensor
) -> tuple[list[float], int | None, int]:
    """Validation losses every 10 steps, the first step the attacker was found far, and
    how many times an honest peer's part was (false reports)."""
    peers, attackers = ATTACKS[attack]
    model = demo_model()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1)
    trust = TrustSection(aggregation=rule)  # type: ignore[arg-type]
    losses, found, honest_far = [mean_loss(model, held)], None, 0
    honest_peers = peers - attackers
    for step in range(steps):
        grads = []
        for peer in range(peers):
            # Honest peers take fresh batches; honest tokens are the same in every run.
            i = (step * peers + peer) * BATCH % (len(data) - BATCH)
            x = data[i : i + BATCH]
            model.zero_grad()
            sequence_losses(model(x[:, :-1])[0], x[:, 1:]).mean().backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
        honest = grads[:honest_peers]
        parts = honest + [
            hostile(attack, grads[honest_peers + k], honest) for k in range(attackers)
        ]
        average, far = combine(parts, trust)
        if found is None and attackers and any(i >= honest_peers for i in far):
            found = step + 1
        honest_far += sum(i < honest_peers for i in far)
        offset = 0
        for p in params:
            p.grad = average[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 10 == 0:
            losses.append(mean_loss(model, held))
    return losses, found, honest_far


def demo_model() -> GPT:
    torch.manual_seed(0)
    return GPT(
        GPTConfig(
            vocab_size=256, seq_len=128, num_layers=4, num_heads=4, d_model=192, positions="rotary"
        )
    )


def cost(data: torch.Tensor, peers: int = 4, repeats: int = 10) -> list[str]:
    """What each rule costs: the median time to combine ``peers`` honest gradients of the
    whole model (the guard's checks included), against one peer's forward and backward
    pass of its batch. In a swarm each peer reduces 1/peers of the vector."""
    model = demo_model()
    params = list(model.parameters())
    grads, compute = [], []
    for peer in range(peers):
        x = data[peer * BATCH : (peer + 1) * BATCH]
        started = time.perf_counter()
        model.zero_grad()
        sequence_losses(model(x[:, :-1])[0], x[:, 1:]).mean().backward()
        compute.append(time.perf_counter() - started)
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
    step_s = sorted(compute)[len(compute) // 2]
    lines = [
        f"One peer's forward and backward pass of {BATCH} sequences: {step_s * 1000:.0f} ms "
        f"({sum(p.numel() for p in params):,} parameters). Combining {peers} peers' "
        f"gradients, median of {repeats}:",
        "",
        "| rule | ms for the whole vector | ms per reducer (1/4 of it) | per reducer, "
        "share of a peer's step |",
        "| --- | ---: | ---: | ---: |",
    ]
    for rule in RULES:
        trust = TrustSection(aggregation=rule)  # type: ignore[arg-type]
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            combine(grads, trust)
            times.append(time.perf_counter() - started)
        spent = sorted(times)[repeats // 2]
        lines.append(
            f"| {rule} | {spent * 1000:.1f} | {spent * 1000 / peers:.1f} | "
            f"{spent / peers / step_s:.1%} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) and a plot")
    parser.add_argument(
        "--cost-only", action="store_true", help="only time the rules (no training runs)"
    )
    args = parser.parse_args()
    files = sorted(glob.glob(f"{sysconfig.get_paths()['stdlib']}/**/*.py", recursive=True))
    random.Random(0).shuffle(files)
    data = sequences(files[:600], args.steps * 6 * BATCH + BATCH)
    held = sequences(files[700:760], 64)
    if args.cost_only:
        print("\n".join(cost(data)))
        return
    started = time.monotonic()
    curves: dict[tuple[str, str], list[float]] = {}
    rows = []
    baseline = None
    for attack in ATTACKS:
        for rule in RULES:
            losses, found, honest_far = run(rule, attack, args.steps, data, held)
            curves[(rule, attack)] = losses
            if baseline is None:
                baseline = losses[-1]  # all honest, the mean
            rows.append((attack, rule, losses[-1], found, honest_far))
            print(
                f"{attack:7} {rule:14} loss {losses[0]:.3f} -> {losses[-1]:.3f} "
                f"(x{losses[-1] / baseline:.3f}), found far at step {found}, honest parts "
                f"found far {honest_far}",
                flush=True,
            )
    assert baseline is not None
    lines = [
        f"Sync data parallel in one process, {args.steps} steps of {BATCH} sequences per "
        f"peer (4 peers, one hostile; sybils: 6 peers, two hostile), the demo's model; "
        f"validation loss on 64 held-out sequences ({time.monotonic() - started:.0f} s on "
        "this machine). Ratio: to the all-honest swarm under the mean.",
        "",
        "| attack | rule | val loss at the end | ratio to all-honest | attacker reported far "
        "from step | honest parts reported far |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for attack, rule, loss, found, honest_far in rows:
        lines.append(
            f"| {attack} | {rule} | {loss:.3f} | {loss / baseline:.3f} | "
            f"{'-' if found is None else found} | {honest_far} |"
        )
    lines += ["", *cost(data)]
    print("\n".join(lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        plot(curves, args.out.with_suffix(".png"))


def plot(curves: dict[tuple[str, str], list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RULES), figsize=(5 * len(RULES), 4), sharey=True)
    for ax, rule in zip(axes, RULES, strict=True):
        for attack in ATTACKS:
            losses = curves[(rule, attack)]
            ax.plot([10 * i for i in range(len(losses))], losses, label=attack)
        ax.set_title(f"aggregation = {rule}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0].set_ylabel("validation loss (nats)")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
