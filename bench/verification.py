"""What checking receipts costs the coordinator, and what spot checks cost the run.

Starts a real coordinator (with its verifier and keeper) and two real nodes
on the bundled corpus with the demo's run spec, lets them train for a fixed
time, and reads the ledger's own account of its CPU time: checking receipts
as they arrive, the keeper's checkpoints, and the spot checks. So that a
short run measures enough spot checks, every receipt is spot-checked and the
keeper keeps a checkpoint every 15 s; the share at the default fraction is
scaled from it. It also states the sync keeper's drift: how many steps and
seconds its newest checkpoint trailed the run, how far the nodes' claimed losses
were from the ones its checkpoints give (the parameters' drift, as the
verifier sees it), and what its step follower cost the volunteers.

    python bench/verification.py --seconds 150 --out bench/results/verification.md
    python bench/verification.py --diloco --seconds 240 --out bench/results/verification-diloco.md

With ``--diloco`` the run is the DiLoCo example's: receipts are spot-checked with the
losses each node samples at its rounds' global parameters, against the keeper's
checkpoint of every round.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.keeper_drift import keeper_drift  # noqa: E402
from crowdtrain.node.device.priority import DEFAULT_NICE  # noqa: E402
from tests.swarm import Swarm  # noqa: E402

RUN_ID = "stdlib-tiny"
DILOCO_RUN_ID = "stdlib-diloco"
FRACTION = 1.0
DEFAULT_FRACTION = 0.1  # protocol.runspec.VerifySection's default


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--shard-tokens", type=int, default=16_384)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keep", type=Path, help="run in this folder and leave it there")
    parser.add_argument(
        "--strict-steps", action="store_true", help="the run's [swarm] strict_steps = true"
    )
    parser.add_argument("--diloco", action="store_true", help=f"the run of {DILOCO_RUN_ID}.toml")
    args = parser.parse_args()
    run_id = DILOCO_RUN_ID if args.diloco else RUN_ID
    with tempfile.TemporaryDirectory(prefix="crowdtrain-bench-") as scratch:
        tmp = str(args.keep or scratch)
        Path(tmp).mkdir(parents=True, exist_ok=True)
        swarm = Swarm(root=Path(tmp))
        try:
            data = swarm.prepare(shard_tokens=args.shard_tokens)
            spec = Path(tmp) / "spec.toml"
            text = (ROOT / "examples" / f"{run_id}.toml").read_text()
            if args.strict_steps:
                text = text.replace("[swarm]\n", "[swarm]\nstrict_steps = true\n", 1)
            spec.write_text(
                text + f"\n[verify]\ncheckpoint_every_s = 15.0\nspot_check_fraction = {FRACTION}\n"
            )
            published = swarm.publish(spec, data)
            assert published.returncode == 0, published.stderr
            swarm.start_coordinator()
            nodes = [
                swarm.start_node(
                    name,
                    *("--max-seconds", str(args.seconds), "--nice", str(DEFAULT_NICE)),
                    run_id=run_id,
                )
                for name in ("node-a", "node-b")
            ]
            for node in nodes:
                node.wait(timeout=args.seconds + 300)
            # each node's last status line: what its uplink carried, state included
            uplinks = [re.findall(r"\| up [^|]*\)", node.output())[-1:] for node in nodes]
            # Let the last receipts meet their DHT evidence and queued spot checks run.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                ledger = swarm.get(f"/api/runs/{run_id}/ledger")
                waiting = [r for r in ledger["receipts"] if r.get("status") == "pending"]
                if not waiting:
                    break
                time.sleep(2)
            board = swarm.get(f"/api/runs/{run_id}/leaderboard")
            drift = keeper_drift(swarm.coord_dir / "coordinator.db", run_id)
            follower = json.loads(
                (swarm.coord_dir / "followers" / run_id / "outbox" / "stats.json").read_text()
            )
        finally:
            swarm.stop_all()
    costs = ledger["costs"]
    statuses: dict[str, int] = {}
    for receipt in ledger["receipts"]:
        statuses[receipt.get("status", "?")] = statuses.get(receipt.get("status", "?"), 0) + 1

    def ms(key: str) -> str:
        value = costs.get(key)
        return "n/a" if value is None else f"{1000 * value:.2f} ms"

    def pct(value: float | None, scale: float = 1.0) -> str:
        return "n/a" if value is None else f"{100 * value * scale:.4f}%"

    share = costs.get("spot_check_share")
    lines = [
        f"Two nodes, one thread each, {args.seconds:.0f} s of training on shards of "
        f"{args.shard_tokens:,} tokens; every receipt spot-checked, a checkpoint every 15 s; "
        f"{'DiLoCo' if args.diloco else 'sync'}, "
        f"strict_steps = {'true' if args.strict_steps else 'false'}.",
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| receipts | {costs['num_receipts']} "
        f"({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}) |",
        f"| spot checks run | {costs['num_spot_checks']} |",
        f"| keeper checkpoints | {costs['num_checkpoints']} |",
        f"| CPU per receipt checked on arrival | {ms('assess_cpu_s_per_receipt')} |",
        f"| CPU per spot check | {ms('cpu_s_per_spot_check')} |",
        "| coordinator CPU per verified receipt (checks, spot checks, keeper) "
        f"| {ms('cpu_s_per_verified_receipt')} |",
        "| spot checks' CPU time against the nodes' device time, every receipt checked "
        f"| {pct(share)} |",
        f"| same at the default fraction ({DEFAULT_FRACTION}) "
        f"| {pct(share, DEFAULT_FRACTION / FRACTION)} |",
        "",
        "| peer | verified tokens | verified share | share of the tokens trained (receipts) "
        "| rejected | flagged |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    trained = sum(row["num_tokens"] for row in board) or 1
    for row in board:
        lines.append(
            f"| {row['name']} | {row['verified_tokens']:,} | {row['verified_share']:.1%} "
            f"| {row['num_tokens'] / trained:.1%} | {row['num_rejected']} "
            f"| {row.get('flagged') or '-'} |"
        )
    gaps = [
        float(m.group(1))
        for r in ledger["receipts"]
        if (m := re.search(r"within ([0-9.e+-]+) of", r["checks"].get("spot_reason") or ""))
    ]
    spreads = [
        float(m.group(1))
        for r in ledger["receipts"]
        if (
            m := re.search(
                r"([0-9.e+-]+) apart", r["checks"].get("spot_reason") or r["reason"] or ""
            )
        )
    ]
    no_checkpoint = sum(
        "no checkpoint of its steps" in (r["checks"].get("spot_reason") or "")
        for r in ledger["receipts"]
    )
    on_snapshots = sum(
        "with a private snapshot" in (r["checks"].get("spot_reason") or "")
        for r in ledger["receipts"]
    )
    traffic = follower.get("traffic", {})

    def mb(purpose: str, way: str) -> str:
        return f"{traffic.get(purpose, {}).get(way, 0) / 1e6:.1f} MB"

    lines += [
        "",
        "The keeper's drift (its follower averages every step or round with weight 0; "
        "sync parameters are written every 15 s here, every DiLoCo round is kept):",
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| newest checkpoint behind the run | {'n/a' if drift is None else drift.line()} |",
        "| spot-checked losses: claimed against the keeper's checkpoint, largest gap "
        f"| {'n/a' if not gaps else f'{max(gaps):.2g} nats (median {statistics.median(gaps):.2g}, {len(gaps)} checks)'} |",
        "| the same differences: how far they lie from their mean, largest "
        f"| {'n/a' if not spreads else f'{max(spreads):.2g} nats (median {statistics.median(spreads):.2g}, {len(spreads)} checks)'} |",
        f"| spot checks passed on the follower's private snapshots | {on_snapshots} |",
        "| spot checks no snapshot or checkpoint could recompute (receipt not credited) "
        f"| {no_checkpoint} |",
        f"| steps or rounds followed / missed / loaded from a peer | {follower.get('followed')} / "
        f"{follower.get('missed')} / {follower.get('loaded')} |",
        f"| the follower's averaging traffic (sent / received) | {mb('averaging', 'sent')} / "
        f"{mb('averaging', 'received')} |",
        f"| state volunteers uploaded to it (received) | {mb('state', 'received')} |",
    ]
    for name, uplink in zip(("node-a", "node-b"), uplinks, strict=True):
        status = uplink[0].strip("| ") if uplink else "n/a"
        lines.append(f"| {name}'s uplink over the run | {status} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
