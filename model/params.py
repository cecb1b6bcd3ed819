"""How a model's parameters are grouped for its optimizer.

Nodes build their collaborative optimizer from these groups and the
coordinator's checkpoint keeper builds a matching one to download the swarm's
state, so the order of tensors must be the same on both sides. Knows nothing
about hivemind or networking.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups: matrices decay, norms' gains do not (as in nanoGPT).

    The order of parameters within each group is ``model.parameters()``'s, so
    two models of one config give groups whose tensors line up one to one.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
