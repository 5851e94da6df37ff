"""Moving the head to an earlier (or any other) version."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.core import metrics
from app.db.models import Edit, EditStatus, Version
from app.services.edits import Conflict, NotFound
from app.services.versions import Catalog, get_head, move_head


def rollback(factory: sessionmaker[Session], catalog: Catalog, version: int) -> dict[str, Any]:
    """Make ``version`` the head; edits off its path become ``reverted``, those on it ``applied``.

    Versions form a tree, so "rolling forward" to a version on another branch is the same call.
    """
    with factory() as session, session.begin():
        if session.get(Version, version) is None:
            raise NotFound(f"version {version} does not exist")
        previous = get_head(session, lock=True)
        if previous == version:
            raise Conflict(f"version {version} is the head already; nothing to roll back")
        move_head(session, version)
        on_path = [info.id for info in catalog.path(session, version)]
        reverted = list(
            session.scalars(
                update(Edit)
                .where(Edit.status == EditStatus.applied, Edit.version.not_in(on_path))
                .values(status=EditStatus.reverted)
                .returning(Edit.id)
            )
        )
        restored = list(
            session.scalars(
                update(Edit)
                .where(Edit.status == EditStatus.reverted, Edit.version.in_(on_path))
                .values(status=EditStatus.applied)
                .returning(Edit.id)
            )
        )
    metrics.ROLLBACKS.inc()
    return {
        "head": version,
        "previous": previous,
        "reverted": sorted(reverted),
        "restored": sorted(restored),
    }
