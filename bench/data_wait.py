"""How long a node waits for data, as a share of its training time.

Starts a real coordinator and two real nodes on the bundled corpus (the
demo's run spec) for a fixed time and reads each node's own account, which
it prints when it leaves: time spent getting the next micro-batch (shard
switches, prefetch misses, batch assembly) against time spent training.

    python bench/data_wait.py --seconds 120 --out bench/results/data_wait.md
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.swarm import Swarm  # noqa: E402

_LEFT = re.compile(
    r"left run \S+: ([\d,]+) tokens trained, step (\d+), data wait ([\d.]+)s of ([\d.]+)s"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--shard-tokens", type=int, default=16_384)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="crowdtrain-bench-") as tmp:
        swarm = Swarm(root=Path(tmp))
        try:
            # Small shards, so each node switches shards every few seconds and the
            # prefetch is exercised, not only batch assembly.
            data = swarm.prepare(shard_tokens=args.shard_tokens)
            published = swarm.publish(ROOT / "examples" / "stdlib-tiny.toml", data)
            assert published.returncode == 0, published.stderr
            swarm.start_coordinator()
            nodes = [
                swarm.start_node(name, "--max-seconds", str(args.seconds), run_id="stdlib-tiny")
                for name in ("node-a", "node-b")
            ]
            rows = []
            for node in nodes:
                node.wait(timeout=args.seconds + 300)
                match = _LEFT.search(node.output())
                if match is None:
                    raise SystemExit(f"{node.name} did not report:\n{node.output()[-2000:]}")
                tokens, step, wait_s, train_s = match.groups()
                shards = node.output().count("accepted")
                rows.append((node.name, tokens, int(step), shards, float(wait_s), float(train_s)))
        finally:
            swarm.stop_all()
    lines = [
        f"Shards of {args.shard_tokens:,} tokens; each node trained for {args.seconds:.0f} s.",
        "",
        "| node | tokens | steps | shards completed | data wait | training time | share |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, tokens, step, shards, wait_s, train_s in rows:
        lines.append(
            f"| {name} | {tokens} | {step} | {shards} | {wait_s:.2f} s | {train_s:.1f} s "
            f"| {100 * wait_s / train_s:.2f}% |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
