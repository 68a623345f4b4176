"""Building the async SQLAlchemy engine for SQLite (embedded) or MySQL/MariaDB (aiomysql) from config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bemsmail.config import DatabaseConfig


def database_url(config: DatabaseConfig) -> URL:
    url = make_url(config.url)
    if config.password is not None:
        url = url.set(password=config.password.get_secret_value())
    if url.get_backend_name() in ("mysql", "mariadb"):
        url = url.update_query_dict({"charset": "utf8mb4"})
    return url


def safe_url(config: DatabaseConfig) -> str:
    """The URL as it may appear in logs and messages: no password."""
    return database_url(config).render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=30000"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def create_engine(config: DatabaseConfig) -> AsyncEngine:
    url = database_url(config)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
            Path(url.database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        if url.database and not url.database.startswith("file:") and url.database != ":memory:":
            _restrict_permissions(Path(url.database))
        return engine
    return create_async_engine(
        url,
        pool_size=config.pool_size,
        max_overflow=config.max_overflow,
        pool_recycle=config.pool_recycle_seconds,
        # No pre-ping round trip per checkout: a dead pooled connection fails one attempt, which the store
        # retries on a fresh connection. No reset on return: every use ends in commit or rollback already.
        pool_pre_ping=False,
        pool_reset_on_return=None,
        isolation_level="READ COMMITTED",
        connect_args={"connect_timeout": config.connect_timeout_seconds},
    )


def _restrict_permissions(path: Path) -> None:
    """The SQLite file holds push tokens: readable by the service account only."""
    if not path.exists():
        path.touch(mode=0o600)
    elif os.name == "posix":
        path.chmod(0o600)
