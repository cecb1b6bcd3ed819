"""How far the keeper's newest checkpoint trails the run, read from a coordinator's database.

For every metrics sample the coordinator took (``run_samples``: time and the
run's step), the newest checkpoint kept by then: how many steps it trails
and how old it is. In a DiLoCo run the follower keeps every round, so it
trails by the round being averaged at most; in a sync run the keeper pulls
every ``[verify] checkpoint_every_s``.

    python -m bench.keeper_drift demo-data/coordinator/coordinator.db --run stdlib-tiny
"""

from __future__ import annotations

import argparse
import bisect
import sqlite3
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Drift:
    samples: int
    max_steps: int
    median_steps: float
    max_age_s: float
    median_age_s: float

    def line(self) -> str:
        return (
            f"{self.samples} samples: the newest checkpoint trailed the run by at most "
            f"{self.max_steps} steps (median {self.median_steps:g}) and was at most "
            f"{self.max_age_s:.1f} s old (median {self.median_age_s:.1f} s)"
        )


def keeper_drift(db_path: Path, run_id: str) -> Drift | None:
    """The drift over the samples taken once the first checkpoint was kept (None: none)."""
    db = sqlite3.connect(db_path)
    try:
        kept = db.execute(
            "SELECT created_at, step FROM checkpoints WHERE run_id = ? ORDER BY created_at",
            (run_id,),
        ).fetchall()
        samples = db.execute(
            "SELECT time, step FROM run_samples WHERE run_id = ? ORDER BY time", (run_id,)
        ).fetchall()
    finally:
        db.close()
    times = [t for t, _ in kept]
    steps_behind, ages = [], []
    newest_step = -1
    for at, step in samples:
        index = bisect.bisect_right(times, at) - 1
        if index < 0:
            continue
        newest_step = max(s for _, s in kept[: index + 1])
        steps_behind.append(max(0, step - newest_step))
        ages.append(at - times[index])
    if not steps_behind:
        return None
    return Drift(
        len(steps_behind),
        max(steps_behind),
        statistics.median(steps_behind),
        max(ages),
        statistics.median(ages),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", type=Path, help="the coordinator's coordinator.db")
    parser.add_argument("--run", required=True)
    args = parser.parse_args()
    drift = keeper_drift(args.db, args.run)
    print(drift.line() if drift is not None else "no sample after the first checkpoint")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
