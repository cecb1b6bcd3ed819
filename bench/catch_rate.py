"""How soon the ledger catches a peer that fakes part of its work, over seeded runs.

Each run is the real ledger on a real store: a published run, a checkpoint, the
coordinator's LeaseBook, Ledger (arrival checks, the spot-check draw, probation)
and the verifier's SpotChecker, with one peer whose DHT evidence backs every
receipt. The peer reports its shards one after another; each receipt is faked
with probability ``--fake`` (losses made up within 0.3 nats of the run's loss level,
the mean of the other receipts' honest losses so far, as a faker could read it
from the run's public validation loss; no forward pass), else honest (the losses the checkpoint gives). A run ends
when a receipt is rejected (caught) or after ``--shards`` receipts. Two kinds of
peer: one that fakes from its first receipt (a new identity), and one that first
passes probation honestly and fakes from then on. Every fake that is spot-checked
here has a checkpoint to be checked with: in a real run a few honest-looking
receipts have none (2 of 29 in the verification bench) and are not credited
instead of caught, which lowers the catch rate by that share.

    python bench/catch_rate.py --runs 200 --out bench/results/catch_rate.md
    python bench/catch_rate.py --runs 200 --diloco --out bench/results/catch_rate-diloco.md
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from crowdtrain.coordinator.ledger.ledger import REJECTED, Ledger  # noqa: E402
from crowdtrain.coordinator.ledger.verifier import SpotChecker, Verifier  # noqa: E402
from crowdtrain.coordinator.runs.leases import LeaseBook  # noqa: E402
from crowdtrain.coordinator.store import Store  # noqa: E402
from crowdtrain.coordinator.swarm.checkpoints import CHECKPOINTS_DIR  # noqa: E402
from crowdtrain.coordinator.swarm.dht import ProgressHistory  # noqa: E402
from crowdtrain.protocol.messages import ReceiptPayload  # noqa: E402
from crowdtrain.protocol.shards import (  # noqa: E402
    num_windows,
)
from tests.coordinator.ledger_support import (  # noqa: E402
    MICRO_BATCH,
    SEQ_LEN,
    STEP,
    Peer,
    honest_losses,
    prepare_small_data,
    publish_run,
    write_checkpoint,
)
from tests.specs import TINY_DILOCO  # noqa: E402


def one_run(
    data: Path, folder: Path, seed: int, args: argparse.Namespace, honest_first: int
) -> int | None:
    """The receipt (1-based, counted from the first fake one could send) at which the peer
    is caught, or None."""
    store = Store(folder / "coordinator")
    try:
        run = publish_run(
            store,
            data,
            folder,
            f"catch-{seed}",
            args.fraction,
            optimizer=TINY_DILOCO if args.diloco else None,
            probation_checks=args.probation,
        )
        model = write_checkpoint(store, run, STEP, seed=seed)
        history = ProgressHistory()
        rng = random.Random(seed)
        ledger = Ledger(store, history, random.Random(seed + 1))
        verifier = Verifier(
            store,
            None,
            SpotChecker(store, store.data_dir / CHECKPOINTS_DIR, random.Random(seed + 2)),
        )
        book = LeaseBook(store)
        peer = Peer(store, run, history, name="faker")
        base = time.time()
        run_level, levels = 0.0, 0
        for i in range(honest_first + args.shards):
            (lease,) = book.grant(run, peer.session, 1)
            entry = next(s for s in run.manifest.train_shards if s.id == lease.shard_id)
            honest = honest_losses(run, lease.shard_id, 0, model, epoch=lease.epoch)
            fake = i >= honest_first and rng.random() < args.fake
            level = run_level / max(1, levels) if levels else 5.5
            losses = [round(level + rng.uniform(-0.3, 0.3), 5) for _ in honest] if fake else honest
            run_level, levels = run_level + sum(honest) / len(honest), levels + 1
            start = base + 20.0 * i
            peer.publish_progress(start, start + 10)
            num_sequences = num_windows(entry.num_tokens, SEQ_LEN) // MICRO_BATCH * MICRO_BATCH
            payload = ReceiptPayload(
                shard_id=lease.shard_id, epoch=lease.epoch, num_sequences=num_sequences,
                num_tokens=num_sequences * SEQ_LEN, loss_sum=level * num_sequences,
                started=start, finished=start + 10, micro_batch_size=MICRO_BATCH,
                samples=[{"step": STEP, "batch": 0, "losses": losses}],
            )  # fmt: skip
            book.complete(run, peer.session, payload)
            ledger.assess(
                run, peer.session, payload, sent_at=start + 10.5, received_at=start + 10.5
            )
            verifier.run_spot_checks(time.time())
            row = store.get_receipt_check(run.id, peer.session.peer_id, lease.shard_id, lease.epoch)
            if row is not None and row["status"] == REJECTED:
                if not fake:
                    raise AssertionError(f"honest receipt {i} rejected: {row['reason']}")
                return i - honest_first + 1
        return None
    finally:
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--shards", type=int, default=100, help="receipts per run, at most")
    parser.add_argument("--fake", type=float, default=0.1, help="share of receipts faked")
    parser.add_argument("--fraction", type=float, default=0.1, help="[verify] spot_check_fraction")
    parser.add_argument("--probation", type=int, default=3, help="[verify] probation_checks")
    parser.add_argument(
        "--diloco", action="store_true", help="a DiLoCo run ([verify] diloco_tolerance applies)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # each caught receipt logs why
    lines = [
        f"{args.runs} seeded runs per row; a peer fakes each receipt with probability "
        f"{args.fake} (made-up losses); {'DiLoCo' if args.diloco else 'sync'} run, "
        f"spot_check_fraction {args.fraction}, "
        f"probation_checks {args.probation}. Caught: a receipt rejected.",
        "",
        "| peer | caught within 1 | 3 | 10 | 30 | 100 receipts (from its first) | median |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="crowdtrain-catch-") as tmp:
        data = prepare_small_data(Path(tmp))
        kinds = (
            ("fakes every receipt, new identity", 0, 1.0),
            (f"fakes {args.fake:.0%}, new identity", 0, args.fake),
            (
                f"fakes {args.fake:.0%} after {args.probation} honest receipts",
                args.probation,
                args.fake,
            ),
        )
        for row, (label, honest_first, fake) in enumerate(kinds):
            caught = []
            run_args = argparse.Namespace(**{**vars(args), "fake": fake})
            for seed in range(args.runs):
                folder = Path(tmp) / f"{row}-{seed}"
                folder.mkdir()
                caught.append(one_run(data, folder, seed, run_args, honest_first))
                print(
                    f"\r{label}: {seed + 1}/{args.runs} ({time.monotonic() - started:.0f} s)",
                    end="",
                    flush=True,
                )
            print()

            def within(n: int, caught: list[int | None] = caught) -> str:
                return f"{sum(c is not None and c <= n for c in caught) / len(caught):.0%}"

            found = sorted(c if c is not None else 10**9 for c in caught)
            median = found[len(found) // 2]
            lines.append(
                f"| {label} | {within(1)} | {within(3)} | {within(10)} | {within(30)} "
                f"| {within(100)} | {median if median < 10**9 else f'> {args.shards}'} |"
            )
    lines += ["", f"({time.monotonic() - started:.0f} s on this machine)"]
    print("\n".join(lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
