"""Robust aggregation: how a reducer combines the parts of its slice (``[trust]``).

hivemind's reducer takes the weighted mean of the parts it receives, so one
part moves the result as far as its sender likes within the guard's norm
bounds. :func:`aggregate` applies the run's rule instead
(:class:`~crowdtrain.protocol.runspec.TrustSection`) and says how far each part
lay from the result, in clip radii, so that far outliers can be reported.
Pure tensor functions: the all-reduce runner
(:mod:`~crowdtrain.node.swarm.allreduce`) calls them once every sender's part
of a slice is in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from crowdtrain.protocol.runspec import TrustSection


@dataclass(frozen=True)
class Aggregate:
    """A slice's result and, per part given, its distance from it in clip radii
    (0 for parts of weight 0 and under the mean, which has no radius); ``judged``: the
    distances mean something (CenteredClip with a radius)."""

    value: torch.Tensor
    distances: list[float]
    judged: bool = False


def aggregate(
    parts: Sequence[torch.Tensor], weights: Sequence[float], trust: TrustSection
) -> Aggregate:
    """Combine ``parts`` (one per sender, same shape) by ``trust.aggregation``.

    Parts of weight 0 take no part (the keeper's follower and a peer with nothing
    accumulated send such parts); when every weight is 0 the result is zero.
    """
    distances = [0.0] * len(parts)
    counted = [i for i, w in enumerate(weights) if w > 0]
    if not counted:
        return Aggregate(torch.zeros_like(parts[0], dtype=torch.float32), distances)
    stacked = torch.stack([parts[i].float().reshape(-1) for i in counted])
    w = torch.tensor([float(weights[i]) for i in counted], dtype=torch.float64)
    if trust.aggregation != "mean" and len(counted) > 2:
        # A weight is its sender's claim: bounded by the others'.
        w = torch.clamp(w, max=trust.max_weight_ratio * float(w.median()))
    w = (w / w.sum()).to(torch.float32)
    if trust.aggregation == "mean" or len(counted) <= 2:
        value = w @ stacked
    elif trust.aggregation == "trimmed_mean":
        value = _trimmed_mean(stacked, w, trust.trim_fraction)
    else:
        value, radius = _centered_clip(stacked, w, trust.clip_iterations, trust.clip_radius)
        if radius > 0:
            far = torch.linalg.vector_norm(stacked - value, dim=1) / radius
            for i, d in zip(counted, far.tolist(), strict=True):
                distances[i] = d
            return Aggregate(value.reshape(parts[0].shape), distances, judged=True)
    return Aggregate(value.reshape(parts[0].shape), distances)


def median(stacked: torch.Tensor) -> torch.Tensor:
    """The coordinate-wise median of the rows (the mean of the middle two for an even count)."""
    n = stacked.shape[0]
    if n <= 2:
        return stacked.mean(dim=0)
    if n <= 4:
        # What is left without the largest and the smallest: three reductions, not a sort
        # (a sort of every column costs a reducer most of a small model's step on a CPU).
        inner = stacked.sum(dim=0) - stacked.amax(dim=0) - stacked.amin(dim=0)
        return inner / (n - 2)
    ordered = stacked.sort(dim=0).values
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def _centered_clip(
    stacked: torch.Tensor, w: torch.Tensor, iterations: int, radius_factor: float
) -> tuple[torch.Tensor, float]:
    """CenteredClip from the coordinate-wise median, with the radius set by the parts'
    median distance from it: (result, radius)."""
    center = median(stacked)
    radius = radius_factor * float(
        median(torch.linalg.vector_norm(stacked - center, dim=1)[:, None])
    )
    if not radius > 0 or not math.isfinite(radius):
        return center, 0.0
    for _ in range(iterations):
        offsets = stacked - center
        norms = torch.linalg.vector_norm(offsets, dim=1)
        scale = torch.clamp(radius / norms.clamp_min(1e-30), max=1.0)
        center = center + (w * scale) @ offsets
    return center, radius


def _trimmed_mean(stacked: torch.Tensor, w: torch.Tensor, fraction: float) -> torch.Tensor:
    """For each coordinate, the weighted mean of the values left after dropping the
    ``fraction`` highest and lowest (at least one of each from three rows on)."""
    n = stacked.shape[0]
    k = min(max(1, math.ceil(fraction * n)) if fraction > 0 else 0, (n - 1) // 2)
    if k == 0:
        return w @ stacked
    ordered, order = stacked.sort(dim=0)
    kept, kept_w = ordered[k : n - k], w[order[k : n - k]]
    return (kept * kept_w).sum(dim=0) / kept_w.sum(dim=0).clamp_min(1e-30)


__all__ = ["Aggregate", "aggregate", "median"]
