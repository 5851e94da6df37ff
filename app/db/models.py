"""The edit log, the version tree and the head pointer: the service's source of truth."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class EditStatus(StrEnum):
    queued = "queued"
    running = "running"
    applied = "applied"
    failed = "failed"
    rejected = "rejected"
    reverted = "reverted"


TERMINAL = frozenset(
    {EditStatus.applied, EditStatus.failed, EditStatus.rejected, EditStatus.reverted}
)

# SQLite only autoincrements INTEGER PRIMARY KEY; Postgres gets a 64-bit identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}  # noqa: RUF012


class Edit(Base):
    __tablename__ = "edits"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    status: Mapped[str] = mapped_column(String(16), default=EditStatus.queued)
    # Edits posted together share the id of the first one; that id names their job.
    batch_id: Mapped[int | None] = mapped_column(BigId, nullable=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    version: Mapped[int | None] = mapped_column(
        ForeignKey("versions.id", name="fk_edits_version"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    layers: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (
        Index("ix_edits_status_id", "status", "id"),
        Index("ix_edits_batch_id", "batch_id"),
        Index("ix_edits_version", "version"),
    )


class Version(Base):
    __tablename__ = "versions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("versions.id", name="fk_versions_parent"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    method: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Names of the matrices this version changed, and of those it also stores in full.
    matrices: Mapped[list[Any]] = mapped_column(JSON, default=list)
    keyframes: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # True when the editor-state blob holds every tensor in full (no appends to the parent's).
    state_full: Mapped[bool] = mapped_column(default=True)
    bytes_stored: Mapped[int] = mapped_column(BigInteger, default=0)
    # Canary accuracy and fixed-text perplexity the worker measured at this version.
    health: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class VersionBlob(Base):
    __tablename__ = "version_blobs"

    version_id: Mapped[int] = mapped_column(
        ForeignKey("versions.id", name="fk_version_blobs_version"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # delta | keyframe | state
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)


class KeyValue(Base):
    """Small named values; ``head`` is the version every server follows."""

    __tablename__ = "kv"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    edit_id: Mapped[int] = mapped_column(ForeignKey("edits.id", name="fk_idempotency_edit"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """A caller's key: only its sha256 is stored; the raw key is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters of the raw key, so an operator can tell keys apart in listings.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


HEAD_KEY = "head"
WORKER_KEY = "worker"  # the edit worker's last heartbeat (JSON)
BASE_MODEL_KEY = "base_model"
