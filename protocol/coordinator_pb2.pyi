from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Envelope(_message.Message):
    __slots__ = ("body", "signature", "public_key")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    public_key: bytes
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class ChallengeRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ChallengeReply(_message.Message):
    __slots__ = ("challenge", "expires_in_s", "coordinator_public_key")
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    challenge: bytes
    expires_in_s: float
    coordinator_public_key: bytes
    def __init__(self, challenge: _Optional[bytes] = ..., expires_in_s: _Optional[float] = ..., coordinator_public_key: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("run_id", "envelope")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    envelope: Envelope
    def __init__(self, run_id: _Optional[str] = ..., envelope: _Optional[_Union[Envelope, _Mapping]] = ...) -> None: ...

class RunInfo(_message.Message):
    __slots__ = ("run_id", "spec_toml", "spec_hash", "manifest_json", "manifest_hash", "step", "shard_base_url", "coordinator_public_key", "run_signature")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_TOML_FIELD_NUMBER: _ClassVar[int]
    SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_HASH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SHARD_BASE_URL_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    RUN_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    spec_toml: str
    spec_hash: str
    manifest_json: str
    manifest_hash: str
    step: int
    shard_base_url: str
    coordinator_public_key: bytes
    run_signature: bytes
    def __init__(self, run_id: _Optional[str] = ..., spec_toml: _Optional[str] = ..., spec_hash: _Optional[str] = ..., manifest_json: _Optional[str] = ..., manifest_hash: _Optional[str] = ..., step: _Optional[int] = ..., shard_base_url: _Optional[str] = ..., coordinator_public_key: _Optional[bytes] = ..., run_signature: _Optional[bytes] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("peer_id", "session_token", "session_ttl_s", "heartbeat_interval_s", "run", "initial_peers")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    INITIAL_PEERS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    session_token: str
    session_ttl_s: float
    heartbeat_interval_s: float
    run: RunInfo
    initial_peers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, peer_id: _Optional[str] = ..., session_token: _Optional[str] = ..., session_ttl_s: _Optional[float] = ..., heartbeat_interval_s: _Optional[float] = ..., run: _Optional[_Union[RunInfo, _Mapping]] = ..., initial_peers: _Optional[_Iterable[str]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ...) -> None: ...

class PeerAllowance(_message.Message):
    __slots__ = ("dht_peer_id", "max_weight")
    DHT_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    dht_peer_id: str
    max_weight: float
    def __init__(self, dht_peer_id: _Optional[str] = ..., max_weight: _Optional[float] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("step", "num_peers", "roster", "verified_tokens", "verified_share")
    STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_PEERS_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_SHARE_FIELD_NUMBER: _ClassVar[int]
    step: int
    num_peers: int
    roster: _containers.RepeatedCompositeFieldContainer[PeerAllowance]
    verified_tokens: int
    verified_share: float
    def __init__(self, step: _Optional[int] = ..., num_peers: _Optional[int] = ..., roster: _Optional[_Iterable[_Union[PeerAllowance, _Mapping]]] = ..., verified_tokens: _Optional[int] = ..., verified_share: _Optional[float] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("max_shards", "resume")
    MAX_SHARDS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    max_shards: int
    resume: bool
    def __init__(self, max_shards: _Optional[int] = ..., resume: _Optional[bool] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("shard_id", "epoch", "expires_in_s")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    epoch: int
    expires_in_s: float
    def __init__(self, shard_id: _Optional[str] = ..., epoch: _Optional[int] = ..., expires_in_s: _Optional[float] = ...) -> None: ...

class LeaseReply(_message.Message):
    __slots__ = ("leases",)
    LEASES_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    def __init__(self, leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ...) -> None: ...

class ShardReport(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ...) -> None: ...

class ShardReportReply(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
