"""Versions, the head and rollback."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.ids import MAX_ID


class BlobPublic(BaseModel):
    kind: str
    sha256: str
    bytes: int


class VersionPublic(BaseModel):
    id: int
    parent: int | None
    is_head: bool
    created_at: datetime
    method: str | None
    edit_ids: list[int]
    matrices: list[str]
    keyframes: list[str]
    bytes_stored: int
    blobs: list[BlobPublic]


class VersionList(BaseModel):
    head: int
    data: list[VersionPublic]
    next_before: int | None


class RollbackCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=0, le=MAX_ID)


class RollbackPublic(BaseModel):
    head: int
    previous: int
    serving: int
    reverted: list[int]
    restored: list[int]
