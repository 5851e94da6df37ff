"""/v1/edits: submit fact corrections, read the edit log, follow one edit's progress."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from app.api.auth import require_scope
from app.api.deps import RuntimeDep, SessionDep
from app.api_runtime import ApiRuntime
from app.db.models import TERMINAL, EditStatus
from app.schemas.edits import EditBatchCreate, EditBatchPublic, EditCreate, EditList, EditPublic
from app.schemas.ids import MAX_ID
from app.services import edits as service

# The edit log holds operators' corrections and notes: reading it needs the edit scope too.
router = APIRouter(
    prefix="/v1/edits", tags=["edits"], dependencies=[Depends(require_scope("edit"))]
)
EditId = Annotated[int, Path(ge=1, le=MAX_ID)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]


def _check(runtime: ApiRuntime, items: list[EditCreate], *, batch: bool) -> None:
    tokenizer = runtime.generator.tokenizer
    service.check(items, batch=batch, limits=runtime.limits, tokenizer=tokenizer)


def _accepted(model: type[BaseModel], body: dict[str, object], replayed: bool) -> Response:
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    content = model.model_validate(body).model_dump_json()
    return Response(content, status_code=202, media_type="application/json", headers=headers)


@router.post("", status_code=202, response_model=EditPublic)
async def create_edit(
    body: EditCreate, runtime: RuntimeDep, key: IdempotencyKey = None
) -> Response:
    # async with one explicit thread hop: this is the API's busiest write path
    _check(runtime, [body], batch=False)
    if key is None:  # concurrent submissions share one commit and one Redis round trip
        edit = await run_in_threadpool(runtime.ingest.submit, body)
        return _accepted(EditPublic, service.public(edit), False)
    edits, replayed = await run_in_threadpool(
        service.submit,
        runtime.infra.factory,
        runtime.infra.dispatcher,
        [body],
        batch=False,
        idempotency_key=key,
        scope="POST /v1/edits",
    )
    return _accepted(EditPublic, service.public(edits[0]), replayed)


@router.post("/batch", status_code=202, response_model=EditBatchPublic)
async def create_batch(
    body: EditBatchCreate, runtime: RuntimeDep, key: IdempotencyKey = None
) -> Response:
    _check(runtime, body.edits, batch=True)
    edits, replayed = await run_in_threadpool(
        service.submit,
        runtime.infra.factory,
        runtime.infra.dispatcher,
        body.edits,
        batch=True,
        idempotency_key=key,
        scope="POST /v1/edits/batch",
    )
    batch = {
        "batch_id": edits[0].batch_id or edits[0].id,
        "status": edits[0].status,
        "edits": [service.public(e) for e in edits],
    }
    return _accepted(EditBatchPublic, batch, replayed)


@router.get("", response_model=EditList)
def list_edits(
    session: SessionDep,
    status: EditStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="an edit id: list older edits")
    ] = None,
) -> dict[str, object]:
    rows = service.list_edits(session, status=status, limit=limit + 1, before=before)
    page = rows[:limit]
    return {
        "data": [service.public(e) for e in page],
        "next_before": page[-1].id if len(rows) > limit else None,
    }


@router.get("/{edit_id}", response_model=EditPublic)
def get_edit(edit_id: EditId, session: SessionDep) -> dict[str, object]:
    return service.public(service.get(session, edit_id))


@router.post("/{edit_id}/requeue", status_code=202, response_model=EditPublic)
def requeue_edit(edit_id: EditId, runtime: RuntimeDep) -> dict[str, object]:
    edit = service.requeue(runtime.infra.factory, runtime.infra.dispatcher, edit_id)
    return service.public(edit)


@router.get("/{edit_id}/events")
async def edit_events(
    edit_id: EditId, runtime: RuntimeDep, request: Request
) -> EventSourceResponse:
    """Server-sent events: one ``status`` event per change, ending at a terminal status."""

    def load() -> dict[str, object]:
        with runtime.infra.factory() as session:
            return service.public(service.get(session, edit_id))

    first = await run_in_threadpool(load)  # a 404 before the stream starts

    async def events() -> AsyncIterator[ServerSentEvent]:
        current, last = first, None
        while True:
            if current["status"] != last:
                last = current["status"]
                data = json.dumps(EditPublic(**current).model_dump(mode="json"))  # type: ignore[arg-type]
                yield ServerSentEvent(data=data, event="status", id=str(last))
                if last in TERMINAL:
                    return
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.2)
            current = await run_in_threadpool(load)

    return EventSourceResponse(events(), ping=15)
