"""A training node yields the CPU: every thread of its process at the nice value asked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from crowdtrain.node.cli import main
from crowdtrain.node.device.priority import yield_cpu

SCRIPT = textwrap.dedent(
    """
    import json, os, threading
    from crowdtrain.node.device.priority import yield_cpu
    release = threading.Event()
    early = threading.Thread(target=release.wait)  # started before: must change too
    early.start()
    changed = yield_cpu(7)
    late = threading.Thread(target=release.wait)  # started after: inherits it
    late.start()
    tids = [int(t) for t in os.listdir("/proc/self/task")]
    nice = lambda: sorted({os.getpriority(os.PRIO_PROCESS, t) for t in tids})
    after = nice()
    yield_cpu(3)  # never lowered again
    print(json.dumps({"changed": changed, "threads": len(tids), "after": after, "again": nice()}))
    release.set()
    """
)


def test_every_thread_of_the_process_yields_and_is_never_raised_again():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    seen = json.loads(out)
    assert seen["changed"] == 2, seen  # the main thread and the early one
    assert seen["threads"] == 3, seen
    assert seen["after"] == [7], seen
    assert seen["again"] == [7], seen


def test_a_nice_value_out_of_range_is_refused_with_what_to_give(capsys):
    with pytest.raises(ValueError, match="0 to 19"):
        yield_cpu(20)
    with pytest.raises(SystemExit):
        main(["join", "http://127.0.0.1:1", "--run", "r", "--nice", "-5"])
    assert "is not a nice value: give 0" in capsys.readouterr().err
