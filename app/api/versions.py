"""/v1/versions and /v1/rollback."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from starlette.concurrency import run_in_threadpool

from app.api.auth import require_scope
from app.api.deps import RuntimeDep, SessionDep
from app.api_runtime import ApiRuntime
from app.db.models import Version
from app.schemas.ids import MAX_ID
from app.schemas.versions import RollbackCreate, RollbackPublic, VersionList, VersionPublic
from app.services import rollback as rollback_service
from app.services.edits import Conflict, NotFound
from app.services.versions import get_head, list_versions, version_public
from app.versions.store import BlobCorrupted

router = APIRouter(tags=["versions"])
# Version numbers are in every generation answer, so generate keys may read the tree too.
ReadVersions = [Depends(require_scope("generate", "edit"))]
RollBack = [Depends(require_scope("edit"))]


@router.get("/v1/versions", response_model=VersionList, dependencies=ReadVersions)
def versions(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
) -> dict[str, object]:
    head = get_head(session)
    rows = list_versions(session, limit=limit + 1, before=before)
    page = rows[:limit]
    return {
        "head": head,
        "data": [version_public(session, row, head) for row in page],
        "next_before": page[-1].id if len(rows) > limit else None,
    }


@router.get("/v1/versions/head", response_model=VersionPublic, dependencies=ReadVersions)
def head_version(session: SessionDep) -> dict[str, object]:
    head = get_head(session)
    row = session.get(Version, head)
    assert row is not None
    return version_public(session, row, head)


@router.get("/v1/versions/{version_id}", response_model=VersionPublic, dependencies=ReadVersions)
def version(
    version_id: Annotated[int, Path(ge=0, le=MAX_ID)], session: SessionDep
) -> dict[str, object]:
    row = session.get(Version, version_id)
    if row is None:
        raise NotFound(f"version {version_id} does not exist")
    return version_public(session, row, get_head(session))


def rollback_now(runtime: ApiRuntime, version: int) -> dict[str, object]:
    """Move the head, switch this process before answering (so its next generation serves the
    new head), and tell the others. Used by /v1/rollback and the dashboard."""
    serving = runtime.serving
    # Read the target first: a version whose blobs are missing or corrupt never becomes head.
    try:
        prepared = serving.prepare(version)
    except KeyError:
        raise NotFound(f"version {version} does not exist") from None
    except BlobCorrupted as error:
        raise Conflict(f"version {version} cannot be served: {error}") from None
    result = rollback_service.rollback(runtime.infra.factory, serving.catalog, version)
    result["serving"] = serving.sync_to_head(prepared)
    runtime.infra.bus.publish(version)
    return result


@router.post("/v1/rollback", response_model=RollbackPublic, dependencies=RollBack)
async def rollback(body: RollbackCreate, runtime: RuntimeDep) -> dict[str, object]:
    return await run_in_threadpool(rollback_now, runtime, body.version)
