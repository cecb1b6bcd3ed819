"""The keeper keeps round 0 of a DiLoCo run without asking a volunteer for it: the round's
global parameters are the run's seeded initialization, and the keeper computes the very
same bytes a node's replica starts from."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from crowdtrain.coordinator.swarm import keeper
from crowdtrain.model import params_sha256
from crowdtrain.node.joining import phases
from crowdtrain.protocol.runspec import parse_spec
from tests.specs import small_spec


def test_round_0_is_the_replica_every_node_builds() -> None:
    spec = parse_spec(small_spec(run={"id": "seeded", "seed": 1234}, optimizer={"mode": "diloco"}))
    torch.manual_seed(99)  # whatever ran before: both seed from the run
    node = phases.build_replica(
        SimpleNamespace(
            micro_batch="auto", compile=False, hooks=SimpleNamespace(memory_cap_bytes=None)
        ),
        SimpleNamespace(spec=spec, device=torch.device("cpu")),
    )
    kept = keeper._seeded_model(SimpleNamespace(spec=spec))
    assert params_sha256(kept.state_dict()) == params_sha256(node.model.state_dict())
    # Another seed is another model: the comparison can fail.
    other = parse_spec(small_spec(run={"id": "seeded", "seed": 1235}, optimizer={"mode": "diloco"}))
    different = keeper._seeded_model(SimpleNamespace(spec=other))
    assert params_sha256(different.state_dict()) != params_sha256(node.model.state_dict())


def test_a_sync_follower_starts_after_a_node_came_and_before_the_first_checkpoint_is_due() -> None:
    """A sync run's follower costs the coordinator's machine a hivemind peer: without
    snapshots for spot checks it starts SYNC_FOLLOWER_LEAD_S before the first checkpoint
    is due, never before a node came; with them, when the first node came. A DiLoCo
    run's is always due (it keeps round 0 and may be the only reducer)."""
    verify = {"checkpoint_every_s": 60, "snapshot_fraction": 0.0}
    sync = SimpleNamespace(id="s", spec=parse_spec(small_spec(verify=verify)))
    diloco = SimpleNamespace(id="d", spec=parse_spec(small_spec(optimizer={"mode": "diloco"})))
    kept = object.__new__(keeper.Keeper)  # only its start policy, no store
    kept._peers_since = {}
    assert not kept._follower_due(sync, now=1000.0)  # no node yet
    assert kept._follower_due(diloco, now=1000.0)
    kept._peers_since["s"] = 1000.0
    lead = 60 - keeper.SYNC_FOLLOWER_LEAD_S
    assert not kept._follower_due(sync, now=1000.0 + lead - 1)
    assert kept._follower_due(sync, now=1000.0 + lead)
    quick = {"checkpoint_every_s": 3, "snapshot_fraction": 0.0}
    quick_run = SimpleNamespace(id="s", spec=parse_spec(small_spec(verify=quick)))
    assert kept._follower_due(quick_run, now=1000.0)  # checkpoints due sooner than the lead
    snapshots = SimpleNamespace(
        id="s", spec=parse_spec(small_spec(verify={"checkpoint_every_s": 60}))
    )
    assert kept._follower_due(snapshots, now=1000.0)  # the default: snapshots from the start
