"""How long each part of the efficiency bench runs: the full plan and ``--quick``'s."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """How long each part runs; ``--quick`` shrinks everything to debug the harness."""

    rounds: int
    inner_steps: int | None  # None: the diloco spec's own
    warmup_s: float
    sync_window_s: float
    diloco_window_s: float
    hivemind_warmup_s: float
    hivemind_window_s: float
    solo_s: float
    loss_timeout_s: float
    sync_loss_timeout_s: float  # sync swarms are slow here: cut short, still at equal tokens
    late_wait_s: float
    late_inner_steps: int
    half_window_s: float
    share_solo_s: float


FULL = Plan(
    rounds=2,
    inner_steps=None,
    warmup_s=20,
    sync_window_s=60,
    # at least this long, and until a round ended (a 2-peer round is ~820k tokens)
    diloco_window_s=90,
    hivemind_warmup_s=20,
    hivemind_window_s=60,
    solo_s=25,
    loss_timeout_s=600,
    sync_loss_timeout_s=480,
    late_wait_s=150,
    late_inner_steps=10,
    half_window_s=90,
    share_solo_s=25,
)
QUICK = Plan(
    rounds=1,
    inner_steps=10,
    warmup_s=5,
    sync_window_s=20,
    diloco_window_s=30,
    hivemind_warmup_s=10,
    hivemind_window_s=20,
    solo_s=8,
    loss_timeout_s=240,
    sync_loss_timeout_s=240,
    late_wait_s=90,
    late_inner_steps=5,
    half_window_s=30,
    share_solo_s=8,
)
