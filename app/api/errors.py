"""Mapping service exceptions to HTTP errors, always as ``{"detail": ...}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.services.edits import Conflict, InvalidEdit, NotFound
from app.services.ratelimit import RateLimited

log = logging.getLogger(__name__)
# How long a client should wait before retrying while the database is away.
DATABASE_RETRY_AFTER = 5


def install(app: FastAPI) -> None:
    @app.exception_handler(InvalidEdit)
    async def _invalid_edit(_: Request, error: InvalidEdit) -> JSONResponse:
        detail = [{"loc": error.loc, "msg": error.message, "type": "value_error"}]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, error: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=404)

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, error: Conflict) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=409)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> Response:
        # FastAPI's words for a body json.loads cannot read (bad UTF-8 included) name nothing.
        if error.status_code == 400 and error.detail == "There was an error parsing the body":
            error.detail = "request body is not valid JSON in UTF-8"
        return await http_exception_handler(request, error)

    @app.exception_handler(RateLimited)
    async def _rate_limited(_: Request, error: RateLimited) -> JSONResponse:
        headers = {"Retry-After": str(error.retry_after)}
        return JSONResponse({"detail": str(error)}, status_code=429, headers=headers)

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    async def _database_away(request: Request, error: DBAPIError) -> JSONResponse:
        # Connection lost or refused: the database is down or restarting, not the request bad.
        if not isinstance(error, OperationalError) and not error.connection_invalidated:
            raise error
        log.warning(
            "database unavailable during %s %s: %s",
            request.method,
            request.url.path,
            str(error.orig).splitlines()[0] if error.orig else error,
        )
        return JSONResponse(
            {"detail": "the database is unavailable; retry shortly"},
            status_code=503,
            headers={"Retry-After": str(DATABASE_RETRY_AFTER)},
        )
