"""One prompt answered by the head and by another version, side by side."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Version
from app.services.edits import NotFound
from app.serving.generation import Generator, GenOutput, GenParams

ENDPOINT = "playground"


def _public(out: GenOutput) -> dict[str, Any]:
    return {"version": out.version, "text": out.text, "usage": out.usage}


def compare(
    factory: sessionmaker[Session],
    generator: Generator,
    prompt: str,
    version: int,
    params: GenParams,
) -> dict[str, Any]:
    with factory() as session:
        if session.get(Version, version) is None:
            raise NotFound(f"version {version} does not exist")
    generator.encode(prompt, params.max_new_tokens)  # a bad prompt is refused before anything
    head = generator.complete(prompt, params, endpoint=ENDPOINT)
    if version == head.version:
        other = head
    else:
        with generator.serving.borrowed(version):
            other = generator.complete_held(prompt, params, version, endpoint=ENDPOINT)
    return {"prompt": prompt, "head": _public(head), "other": _public(other)}
