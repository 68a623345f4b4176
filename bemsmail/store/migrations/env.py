"""Alembic environment: runs on the connection bemsmail hands it (see store/schema.py), or offline to SQL."""

from __future__ import annotations

from alembic import context

from bemsmail.store.tables import metadata


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        context.configure(
            url=context.config.get_main_option("sqlalchemy.url"),
            target_metadata=metadata,
            literal_binds=True,
            render_as_batch=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run()
