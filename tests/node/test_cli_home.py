"""Where ``crowdtrain-node`` keeps its identity: ``--home``, else ``$CROWDTRAIN_HOME`` (as the
notebook API reads it), else ``~/.crowdtrain``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.swarm import NODE


def _identity(*args: str, env: dict[str, str]) -> Path:
    """Run ``crowdtrain-node identity``; the key file it names."""
    result = subprocess.run(
        [NODE, "identity", *args], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("key file")]
    return Path(line.removeprefix("key file").strip())


def _env(tmp_path: Path, **variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CROWDTRAIN_HOME"}
    return {**env, "HOME": str(tmp_path / "user"), **variables}


def test_crowdtrain_home_holds_the_identity(tmp_path):
    home = tmp_path / "from-variable"
    env = _env(tmp_path, CROWDTRAIN_HOME=str(home))
    key = _identity(env=env)
    assert key == home / "identity.pem" and key.is_file()
    assert _identity(env=env) == key  # read back, not made again
    assert not (tmp_path / "user" / ".crowdtrain").exists()


def test_home_flag_wins_over_the_variable(tmp_path):
    flag = tmp_path / "from-flag"
    env = _env(tmp_path, CROWDTRAIN_HOME=str(tmp_path / "from-variable"))
    assert _identity("--home", str(flag), env=env) == flag / "identity.pem"
    assert (flag / "identity.pem").is_file()
    assert not (tmp_path / "from-variable").exists()


def test_without_either_the_home_folder_is_used(tmp_path):
    key = _identity(env=_env(tmp_path))
    assert key == tmp_path / "user" / ".crowdtrain" / "identity.pem" and key.is_file()
