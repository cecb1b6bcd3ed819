"""The layout of a DiLoCo run's global state as it travels between processes.

A DiLoCo peer serves its global (outer) state through hivemind's download
RPC (:mod:`crowdtrain.node.swarm.diloco_state`) and the coordinator's keeper
downloads it (:mod:`crowdtrain.coordinator.swarm.keeper`): metadata
``{"round": r, "epoch": e, "layout": DILOCO_STATE_LAYOUT}``, where ``r`` is
the number of outer steps in the global parameters; tensors are the global
parameters in ``model.parameters()`` order, then the outer momentum buffers
in the same order (zeros before the first outer step). A peer takes the round,
parameters and momentum it serves in one snapshot, so one download is consistent.
Change the layout's name whenever the layout changes, so neither side misreads
the other's.
"""

from __future__ import annotations

DILOCO_STATE_LAYOUT = "diloco-v1"


def diloco_prefix(run_id: str) -> str:
    """The DHT prefix of a run's DiLoCo averagers: matchmaking, and under
    ``<prefix>.all_averagers`` each serving peer's round (its state-sharing priority)."""
    return f"{run_id}_diloco"


__all__ = ["DILOCO_STATE_LAYOUT", "diloco_prefix"]
