"""The reducers' aggregation rules against parts a hostile sender crafts inside the guard's
bounds (crowdtrain.node.swarm.robust): honest parts are gradients of one direction plus
noise, as a round's are."""

from __future__ import annotations

import pytest
import torch

from crowdtrain.node.swarm.robust import aggregate, median
from crowdtrain.protocol.runspec import TrustSection

DIM = 4096
RULES = ("trimmed_mean", "centered_clip")


def honest_parts(n: int, seed: int = 0, noise: float = 1.0) -> tuple[torch.Tensor, list]:
    """The true gradient and ``n`` noisy estimates of it (noise as large as the signal)."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(DIM, generator=g)
    parts = [true + noise * torch.randn(DIM, generator=g) for _ in range(n)]
    return true, parts


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def trust(rule: str) -> TrustSection:
    return TrustSection(aggregation=rule)  # type: ignore[arg-type]


@pytest.mark.parametrize("honest", [2, 3, 5])
def test_a_flipped_part_times_9_9_wins_the_mean_and_loses_the_robust_rules(honest: int) -> None:
    true, parts = honest_parts(honest)
    attacker = -9.9 * parts[0]
    weights = [1.0] * (honest + 1)
    mean = aggregate([*parts, attacker], weights, trust("mean")).value
    assert cosine(mean, true) < 0  # the mean points against the true gradient
    for rule in RULES:
        robust = aggregate([*parts, attacker], weights, trust(rule)).value
        assert cosine(robust, true) > 0.5, (rule, cosine(robust, true))


def test_the_attacker_is_far_and_honest_parts_are_not() -> None:
    _, parts = honest_parts(5)
    result = aggregate([*parts, -9.9 * parts[0]], [1.0] * 6, trust("centered_clip"))
    *honest, attacker = result.distances
    assert attacker > TrustSection().report_distance
    assert max(honest) < 2.0, honest


def test_a_little_is_enough_bias_moves_centered_clip_by_at_most_its_share_of_the_radius() -> None:
    """A part at the honest mean plus a bias as long as the true gradient (within every
    norm bound): it moves the mean by a quarter of the bias with four senders, the clipped
    result by at most its weight's share of the clip radius per iteration."""
    true, parts = honest_parts(3, noise=0.5)
    honest_mean = torch.stack(parts).mean(0)
    bias = true.norm() * torch.nn.functional.normalize(torch.randn(DIM), dim=0)
    spec = TrustSection()
    stacked = torch.stack([*parts, honest_mean + bias])
    radius = spec.clip_radius * float(
        median(torch.linalg.vector_norm(stacked - median(stacked), dim=1)[:, None])
    )
    result = aggregate([*parts, honest_mean + bias], [1.0] * 4, spec).value
    moved = float((result - honest_mean).norm())
    # Each iteration moves the centre by at most the mean clipped offset: a radius.
    assert moved <= spec.clip_iterations * radius
    mean = aggregate([*parts, honest_mean + bias], [1.0] * 4, trust("mean")).value
    assert float((mean - honest_mean).norm()) == pytest.approx(float(bias.norm()) / 4, rel=1e-4)


def test_with_two_parts_every_rule_is_the_weighted_mean() -> None:
    a, b = torch.randn(DIM), torch.randn(DIM)
    expected = (a + 3 * b) / 4
    for rule in ("mean", *RULES):
        result = aggregate([a, b], [1.0, 3.0], trust(rule))
        assert torch.allclose(result.value, expected, atol=1e-6), rule
        assert result.distances == [0.0, 0.0]


def test_parts_of_weight_zero_take_no_part() -> None:
    _, parts = honest_parts(3)
    wild = torch.full((DIM,), 1e6)
    for rule in ("mean", *RULES):
        with_wild = aggregate([*parts, wild], [1.0, 1.0, 1.0, 0.0], trust(rule))
        without = aggregate(parts, [1.0, 1.0, 1.0], trust(rule))
        assert torch.allclose(with_wild.value, without.value), rule
        assert with_wild.distances[3] == 0.0
        nothing = aggregate(parts, [0.0, 0.0, 0.0], trust(rule))
        assert not nothing.value.any()


def test_identical_honest_parts_come_back_unchanged() -> None:
    part = torch.randn(DIM)
    for rule in RULES:
        result = aggregate([part, part.clone(), part.clone()], [1.0, 2.0, 1.0], trust(rule))
        assert torch.allclose(result.value, part), rule


def test_trimmed_mean_drops_the_extremes_of_each_coordinate() -> None:
    parts = [torch.tensor([1.0, 10.0]), torch.tensor([2.0, 20.0]), torch.tensor([100.0, -5.0])]
    result = aggregate(parts, [1.0, 1.0, 1.0], trust("trimmed_mean")).value
    assert result.tolist() == [2.0, 10.0]  # the middle value of three


def test_shapes_survive() -> None:
    parts = [torch.randn(3, 5) for _ in range(4)]
    for rule in ("mean", *RULES):
        assert aggregate(parts, [1.0] * 4, trust(rule)).value.shape == (3, 5)


def test_a_heavy_claim_counts_for_at_most_twice_the_median_weight() -> None:
    """A flipper claiming 4 target batches against three honest peers' one each: under the
    mean (weights as claimed) it owns the round; the robust rules count it as 2."""
    true, parts = honest_parts(3)
    attacker = -9.9 * parts[0]
    weights = [1.0, 1.0, 1.0, 4.0]
    assert cosine(aggregate([*parts, attacker], weights, trust("mean")).value, true) < 0
    for rule in RULES:
        robust = aggregate([*parts, attacker], weights, trust(rule)).value
        assert cosine(robust, true) > 0.5, rule
    # what the cap means: 4 counts as 2 (twice the median of 1, 1, 1, 4)
    spread = [torch.full((4,), float(v)) for v in (0.0, 0.0, 0.0, 1.0)]
    capped = aggregate(spread, weights, TrustSection(aggregation="trimmed_mean", trim_fraction=0.0))
    assert capped.value.tolist() == pytest.approx([2 / 5] * 4)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_the_median_is_the_middle_value_or_the_mean_of_the_middle_two(n: int) -> None:
    stacked = torch.randn(n, 257)
    ordered = stacked.sort(dim=0).values
    expected = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    assert torch.allclose(median(stacked), expected, atol=1e-6)
