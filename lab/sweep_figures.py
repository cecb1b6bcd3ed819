"""What the bandwidth sweep reports per run and per peer, from what the run exposes:
two reads of the coordinator's peers view (``/api/runs/<id>/peers``: each peer's
heartbeat counters, tokens and bytes by purpose), the nodes' log lines, the
coordinator's evaluations. Pure arithmetic and formatting; it starts nothing and
knows nothing about namespaces (:mod:`lab.sweep` runs the sweep).

Compute utilisation is measured against the lab itself: a calibration run of the
same peers on the same cores, whose rounds never end (nothing is averaged, so its
peers only compute), gives each peer's compute rate in tokens per second. In a
measured run, a peer's utilisation is its token rate over its calibrated rate: the
share of its wall time it spent computing, if computing a token costs what it cost
in calibration. Beside it, each node's own count: the share of its training loop's
time it spent computing and blocked on the swarm in the window (the peers view's
``loop_time``, from each heartbeat; on this machine's shared cores a node computing beside
three others computes more slowly, so the two measures differ).
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from typing import Any

from crowdtrain.protocol.messages import TRAFFIC_PURPOSES

# diloco.py: a round's average applied; a round that failed (then loaded or applied alone);
# a group's average refused (worse on held-out data than our own pseudo-gradient).
ROUND_AVERAGED = re.compile(r"round (\d+) averaged with (\d+) peers")
ROUND_FAILED = re.compile(r"round (\d+): (?:averaging failed|refused the group's average)")
# sync.py: a step this peer skipped (out of step with the swarm after a failed round).
STEP_SKIPPED = re.compile(r"step (\d+): .*; skipping it")


@dataclass(frozen=True)
class Snapshot:
    """One read of the peers view at ``at_s`` (monotonic seconds), by peer name."""

    at_s: float
    peers: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, at_s: float, view: list[dict[str, Any]]) -> Snapshot:
        return cls(at_s, {p["name"]: p for p in view})


@dataclass(frozen=True)
class PeerFigures:
    """One peer over a run's measured window."""

    name: str
    num_tokens: int
    window_s: float
    tokens_per_s: float
    utilisation: float | None  # tokens_per_s over the calibrated compute rate
    bytes_sent: dict[str, int]  # by purpose, in the window
    bytes_received: dict[str, int]
    rounds_averaged: int  # in the window: diloco rounds averaged with another peer
    rounds_failed: int  # in the window: diloco rounds failed or refused, sync steps skipped
    step: int  # at the window's end
    # What the capped links carried in the window (tc's counters), everything included.
    wire_sent: int = 0
    wire_received: int = 0
    # The node's own count in the window: the shares of its training loop's time spent
    # computing and blocked on the swarm (None: no heartbeat carried its time).
    computing_share: float | None = None
    swarm_wait_share: float | None = None


@dataclass(frozen=True)
class RunFigures:
    """One run of the sweep: its link, its peers, and the run's validation loss."""

    name: str
    mode: str
    real_uplink_mbit: float | None  # the real link it stands for (None: uncapped)
    up_bps: float | None
    down_bps: float | None
    peers: list[PeerFigures]
    val_loss: float | None  # the coordinator's latest evaluation at the window's end
    val_step: int | None
    swarm_tokens: int  # every peer's tokens at the window's end, since the start
    evals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def utilisation(self) -> float | None:
        values = [p.utilisation for p in self.peers if p.utilisation is not None]
        return statistics.mean(values) if values else None

    @property
    def tokens_per_s(self) -> float:
        return sum(p.tokens_per_s for p in self.peers)

    def mean_bytes(self, direction: str, purpose: str) -> float:
        """Mean bytes per peer in the window, ``direction`` "sent" or "received"."""
        key = "bytes_sent" if direction == "sent" else "bytes_received"
        return statistics.mean(getattr(p, key)[purpose] for p in self.peers) if self.peers else 0


def window_counts(log: str, start: int, end: int) -> tuple[int, int]:
    """Rounds averaged (with at least one other peer) and rounds failed in ``log[start:end]``
    (character offsets: the log's length at the window's two ends)."""
    part = log[start:end]
    averaged = sum(1 for _, n in ROUND_AVERAGED.findall(part) if int(n) >= 2)
    failed = len(ROUND_FAILED.findall(part)) + len(STEP_SKIPPED.findall(part))
    return averaged, failed


def peer_figures(
    name: str,
    before: Snapshot,
    after: Snapshot,
    compute_rate: float | None,
    rounds: tuple[int, int],
    wire: tuple[int, int] = (0, 0),
) -> PeerFigures:
    """``name``'s figures between two snapshots; ``compute_rate`` is its calibrated tokens/s
    (None in the calibration run itself), ``rounds`` its (averaged, failed) in the window,
    ``wire`` the bytes its uplink and downlink carried in the window."""
    a, b = before.peers.get(name), after.peers[name]
    window_s = after.at_s - before.at_s
    if window_s <= 0:
        raise ValueError(f"the window must end after it starts ({window_s} s)")
    tokens = b["num_tokens"] - (a["num_tokens"] if a else 0)
    rate = tokens / window_s
    sent, received = {}, {}
    for purpose in TRAFFIC_PURPOSES:
        then = a["traffic"][purpose] if a else {"sent": 0, "received": 0}
        now = b["traffic"][purpose]
        sent[purpose] = now["sent"] - then["sent"]
        received[purpose] = now["received"] - then["received"]
    computing_share, swarm_wait_share = _time_shares(a, b)
    return PeerFigures(
        name=name,
        num_tokens=tokens,
        window_s=window_s,
        tokens_per_s=rate,
        utilisation=rate / compute_rate if compute_rate else None,
        bytes_sent=sent,
        bytes_received=received,
        rounds_averaged=rounds[0],
        rounds_failed=rounds[1],
        step=int(b["step"]),
        wire_sent=wire[0],
        wire_received=wire[1],
        computing_share=computing_share,
        swarm_wait_share=swarm_wait_share,
    )


