"""Folder state for catch-up: the receive time of the newest items a source has handed on, and their ids.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "subscriptions",
        sa.Column("seen_through", sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"),
                  nullable=True),
    )
    op.add_column("subscriptions", sa.Column("seen_ids", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("subscriptions", "seen_ids")
    op.drop_column("subscriptions", "seen_through")
