"""A node's CPU priority: training yields to its owner's programs, as BOINC's work does.

A node starts at the priority it was given (joining is short and a newcomer should
be quick), and once it trains, :func:`yield_cpu` raises the nice value of the
training process's threads, so the owner's programs, and the node's own
averaging and networking helpers (other processes, left as they were), come
first whenever the CPU is busy. On an idle machine it trains as fast as before.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_NICE = 10  # what `crowdtrain-node join` uses unless told --nice
MAX_NICE = 19


def yield_cpu(nice: int) -> int:
    """Raise every thread of this process to nice value ``nice`` (0..19; never lowered:
    that needs privileges). Returns how many threads changed. Threads started later
    inherit it from the thread that starts them (Linux keeps a nice value per thread)."""
    if not 0 <= nice <= MAX_NICE:
        raise ValueError(f"a nice value is 0 to {MAX_NICE}, got {nice}")
    if nice == 0 or not hasattr(os, "setpriority"):
        return 0
    tasks = Path("/proc/self/task")
    ids = [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]
    changed = 0
    for tid in ids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                changed += 1
        except OSError:  # a thread that ended meanwhile
            continue
    if changed:
        logger.info("training at nice %d: the owner's programs come first on a busy CPU", nice)
    return changed


__all__ = ["DEFAULT_NICE", "MAX_NICE", "yield_cpu"]
