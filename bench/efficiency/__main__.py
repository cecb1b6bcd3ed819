"""``python -m bench.efficiency``: run the parts named by ``--parts`` and write the report."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import efficiency
from bench.efficiency import ROOT
from bench.efficiency.foreign_cpu import ForeignCpu
from bench.efficiency.parts import LOSS_MODES, PARTS, Bench, error_summary
from bench.efficiency.plan import FULL, QUICK
from bench.efficiency.report import write_report


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.efficiency",
        description=efficiency.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "efficiency.md")
    parser.add_argument("--quick", action="store_true", help="a few minutes, to debug the harness")
    parser.add_argument(
        "--rounds", type=int, default=None, help="diloco rounds of tokens (default 2; quick 1)"
    )
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated of {','.join(PARTS)}"
    )
    parser.add_argument(
        "--loss-modes",
        default=",".join(LOSS_MODES),
        help="the loss part's swarms, comma-separated (diloco-KIND: diloco with "
        "pseudo_grad_compression KIND); each replaces its own earlier result only",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--report-only", action="store_true", help="rebuild the markdown and plots")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep logs here (default: a temp dir)"
    )
    args = parser.parse_args()
    args.out = args.out.resolve()
    if args.report_only:
        write_report(json.loads(args.out.with_suffix(".json").read_text()), args.out)
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    # SIGTERM (make, a CI runner) unwinds like Ctrl-C, so every process group is stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    plan = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="crowdtrain-eff-") as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        bench = Bench(args, plan, work)
        bench.prepare()
        started = time.monotonic()
        for part in PARTS:
            if part not in parts:
                continue
            print(f"-- {part} ({time.monotonic() - started:.0f} s in)", flush=True)
            t0 = time.monotonic()
            # Other work on the machine skews every figure here; the 1-minute load says if any ran.
            load = os.getloadavg()[0]
            foreign = ForeignCpu()
            foreign.start()
            try:
                value = getattr(bench, f"part_{part}")()
            except Exception as e:
                traceback.print_exc()
                value = {"error": error_summary(e)}
            if isinstance(value, dict):
                value["part_s"] = round(time.monotonic() - t0, 1)
                value["load_before"] = round(load, 2)
                value["foreign_cpu_share"] = round(foreign.stop(), 3)
            bench.save(part, value)
            print(f"   {part}: {time.monotonic() - t0:.0f} s", flush=True)
        write_report(bench.results, args.out)
        print(f"efficiency bench took {time.monotonic() - started:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
