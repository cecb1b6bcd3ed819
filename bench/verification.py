"""What checking receipts costs the coordinator, and what spot checks cost the run.

Starts a real coordinator (with its verifier and keeper) and two real nodes
on the bundled corpus with the demo's run spec and its default ``[verify]``
settings, lets them train for a fixed time, and reads the ledger's own
account of its CPU time: checking receipts as they arrive, the keeper's
state downloads, and the spot checks.

    python bench/verification.py --seconds 150 --out bench/results/verification.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.swarm import Swarm  # noqa: E402

RUN_ID = "stdlib-tiny"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--shard-tokens", type=int, default=16_384)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="crowdtrain-bench-") as tmp:
        swarm = Swarm(root=Path(tmp))
        try:
            data = swarm.prepare(shard_tokens=args.shard_tokens)
            published = swarm.publish(ROOT / "examples" / f"{RUN_ID}.toml", data)
            assert published.returncode == 0, published.stderr
            swarm.start_coordinator()
            nodes = [
                swarm.start_node(name, "--max-seconds", str(args.seconds), run_id=RUN_ID)
                for name in ("node-a", "node-b")
            ]
            for node in nodes:
                node.wait(timeout=args.seconds + 300)
            # Let the last receipts meet their DHT evidence and queued spot checks run.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                ledger = swarm.get(f"/api/runs/{RUN_ID}/ledger")
                waiting = [r for r in ledger["receipts"] if r.get("status") == "pending"]
                if not waiting:
                    break
                time.sleep(2)
            spec = swarm.get(f"/api/runs/{RUN_ID}")["spec"]["verify"]
            board = swarm.get(f"/api/runs/{RUN_ID}/leaderboard")
        finally:
            swarm.stop_all()
    costs = ledger["costs"]
    statuses: dict[str, int] = {}
    for receipt in ledger["receipts"]:
        statuses[receipt.get("status", "?")] = statuses.get(receipt.get("status", "?"), 0) + 1
    lines = [
        f"Two nodes, one thread each, {args.seconds:.0f} s of training on shards of "
        f"{args.shard_tokens:,} tokens; default [verify]: a checkpoint every "
        f"{spec['checkpoint_every_s']:.0f} s, {spec['spot_check_fraction']:.0%} of receipts "
        "spot-checked.",
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| receipts | {costs['num_receipts']} ({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}) |",  # noqa: E501
        f"| spot checks run | {costs['num_spot_checks']} |",
        f"| keeper checkpoints | {costs['num_checkpoints']} |",
        f"| CPU per receipt checked on arrival | {1000 * costs['assess_cpu_s_per_receipt']:.2f} ms |",  # noqa: E501
        f"| CPU per spot check | {1000 * costs['cpu_s_per_spot_check']:.1f} ms |",
        f"| coordinator CPU per verified receipt (checks, spot checks, keeper) | {costs['cpu_s_per_verified_receipt']:.3f} s |",  # noqa: E501
        f"| spot checks' share of the run's compute (CPU time against device time) | {100 * costs['spot_check_share']:.4f}% |",  # noqa: E501
        f"| same, by FLOPs, at the default fraction | {100 * costs['spot_check_flops_share_at_default_fraction']:.4f}% |",  # noqa: E501
        "",
        "| peer | verified tokens | verified share | rejected | flagged |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for row in board:
        lines.append(
            f"| {row['name']} | {row['verified_tokens']:,} | {row['verified_share']:.1%} "
            f"| {row['num_rejected']} | {row.get('flagged') or '-'} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
