"""What separates two versions: the edits on each side and how much each matrix differs."""

from __future__ import annotations

from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Edit, Version
from app.services.edits import NotFound
from app.services.versions import Catalog
from app.versions.chain import touched
from app.versions.materialise import Materialiser


def diff(
    session: Session, catalog: Catalog, materialiser: Materialiser, a: int, b: int
) -> dict[str, Any]:
    for version in (a, b):
        if session.get(Version, version) is None:
            raise NotFound(f"version {version} does not exist")
    path_a, path_b = catalog.path(session, a), catalog.path(session, b)
    common = 0
    while common < min(len(path_a), len(path_b)) and path_a[common].id == path_b[common].id:
        common += 1
    only_a, only_b = path_a[common:], path_b[common:]
    matrices = []
    for name in sorted(touched(only_a) | touched(only_b)):
        value_a = materialiser.weight(path_a, name)
        value_b = materialiser.weight(path_b, name)
        change = float(torch.linalg.matrix_norm(value_b - value_a))
        matrices.append(
            {
                "name": name,
                "norm": round(change, 6),
                "relative": round(change / float(torch.linalg.matrix_norm(value_a)), 8),
            }
        )
    side_ids = [info.id for info in (*only_a, *only_b)]
    grouped: dict[int, list[int]] = {}
    for edit_id, version in session.execute(
        select(Edit.id, Edit.version).where(Edit.version.in_(side_ids)).order_by(Edit.id)
    ):
        grouped.setdefault(version, []).append(edit_id)
    return {
        "a": a,
        "b": b,
        "common_ancestor": path_a[common - 1].id if common else None,
        "only_in_a": [{"version": i.id, "edit_ids": grouped.get(i.id, [])} for i in only_a],
        "only_in_b": [{"version": i.id, "edit_ids": grouped.get(i.id, [])} for i in only_b],
        "matrices": matrices,
    }
