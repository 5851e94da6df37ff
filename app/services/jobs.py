"""The worker's side of the edit log: claiming a job and recording how it ended."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Edit, EditStatus, Version, VersionBlob, utcnow
from app.services.versions import move_head


def _job_filter(job_id: int) -> Any:
    return or_(Edit.id == job_id, Edit.batch_id == job_id)


def claim(factory: sessionmaker[Session], job_id: int) -> list[Edit]:
    """Mark the job's edits ``running``; empty when they are not queued (already handled)."""
    with factory() as session, session.begin():
        result = session.execute(
            update(Edit)
            .where(_job_filter(job_id), Edit.status == EditStatus.queued)
            .values(status=EditStatus.running, started_at=utcnow(), attempts=Edit.attempts + 1)
        )
        if result.rowcount == 0:  # type: ignore[attr-defined]
            return []
        return list(
            session.scalars(
                select(Edit)
                .where(_job_filter(job_id), Edit.status == EditStatus.running)
                .order_by(Edit.id)
            )
        )


def finish(
    factory: sessionmaker[Session],
    edits: Sequence[Edit],
    status: EditStatus,
    *,
    error: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> None:
    with factory() as session, session.begin():
        session.execute(
            update(Edit)
            .where(Edit.id.in_([e.id for e in edits]), Edit.status == EditStatus.running)
            .values(status=status, error=error, metrics=metrics, finished_at=utcnow())
        )


def commit_version(
    factory: sessionmaker[Session],
    edits: Sequence[Edit],
    *,
    parent: int,
    method: str,
    matrices: list[str],
    keyframes: list[str],
    state_full: bool,
    blobs: dict[str, tuple[str, int]],
    layers: list[int],
    metrics: dict[str, Any],
    health: dict[str, Any] | None = None,
    per_edit: dict[int, dict[str, Any]] | None = None,
) -> int:
    """One transaction: the version row and its blobs, the edits applied, the head moved.

    Raises ``HeadMoved`` (and commits nothing) when a rollback moved the head meanwhile.
    """
    with factory() as session, session.begin():
        version = Version(
            parent_id=parent,
            created_at=utcnow(),
            method=method,
            matrices=matrices,
            keyframes=keyframes,
            state_full=state_full,
            bytes_stored=sum(size for _, size in blobs.values()),
            health=health,
        )
        session.add(version)
        session.flush()
        for kind, (sha, size) in blobs.items():
            session.add(VersionBlob(version_id=version.id, kind=kind, sha256=sha, bytes=size))
        move_head(session, version.id, expected=parent)
        now = utcnow()
        for edit in edits:  # one row each: an edit's own probe joins the job's metrics
            own = {**metrics, **(per_edit or {}).get(edit.id, {})}
            session.execute(
                update(Edit)
                .where(Edit.id == edit.id)
                .values(
                    status=EditStatus.applied,
                    version=version.id,
                    finished_at=now,
                    error=None,
                    layers=layers,
                    metrics=own,
                )
            )
        return version.id


def record_health(factory: sessionmaker[Session], version: int, health: dict[str, Any]) -> None:
    """Health measured for a version that has none yet (the base model's, on first start)."""
    with factory() as session, session.begin():
        session.execute(
            update(Version)
            .where(Version.id == version, Version.health.is_(None))
            .values(health=health)
        )
