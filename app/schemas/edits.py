"""Edit requests and responses."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.db.models import EditStatus

Text = Field(min_length=1, max_length=2000)
# The schema's ceiling; LOKID_MAX_BATCH (default 100) is the limit a server enforces.
MAX_BATCH = 10_000


class EditCreate(BaseModel):
    """One fact correction, ROME-style: ``prompt`` (containing ``subject``) → ``target_new``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Text
    subject: str = Text
    target_new: str = Text
    ground_truth: str | None = Field(default=None, min_length=1, max_length=2000)
    rephrase_prompts: list[str] = Field(default_factory=list, max_length=32)
    locality_prompts: list[str] = Field(default_factory=list, max_length=32)
    note: str | None = Field(default=None, max_length=2000)

    def editor_request(self) -> dict[str, Any]:
        return self.model_dump(exclude={"note"})


class EditBatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    edits: list[EditCreate] = Field(min_length=1, max_length=MAX_BATCH)


class EditPublic(BaseModel):
    id: int
    status: EditStatus
    version: int | None
    batch_id: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    layers: list[int] | None
    metrics: dict[str, Any] | None
    request: dict[str, Any]
    note: str | None


class EditBatchPublic(BaseModel):
    batch_id: int
    status: EditStatus
    edits: list[EditPublic]


class EditList(BaseModel):
    data: list[EditPublic]
    # Pass as ``before`` to get the next (older) page; null on the last page.
    next_before: int | None
