"""API keys: create (the raw key is returned once), revoke, list, and authenticate a caller.

Only the sha256 of a key is stored. A key is 32 random bytes, so a fast hash is enough: nobody
can brute-force 256 bits, and a slow hash would cost every request a slow hash.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import ApiKey, utcnow
from app.services.edits import Conflict, NotFound

SCOPES = ("generate", "edit", "admin")
# An admin may do everything the service offers, so an admin key passes every scope check.
SUPERSCOPE = "admin"
KEY_PREFIX = "lokid_"
PREFIX_SHOWN = len(KEY_PREFIX) + 6
NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
# Writing last_used_at on every request would make every read a write; a minute is precise enough.
LAST_USED_RESOLUTION = timedelta(seconds=60)


class BadKeyRequest(ValueError):
    """A key name or scope that cannot be used; the message says which and why."""


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def check_scopes(scopes: Iterable[str]) -> list[str]:
    chosen = sorted(set(scopes))
    if not chosen:
        raise BadKeyRequest(f"give at least one scope: {', '.join(SCOPES)}")
    unknown = [s for s in chosen if s not in SCOPES]
    if unknown:
        raise BadKeyRequest(f"unknown scope {unknown[0]!r}; scopes are {', '.join(SCOPES)}")
    return chosen


def create_key(session: Session, name: str, scopes: Iterable[str]) -> tuple[ApiKey, str]:
    """A new key named ``name``; returns its row and the raw key, which is never stored."""
    if not NAME.match(name):
        raise BadKeyRequest("key name: 1-64 letters, digits or _.@-")
    chosen = check_scopes(scopes)
    if session.scalar(select(ApiKey.id).where(ApiKey.name == name)) is not None:
        raise Conflict(f"a key named {name!r} exists already (revoked keys keep their name)")
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        name=name,
        prefix=raw[:PREFIX_SHOWN],
        key_hash=hash_key(raw),
        scopes=chosen,
        created_at=utcnow(),
    )
    session.add(row)
    session.commit()
    return row, raw


def revoke_key(session: Session, name: str) -> ApiKey:
    row = session.scalar(select(ApiKey).where(ApiKey.name == name))
    if row is None:
        raise NotFound(f"no key named {name!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def authenticate(session: Session, raw: str) -> ApiKey | None:
    """The key's row, or None when the key is unknown or revoked."""
    if not raw.startswith(KEY_PREFIX) or len(raw) > 128:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(raw)))
    if row is None or row.revoked_at is not None:
        return None
    now = utcnow()
    last = row.last_used_at
    if last is not None and last.tzinfo is None:  # SQLite returns naive datetimes
        last = last.replace(tzinfo=now.tzinfo)
    if last is None or now - last > LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.commit()
    return row


def allows_scopes(held: Iterable[str], wanted: Iterable[str]) -> bool:
    """True when a key holding ``held`` may do what needs any one of ``wanted``."""
    have = set(held)
    return SUPERSCOPE in have or any(scope in have for scope in wanted)


def key_public(row: ApiKey) -> dict[str, object]:
    return {
        "name": row.name,
        "prefix": row.prefix,
        "scopes": list(row.scopes),
        "created_at": row.created_at,
        "revoked_at": row.revoked_at,
        "last_used_at": row.last_used_at,
    }
