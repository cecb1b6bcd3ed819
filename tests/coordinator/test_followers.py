"""The keeper's side of a round follower: its outbox is read with every file checked."""

from __future__ import annotations

from pathlib import Path

import torch

from crowdtrain.coordinator.swarm.followers import Followers
from crowdtrain.model import params_sha256, save_checkpoint


def _write(outbox: Path, round_: int, state: dict, sha256: str, run_id: str = "run") -> None:
    metadata = {"run_id": run_id, "step": str(round_), "params_sha256": sha256}
    save_checkpoint(outbox / f"round-{round_}.outer.safetensors", state, metadata)
    save_checkpoint(outbox / f"round-{round_}.safetensors", state, metadata)


def test_rounds_are_handed_over_checked_and_oldest_first(tmp_path: Path) -> None:
    followers = Followers(tmp_path, [])
    outbox = followers.outbox("run")
    outbox.mkdir(parents=True)
    good = {"w": torch.ones(3)}
    _write(outbox, 4, good, params_sha256(good))
    _write(outbox, 3, good, params_sha256(good))
    _write(outbox, 5, {"w": torch.zeros(3)}, params_sha256(good))  # says another hash
    _write(outbox, 6, good, params_sha256(good), run_id="other")  # another run's
    (outbox / "round-7.safetensors").write_bytes(b"garbage")

    rounds = followers.rounds("run")
    assert [r.round for r in rounds] == [3, 4]
    assert rounds[0].sha256 == params_sha256(good) and rounds[0].momentum is not None
    # What did not check is gone; what did stays until the keeper took it.
    left = sorted(p.name for p in outbox.iterdir() if not p.name.endswith(".outer.safetensors"))
    assert left == ["round-3.safetensors", "round-4.safetensors"]
    followers.taken("run", 3)
    assert [r.round for r in followers.rounds("run")] == [4]


def test_the_roster_is_written_where_the_follower_reads_it(tmp_path: Path) -> None:
    followers = Followers(tmp_path, [])
    followers.update_roster("run", [("12D3KooWA", 256.0), ("12D3KooWBanned", 0.0)])
    from crowdtrain.node.swarm.guard import GuardConfig

    config = GuardConfig(followers.guard("run"), 1.0)
    assert config.read_roster() == {"12D3KooWA": 256.0, "12D3KooWBanned": 0.0}
