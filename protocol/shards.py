"""Token shards and the manifest that lists them: the data contract of a run.

A shard is a 24-byte header followed by raw little-endian tokens; the manifest
names every shard with its size and sha256, and its hash pins the data a run
trains on. Knows nothing about networking, tokenizers or how a corpus is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from crowdtrain.protocol.errors import ShardError

MAGIC = b"CTSHARD1"
SHARD_VERSION = 1
MANIFEST_VERSION = 2
MANIFEST_FILE = "manifest.json"

# magic, format version, dtype code, 5 reserved zero bytes, number of tokens
_HEADER = struct.Struct("<8sHB5sQ")
HEADER_SIZE = _HEADER.size
assert HEADER_SIZE == 24

DTYPES: dict[str, int] = {"uint8": 1, "uint16": 2, "uint32": 4}
"""Token dtypes a shard may hold, by name, with their header code (the item size)."""

_CODES = {code: name for name, code in DTYPES.items()}
# Ids and file names travel over the network and become file names on nodes.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")

Split = Literal["train", "val"]
SPLITS: tuple[Split, ...] = ("train", "val")
TOKENIZERS = ("byte", "bpe")
"""Tokenizer names a manifest may give; every one but ``byte`` comes with a file."""


@dataclass(frozen=True)
class ShardEntry:
    """One shard file as the manifest lists it.

    ``file`` is a plain file name inside the data folder, never a path, so a
    node can store a downloaded shard without trusting the manifest with its
    file system. ``num_bytes`` counts the UTF-8 bytes of the text behind the
    shard's tokens, each end of document as one byte: a loss in nats per token
    becomes bits per byte as ``loss / ln 2 * num_tokens / num_bytes``.
    """

    id: str
    file: str
    split: Split
    num_tokens: int
    size_bytes: int
    sha256: str
    num_bytes: int

    def __post_init__(self) -> None:
        if not _SAFE_NAME.fullmatch(self.id):
            raise ShardError(
                f"shard id {self.id!r} is not allowed: use letters, digits, '.', '_' or '-'"
            )
        if not _SAFE_NAME.fullmatch(self.file):
            raise ShardError(
                f"shard {self.id!r} has a bad file: {self.file!r} must be a plain file name"
            )
        if self.split not in SPLITS:
            raise ShardError(
                f"shard {self.id!r} has a bad split: {self.split!r} is not 'train' or 'val'"
            )
        if self.num_tokens < 0:
            raise ShardError(f"shard {self.id!r} has a bad num_tokens: {self.num_tokens} < 0")
        if self.num_bytes < 0:
            raise ShardError(f"shard {self.id!r} has a bad num_bytes: {self.num_bytes} < 0")
        if not _SHA256.fullmatch(self.sha256):
            raise ShardError(
                f"shard {self.id!r} has a bad sha256: {self.sha256!r} is not 64 lowercase hex digits"
            )


@dataclass(frozen=True)
class ShardManifest:
    """Every shard of a data folder, with what is needed to check and decode it.

    ``hash`` pins the data of a run: two manifests with the same hash list the
    same bytes. ``source`` is a human description of where the text came from.
    A ``bpe`` tokenizer is the file ``tokenizer_file`` beside the manifest,
    pinned by ``tokenizer_sha256``; ``byte`` has neither (both ``None``).
    """

    version: int
    tokenizer: str
    vocab_size: int
    dtype: str
    shards: tuple[ShardEntry, ...]
    source: str
    tokenizer_file: str | None = None
    tokenizer_sha256: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", tuple(self.shards))
        if self.version != MANIFEST_VERSION:
            raise _unsupported_version(self.version)
        if self.dtype not in DTYPES:
            raise ShardError(
                f"manifest key 'dtype' is {self.dtype!r}; use one of {', '.join(DTYPES)}"
            )
        if self.tokenizer not in TOKENIZERS:
            raise ShardError(
                f"manifest key 'tokenizer' is {self.tokenizer!r}; use one of {', '.join(TOKENIZERS)}"
            )
        if self.tokenizer_file is not None and not _SAFE_NAME.fullmatch(self.tokenizer_file):
            raise ShardError(
                f"manifest key 'tokenizer_file' is {self.tokenizer_file!r}; use a plain file name"
            )
        if self.tokenizer_sha256 is not None and not _SHA256.fullmatch(self.tokenizer_sha256):
            raise ShardError(
                f"manifest key 'tokenizer_sha256' is {self.tokenizer_sha256!r}; "
                "use 64 lowercase hex digits"
            )
        itemsize = DTYPES[self.dtype]
        if not 0 < self.vocab_size <= 1 << (8 * itemsize):
            raise ShardError(
                f"manifest key 'vocab_size' is {self.vocab_size}, which {self.dtype} cannot hold"
            )
        for key in ("id", "file"):
            values = [getattr(s, key) for s in self.shards]
            if key == "file" and self.tokenizer_file is not None:
                values.append(self.tokenizer_file)
            duplicates = sorted({v for v in values if values.count(v) > 1})
            if duplicates:
                raise ShardError(f"manifest lists shard {key} {duplicates[0]!r} more than once")
        for shard in self.shards:
            expected = HEADER_SIZE + shard.num_tokens * itemsize
            if shard.size_bytes != expected:
                raise ShardError(
                    f"shard {shard.id!r} has a bad size_bytes: {shard.num_tokens} {self.dtype} "
                    f"tokens take {expected} bytes, not {shard.size_bytes}"
                )
            if self.tokenizer == "byte" and shard.num_bytes != shard.num_tokens:
                raise ShardError(
                    f"shard {shard.id!r} has a bad num_bytes: {shard.num_tokens} byte tokens "
                    f"are {shard.num_tokens} bytes, not {shard.num_bytes}"
                )

    @property
    def train_shards(self) -> tuple[ShardEntry, ...]:
        return tuple(s for s in self.shards if s.split == "train")

    @property
    def val_shards(self) -> tuple[ShardEntry, ...]:
        return tuple(s for s in self.shards if s.split == "val")

    @property
    def num_train_tokens(self) -> int:
        return sum(s.num_tokens for s in self.train_shards)

    @property
    def hash(self) -> str:
        """sha256 hex digest of :meth:`to_json`."""
        return hashlib.sha256(self.to_json().encode("ascii")).hexdigest()

    def to_json(self) -> str:
        """The canonical JSON text: sorted keys, no spaces, ASCII only."""
        return json.dumps(
            dataclasses.asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> ShardManifest:
        """Parse a manifest strictly: an unknown, missing or ill-typed key raises
        :class:`ShardError` naming the key, as does any inconsistent value."""
        try:
            data = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise ShardError(f"manifest is not valid JSON: {e}") from e
        version = data.get("version") if isinstance(data, dict) else None
        if isinstance(version, int) and version != MANIFEST_VERSION:
            # Another format has other keys: say what to do, not "unknown key".
            raise _unsupported_version(version)
        fields = _fields(data, _MANIFEST_KEYS, prefix="")
        shards = tuple(
            ShardEntry(**_fields(item, _ENTRY_KEYS, prefix=f"shards[{i}]."))
            for i, item in enumerate(fields.pop("shards"))
        )
        manifest = cls(shards=shards, **fields)
        manifest._check_tokenizer_file()
        return manifest

    def _check_tokenizer_file(self) -> None:
        """Refuse a tokenizer without its pinned file, or a byte tokenizer with one.

        Checked where manifests are read, not on construction, so code may
        build variants of a manifest in memory.
        """
        has_file = (self.tokenizer_file is not None, self.tokenizer_sha256 is not None)
        if self.tokenizer == "byte" and any(has_file):
            raise ShardError(
                "manifest keys 'tokenizer_file' and 'tokenizer_sha256' must be null "
                "for the byte tokenizer"
            )
        if self.tokenizer != "byte" and not all(has_file):
            raise ShardError(
                f"manifest keys 'tokenizer_file' and 'tokenizer_sha256' must be set "
                f"for the {self.tokenizer} tokenizer"
            )


_MANIFEST_KEYS: dict[str, type | tuple[type, ...]] = {
    "version": int,
    "tokenizer": str,
    "vocab_size": int,
    "dtype": str,
    "shards": list,
    "source": str,
    "tokenizer_file": (str, type(None)),
    "tokenizer_sha256": (str, type(None)),
}
_ENTRY_KEYS: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "file": str,
    "split": str,
    "num_tokens": int,
    "size_bytes": int,
    "sha256": str,
    "num_bytes": int,
}
_JSON_KINDS = {
    str: "a string",
    int: "an integer",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


def _fields(value: Any, spec: dict[str, type | tuple[type, ...]], prefix: str) -> dict[str, Any]:
    """Check that ``value`` is an object with exactly the keys of ``spec``, each of its type."""
    if not isinstance(value, dict):
        where = f"manifest key '{prefix[:-1]}'" if prefix else "manifest"
        raise ShardError(f"{where} must be a JSON object, got {_json_kind(value)}")
    for key in sorted(value):
        if key not in spec:
            raise ShardError(
                f"unknown manifest key '{prefix}{key}'; remove it "
                "(or upgrade crowdtrain if a newer version wrote this manifest)"
            )
    for key, kind in spec.items():
        if key not in value:
            raise ShardError(f"manifest is missing key '{prefix}{key}'")
        item = value[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(item, kinds) or (int in kinds and isinstance(item, bool)):
            expected = " or ".join(_JSON_KINDS[k] for k in kinds)
            raise ShardError(
                f"manifest key '{prefix}{key}' must be {expected}, got {_json_kind(item)}"
            )
    return dict(value)


def _unsupported_version(version: int) -> ShardError:
    if version < MANIFEST_VERSION:
        return ShardError(
            f"manifest version {version} was prepared by an older crowdtrain (this one reads "
            f"version {MANIFEST_VERSION}); run `crowdtrain-coordinator prepare-data` again"
        )
    return ShardError(
        f"manifest version {version} is not supported "
        f"(this crowdtrain reads version {MANIFEST_VERSION}); upgrade crowdtrain"
    )


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    if isinstance(value, float):
        return "a number"
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ShardError(f"manifest has key {key!r} twice")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ShardError(f"manifest contains {name}, which is not JSON")


def load_manifest(folder: str | os.PathLike[str]) -> ShardManifest:
    """Read ``folder/manifest.json`` of a data folder made by ``prepare-data``."""
    path = Path(folder) / MANIFEST_FILE
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ShardError(
            f"{folder} is not a crowdtrain data folder: no {MANIFEST_FILE}; "
            "create one with `crowdtrain-coordinator prepare-data`"
        ) from None
    except OSError as e:
        raise ShardError(f"cannot read {path}: {e.strerror}") from e
    try:
        return ShardManifest.from_json(text)
    except ShardError as e:
        raise ShardError(f"{path}: {e}") from e


def _dtype_name(dtype: str | np.dtype[Any] | type) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in DTYPES:
        raise ShardError(f"shard dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return name


def write_shard(
    path: str | os.PathLike[str], tokens: np.ndarray, dtype: str | np.dtype[Any] | type
) -> tuple[int, str]:
    """Write ``tokens`` as a shard of ``dtype`` and return its ``(size_bytes, sha256)``.

    Tokens must be a 1-D integer array whose values fit in ``dtype``.
    """
    name = _dtype_name(dtype)
    target = np.dtype(f"<u{DTYPES[name]}")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
        raise ShardError(
            f"cannot write shard {path}: tokens must be a 1-D integer array, "
            f"got {tokens.dtype} with shape {tokens.shape}"
        )
    if tokens.size and not np.can_cast(tokens.dtype, target, "safe"):
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high > np.iinfo(target).max:
            raise ShardError(
                f"cannot write shard {path}: token {low if low < 0 else high} does not fit in {name}"
            )
    body = np.ascontiguousarray(tokens, dtype=target).data.cast("B")
    header = _HEADER.pack(MAGIC, SHARD_VERSION, DTYPES[name], bytes(5), len(tokens))
    with open(path, "wb") as f:
        f.write(header)
        f.write(body)
    digest = hashlib.sha256(header)
    digest.update(body)
    return HEADER_SIZE + body.nbytes, digest.hexdigest()


def read_shard(path: str | os.PathLike[str], expected: ShardEntry | None = None) -> np.ndarray:
    """Return the tokens of a shard as a read-only array mapped from the file.

    With ``expected``, the file is first checked against its manifest entry
    (size and sha256); always use it for files that came over the network.
    """
    if expected is not None:
        verify_shard(path, expected)
    try:
        with open(path, "rb") as f:
            header = f.read(HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise ShardError(f"shard {path} does not exist") from None
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e.strerror}") from e
    dtype, num_tokens = _parse_header(path, header)
    body_bytes = num_tokens * dtype.itemsize
    if size < HEADER_SIZE + body_bytes:
        raise ShardError(
            f"shard {path} is truncated: its header promises {num_tokens} tokens "
            f"({HEADER_SIZE + body_bytes} bytes) but the file has {size}; download it again"
        )
    if size > HEADER_SIZE + body_bytes:
        raise ShardError(
            f"shard {path} is longer than its header says: {size} bytes for {num_tokens} "
            f"tokens ({HEADER_SIZE + body_bytes} bytes); it is corrupt, download it again"
        )
    if expected is not None and num_tokens != expected.num_tokens:
        raise ShardError(
            f"shard {path} holds {num_tokens} tokens but the manifest entry "
            f"{expected.id!r} says {expected.num_tokens}"
        )
    if num_tokens == 0:  # mmap cannot map zero bytes
        empty = np.empty(0, dtype=dtype)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(num_tokens,))


def _parse_header(path: str | os.PathLike[str], header: bytes) -> tuple[np.dtype[Any], int]:
    if len(header) < HEADER_SIZE:
        raise ShardError(
            f"shard {path} is truncated: {len(header)} bytes, shorter than the "
            f"{HEADER_SIZE}-byte header; download it again"
        )
    magic, version, code, reserved, num_tokens = _HEADER.unpack(header)
    if magic != MAGIC:
        raise ShardError(f"{path} is not a crowdtrain shard: magic {magic!r}, expected {MAGIC!r}")
    if version != SHARD_VERSION:
        raise ShardError(
            f"shard {path} has format version {version}; this crowdtrain reads "
            f"version {SHARD_VERSION}, upgrade it"
        )
    if code not in _CODES:
        raise ShardError(f"shard {path} has unknown dtype code {code} (known: 1, 2, 4)")
    if reserved != bytes(5):
        raise ShardError(f"shard {path} has non-zero reserved header bytes; it is corrupt")
    return np.dtype(f"<u{code}"), num_tokens


def verify_shard(path: str | os.PathLike[str], entry: ShardEntry) -> None:
    """Check a shard file's size and sha256 against its manifest entry.

    Hashes in chunks, so memory stays small whatever the shard size.
    """
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise ShardError(f"shard {entry.id!r} is missing: {path} does not exist") from None
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e.strerror}") from e
    if size != entry.size_bytes:
        raise ShardError(
            f"shard {path} ({entry.id!r}) is {size} bytes, the manifest says "
            f"{entry.size_bytes}; it is truncated or corrupt, download it again"
        )
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise ShardError(
            f"shard {path} ({entry.id!r}) fails its checksum: sha256 is {actual[:12]}..., "
            f"the manifest says {entry.sha256[:12]}...; download it again"
        )


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file, read in chunks."""
    try:
        with open(path, "rb", buffering=0) as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise ShardError(f"cannot read {path}: {e.strerror}") from e


