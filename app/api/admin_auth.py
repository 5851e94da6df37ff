"""Who may see /admin and /v1/admin/*: an admin-scope API key (Bearer or X-API-Key) or a
dashboard session made by logging in with one. Always required, whatever ``LOKID_AUTH`` says:
the dashboard can roll the model back."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from app.services import keys as key_service
from app.services.admin_sessions import ADMIN_SCOPE, AdminSession, SessionCodec, admin_key

COOKIE = "lokid_admin"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"


@dataclass(frozen=True)
class Admin:
    key: str  # the key's name
    session: AdminSession | None  # None when the request carried the key itself


class LoginRequired(Exception):
    """A dashboard page asked for without a session: the handler sends the login page."""

    def __init__(self, next_path: str) -> None:
        self.next_path = next_path


def codec(request: Request) -> SessionCodec:
    return request.app.state.admin_sessions


def cookie_session(request: Request) -> AdminSession | None:
    return codec(request).load(request.cookies.get(COOKIE))


def set_cookie(request: Request, response: Response, session: AdminSession | None) -> None:
    if session is None:
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return
    sessions = codec(request)
    response.set_cookie(
        COOKIE,
        sessions.dump(session),
        max_age=sessions.max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.app.state.runtime.settings.cookie_secure,
    )


def _raw_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key") or None


def _check(request: Request, session: AdminSession | None, raw: str | None) -> Admin | None:
    """The admin behind the session or the key; raises 403 for a key without the scope."""
    factory = request.app.state.runtime.infra.factory
    with factory() as db:
        if session is not None and session.key_id is not None:
            row = admin_key(db, session.key_id)
            if row is not None:
                return Admin(row.name, session)
        if raw:
            key = key_service.authenticate(db, raw)
            if key is None:
                return None
            if ADMIN_SCOPE not in key.scopes:
                raise HTTPException(
                    403, detail=f"this key ({key.name}) lacks the admin scope needed here"
                )
            return Admin(key.name, None)
    return None


async def require_admin(request: Request) -> Admin:
    """For /v1/admin/*: 401 JSON unless an admin key or an admin session comes with it."""
    admin = await run_in_threadpool(_check, request, cookie_session(request), _raw_key(request))
    if admin is None:
        raise HTTPException(
            401,
            detail="admin authentication required: send an admin-scope API key "
            "(Authorization: Bearer <key>) or log in at /admin/login",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if admin.session is not None and request.method not in ("GET", "HEAD", "OPTIONS"):
        # a browser session, not a key: a write must prove it comes from our own page
        token = request.headers.get(CSRF_HEADER)
        if not codec(request).csrf_ok(admin.session, token):
            raise HTTPException(403, detail=f"CSRF token missing or wrong: send {CSRF_HEADER}")
    request.state.admin = admin
    return admin


async def require_admin_page(request: Request) -> Admin:
    """For /admin pages: the login page instead of a 401."""
    session = cookie_session(request)
    admin = await run_in_threadpool(_check, request, session, None)
    if admin is None:
        raise LoginRequired(request.url.path)
    request.state.admin = admin
    return admin


async def require_csrf(request: Request) -> None:
    """Every form POST of the dashboard: the token from the page (form field, or the header
    htmx sends) must match the one derived from this browser's session cookie."""
    token = request.headers.get(CSRF_HEADER)
    if token is None:
        form = await request.form()
        value = form.get(CSRF_FIELD)
        token = value if isinstance(value, str) else None
    if not codec(request).csrf_ok(cookie_session(request), token):
        raise HTTPException(
            403, detail="CSRF token missing or wrong: reload the page and submit again"
        )
