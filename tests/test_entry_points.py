"""Both command lines run as ``python -m crowdtrain.X`` as well as by their console script,
and say which crowdtrain they are."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from crowdtrain.protocol import version as version_module


@pytest.mark.parametrize("package", ["node", "coordinator"])
def test_python_m_runs_the_command_line(package):
    command = [sys.executable, "-m", f"crowdtrain.{package}"]
    shown = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    expected = importlib.metadata.version("crowdtrain")
    assert shown.stdout.strip() == f"crowdtrain-{package} {expected}"
    helped = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(f"usage: crowdtrain-{package} ")


def test_a_source_tree_without_metadata_reports_an_unknown_version(monkeypatch):
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(version_module, "version", missing)
    assert version_module.crowdtrain_version() == "0+unknown"
