"""Submitting edits and reading the edit log."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.core import metrics
from app.db.models import Edit, EditStatus, IdempotencyKey, utcnow
from app.db.session import engine_of
from app.queue.dispatch import Dispatcher
from app.schemas.edits import EditCreate
from app.services.limits import Limits
from app.services.versions import as_utc
from workers.editing.requests import EditRequest

log = logging.getLogger(__name__)


class InvalidEdit(ValueError):
    """An edit the editor would refuse; ``loc`` points at the offending field."""

    def __init__(self, loc: list[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


class Conflict(ValueError):
    """The request clashes with the current state (HTTP 409)."""


class IdempotencyConflict(Conflict):
    pass


class NotFound(LookupError):
    pass


def check(
    items: Sequence[EditCreate],
    *,
    batch: bool,
    limits: Limits | None = None,
    tokenizer: Any = None,
) -> None:
    """Refuse now what the worker would refuse later, or what exceeds a limit, naming the field."""
    if limits is not None:
        problem = limits.batch_problem(len(items))
        if problem:
            raise InvalidEdit(["body", "edits"], problem)
    for i, item in enumerate(items):
        loc: list[str | int] = ["body", "edits", i] if batch else ["body"]
        try:
            EditRequest.from_dict(item.editor_request())
        except ValueError as error:
            field, _, message = str(error).partition(": ")
            raise InvalidEdit([*loc, field], message or str(error)) from None
        if limits is not None and tokenizer is not None:
            too_long = limits.edit_problem(tokenizer, item.editor_request())
            if too_long:
                raise InvalidEdit([*loc, too_long[0]], too_long[1])


def request_hash(scope: str, payload: Any) -> str:
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{scope}\n{body}".encode()).hexdigest()


def _existing(session: Session, key: str, digest: str) -> list[Edit] | None:
    row = session.get(IdempotencyKey, key)
    if row is None:
        return None
    if row.request_hash != digest:
        raise IdempotencyConflict(
            "Idempotency-Key was already used with a different request; use a new key"
        )
    return job_edits(session, row.edit_id)


def job_edits(session: Session, job_id: int) -> list[Edit]:
    stmt = select(Edit).where((Edit.id == job_id) | (Edit.batch_id == job_id)).order_by(Edit.id)
    return list(session.scalars(stmt))


def submit(
    factory: sessionmaker[Session],
    dispatcher: Dispatcher,
    items: Sequence[EditCreate],
    *,
    batch: bool,
    idempotency_key: str | None = None,
    scope: str = "",
) -> tuple[list[Edit], bool]:
    """Store the edits as ``queued`` and dispatch their job; returns (edits, replayed)."""
    digest = request_hash(scope, [i.model_dump() for i in items]) if idempotency_key else ""
    if idempotency_key:
        with factory() as session:
            found = _existing(session, idempotency_key, digest)
        if found is not None:
            return found, True
    now = utcnow()
    rows = [
        {
            "status": EditStatus.queued.value,
            "request": item.editor_request(),
            "note": item.note,
            "created_at": now,
            "attempts": 0,
        }
        for item in items
    ]
    edits_table, keys_table = Edit.__table__, IdempotencyKey.__table__
    try:
        # Core, not the ORM: this is the hot path of the API (hundreds of requests a second).
        with engine_of(factory).begin() as conn:
            returning = insert(edits_table).returning(
                edits_table.c.id, sort_by_parameter_order=True
            )
            ids = [int(i) for i in conn.scalars(returning, rows)]
            job_id = ids[0]
            if batch:
                conn.execute(
                    update(edits_table).where(edits_table.c.id.in_(ids)).values(batch_id=job_id)
                )
            if idempotency_key:
                conn.execute(
                    insert(keys_table).values(
                        key=idempotency_key, request_hash=digest, edit_id=job_id, created_at=now
                    )
                )
    except IntegrityError:
        if not idempotency_key:
            raise
        with factory() as session:  # a concurrent request with the same key won the race
            found = _existing(session, idempotency_key, digest)
        if found is None:
            raise
        return found, True
    try:
        dispatcher.enqueue(job_id)
    except Exception:  # the row is committed; the reconciler dispatches it later
        log.warning(
            "could not dispatch edit job %s now", job_id, exc_info=True, extra={"edit_id": job_id}
        )
    metrics.EDITS_SUBMITTED.inc(len(ids))
    edits = [
        Edit(id=i, batch_id=job_id if batch else None, version=None, **row)
        for i, row in zip(ids, rows, strict=True)
    ]
    return edits, False


def get(session: Session, edit_id: int) -> Edit:
    edit = session.get(Edit, edit_id)
    if edit is None:
        raise NotFound(f"edit {edit_id} does not exist")
    return edit


def list_edits(
    session: Session, *, status: EditStatus | None, limit: int, before: int | None
) -> list[Edit]:
    stmt = select(Edit).order_by(Edit.id.desc()).limit(limit)
    if status is not None:
        stmt = stmt.where(Edit.status == status)
    if before is not None:
        stmt = stmt.where(Edit.id < before)
    return list(session.scalars(stmt))


def public(edit: Edit) -> dict[str, Any]:
    return {
        "id": edit.id,
        "status": edit.status,
        "version": edit.version,
        "batch_id": edit.batch_id,
        "created_at": as_utc(edit.created_at),
        "started_at": as_utc(edit.started_at),
        "finished_at": as_utc(edit.finished_at),
        "error": edit.error,
        "layers": edit.layers,
        "metrics": edit.metrics,
        "request": edit.request,
        "note": edit.note,
    }


def requeue(factory: sessionmaker[Session], dispatcher: Dispatcher, edit_id: int) -> Edit:
    """Submit a finished edit's request again, as a new edit on the current head."""
    with factory() as session:
        old = get(session, edit_id)
        if old.status in (EditStatus.queued, EditStatus.running, EditStatus.applied):
            raise Conflict(f"edit {edit_id} is {old.status}; only finished edits can be requeued")
        item = EditCreate(**old.request, note=f"requeue of edit {edit_id}")
    edits, _ = submit(factory, dispatcher, [item], batch=False)
    return edits[0]