def _time_shares(
    before: dict[str, Any] | None, after: dict[str, Any]
) -> tuple[float | None, float | None]:
    """The shares of the training loop's time spent computing and waiting on the swarm
    between two reads of a peer (None without the node's time split)."""
    now = after.get("loop_time")
    if not now:
        return None, None
    then = (before or {}).get("loop_time") or {}
    training = now["training_s"] - then.get("training_s", 0.0)
    if training <= 0:
        return None, None
    computing = now["computing_s"] - then.get("computing_s", 0.0)
    waiting = now["swarm_wait_s"] - then.get("swarm_wait_s", 0.0)
    return computing / training, waiting / training


def val_at_tokens(evals: list[dict[str, Any]], swarm_tokens: float) -> float | None:
    """The validation loss of the latest evaluation made when the swarm had trained at most
    ``swarm_tokens`` (each evaluation carries the swarm's tokens when it was made)."""
    found = [e for e in evals if e.get("swarm_tokens", 0) <= swarm_tokens and e.get("val_loss")]
    return found[-1]["val_loss"] if found else None


def _loss(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _mbit(bps: float | None) -> str:
    return f"{bps / 1e6:.3g}" if bps else "-"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def run_table(runs: list[RunFigures], at_tokens: float | None = None) -> str:
    """A markdown table, a row per run: link, utilisation, rates, rounds, the latest
    validation loss at the window's end (equal wall time), with ``at_tokens`` the latest
    made by then (equal tokens), and the nodes' own count of their time (computing /
    blocked on the swarm, mean shares; "-" for runs that predate it)."""
    equal = f" val loss at {at_tokens / 1e3:,.0f}k tokens |" if at_tokens else ""
    lines = [
        "| run | real uplink (Mbit/s) | lab up/down (Mbit/s) | utilisation (mean; per peer) "
        "| tokens/s per peer (mean) | rounds averaged / failed (per peer, mean) | step "
        f"| val loss at the end (step) |{equal} nodes' count: computing / swarm wait |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if at_tokens else ""),
    ]
    for r in runs:
        util = (
            f"{r.utilisation:.0%}; " + " ".join(f"{p.utilisation:.0%}" for p in r.peers)
            if r.utilisation is not None
            else "(calibration)"
        )
        per_peer = r.tokens_per_s / len(r.peers) if r.peers else 0.0
        averaged = statistics.mean(p.rounds_averaged for p in r.peers) if r.peers else 0
        failed = statistics.mean(p.rounds_failed for p in r.peers) if r.peers else 0
        step = max((p.step for p in r.peers), default=0)
        val = f"{r.val_loss:.3f} ({r.val_step})" if r.val_loss is not None else "-"
        real = f"{r.real_uplink_mbit:g}" if r.real_uplink_mbit else "uncapped"
        lines.append(
            f"| {r.name} | {real} | {_mbit(r.up_bps)}/{_mbit(r.down_bps)} | {util} "
            f"| {per_peer:.0f} | {averaged:.1f} / {failed:.1f} | {step} | {val} |"
            + (f" {_loss(val_at_tokens(r.evals, at_tokens))} |" if at_tokens else "")
            + f" {_own_count(r)} |"
        )
    return "\n".join(lines)


def _own_count(run: RunFigures) -> str:
    computing = [p.computing_share for p in run.peers if p.computing_share is not None]
    waiting = [p.swarm_wait_share for p in run.peers if p.swarm_wait_share is not None]
    if not computing or not waiting:
        return "-"
    return f"{statistics.mean(computing):.0%} / {statistics.mean(waiting):.0%}"


def bytes_table(runs: list[RunFigures]) -> str:
    """A markdown table of the mean bytes per peer in the window, by purpose (MB up/down),
    and what its capped links carried (tc's counters; "-" where the links were not capped
    or the run predates the counters)."""
    head = " | ".join(f"{p} up/down (MB)" for p in TRAFFIC_PURPOSES)
    lines = [
        f"| run | {head} | on the wire up/down (MB) |",
        "|---|" + "---|" * (len(TRAFFIC_PURPOSES) + 1),
    ]
    for r in runs:
        cells = " | ".join(
            f"{_mb(r.mean_bytes('sent', p))} / {_mb(r.mean_bytes('received', p))}"
            for p in TRAFFIC_PURPOSES
        )
        sent = [p.wire_sent for p in r.peers]
        wire = (
            f"{_mb(statistics.mean(sent))} / {_mb(statistics.mean(p.wire_received for p in r.peers))}"
            if any(sent)
            else "-"
        )
        lines.append(f"| {r.name} | {cells} | {wire} |")
    return "\n".join(lines)
