"""Initial schema: mailboxes, registrations, subscriptions, nodes.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TABLE_ARGS: dict[str, Any] = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin", "mysql_engine": "InnoDB"}


def _ts(name: str, nullable: bool = False) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "mailboxes",
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("tenant", sa.String(200), nullable=True),
        sa.Column("backend", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("address", name="pk_mailboxes"),
        **TABLE_ARGS,
    )
    op.create_table(
        "registrations",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("mailbox", sa.String(320), nullable=False),
        sa.Column("device_id", sa.String(200), nullable=False),
        sa.Column("platform", sa.String(16), nullable=False),
        sa.Column("token", sa.Text(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("app_id", sa.String(200), nullable=False),
        sa.Column("environment", sa.String(16), nullable=False),
        sa.Column("locale", sa.String(35), nullable=True),
        sa.Column("timezone", sa.String(64), nullable=True),
        sa.Column("settings", sa.JSON(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("last_seen_at"),
        _ts("last_push_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_registrations"),
        sa.ForeignKeyConstraint(
            ["mailbox"], ["mailboxes.address"], name="fk_registrations_mailbox_mailboxes", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("mailbox", "device_id", name="uq_registrations_mailbox_device_id"),
        sa.UniqueConstraint("token_hash", name="uq_registrations_token_hash"),
        **TABLE_ARGS,
    )
    op.create_index("ix_registrations_last_seen_at", "registrations", ["last_seen_at"])
    op.create_table(
        "subscriptions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("mailbox", sa.String(320), nullable=False),
        sa.Column("backend", sa.String(16), nullable=False),
        sa.Column("folder", sa.String(255), nullable=False),
        sa.Column("remote_id", sa.String(512), nullable=True),
        sa.Column("client_state", sa.String(255), nullable=True),
        _ts("expires_at", nullable=True),
        sa.Column("sync_state", sa.Text(), nullable=True),
        sa.Column("watermark", sa.Text(), nullable=True),
        sa.Column("delta_link", sa.Text(), nullable=True),
        sa.Column("owner", sa.String(200), nullable=True),
        sa.Column("fencing_epoch", sa.BigInteger(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_subscriptions"),
        sa.ForeignKeyConstraint(
            ["mailbox"], ["mailboxes.address"], name="fk_subscriptions_mailbox_mailboxes", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("mailbox", "backend", "folder", name="uq_subscriptions_mailbox_backend_folder"),
        **TABLE_ARGS,
    )
    op.create_index("ix_subscriptions_remote_id", "subscriptions", ["remote_id"])
    op.create_index("ix_subscriptions_expires_at", "subscriptions", ["expires_at"])
    op.create_table(
        "nodes",
        sa.Column("node_id", sa.String(200), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        _ts("started_at"),
        _ts("heartbeat_at"),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("node_id", name="pk_nodes"),
        **TABLE_ARGS,
    )


def downgrade() -> None:
    op.drop_table("nodes")
    op.drop_index("ix_subscriptions_expires_at", "subscriptions")
    op.drop_index("ix_subscriptions_remote_id", "subscriptions")
    op.drop_table("subscriptions")
    op.drop_index("ix_registrations_last_seen_at", "registrations")
    op.drop_table("registrations")
    op.drop_table("mailboxes")
