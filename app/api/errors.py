"""Mapping service exceptions to HTTP errors, always as ``{"detail": ...}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError

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
