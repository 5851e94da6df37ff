"""/admin/login and /admin/logout: trading an admin API key for a session cookie."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from app.api.admin_auth import cookie_session, require_csrf, set_cookie
from app.dashboard.templating import render
from app.services import keys as key_service
from app.services.admin_sessions import ADMIN_SCOPE, new_session

router = APIRouter()


def _safe_next(path: str | None) -> str:
    """Only back into the dashboard: never an open redirect to another site."""
    if path and path.startswith("/admin") and not path.startswith("/admin/login"):
        return path
    return "/admin"


def _login_page(
    request: Request, next_path: str, error: str | None = None, status_code: int = 200
) -> Response:
    session = cookie_session(request)
    fresh = session is None
    if fresh:  # the login form's CSRF token needs a session of its own, before any key
        session = new_session()
    response = render(
        request,
        "login.html",
        status_code=status_code,
        session=session,
        next_path=next_path,
        error=error,
    )
    if fresh:
        set_cookie(request, response, session)
    return response


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None) -> Response:
    return _login_page(request, _safe_next(next))


def _admin_key_id(request: Request, raw: str) -> tuple[int | None, str, int]:
    """(key id, error, status): the id of an admin key, or why not and the HTTP status."""
    with request.app.state.runtime.infra.factory() as session:
        key = key_service.authenticate(session, raw.strip())
        if key is None:
            return None, "That key is not recognised (unknown or revoked).", 401
        if ADMIN_SCOPE not in key.scopes:
            return None, f"The key {key.name!r} lacks the admin scope.", 403
        return key.id, "", 200


@router.post("/login", response_class=HTMLResponse, dependencies=[Depends(require_csrf)])
async def login(
    request: Request,
    key: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=500)] = "/admin",
) -> Response:
    key_id, error, status = await run_in_threadpool(_admin_key_id, request, key)
    if key_id is None:
        return _login_page(request, _safe_next(next), error, status)
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_cookie(request, response, new_session(key_id))  # a new sid: no session fixation
    return response


@router.post("/logout", dependencies=[Depends(require_csrf)])
def logout(request: Request) -> Response:
    response = RedirectResponse("/admin/login", status_code=303)
    set_cookie(request, response, None)
    return response
