"""What every lab test needs: a machine that can build a lab (root, ``ip``, ``tc``,
``nft``). Where it cannot, a lab test skips with the reason, except under ``CI=true``,
where it fails instead (``.ci/run`` installs nftables and iproute2 and runs as root)."""

from __future__ import annotations

import os

import pytest

from lab import netns


@pytest.fixture
def lab_ready() -> None:
    reason = netns.unavailable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (required under CI=true)")
    pytest.skip(reason)
