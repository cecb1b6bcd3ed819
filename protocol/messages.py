"""Payloads of signed envelopes, as strict pydantic models.

Nodes build them; the coordinator parses every payload through them before
it trusts a value. Unknown keys, wrong types, negative counters and
non-finite numbers are refused.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from crowdtrain.protocol.errors import CrowdtrainError

Count = Annotated[int, Field(ge=0, le=2**62)]
Rate = Annotated[float, Field(ge=0, le=1e15)]
ShortText = Annotated[str, Field(max_length=128)]


# Averaging weight (samples a sender says it accumulated for a round), in target batches
# (a DiLoCo round's: times its inner steps). A part claiming more than MAX_WEIGHT_BATCHES
# is refused and its sender reported: no honest peer collects four targets in one round.
# Below that a claim counts for at most what the coordinator's roster allows the sender
# (about twice its verified work per step), and NEWCOMER_WEIGHT_BATCHES for a sender
# with no verified work yet or that the roster does not list.
MAX_WEIGHT_BATCHES = 4.0
NEWCOMER_WEIGHT_BATCHES = 1.0


class PayloadError(CrowdtrainError):
    """A payload that does not match its schema."""


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @field_validator("*")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be finite")
        return value


class RegisterPayload(_Payload):
    """Who a node is, and its answer to the coordinator's challenge.

    ``challenge`` is the one-time value the coordinator just handed out;
    signing it proves the key is held now. ``invite`` is needed once, on a
    run whose ``[access] mode`` is ``invite``.
    """

    challenge: Annotated[bytes, Field(min_length=16, max_length=64)]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    device: ShortText
    versions: Annotated[str, Field(max_length=512)] = ""
    invite: Annotated[str, Field(max_length=128)] = ""


class Evaluation(_Payload):
    """A validation measurement a node made on the held-out shard."""

    step: Count
    num_tokens: Count
    loss: Annotated[float, Field(ge=0, le=1e4)]
    bits_per_byte: Annotated[float, Field(ge=0, le=1e4)]


class HeldLease(_Payload):
    """A shard a node still holds: queued, downloading or being trained."""

    shard_id: Annotated[str, Field(min_length=1, max_length=64)]
    epoch: Count


class PeerReport(_Payload):
    """Averaging parts from one sender that this node dropped, and why."""

    dht_peer_id: Annotated[str, Field(min_length=1, max_length=128)]
    reason: Annotated[str, Field(min_length=1, max_length=64)]
    count: Annotated[int, Field(ge=1, le=2**31)]


TrafficPurpose = Literal["averaging", "state", "control", "data"]
TRAFFIC_PURPOSES: tuple[str, ...] = get_args(TrafficPurpose)
"""What a node's bytes are for (see :mod:`crowdtrain.node.stats.traffic`)."""


class TrafficCount(_Payload):
    """Bytes one node process sent and received for one purpose since it started."""

    sent: Count = 0
    received: Count = 0


Seconds = Annotated[float, Field(ge=0, le=1e12)]


class TimeSplit(_Payload):
    """Where a node process's training loop spent its wall time since it started:
    ``training_s`` in all, of which ``computing_s`` in forward and backward passes and
    local optimizer steps, ``swarm_wait_s`` blocked on the swarm (averaging rounds it had
    to wait for, state downloads) and ``data_wait_s`` waiting for the next batch. Compute
    utilisation is ``computing_s / training_s``. Self-reported: shown, never credited."""

    training_s: Seconds = 0.0
    computing_s: Seconds = 0.0
    swarm_wait_s: Seconds = 0.0
    data_wait_s: Seconds = 0.0

    @model_validator(mode="after")
    def _parts_within_whole(self) -> TimeSplit:
        parts = self.computing_s + self.swarm_wait_s + self.data_wait_s
        if parts > self.training_s * 1.01 + 1.0:  # (each part is timed apart)
            raise ValueError(
                f"computing, swarm and data seconds ({parts:.1f} in all) exceed the "
                f"training loop's {self.training_s:.1f}"
            )
        return self


class SwarmProof(_Payload):
    """Proof that a node holds the keys behind its swarm ids: its libp2p identity's
    public key (hex, DER; its hash is the hivemind peer id) and both keys' signatures
    (base64, as hivemind makes them) over
    :func:`~crowdtrain.protocol.identity.swarm_binding_statement`."""

    dht_public_key: Annotated[str, Field(min_length=2, max_length=2048, pattern=r"^[0-9a-f]*$")]
    dht_signature: Annotated[str, Field(min_length=4, max_length=1024)]
    progress_signature: Annotated[str, Field(min_length=4, max_length=1024)]


