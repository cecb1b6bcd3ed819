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
