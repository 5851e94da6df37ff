"""/v1/admin/*: what the dashboard shows, as JSON for other tools. Admin key or session only."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from starlette.concurrency import run_in_threadpool

from app.api.admin_auth import require_admin
from app.api.deps import RuntimeDep, SessionDep
from app.api_runtime import ApiRuntime
from app.db.models import EditStatus
from app.schemas.admin import PlaygroundCreate
from app.schemas.ids import MAX_ID
from app.services.admin import edit_log, overview, playground, version_diff, version_tree
from app.services.edits import public
from app.serving.generation import GenParams

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])
GENERATION_WINDOWS = {"last_5m": 300.0, "last_hour": 3600.0}


def generation_stats(runtime: ApiRuntime) -> dict[str, Any]:
    """This API process's generation requests and tokens/s (each replica counts its own)."""
    out = {}
    for name, seconds in GENERATION_WINDOWS.items():
        window = runtime.generator.stats.window(seconds)
        rate = window.tokens_per_second
        out[name] = {
            "requests": window.requests,
            "tokens": window.tokens,
            "tokens_per_second": None if rate is None else round(rate, 2),
        }
    return out


def overview_of(runtime: ApiRuntime) -> dict[str, Any]:
    with runtime.infra.factory() as session:
        body = overview.overview(session)
    body["serving_version"] = runtime.serving.version
    body["generation"] = generation_stats(runtime)
    return body


@router.get("/overview")
def get_overview(runtime: RuntimeDep) -> dict[str, Any]:
    return overview_of(runtime)


@router.get("/edits")
def list_edits(
    session: SessionDep,
    status: EditStatus | None = None,
    q: Annotated[
        str | None, Query(max_length=200, description="subject or target contains")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 25,
    before: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> dict[str, Any]:
    page, next_before = edit_log.search(session, status=status, query=q, limit=limit, before=before)
    return {"data": [public(e) for e in page], "next_before": next_before}


@router.get("/edits/{edit_id}")
def get_edit(edit_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep) -> dict[str, Any]:
    return edit_log.detail(session, edit_id)


@router.get("/versions")
def get_versions(session: SessionDep) -> dict[str, Any]:
    return version_tree.tree(session)


@router.get("/versions/diff")
def get_diff(
    runtime: RuntimeDep,
    session: SessionDep,
    a: Annotated[int, Query(ge=0, le=MAX_ID)],
    b: Annotated[int, Query(ge=0, le=MAX_ID)],
) -> dict[str, Any]:
    serving = runtime.serving
    return version_diff.diff(session, serving.catalog, serving.live.materialiser, a, b)


@router.get("/health")
def get_health(session: SessionDep) -> dict[str, Any]:
    return version_tree.health_series(session)


@router.post("/playground")
async def post_playground(body: PlaygroundCreate, runtime: RuntimeDep) -> dict[str, Any]:
    params = GenParams(max_new_tokens=body.max_new_tokens)
    return await run_in_threadpool(
        playground.compare,
        runtime.infra.factory,
        runtime.generator,
        body.prompt,
        body.version,
        params,
    )
