"""The edit log as operators browse it: filtered, searched, paged; one edit in detail."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from app.db.models import Edit, EditStatus
from app.services.edits import get, public
from app.services.versions import as_utc


def search(
    session: Session,
    *,
    status: EditStatus | None,
    query: str | None,
    limit: int,
    before: int | None,
) -> tuple[list[Edit], int | None]:
    """Newest first; ``query`` matches the subject or the target, case-insensitively.

    Returns the page and the id to pass as ``before`` for the next one (None on the last page).
    """
    stmt = select(Edit).order_by(Edit.id.desc()).limit(limit + 1)
    if status is not None:
        stmt = stmt.where(Edit.status == status)
    if before is not None:
        stmt = stmt.where(Edit.id < before)
    if query:
        needle = query.lower()
        stmt = stmt.where(
            or_(
                func.lower(Edit.request["subject"].as_string()).contains(needle, autoescape=True),
                func.lower(Edit.request["target_new"].as_string()).contains(
                    needle, autoescape=True
                ),
            )
        )
    rows = list(session.scalars(stmt))
    page = rows[:limit]
    return page, (page[-1].id if len(rows) > limit else None)


def history(edit: Edit) -> list[dict[str, Any]]:
    """Status changes as the edit's timestamps record them (a revert has no time of its own)."""
    steps: list[dict[str, Any]] = [{"status": EditStatus.queued.value, "at": edit.created_at}]
    if edit.started_at is not None:
        steps.append({"status": EditStatus.running.value, "at": edit.started_at})
    if edit.status == EditStatus.reverted:
        steps.append({"status": EditStatus.applied.value, "at": edit.finished_at})
        steps.append({"status": EditStatus.reverted.value, "at": None})
    elif edit.status != EditStatus.queued and edit.status != EditStatus.running:
        steps.append({"status": str(edit.status), "at": edit.finished_at})
    for step in steps:
        step["at"] = as_utc(step["at"])
    return steps


def detail(session: Session, edit_id: int) -> dict[str, Any]:
    edit = get(session, edit_id)
    metrics = edit.metrics or {}
    return {
        **public(edit),
        "history": history(edit),
        "layer_scores": metrics.get("layers", []),
        "delta_norm": metrics.get("delta_norm", {}),
        "relative_change": metrics.get("relative_change", {}),
        "steps": metrics.get("steps"),
        "seconds": metrics.get("seconds"),
        "probe": metrics.get("probe"),
        "health": metrics.get("health"),
    }
