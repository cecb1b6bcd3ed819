"""`make bench`: run every benchmark here and write BENCHMARKS.md.

Each benchmark is a script (``bench/NAME.py``) or a package run with ``python -m``
(``bench/NAME/``) that writes a markdown table to the path given by ``--out``;
this file adds the machine, the date and the command that made each figure.
Long runs live here, never in the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# (title, what it shows and the goal, script or package, extra arguments[, flags]); a "gpu"
# benchmark runs only with --device cuda, and otherwise its committed results are shown as
# they are; "as:NAME" names a second run of a script (its results go to NAME.md).
BENCHMARKS: list[tuple] = [
    (
        "Data wait per step",
        "Time a node spends getting its next micro-batch (shard switches, prefetch "
        "misses, batch assembly) as a share of its training time, two nodes on the "
        "bundled corpus with the demo's run spec. Goal: under 1%.",
        "data_wait.py",
        ["--seconds", "120"],
    ),
    (
        "prepare-data",
        "Throughput in MB of text per second (bytes and BPE) on the bundled corpus, and "
        "peak memory on a corpus 10x larger against the bundled one. Goal: under 1.5x.",
        "prepare_bench.py",
        [],
    ),
    (
        "Verification cost",
        "Coordinator CPU time per verified receipt (arrival checks, the keeper's "
        "checkpoints, spot checks) and the share of the run's compute spent on spot checks "
        "at the default rate, two nodes on the bundled corpus with the demo's run spec. "
        "Goal: under 2%. Also the sync keeper's drift (issue 13): its step follower averages "
        "every step with the nodes instead of pulling state.",
        "verification.py",
        ["--seconds", "150"],
    ),
    (
        "Verification cost, DiLoCo",
        "The same for the DiLoCo example's run: every receipt spot-checked with the losses "
        "each node samples at its rounds' global parameters, against the keeper's checkpoint "
        "of every round. Goal: every honest receipt verified, verified shares within 5% of "
        "the tokens trained.",
        "verification.py",
        ["--diloco", "--seconds", "240"],
        "as:verification-diloco",
    ),
    (
        "How soon a faker is caught",
        "Seeded runs of the real ledger and verifier on a real store: a peer faking every "
        "receipt or 10% of them (made-up losses near the run's loss level), at the default "
        "spot_check_fraction with probation. Goal (issue 14): a free rider caught within 3 "
        "shards.",
        "catch_rate.py",
        ["--runs", "200"],
    ),
    (
        "How soon a faker is caught, DiLoCo",
        "The same in a DiLoCo run, whose samples are checked within [verify] "
        "diloco_tolerance (their parameters are held bit for bit).",
        "catch_rate.py",
        ["--runs", "200", "--diloco"],
        "as:catch_rate-diloco",
    ),
    (
        "What a DiLoCo pseudo-gradient shows of its data",
        "Whether a gauntlet-style score (the loss an update removes on its peer's own data, "
        "less on held-out data) tells an honest update from a copied one, noise or an "
        "average, for the demo's model after one pass over a shard.",
        "gauntlet_signal.py",
        ["--inner-steps", "100", "--warmup", "150"],
    ),
    (
        "Robust aggregation against poisoned gradients",
        "Sync data parallel of the demo's model simulated in one process with the guard's "
        "checks and each [trust] aggregation rule, one hostile peer of four (sign flip x9.9, "
        "a little is enough, inner-product manipulation) or two of six: validation loss as a "
        "ratio to the all-honest swarm, when the attacker is first reported, and what the "
        "rule costs per step. Goal (issue 15): within 5% of the all-honest swarm.",
        "robust.py",
        ["--steps", "60"],
    ),
    (
        "Coordinator under load",
        "A real coordinator on a store holding 100,000 identities that once registered and "
        "1,000,000 evaluation rows: the latency of one heartbeat and of the run's page, and "
        "the heartbeats per second it holds at p99 under 50 ms from 200 active identities "
        "signing their own (client threads share the 2 cores). Goal (issue 14): the rate held "
        "at p99 under 50 ms with 10,000 or more identities registered, and a heartbeat's cost "
        "independent of them.",
        "coordinator_load.py",
        [],
    ),
    (
        "Training efficiency",
        "A swarm of real node processes on loopback against one process training alone and "
        "against plain hivemind: loss at equal tokens (4 peers, diloco with 8-bit, 4-bit and "
        "top-k pseudo-gradients, and sync), a peer's tokens/s in a 2-peer swarm against "
        "alone, every byte on a peer's uplink per million tokens, tokens/s against "
        "hivemind.Optimizer with its defaults and tuned to our timings, a late joiner's and "
        "a restarted node's start-up and a half-speed node's share of samples; the goals are "
        "in the table. About 40 minutes.",
        "efficiency",
        [],
    ),
    (
        "Model FLOPs utilisation",
        "MFU of one node's training step on a GPU (GPT-2 small shape, bf16 autocast), eager and "
        "torch.compile. Needs a CUDA GPU: `python bench/run.py --device cuda mfu`.",
        "mfu.py",
        ["--both"],
        "gpu",
    ),
]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return (
        f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {platform.system()} {platform.release()}"
    )


def _name(script: str, flags: list[str]) -> str:
    """A benchmark's name: its script's, or the one an "as:NAME" flag gives."""
    return next((f[3:] for f in flags if f.startswith("as:")), script.removesuffix(".py"))


def _fragment(path: Path) -> str:
    """A benchmark's markdown, less any heading of its own (this file titles it)."""
    lines = path.read_text().splitlines()
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    return "\n".join(lines) + "\n"


