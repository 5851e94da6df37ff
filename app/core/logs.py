"""Structured logs: one JSON object per line, carrying the edit id and version in context.

Code that works on an edit wraps itself in ``edit_context(edit_id, version)``; every line logged
inside it (by any module, on that thread or task) then names the edit, so
``grep '"edit_id": 42'`` finds the edit's whole story across the API and the worker.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal

_edit_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("edit_id", default=None)
_version: contextvars.ContextVar[int | None] = contextvars.ContextVar("version", default=None)


@contextmanager
def edit_context(edit_id: int, version: int | None = None) -> Iterator[None]:
    tokens = (_edit_id.set(edit_id), _version.set(version))
    try:
        yield
    finally:
        _edit_id.reset(tokens[0])
        _version.reset(tokens[1])


def set_version(version: int | None) -> None:
    """The version an edit in progress is based on, then the one it created."""
    _version.set(version)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        edit_id = getattr(record, "edit_id", None) or _edit_id.get()
        if edit_id is not None:
            line["edit_id"] = edit_id
            line["version"] = getattr(record, "version", None) or _version.get()
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(fmt: Literal["json", "text"], level: str) -> None:
    """Route the root logger (uvicorn's and rq's loggers included) to stderr in ``fmt``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "rq.worker"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
