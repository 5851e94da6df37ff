"""Mapping service exceptions to HTTP errors, always as ``{"detail": ...}``."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.services.edits import Conflict, InvalidEdit, NotFound


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
