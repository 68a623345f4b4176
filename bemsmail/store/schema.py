"""Migrating the database and telling whether its schema matches this build."""

from __future__ import annotations

import functools
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

from bemsmail.core.ports import SchemaStatus

MIGRATIONS = Path(__file__).with_name("migrations")
MYSQL_MIGRATION_LOCK = "bemsmail.migrate"


def alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


@functools.cache
def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _current(connection: sa.Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def schema_status(engine: AsyncEngine) -> SchemaStatus:
    async with engine.connect() as conn:
        current = await conn.run_sync(_current)
    return SchemaStatus(current=current, head=head_revision())


def _upgrade(connection: sa.Connection, target: str) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, target)


async def migrate(engine: AsyncEngine, target: str = "head") -> SchemaStatus:
    """Upgrade to `target`. On MySQL/MariaDB a named lock keeps several nodes from migrating at once."""
    async with engine.connect() as conn:
        mysql = conn.dialect.name in ("mysql", "mariadb")
        if mysql:
            got = (await conn.execute(sa.text("SELECT GET_LOCK(:n, 60)"), {"n": MYSQL_MIGRATION_LOCK})).scalar()
            if got != 1:
                raise RuntimeError("another node holds the migration lock for over 60 s")
            await conn.commit()
        try:
            await conn.run_sync(_upgrade, target)
            await conn.commit()
        finally:
            if mysql:
                await conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": MYSQL_MIGRATION_LOCK})
                await conn.commit()
    return await schema_status(engine)


def schema_problem(status: SchemaStatus) -> str | None:
    """A sentence for an operator when the schema is not the one this build expects, else None."""
    if status.current is None:
        return "the database has no bemsmail schema: run `bemsmail migrate` (or `serve --migrate`)"
    if status.current == status.head:
        return None
    known = {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if status.current not in known:
        return (
            f"the database schema ({status.current}) is newer than this build ({status.head}): "
            "upgrade bemsmail, do not downgrade the database"
        )
    return f"the database schema is at {status.current}, this build needs {status.head}: run `bemsmail migrate`"
