"""Reading a batch of edits from an uploaded file: a JSON list, {"edits": [...]}, or JSONL."""

from __future__ import annotations

import json
from typing import Any

from app.schemas.edits import EditBatchCreate, EditCreate

MAX_BYTES = 2_000_000


class BadUpload(ValueError):
    """A file that is not a batch of edits; the message says what is wrong with it."""


def _items(text: str) -> list[Any]:
    try:
        data = json.loads(text)
    except ValueError:
        data = None
        lines = [line for line in text.splitlines() if line.strip()]
        try:
            return [json.loads(line) for line in lines]
        except ValueError as error:
            raise BadUpload(f"file: neither JSON nor JSON lines ({error})") from None
    if isinstance(data, dict) and isinstance(data.get("edits"), list):
        return data["edits"]
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        return [data]  # JSONL with a single line
    raise BadUpload('file: expected a list of edits, {"edits": [...]}, or one edit per line')


def parse(raw: bytes) -> list[EditCreate]:
    """Raises ``BadUpload`` or pydantic's ``ValidationError`` (naming the edit and field)."""
    if len(raw) > MAX_BYTES:
        raise BadUpload(f"file: larger than {MAX_BYTES} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadUpload("file: not UTF-8 text") from None
    if not text.strip():
        raise BadUpload("file: is empty")
    return EditBatchCreate(edits=_items(text)).edits