class HeartbeatPayload(_Payload):
    """A node's counters since it started (``session_key`` names that start)."""

    session_key: Annotated[str, Field(min_length=8, max_length=64)]
    num_tokens: Count
    num_sequences: Count
    tokens_per_s: Rate
    loss: Annotated[float, Field(ge=0, le=1e4)] | None = None
    step: Count
    device: ShortText = ""
    # Measurements made since the last acknowledged heartbeat, oldest first.
    evaluations: Annotated[list[Evaluation], Field(max_length=32)] = []
    # The leases this heartbeat renews; any other lease of the node runs out.
    leases: Annotated[list[HeldLease], Field(max_length=64)] = []
    # The node's identities in the swarm: its hivemind peer id and the public key
    # that signs its progress records (hex). Empty until its DHT runs.
    dht_peer_id: Annotated[str, Field(max_length=128)] = ""
    progress_key: Annotated[str, Field(max_length=2048, pattern=r"^[0-9a-f]*$")] = ""
    # Sent until a heartbeat carrying it is answered: binds the two ids to this peer.
    swarm_proof: SwarmProof | None = None
    # Micro-batches skipped because their gradients were not finite.
    num_skipped_steps: Count = 0
    # Senders whose averaging parts this node dropped since the last heartbeat.
    reports: Annotated[list[PeerReport], Field(max_length=32)] = []
    # Bytes sent and received since the node started, by purpose. Self-reported:
    # shown to people, never credited.
    traffic: dict[TrafficPurpose, TrafficCount] = {}
    # Where the training loop's time went since the node started (see TimeSplit).
    time: TimeSplit | None = None


# A receipt sample holds the loss of every sequence of its micro-batch, up to this many;
# a receipt holds at most MAX_RECEIPT_SAMPLES samples and MAX_RECEIPT_LOSSES losses in
# all (a signed envelope holds 64 KiB, a loss takes 9 bytes of it).
MAX_SAMPLE_LOSSES = 256
MAX_RECEIPT_SAMPLES = 256
MAX_RECEIPT_LOSSES = 4096


class ReceiptSample(_Payload):
    """A micro-batch a node trained at swarm step ``step``.

    ``batch`` is its index within the shard's seeded order; ``losses`` are
    the per-sequence losses of every sequence in it (the first
    :data:`MAX_SAMPLE_LOSSES` of a larger one), so a verifier holding the
    checkpoint of ``step`` can recompute any of them: it picks which after the
    receipt arrives.
    """

    step: Count
    batch: Annotated[int, Field(ge=0, le=2**31)]
    losses: Annotated[
        list[Annotated[float, Field(ge=0, le=1e4)]], Field(max_length=MAX_SAMPLE_LOSSES)
    ]
    # DiLoCo: the sha256 (model.params_sha256) of the global parameters the losses were
    # computed at, so that a round whose parameters differ from the keeper's checkpoint
    # of it (a round met in two groups) is not checked against it. None in sync runs.
    params_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None

    @model_serializer(mode="wrap")
    def _without_absent_hash(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A sync sample (no hash) serializes, and is signed, as before the field existed.
        data: dict[str, Any] = handler(self)
        if data.get("params_sha256") is None:
            data.pop("params_sha256", None)
        return data


class ReceiptPayload(_Payload):
    """A node's account of one shard it trained."""

    shard_id: Annotated[str, Field(min_length=1, max_length=64)]
    epoch: Count
    num_sequences: Count
    num_tokens: Count
    loss_sum: Annotated[float, Field(ge=0)]
    started: Annotated[float, Field(ge=0)]
    finished: Annotated[float, Field(ge=0)]
    micro_batch_size: Annotated[int, Field(ge=1, le=65536)] = 1
    samples: Annotated[list[ReceiptSample], Field(max_length=MAX_RECEIPT_SAMPLES)] = []

    @field_validator("samples")
    @classmethod
    def _bounded_losses(cls, samples: list[ReceiptSample]) -> list[ReceiptSample]:
        total = sum(len(s.losses) for s in samples)
        if total > MAX_RECEIPT_LOSSES:
            raise ValueError(f"{total} losses in all; a receipt holds at most {MAX_RECEIPT_LOSSES}")
        return samples


def parse_payload(model: type[_Payload], payload: dict[str, Any]) -> Any:
    """Validate ``payload`` against ``model`` or raise :class:`PayloadError`."""
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise PayloadError(f"bad {model.__name__}: {where}: {first['msg']}") from None
