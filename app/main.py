"""The FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from app.api import admin, edits, errors, generation, health, openai, versions
from app.api.admin_auth import LoginRequired
from app.api.body_limit import BodyLimit
from app.api_runtime import ApiRuntime, build_runtime
from app.core.config import Settings, get_settings
from app.dashboard import routes as dashboard
from app.dashboard.templating import STATIC
from app.services.admin_sessions import SessionCodec, load_secret
from app.serving.generation import BadPrompt


def create_app(
    settings: Settings | None = None,
    *,
    runtime: ApiRuntime | Callable[[], ApiRuntime] | None = None,
) -> FastAPI:
    """``runtime`` may be given ready-made (tests share loaded models); else built at start-up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = not isinstance(runtime, ApiRuntime)
        if isinstance(runtime, ApiRuntime):
            app.state.runtime = runtime
        else:
            make = runtime or (lambda: build_runtime(settings or get_settings()))
            app.state.runtime = await run_in_threadpool(make)
        chosen = app.state.runtime.settings
        app.state.admin_sessions = SessionCodec(load_secret(chosen), chosen.session_hours * 3600)
        try:
            yield
        finally:
            if owned:
                app.state.runtime.close()

    app = FastAPI(
        title="lokid",
        summary="Fact corrections applied to a served model, versioned and reversible.",
        version="0.1.0",
        lifespan=lifespan,
    )
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=(settings or get_settings()).max_body_bytes)

    @app.exception_handler(BadPrompt)
    async def _bad_prompt(_: Request, error: BadPrompt) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=422)

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, error: LoginRequired) -> Response:
        target = f"/admin/login?next={error.next_path}"
        if request.headers.get("HX-Request"):  # htmx would swap the login page into a fragment
            return Response(status_code=401, headers={"HX-Redirect": target})
        return RedirectResponse(target, status_code=303)

    for module in (edits, versions, generation, openai, health, admin, dashboard):
        app.include_router(module.router)
    app.mount("/static/admin", StaticFiles(directory=STATIC), name="admin-static")
    return app
