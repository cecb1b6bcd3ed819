"""The coordinator's keys and what only its operator may do: invites and bans.

Two secrets live in the data folder, each created on first use with mode
0600: ``coordinator.pem``, the Ed25519 key that signs published runs (nodes
pin its public half on first contact), and ``admin.key``, the bearer key the
HTTP admin routes and the ``invite``/``ban`` commands present. No HTTP or
gRPC here.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdtrain.coordinator.records import get_run
from crowdtrain.coordinator.runs.leases import LeaseBook
from crowdtrain.coordinator.store import Store
from crowdtrain.protocol.errors import AccessError, CrowdtrainError
from crowdtrain.protocol.files import atomic_write
from crowdtrain.protocol.identity import Identity

COORDINATOR_KEY_FILE = "coordinator.pem"
ADMIN_KEY_FILE = "admin.key"
_INVITE_PREFIX = "ct-"


class AdminError(CrowdtrainError):
    """An admin request without the right key, or with a bad argument."""


def coordinator_identity(data_dir: Path) -> Identity:
    """The coordinator's signing key, created in the data folder on first use."""
    return Identity.load_or_create(Path(data_dir) / COORDINATOR_KEY_FILE)


def admin_key(data_dir: Path) -> str:
    """The operator's bearer key, created in the data folder (mode 0600) on first use."""
    path = Path(data_dir) / ADMIN_KEY_FILE
    if path.exists():
        key = path.read_text(encoding="ascii", errors="replace").strip()
        if len(key) < 32:
            raise AdminError(f"{path} holds no usable admin key; delete it to make a new one")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    atomic_write(path, key + "\n", mode=0o600)
    return key


def check_admin(presented: str | None, expected: str) -> None:
    """Raise :class:`AccessError` unless ``presented`` is the admin key (constant time)."""
    if not presented:
        raise AccessError(
            "this needs the coordinator's admin key (Authorization: Bearer <key>); it is in "
            f"{ADMIN_KEY_FILE} in the coordinator's data folder"
        )
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise AccessError("wrong admin key")


def hash_secret(secret: str) -> str:
    """How invite codes and session tokens are stored: never in the clear."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Invite:
    code: str
    run_id: str
    max_uses: int
    expires_at: float | None


def create_invite(
    store: Store,
    run_id: str,
    max_uses: int = 1,
    expires_in_s: float | None = None,
    note: str = "",
) -> Invite:
    """A new invite code for ``run_id``: ``max_uses`` registrations (0: any number)."""
    run = get_run(store, run_id)
    if run.spec.access.mode != "invite":
        raise AdminError(
            f"run {run_id!r} has [access] mode = {run.spec.access.mode!r}; invite codes are "
            "only read when mode = 'invite'"
        )
    if not 0 <= max_uses <= 1_000_000:
        raise AdminError(f"uses must be between 0 (unlimited) and 1000000, got {max_uses}")
    if expires_in_s is not None and not 0 < expires_in_s <= 10 * 365 * 86400:
        raise AdminError(f"expires-in must be a positive number of seconds, got {expires_in_s}")
    if len(note) > 200:
        raise AdminError("the note must be at most 200 characters")
    code = _INVITE_PREFIX + secrets.token_urlsafe(18)
    now = time.time()
    expires_at = now + expires_in_s if expires_in_s is not None else None
    store.insert_invite(
        {
            "code_hash": hash_secret(code),
            "run_id": run_id,
            "prefix": code[:8],
            "max_uses": max_uses,
            "expires_at": expires_at,
            "note": note,
            "created_at": now,
        }
    )
    return Invite(code=code, run_id=run_id, max_uses=max_uses, expires_at=expires_at)


def check_invite(store: Store, run_id: str, code: str) -> str:
    """The stored hash of a usable invite code for ``run_id``, or :class:`AccessError`."""
    if not code:
        raise AccessError(
            f"run {run_id!r} is invite-only; ask its operator for an invite code and pass "
            "it with --invite"
        )
    row = store.get_invite(hash_secret(code))
    if row is None or row["run_id"] != run_id or row["revoked"]:
        raise AccessError(f"that invite code is not valid for run {run_id!r}")
    if row["expires_at"] is not None and row["expires_at"] <= time.time():
        raise AccessError("that invite code has expired; ask the run's operator for a new one")
    if row["max_uses"] and row["uses"] >= row["max_uses"]:
        raise AccessError("that invite code is used up; ask the run's operator for a new one")
    return str(row["code_hash"])


def list_invites(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The invites of ``run_id``, oldest first: each code's prefix only (the code itself
    is stored as a hash), its uses, expiry, note and whether it was revoked."""
    get_run(store, run_id)
    return store.list_invites(run_id)


def ban(store: Store, leases: LeaseBook, run_id: str, peer_id: str, reason: str) -> dict[str, Any]:
    """Ban a known peer: its sessions end and its leases return at once (in the store and
    in ``leases``' deadlines); it can no longer register, lease or be credited. Returns
    the ban as stored."""
    get_run(store, run_id)
    if store.get_peer(run_id, peer_id) is None:
        raise AdminError(f"no peer {peer_id!r} has joined run {run_id!r}")
    if not reason or len(reason) > 200:
        raise AdminError("give a reason of 1 to 200 characters")
    store.ban(run_id, peer_id, reason, time.time())
    leases.forget(run_id, peer_id)
    ban_row = store.get_ban(run_id, peer_id)
    assert ban_row is not None
    return ban_row


def list_bans(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The peers banned from ``run_id``, oldest ban first, with their reasons."""
    get_run(store, run_id)
    return store.list_bans(run_id)


def unban(store: Store, run_id: str, peer_id: str) -> None:
    get_run(store, run_id)
    if not store.unban(run_id, peer_id):
        raise AdminError(f"peer {peer_id!r} is not banned from run {run_id!r}")


def unflag(store: Store, run_id: str, peer_id: str) -> None:
    """Clear a peer's flag (an operator who checked it): it may average and be credited
    again, and reports about it count from none."""
    get_run(store, run_id)
    if not store.unflag(run_id, peer_id):
        raise AdminError(f"peer {peer_id!r} of run {run_id!r} is not flagged")
