"""Payloads of signed envelopes, as strict pydantic models.

Nodes build them; the coordinator parses every payload through them before
it trusts a value. Unknown keys, wrong types, negative counters and
non-finite numbers are refused.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from crowdtrain.protocol.errors import CrowdtrainError

Count = Annotated[int, Field(ge=0, le=2**62)]
Rate = Annotated[float, Field(ge=0, le=1e15)]
ShortText = Annotated[str, Field(max_length=128)]


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
    """Who a node is: shown on the dashboard and logged for bug reports."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    device: ShortText
    versions: Annotated[str, Field(max_length=512)] = ""


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


class ReceiptPayload(_Payload):
    """A node's account of one shard it trained."""

    shard_id: Annotated[str, Field(min_length=1, max_length=64)]
    epoch: Count
    num_sequences: Count
    num_tokens: Count
    loss_sum: Annotated[float, Field(ge=0)]
    started: Annotated[float, Field(ge=0)]
    finished: Annotated[float, Field(ge=0)]


def parse_payload(model: type[_Payload], payload: dict[str, Any]) -> Any:
    """Validate ``payload`` against ``model`` or raise :class:`PayloadError`."""
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise PayloadError(f"bad {model.__name__}: {where}: {first['msg']}") from None
