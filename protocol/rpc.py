"""What both ends of the gRPC control plane agree on besides the .proto.

Message size limits, deadlines, keepalive options and the conversion of
envelopes to and from their protobuf form. Knows nothing about servers.
"""

from __future__ import annotations

from crowdtrain.protocol import coordinator_pb2 as pb
from crowdtrain.protocol.identity import Envelope

# A run spec plus a manifest of a few thousand shards fits well within this.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Every call a node makes has a deadline: a lost coordinator must never block training.
CALL_DEADLINE_S = 10.0
# Kinds of signed envelope.
KIND_REGISTER = "register"
KIND_HEARTBEAT = "heartbeat"
KIND_RECEIPT = "receipt"

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]
SERVER_OPTIONS = [
    *CHANNEL_OPTIONS,
    # Without this a second server on the same port starts silently (SO_REUSEPORT).
    ("grpc.so_reuseport", 0),
    ("grpc.max_concurrent_streams", 256),
]


def envelope_to_pb(envelope: Envelope) -> pb.Envelope:
    return pb.Envelope(
        body=envelope.body, signature=envelope.signature, public_key=envelope.public_key
    )


def envelope_from_pb(message: pb.Envelope) -> Envelope:
    return Envelope(body=message.body, signature=message.signature, public_key=message.public_key)
