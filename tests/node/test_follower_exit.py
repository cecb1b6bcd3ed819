"""A round or step follower never outlives its coordinator, even when its own exit hangs.

Five followers were found two hours after their coordinator had asked them to stop (their
clean exit hung in hivemind's shutdown) and had itself been killed before it killed them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

# A follower's last moments: its helper (as hivemind's forks and p2pd are, in its process
# group), the deadline thread, then a main thread that never finishes.
SCRIPT = """
import os, subprocess, sys, threading, time
from crowdtrain.node.swarm.follower import exit_deadline
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(helper.pid, flush=True)
stop = threading.Event()
gone = sys.argv[1] == "parent-gone"
parent = os.getppid() + 1_000_000 if gone else os.getppid()
threading.Thread(target=exit_deadline, args=(parent, stop, 1.0), daemon=True).start()
if not gone:
    stop.set()  # asked to stop (SIGTERM), and the clean exit hangs
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("why", ["asked-to-stop", "parent-gone"])
def test_a_follower_whose_exit_hangs_ends_itself_and_its_helpers(why: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, why],
        stdout=subprocess.PIPE,
        text=True,
        process_group=0,  # the keeper starts each follower as its group's leader
    )
    try:
        assert process.stdout is not None
        helper = int(process.stdout.readline())
        assert process.wait(timeout=20) == 1
        deadline = time.monotonic() + 5
        while _alive(helper) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(helper), "the follower's helper outlived it"
    finally:
        try:
            os.killpg(process.pid, 9)
        except ProcessLookupError:
            pass
        process.wait()
