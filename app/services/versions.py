"""Reading the version tree and the head pointer from the database."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.models import HEAD_KEY, Edit, KeyValue, Version, VersionBlob, utcnow
from app.versions.chain import VersionInfo, path_to


class HeadMoved(RuntimeError):
    """The head changed (a rollback) while an edit was being computed on the old one."""


def get_head(session: Session, *, lock: bool = False) -> int:
    stmt = select(KeyValue.value).where(KeyValue.key == HEAD_KEY)
    if lock:  # serialises rollbacks and version commits on Postgres; SQLite locks the file
        stmt = stmt.with_for_update()
    value = session.scalar(stmt)
    if value is None:
        raise RuntimeError("database has no head version: run `lokid db upgrade`")
    return int(value)


def move_head(session: Session, new: int, *, expected: int | None = None) -> None:
    """Point the head at ``new``; with ``expected``, only if it still points there."""
    stmt = update(KeyValue).where(KeyValue.key == HEAD_KEY)
    if expected is not None:
        stmt = stmt.where(KeyValue.value == str(expected))
    result = session.execute(stmt.values(value=str(new), updated_at=utcnow()))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise HeadMoved(f"head is no longer {expected}")


def _info(row: Version, blobs: dict[str, str]) -> VersionInfo:
    return VersionInfo(
        id=row.id,
        parent=row.parent_id,
        matrices=tuple(row.matrices or ()),
        keyframes=tuple(row.keyframes or ()),
        state_full=bool(row.state_full),
        blobs=blobs,
    )


class Catalog:
    """In-memory copy of the version tree; versions are immutable, so it only ever grows."""

    def __init__(self) -> None:
        self._infos: dict[int, VersionInfo] = {}
        self._lock = threading.Lock()

    def path(self, session: Session, version: int) -> list[VersionInfo]:
        with self._lock:
            try:
                return path_to(version, self._infos)
            except KeyError:
                self._reload(session)
                return path_to(version, self._infos)

    def add(self, info: VersionInfo) -> None:
        with self._lock:
            self._infos[info.id] = info

    def _reload(self, session: Session) -> None:
        known = set(self._infos)
        stmt = select(Version)
        if known:
            stmt = stmt.where(Version.id.not_in(known))
        new = {row.id: row for row in session.scalars(stmt)}
        if not new:
            return
        blobs: dict[int, dict[str, str]] = {vid: {} for vid in new}
        for blob in session.scalars(select(VersionBlob).where(VersionBlob.version_id.in_(new))):
            blobs[blob.version_id][blob.kind] = blob.sha256
        for vid, row in new.items():
            self._infos[vid] = _info(row, blobs[vid])


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every stored time is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def version_public(session: Session, row: Version, head: int) -> dict[str, object]:
    blobs = session.scalars(
        select(VersionBlob).where(VersionBlob.version_id == row.id).order_by(VersionBlob.kind)
    ).all()
    edit_ids = session.scalars(select(Edit.id).where(Edit.version == row.id).order_by(Edit.id))
    return {
        "id": row.id,
        "parent": row.parent_id,
        "is_head": row.id == head,
        "created_at": as_utc(row.created_at),
        "method": row.method,
        "edit_ids": list(edit_ids),
        "matrices": list(row.matrices or []),
        "keyframes": list(row.keyframes or []),
        "bytes_stored": row.bytes_stored,
        "blobs": [{"kind": b.kind, "sha256": b.sha256, "bytes": b.bytes} for b in blobs],
    }


def list_versions(session: Session, *, limit: int, before: int | None) -> list[Version]:
    stmt = select(Version).order_by(Version.id.desc()).limit(limit)
    if before is not None:
        stmt = stmt.where(Version.id < before)
    return list(session.scalars(stmt))
