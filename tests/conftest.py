from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.swarm import Swarm


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[Swarm]:
    """A coordinator and nodes as real processes; all reaped, pass or fail."""
    s = Swarm(root=tmp_path)
    try:
        yield s
    finally:
        # The test is over: a node still in a step would wait a whole averaging timeout
        # for a group before leaving politely, and nothing checks how it leaves here.
        s.stop_all()


@pytest.fixture(autouse=True, scope="session")
def reap_children() -> Iterator[None]:
    """Whatever is still running when the session ends is killed: a process a fixture
    could not stop, or one that left its group (every test stops its own; this is the
    net under them, as hivemind's own test suite keeps)."""
    yield
    # Not torch's shared-memory manager (hivemind shares tensors through files): freeing a
    # shared tensor at exit after it died threw 'std::system_error: Broken pipe' and
    # aborted the interpreter, and the run's summary with it (make test's swarm phase). It
    # ends by itself once its clients are gone.
    children = [
        c for c in psutil.Process().children(recursive=True) if _name(c) != "torch_shm_manager"
    ]
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=10)


def _name(process: psutil.Process) -> str | None:
    try:
        return process.name()
    except psutil.Error:
        return None