def main() -> int:
    """Run the benchmarks named on the command line (all by default) and rebuild
    BENCHMARKS.md from every benchmark's latest results.

    ``--reuse`` runs nothing and only rebuilds BENCHMARKS.md. ``--device cuda`` trains
    the efficiency bench's nodes on the GPU and runs the GPU-only benchmarks (MFU);
    without it those show their committed results.
    """
    names = [_name(script, flags) for _, _, script, _, *flags in BENCHMARKS]
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description=inspect.cleandoc(main.__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "only", nargs="*", metavar="NAME", help=f"run only these: {', '.join(names)}"
    )
    parser.add_argument("--reuse", action="store_true", help="run nothing; rebuild BENCHMARKS.md")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        # Without this, an unknown name ran nothing and rewrote BENCHMARKS.md.
        parser.error(f"no benchmark named {', '.join(unknown)}; choose from {', '.join(names)}")
    reuse, device, only = args.reuse, args.device, set(args.only)
    RESULTS.mkdir(parents=True, exist_ok=True)
    sections = []
    for title, about, script, extra, *flags in BENCHMARKS:
        name = _name(script, flags)
        out = RESULTS / f"{name}.md"
        gpu_only = "gpu" in flags
        if gpu_only or (device == "cuda" and name == "efficiency"):
            extra = [*extra, "--device", "cuda"]
        runner = [f"bench/{script}"] if script.endswith(".py") else ["-m", f"bench.{script}"]
        command = ["python", *runner, *extra, "--out", str(out.relative_to(ROOT))]
        took = ""
        skip = gpu_only and device != "cuda"
        if skip and out.exists():
            took = " (not run by this `make bench`: no `--device cuda`; committed results)"
        if not reuse and not skip and (not only or name in only):
            print(f"== {title}: {' '.join(command)}", flush=True)
            started = time.monotonic()
            subprocess.run([sys.executable, *command[1:]], cwd=ROOT, check=True)
            took = f" ({time.monotonic() - started:.0f} s)"
        if not out.exists():
            continue
        sections.append(f"## {title}\n\n{about}\n\n`{' '.join(command)}`{took}\n\n{_fragment(out)}")
    today = datetime.date.today().isoformat()
    text = (
        "# Benchmarks\n\n"
        f"Made by `make bench` on {today}.\n\nMachine: {machine()}.\n\n" + "\n".join(sections)
    )
    (ROOT / "BENCHMARKS.md").write_text(text)
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
