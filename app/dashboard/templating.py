"""Jinja2 set-up shared by the dashboard pages: every page gets the CSRF token and the admin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request, Response
from fastapi.templating import Jinja2Templates

from app.api.admin_auth import codec, cookie_session
from app.services.admin_sessions import AdminSession

HERE = Path(__file__).parent
STATIC = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")


def render(
    request: Request,
    name: str,
    *,
    status_code: int = 200,
    session: AdminSession | None = None,
    **context: Any,
) -> Response:
    """``session``: one this response is about to set (the login page's first visit)."""
    session = session or cookie_session(request)
    csrf = codec(request).csrf_token(session) if session is not None else ""
    return templates.TemplateResponse(
        request,
        name,
        {"csrf": csrf, "admin": getattr(request.state, "admin", None), **context},
        status_code=status_code,
    )
