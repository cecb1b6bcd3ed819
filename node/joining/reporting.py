"""What this node tells its coordinator at each heartbeat, and what it takes from the reply.

:class:`Reporter` turns the node's counters, its identities in the swarm and
the senders its guard dropped into a
:class:`~crowdtrain.protocol.messages.HeartbeatPayload`, and takes the
coordinator's answer: this peer's verified credit and the roster of
averaging allowances the guard enforces. It implements the link's
:class:`~crowdtrain.node.link.heartbeat.Reports`; knows nothing about how
heartbeats travel or when they are sent.
"""

from __future__ import annotations

import math

from crowdtrain.node.stats.accounting import NodeStats
from crowdtrain.node.swarm.guard import SwarmGuard
from crowdtrain.protocol import coordinator_pb2 as pb
from crowdtrain.protocol.messages import Evaluation, HeartbeatPayload, HeldLease, SwarmProof

# HeartbeatPayload.loss's bound: a larger moving loss (a diverging model) is reported
# as unknown rather than making the coordinator refuse the whole heartbeat.
_MAX_LOSS = 1e4


class Reporter:
    """Heartbeats of one node: ``stats`` (its counters), ``device`` (as the coordinator
    bounds its compute by it), ``dht_peer_id`` and ``progress_key`` (its hivemind peer
    id and the key that signs its progress records) and ``guard`` (whose dropped
    senders each heartbeat carries, and whose roster each reply updates)."""

    def __init__(
        self,
        stats: NodeStats,
        device: str,
        dht_peer_id: str,
        progress_key: str,
        guard: SwarmGuard,
        swarm_proof: SwarmProof | None = None,
    ):
        self.stats = stats
        self.device = device
        self.dht_peer_id = dht_peer_id
        self.progress_key = progress_key
        self.guard = guard
        # Sent until a heartbeat that carried it is answered: the ids are bound then.
        self._swarm_proof = swarm_proof
        self._proof_in_flight = False

    def heartbeat(self, evaluations: list[Evaluation], leases: list[HeldLease]) -> HeartbeatPayload:
        """The counters now, the senders dropped since the last heartbeat, and the
        link's pending ``evaluations`` and held ``leases``."""
        s = self.stats
        self._proof_in_flight = self._swarm_proof is not None
        loss = s.loss if s.loss is not None and math.isfinite(s.loss) else None
        return HeartbeatPayload(
            session_key=s.session_key,
            num_tokens=s.num_tokens,
            num_sequences=s.num_sequences,
            tokens_per_s=float(s.tokens_per_s),
            loss=loss if loss is not None and 0.0 <= loss <= _MAX_LOSS else None,
            step=s.step,
            device=self.device,
            evaluations=evaluations,
            leases=leases,
            dht_peer_id=self.dht_peer_id,
            progress_key=self.progress_key,
            swarm_proof=self._swarm_proof,
            num_skipped_steps=s.num_skipped_steps,
            reports=self.guard.drain_reports(),
            traffic=s.traffic.counts(),
            time=s.time.split(),
        )

    def on_reply(self, reply: pb.HeartbeatReply) -> None:
        """The coordinator's view: this peer's verified credit, and whom to accept parts
        from (and how much weight each may claim)."""
        if self._proof_in_flight:
            self._swarm_proof = None
        self.stats.verified_tokens = int(reply.verified_tokens)
        self.guard.update_roster({a.dht_peer_id: a.max_weight for a in reply.roster})


__all__ = ["Reporter"]
