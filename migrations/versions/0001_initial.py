"""Edit log, version tree with blobs, head pointer and idempotency keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    versions = op.create_table(
        "versions",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("parent_id", BigId, sa.ForeignKey("versions.id", name="fk_versions_parent")),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("method", sa.String(64)),
        sa.Column("matrices", sa.JSON, nullable=False),
        sa.Column("keyframes", sa.JSON, nullable=False),
        sa.Column("state_full", sa.Boolean, nullable=False),
        sa.Column("bytes_stored", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "version_blobs",
        sa.Column(
            "version_id",
            BigId,
            sa.ForeignKey("versions.id", name="fk_version_blobs_version"),
            primary_key=True,
        ),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "edits",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("batch_id", BigId),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("note", sa.Text),
        sa.Column("version", BigId, sa.ForeignKey("versions.id", name="fk_edits_version")),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("error", sa.Text),
        sa.Column("layers", sa.JSON),
        sa.Column("metrics", sa.JSON),
        sa.Column("attempts", sa.Integer, nullable=False),
    )
    op.create_index("ix_edits_status_id", "edits", ["status", "id"])
    op.create_index("ix_edits_batch_id", "edits", ["batch_id"])
    op.create_index("ix_edits_version", "edits", ["version"])
    kv = op.create_table(
        "kv",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column(
            "edit_id", BigId, sa.ForeignKey("edits.id", name="fk_idempotency_edit"), nullable=False
        ),
        sa.Column("created_at", TS, nullable=False),
    )
    # Version 0 is the base model; it exists before any edit, and the head starts there.
    now = datetime.now(UTC)
    op.bulk_insert(
        versions,
        [
            {
                "id": 0,
                "parent_id": None,
                "created_at": now,
                "method": None,
                "matrices": [],
                "keyframes": [],
                "state_full": True,
                "bytes_stored": 0,
            }
        ],
    )
    op.bulk_insert(kv, [{"key": "head", "value": "0", "updated_at": now}])


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_table("kv")
    op.drop_index("ix_edits_version", table_name="edits")
    op.drop_index("ix_edits_batch_id", table_name="edits")
    op.drop_index("ix_edits_status_id", table_name="edits")
    op.drop_table("edits")
    op.drop_table("version_blobs")
    op.drop_table("versions")
