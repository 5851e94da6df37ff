"""Who is calling: ``require_scope`` checks the caller's API key (401/403) in ``LOKID_AUTH=keys``
mode and lets everyone through in open mode; either way the caller is then rate limited."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from app.services import keys as key_service

# auto_error=False: a missing key is our 401 with our message, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
HeaderDep = Annotated[str | None, Security(_header)]


@dataclass(frozen=True)
class Caller:
    """``key`` is the key's name (None in open mode); ``identity`` is what rate limits count."""

    key: str | None
    scopes: tuple[str, ...]
    identity: str


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, detail=message, headers={"WWW-Authenticate": "Bearer"})


def _lookup(request: Request, raw: str) -> Caller | None:
    factory = request.app.state.runtime.infra.factory
    with factory() as session:
        row = key_service.authenticate(session, raw)
        if row is None:
            return None
        return Caller(key=row.name, scopes=tuple(row.scopes), identity=f"key:{row.name}")


def _open_caller(request: Request) -> Caller:
    host = request.client.host if request.client else "unknown"
    return Caller(key=None, scopes=key_service.SCOPES, identity=f"addr:{host}")


def require_scope(scope: str, *alternatives: str) -> Callable[..., Awaitable[Caller]]:
    """A dependency that admits a caller whose key holds ``scope`` (or one of
    ``alternatives``; an admin key holds every scope)."""
    wanted = (scope, *alternatives)
    unknown = [s for s in wanted if s not in key_service.SCOPES]
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}")

    async def dependency(request: Request, bearer: BearerDep, header: HeaderDep) -> Caller:
        runtime = request.app.state.runtime
        if runtime.settings.auth == "open":
            caller = _open_caller(request)
        else:
            raw = bearer.credentials if bearer is not None else header
            if not raw:
                raise _unauthorized(
                    "missing API key: send Authorization: Bearer <key> or X-API-Key: <key>"
                )
            found = await run_in_threadpool(_lookup, request, raw)
            if found is None:
                raise _unauthorized("API key not recognised (unknown or revoked)")
            if not key_service.allows_scopes(found.scopes, wanted):
                raise HTTPException(
                    403,
                    detail=f"this key ({found.key}) lacks the {' or '.join(wanted)} scope; "
                    f"it holds {', '.join(found.scopes)}",
                )
            caller = found
        request.state.caller = caller
        limiter = getattr(runtime, "limiter", None)
        if limiter is not None:
            limiter.check(caller.identity)
        return caller

    return dependency


GenerateCaller = Annotated[Caller, Depends(require_scope("generate"))]
EditCaller = Annotated[Caller, Depends(require_scope("edit"))]
