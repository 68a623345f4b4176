"""The schema as SQLAlchemy Core tables; migrations in store/migrations create exactly this."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
}
MYSQL_TABLE_ARGS: dict[str, Any] = {
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
    "mysql_engine": "InnoDB",
}

metadata = sa.MetaData(naming_convention=NAMING)


class UtcDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC in Python, naive UTC with microseconds in the database (MySQL DATETIME has no zone)."""

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use aware UTC")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


mailboxes = sa.Table(
    "mailboxes",
    metadata,
    sa.Column("address", sa.String(320), primary_key=True),
    sa.Column("tenant", sa.String(200), nullable=True),
    sa.Column("backend", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    **MYSQL_TABLE_ARGS,
)

registrations = sa.Table(
    "registrations",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column(
        "mailbox",
        sa.String(320),
        sa.ForeignKey("mailboxes.address", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("device_id", sa.String(200), nullable=False),
    sa.Column("platform", sa.String(16), nullable=False),
    sa.Column("token", sa.Text(), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column("app_id", sa.String(200), nullable=False),
    sa.Column("environment", sa.String(16), nullable=False),
    sa.Column("locale", sa.String(35), nullable=True),
    sa.Column("timezone", sa.String(64), nullable=True),
    sa.Column("settings", sa.JSON(), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    sa.Column("last_seen_at", UtcDateTime(), nullable=False),
    sa.Column("last_push_at", UtcDateTime(), nullable=True),
    sa.UniqueConstraint("mailbox", "device_id"),
    sa.UniqueConstraint("token_hash"),
    sa.Index(None, "last_seen_at"),
    **MYSQL_TABLE_ARGS,
)

subscriptions = sa.Table(
    "subscriptions",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column(
        "mailbox",
        sa.String(320),
        sa.ForeignKey("mailboxes.address", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("backend", sa.String(16), nullable=False),
    sa.Column("folder", sa.String(255), nullable=False),
    sa.Column("remote_id", sa.String(512), nullable=True),
    sa.Column("client_state", sa.String(255), nullable=True),
    sa.Column("expires_at", UtcDateTime(), nullable=True),
    sa.Column("sync_state", sa.Text(), nullable=True),
    sa.Column("watermark", sa.Text(), nullable=True),
    sa.Column("delta_link", sa.Text(), nullable=True),
    #: the receive time of the newest item the source has handed to the relay (catch-up skips older ones)
    sa.Column("seen_through", UtcDateTime(), nullable=True),
    #: ids of the items received at exactly seen_through, newline-separated (EWS times have whole seconds)
    sa.Column("seen_ids", sa.Text(), nullable=True),
    sa.Column("owner", sa.String(200), nullable=True),
    sa.Column("fencing_epoch", sa.BigInteger(), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    sa.UniqueConstraint("mailbox", "backend", "folder"),
    sa.Index(None, "remote_id"),
    sa.Index(None, "expires_at"),
    **MYSQL_TABLE_ARGS,
)

nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("node_id", sa.String(200), primary_key=True),
    sa.Column("hostname", sa.String(255), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("started_at", UtcDateTime(), nullable=False),
    sa.Column("heartbeat_at", UtcDateTime(), nullable=False),
    sa.Column("capacity", sa.Integer(), nullable=False),
    **MYSQL_TABLE_ARGS,
)
