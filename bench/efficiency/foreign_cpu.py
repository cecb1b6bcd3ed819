"""Whether the machine was the bench's own: CPU time used by processes it did not start.

Every figure assumes the bench has the machine to itself; a part records the
share of CPU that other work took while it ran.
"""

from __future__ import annotations

import os
import threading
import time


class ForeignCpu:
    """Share of the machine's CPU used by processes this bench did not start.

    Every figure here assumes the bench has the machine to itself; this says
    when it did not (tests or builds running beside it). A process is ours
    when its session is this process's or was started by this process (every
    peer gets its own session, whose leader's parent is us).
    """

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self.own_pid = os.getpid()
        self.own_sids = {os.getsid(0)}
        self.foreign_s = 0.0
        self.wall_s = 0.0
        self._last: dict[int, float] = {}
        self._last_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick = os.sysconf("SC_CLK_TCK")

    def _read(self) -> dict[int, tuple[int, int, float]]:
        """pid -> (ppid, session, cpu seconds) of every process."""
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # fields[0] is the state: ppid, pgrp, session, ... utime is field 14, stime 15.
            out[int(entry)] = (
                int(fields[1]),
                int(fields[3]),
                (int(fields[11]) + int(fields[12])) / self._tick,
            )
        return out

    def sample(self) -> None:
        procs = self._read()
        for pid, (ppid, sid, _) in procs.items():
            if pid == sid and ppid == self.own_pid:
                self.own_sids.add(sid)
        now = time.monotonic()
        foreign = {pid: cpu for pid, (_, sid, cpu) in procs.items() if sid not in self.own_sids}
        if self._last_at:
            self.foreign_s += sum(cpu - self._last.get(pid, 0.0) for pid, cpu in foreign.items())
            self.wall_s += now - self._last_at
        self._last, self._last_at = foreign, now

    def share(self) -> float:
        """Foreign CPU seconds per second of wall time, as a share of all cores."""
        return self.foreign_s / max(self.wall_s, 1e-9) / (os.cpu_count() or 1)

    def start(self) -> None:
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True, name="foreign-cpu")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def stop(self) -> float:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sample()
        return self.share()
