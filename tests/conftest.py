from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.swarm import Swarm


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[Swarm]:
    """A coordinator and nodes as real processes; all reaped, pass or fail."""
    s = Swarm(root=tmp_path)
    try:
        yield s
    finally:
        s.stop_all()
