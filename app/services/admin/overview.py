"""The overview: head and base model, queue, worker heartbeat, edit outcomes and timings."""

from __future__ import annotations

import json
import statistics
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.models import BASE_MODEL_KEY, WORKER_KEY, Edit, EditStatus, KeyValue, Version, utcnow
from app.services.versions import as_utc, get_head

WINDOWS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
OUTCOMES = (EditStatus.applied, EditStatus.failed, EditStatus.rejected)
# A worker that has not written its heartbeat for this many intervals is reported stale.
STALE_AFTER_BEATS = 3
_MEDIAN_SAMPLE = 1000  # most recent applied edits the median edit time is taken over


def worker_state(session: Session, now: datetime) -> dict[str, Any]:
    row = session.get(KeyValue, WORKER_KEY)
    if row is None:
        return {"state": "never seen", "alive": False, "last_heartbeat": None, "age_seconds": None}
    body = json.loads(row.value)
    beat = as_utc(row.updated_at)
    assert beat is not None
    age = (now - beat).total_seconds()
    alive = body.get("state") != "stopped" and age <= STALE_AFTER_BEATS * body.get("interval", 5)
    return {**body, "alive": alive, "last_heartbeat": beat, "age_seconds": round(age, 1)}


def outcome_counts(session: Session, now: datetime) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for name, span in WINDOWS.items():
        rows = session.execute(
            select(Edit.status, func.count())
            .where(Edit.finished_at >= now - span, Edit.status.in_(OUTCOMES))
            .group_by(Edit.status)
        ).all()
        found = {str(status): int(n) for status, n in rows}
        counts[name] = {str(s): found.get(str(s), 0) for s in OUTCOMES}
    return counts


def median_edit_seconds(session: Session, now: datetime) -> float | None:
    """Claim to version, over the applied edits of the last day (reverted ones count too)."""
    rows = session.execute(
        select(Edit.started_at, Edit.finished_at)
        .where(
            Edit.finished_at >= now - WINDOWS["day"],
            Edit.status.in_((EditStatus.applied, EditStatus.reverted)),
            Edit.started_at.is_not(None),
        )
        .order_by(Edit.id.desc())
        .limit(_MEDIAN_SAMPLE)
    ).all()
    spans = [(as_utc(f) - as_utc(s)).total_seconds() for s, f in rows]  # type: ignore[operator]
    return round(statistics.median(spans), 3) if spans else None


def overview(session: Session) -> dict[str, Any]:
    now = utcnow()
    head = get_head(session)
    base = session.get(KeyValue, BASE_MODEL_KEY)
    head_row = session.get(Version, head)
    queued = session.scalar(
        select(func.count()).select_from(Edit).where(Edit.status == EditStatus.queued)
    )
    running = session.scalar(
        select(func.count()).select_from(Edit).where(Edit.status == EditStatus.running)
    )
    return {
        "now": now,
        "head": head,
        "head_health": head_row.health if head_row is not None else None,
        "base_model": base.value if base is not None else None,
        "queue_depth": int(queued or 0),
        "running": int(running or 0),
        "worker": worker_state(session, now),
        "edits": outcome_counts(session, now),
        "median_edit_seconds": median_edit_seconds(session, now),
    }
