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

class RegisterRequest(_message.Message):
    __slots__ = ("run_id", "envelope")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    envelope: Envelope
    def __init__(self, run_id: _Optional[str] = ..., envelope: _Optional[_Union[Envelope, _Mapping]] = ...) -> None: ...

class RunInfo(_message.Message):
    __slots__ = ("run_id", "spec_toml", "spec_hash", "manifest_json", "manifest_hash", "step", "shard_base_url")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_TOML_FIELD_NUMBER: _ClassVar[int]
    SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_HASH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SHARD_BASE_URL_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    spec_toml: str
    spec_hash: str
    manifest_json: str
    manifest_hash: str
    step: int
    shard_base_url: str
    def __init__(self, run_id: _Optional[str] = ..., spec_toml: _Optional[str] = ..., spec_hash: _Optional[str] = ..., manifest_json: _Optional[str] = ..., manifest_hash: _Optional[str] = ..., step: _Optional[int] = ..., shard_base_url: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("session_token", "envelope")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    envelope: Envelope
    def __init__(self, session_token: _Optional[str] = ..., envelope: _Optional[_Union[Envelope, _Mapping]] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("step", "num_peers")
    STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_PEERS_FIELD_NUMBER: _ClassVar[int]
    step: int
    num_peers: int
    def __init__(self, step: _Optional[int] = ..., num_peers: _Optional[int] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("session_token", "max_shards", "resume")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_SHARDS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    max_shards: int
    resume: bool
    def __init__(self, session_token: _Optional[str] = ..., max_shards: _Optional[int] = ..., resume: _Optional[bool] = ...) -> None: ...

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
    __slots__ = ("session_token", "envelope")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    envelope: Envelope
    def __init__(self, session_token: _Optional[str] = ..., envelope: _Optional[_Union[Envelope, _Mapping]] = ...) -> None: ...

class ShardReportReply(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("session_token",)
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    def __init__(self, session_token: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
