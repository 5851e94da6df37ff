"""The version tree as the dashboard draws it, and the health of each version."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Edit, Version
from app.services.versions import as_utc, get_head

MAX_VERSIONS = 500  # the newest this many; older ones are reachable through /v1/versions


def tree(session: Session) -> dict[str, Any]:
    """Newest versions with their parent, edits and health, plus the head's path."""
    head = get_head(session)
    rows = list(session.scalars(select(Version).order_by(Version.id.desc()).limit(MAX_VERSIONS)))
    ids = [row.id for row in rows]
    edits: dict[int, list[int]] = {}
    for edit_id, version in session.execute(
        select(Edit.id, Edit.version).where(Edit.version.in_(ids)).order_by(Edit.id)
    ):
        edits.setdefault(version, []).append(edit_id)
    parents = {row.id: row.parent_id for row in rows}
    on_head: list[int] = []
    current: int | None = head
    while current is not None and current in parents:
        on_head.append(current)
        current = parents[current]
    nodes = [
        {
            "id": row.id,
            "parent": row.parent_id,
            "is_head": row.id == head,
            "on_head_path": row.id in on_head,
            "created_at": as_utc(row.created_at),
            "method": row.method,
            "edit_ids": edits.get(row.id, []),
            "matrices": list(row.matrices or []),
            "bytes_stored": row.bytes_stored,
            "health": row.health,
        }
        for row in rows
    ]
    return {"head": head, "head_path": sorted(on_head), "versions": nodes}


def nested(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The flat node list as a forest (``children`` lists, oldest first) for rendering."""
    by_id = {n["id"]: {**n, "children": []} for n in nodes}
    roots = []
    for node in sorted(by_id.values(), key=lambda n: n["id"]):
        parent = by_id.get(node["parent"])
        (parent["children"] if parent is not None else roots).append(node)
    return roots


def health_series(session: Session) -> dict[str, Any]:
    """Canary accuracy and perplexity per version, in version order, head path marked."""
    data = tree(session)
    points = [
        {
            "version": n["id"],
            "canary_accuracy": n["health"]["canary_accuracy"],
            "perplexity": n["health"]["perplexity"],
            "on_head_path": n["on_head_path"],
            "is_head": n["is_head"],
        }
        for n in sorted(data["versions"], key=lambda n: n["id"])
        if n["health"]
    ]
    return {"head": data["head"], "points": points}
