"""Judging a DiLoCo round's result against the node's own round (node/swarm/round_judge.py).

The held-out loss here is a quadratic bowl around known parameters, so which
candidate is worse is known exactly; the judge's real loss (a model on held-out
sequences) is exercised by tests/e2e/test_adversarial.py.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from crowdtrain.node.swarm.guard import LOSS_MARGIN, SwarmGuard
from crowdtrain.node.swarm.round_judge import RoundJudge, contributors, own_pseudo_gradient
from crowdtrain.node.swarm.rounds import after_outer_step, outer_optimizer, outer_step
from crowdtrain.protocol.runspec import OptimizerSection

SPEC = OptimizerSection(
    target_batch_size=8, mode="diloco", outer_lr=0.7, outer_momentum=0.9, outer_nesterov=True
)
TARGET = {"w": torch.full((64,), 1.0), "b": torch.full((8,), -1.0)}
NAMES = ("w", "b")


def named(tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(zip(NAMES, tensors, strict=True))


def bowl(state: dict[str, torch.Tensor]) -> float:
    return sum(float((state[k] - TARGET[k]).pow(2).mean()) for k in NAMES)


def judge_of(
    tmp_path: Path, global_params: list[torch.Tensor]
) -> tuple[RoundJudge, torch.optim.SGD]:
    guard = SwarmGuard(tmp_path / "guard", 8)
    guard.heldout_loss = bowl
    outer = outer_optimizer(global_params, SPEC)
    return RoundJudge(guard, outer, global_params, SPEC, named, threading.Lock()), outer


def start() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(64, generator=generator), torch.randn(8, generator=generator)]


def toward_target(global_params: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """Local parameters at a round's end: ``fraction`` of the way to the bowl's bottom."""
    return [g + fraction * (TARGET[k] - g) for g, k in zip(global_params, NAMES, strict=True)]


def test_a_rounds_result_is_computed_on_copies_bit_for_bit() -> None:
    """The judged result is the outer step the round then applies, bit for bit with the
    Nesterov momentum of earlier rounds, and computing it leaves the global parameters
    and the momentum alone."""
    global_params = start()
    outer = outer_optimizer(global_params, SPEC)
    outer_step(outer, global_params, [torch.full_like(g, 0.1) for g in global_params])
    average = [torch.randn_like(g) for g in global_params]
    before = [g.clone() for g in global_params]
    momentum = [outer.state[g]["momentum_buffer"].clone() for g in global_params]

    candidate = after_outer_step(outer, global_params, average, SPEC)

    for g, b, m in zip(global_params, before, momentum, strict=True):
        assert torch.equal(g, b)
        assert torch.equal(outer.state[g]["momentum_buffer"], m)
    outer_step(outer, global_params, average)
    for g, c in zip(global_params, candidate, strict=True):
        assert torch.equal(g, c)


def test_a_flipped_average_is_refused_and_an_honest_one_taken(tmp_path: Path) -> None:
    global_params = start()
    judge, _ = judge_of(tmp_path, global_params)
    own = own_pseudo_gradient(global_params, toward_target(global_params, 0.3))
    other = own_pseudo_gradient(global_params, toward_target(global_params, 0.25))
    flipped = [-9.9 * o for o in other]

    assert judge.average_problem(own, own) is None  # a node alone never refuses
    honest = [(a + b) / 2 for a, b in zip(own, other, strict=True)]
    assert judge.average_problem(honest, own) is None
    problem = judge.average_problem([(a + b) / 2 for a, b in zip(own, flipped, strict=True)], own)
    assert problem is not None and "our own pseudo-gradient" in problem
    # judging changed nothing
    assert all(torch.equal(g, s) for g, s in zip(global_params, start(), strict=True))


def test_the_margin_is_relative_to_our_own_round(tmp_path: Path) -> None:
    """A state a little worse than our round passes; more than LOSS_MARGIN worse does not."""
    global_params = start()
    judge, outer = judge_of(tmp_path, global_params)
    own = own_pseudo_gradient(global_params, toward_target(global_params, 0.3))
    alone = after_outer_step(outer, global_params, own, SPEC)
    base = bowl(named(alone))
    for extra, refused in ((0.5 * LOSS_MARGIN, False), (2 * LOSS_MARGIN, True)):
        # the same deviation from the bowl's bottom, scaled: the loss grows by exactly extra
        scale = ((base + extra) / base) ** 0.5
        worse = [TARGET[k] + scale * (a - TARGET[k]) for a, k in zip(alone, NAMES, strict=True)]
        assert (bowl(named(worse)) - base > LOSS_MARGIN) == refused
        assert (judge.worse_than_own(worse, own) is not None) == refused


def test_without_held_out_data_nothing_is_judged(tmp_path: Path) -> None:
    global_params = start()
    judge = RoundJudge(
        None, outer_optimizer(global_params, SPEC), global_params, SPEC, named, threading.Lock()
    )
    assert not judge.active
    assert judge.average_problem([torch.full_like(g, 1e6) for g in global_params], start()) is None


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        ({"us": {"weight": 8}, "them": {"weight": 8}}, ["them"]),
        ({"us": {"weight": 8}, "them": {"weight": 0}}, []),
        ({"us": {"weight": 8}, "keeper": {"weight": 0, "follower": True}}, []),
        ({"us": {"weight": 8}, "a": {"weight": 4}, "b": {"weight": 4}}, ["a", "b"]),
    ],
)
def test_only_other_weighing_peers_are_contributors(group: dict, expected: list[str]) -> None:
    assert contributors(group, "us") == expected
