"""Admin dashboard sessions: a signed cookie naming the admin key that logged in, and the CSRF
token bound to it. Nothing is stored server-side; revoking the key ends its sessions, because
every request checks the key again."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.models import ApiKey
from app.services import keys as key_service

log = logging.getLogger(__name__)
ADMIN_SCOPE = "admin"
BOOTSTRAP_KEY_NAME = "bootstrap-admin"


def load_secret(settings: Settings) -> bytes:
    """``LOKID_SESSION_SECRET``, else the secret file (created, mode 0600, on first start)."""
    if settings.session_secret is not None:
        return settings.session_secret.get_secret_value().encode()
    path = Path(settings.session_secret_file)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    secret = path.read_text().strip()
    if len(secret) < 32:
        raise ValueError(f"LOKID_SESSION_SECRET_FILE: {path} holds fewer than 32 characters")
    return secret.encode()


@dataclass(frozen=True)
class AdminSession:
    sid: str  # random per session; the CSRF token is derived from it
    key_id: int | None  # None before login: the login form's CSRF still needs a sid


class SessionCodec:
    def __init__(self, secret: bytes, max_age_seconds: float) -> None:
        self._secret = secret
        self._serializer = URLSafeTimedSerializer(secret, salt="lokid-admin-session")
        self.max_age = int(max_age_seconds)

    def dump(self, session: AdminSession) -> str:
        return self._serializer.dumps({"sid": session.sid, "key": session.key_id})

    def load(self, token: str | None) -> AdminSession | None:
        if not token:
            return None
        try:
            data = self._serializer.loads(token, max_age=self.max_age)
        except BadSignature:  # tampered, or expired (SignatureExpired is a BadSignature)
            return None
        if not isinstance(data, dict) or not isinstance(data.get("sid"), str):
            return None
        key_id = data.get("key")
        return AdminSession(data["sid"], key_id if isinstance(key_id, int) else None)

    def csrf_token(self, session: AdminSession) -> str:
        return hmac.new(self._secret, f"csrf:{session.sid}".encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, session: AdminSession | None, token: str | None) -> bool:
        if session is None or not token:
            return False
        return hmac.compare_digest(self.csrf_token(session), token)


def new_session(key_id: int | None = None) -> AdminSession:
    return AdminSession(secrets.token_urlsafe(24), key_id)


def admin_key(session: Session, key_id: int) -> ApiKey | None:
    """The key a session names, while it is still an unrevoked admin key."""
    row = session.get(ApiKey, key_id)
    if row is None or row.revoked_at is not None or ADMIN_SCOPE not in row.scopes:
        return None
    return row


def ensure_admin_key(factory: sessionmaker[Session]) -> str | None:
    """Create an admin key when the database holds no usable one; returns it raw (once)."""
    with factory() as session:
        for row in session.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None))):
            if ADMIN_SCOPE in row.scopes:
                return None
        name = BOOTSTRAP_KEY_NAME
        taken = set(session.scalars(select(ApiKey.name)))
        while name in taken:  # an earlier bootstrap key was revoked: its name stays taken
            name = f"{BOOTSTRAP_KEY_NAME}-{secrets.token_hex(3)}"
        _, raw = key_service.create_key(session, name, [ADMIN_SCOPE])
    log.warning("created admin key %r: it is shown once, at start-up", name)
    return raw