# Sequence order: nodes train a shard's windows in this order and the coordinator's
# verifier cuts the same batches from it, so both must use this one implementation.


def sequence_seed(run_seed: int, epoch: int, shard_id: str, replay: int = 0) -> int:
    """A seed for the order of sequences within a shard; every node derives the same one."""
    text = f"{run_seed}:{epoch}:{shard_id}:{replay}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


def num_windows(num_tokens: int, seq_len: int) -> int:
    """How many inputs of ``seq_len`` (plus one target token) a shard holds."""
    return max(0, (num_tokens - 1) // seq_len)


def window(tokens: np.ndarray, index: int, seq_len: int) -> np.ndarray:
    """Window ``index`` of a shard: ``seq_len + 1`` tokens (inputs and the last target)."""
    start = index * seq_len
    return tokens[start : start + seq_len + 1]


def sequence_order(
    run_seed: int,
    epoch: int,
    shard_id: str,
    num_tokens: int,
    seq_len: int,
    batch_size: int,
    replay: int = 0,
) -> np.ndarray:
    """The window indices of a shard in training order, cut to whole micro-batches.

    Micro-batch ``b`` is ``order[b * batch_size : (b + 1) * batch_size]``; the
    few windows left over at the end are never trained.
    """
    n = num_windows(num_tokens, seq_len)
    num_batches = n // batch_size
    rng = np.random.default_rng(sequence_seed(run_seed, epoch, shard_id, replay))
    return rng.permutation(n)[: num_batches * batch_size]


def batch_windows(
    tokens: np.ndarray, order: np.ndarray, batch: int, batch_size: int, seq_len: int
) -> np.ndarray:
    """Micro-batch ``batch`` of a shard in ``order``: int64 ``[batch_size, seq_len + 1]``."""
    indices = order[batch * batch_size : (batch + 1) * batch_size]
    if len(indices) == 0:
        raise ShardError(f"micro-batch {batch} is past the end of the shard's order")
    return np.stack([window(tokens, int(i), seq_len) for i in indices]).astype(np.int64)
