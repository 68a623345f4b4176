"""The Store port on SQLAlchemy Core: the same queries on SQLite and MySQL/MariaDB."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql as mysql_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bemsmail.core.model import (
    Backend,
    DeviceSettings,
    Environment,
    MailboxState,
    Platform,
    Registration,
    RegistrationInput,
    UpsertResult,
    token_fingerprint,
)
from bemsmail.core.ports import Clock, SchemaStatus
from bemsmail.store import schema
from bemsmail.store.tables import mailboxes, registrations

# MySQL error codes worth retrying the whole transaction for: deadlock, lock wait timeout, duplicate key
# (two clients inserting the same new key at once: the loser retries and finds the winner's row).
_RETRYABLE_MYSQL = {1213, 1205, 1062}
_MAX_ATTEMPTS = 5
_KNOWN_MAILBOXES = 100_000

MUTABLE_FIELDS = frozenset({"token", "app_id", "environment", "locale", "timezone", "settings"})


class StoreConflict(Exception):
    """A write kept colliding with concurrent writes and was given up after several attempts."""


def _row_to_registration(row: Mapping[Any, Any]) -> Registration:
    return Registration(
        id=row["id"],
        mailbox=row["mailbox"],
        device_id=row["device_id"],
        platform=Platform(row["platform"]),
        token=row["token"],
        app_id=row["app_id"],
        environment=Environment(row["environment"]),
        locale=row["locale"],
        timezone=row["timezone"],
        settings=DeviceSettings.model_validate(row["settings"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_seen_at=row["last_seen_at"],
        last_push_at=row["last_push_at"],
    )


def _retryable(exc: DBAPIError) -> bool:
    if isinstance(exc, IntegrityError) and "sqlite" in type(exc.orig).__module__:
        return True  # unique race between two writers; SQLite writers are serialized, so rare
    args: tuple[Any, ...] = getattr(exc.orig, "args", ())
    return bool(args) and args[0] in _RETRYABLE_MYSQL


class SqlStore:
    """Registrations and mailboxes in SQL. Each public method is one transaction."""

    def __init__(self, engine: AsyncEngine, clock: Clock) -> None:
        self._engine = engine
        self._clock = clock
        self._sqlite = engine.dialect.name == "sqlite"
        # SQLite has one writer; serializing writes here avoids "database is locked" upgrades under load.
        self._write_lock = asyncio.Lock() if self._sqlite else None
        # Mailbox rows are never deleted while registrations point at them, so "we inserted it" stays true.
        self._known_mailboxes: OrderedDict[str, None] = OrderedDict()

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        if self._write_lock is None:
            async with self._engine.begin() as conn:
                yield conn
        else:
            async with self._write_lock, self._engine.begin() as conn:
                yield conn

    async def _retrying(self, work: Any) -> Any:
        for attempt in range(_MAX_ATTEMPTS):
            try:
                async with self._transaction() as conn:
                    return await work(conn)
            except DBAPIError as exc:
                if not _retryable(exc) or attempt == _MAX_ATTEMPTS - 1:
                    if _retryable(exc):
                        raise StoreConflict("gave up after repeated write conflicts") from exc
                    raise
                await asyncio.sleep(0.005 * (2**attempt))
        raise AssertionError("unreachable")

    # --- mailboxes -------------------------------------------------------------------------------------------

    async def _ensure_mailbox(self, conn: AsyncConnection, address: str, tenant: str | None,
                              backend: Backend) -> None:
        if address in self._known_mailboxes:
            self._known_mailboxes.move_to_end(address)
            return
        now = self._clock.now()
        values = {"address": address, "tenant": tenant, "backend": backend.value,
                  "state": MailboxState.ACTIVE.value, "created_at": now, "updated_at": now}
        stmt: sa.Executable
        if self._sqlite:
            stmt = sqlite_dialect.insert(mailboxes).values(values).on_conflict_do_nothing()
        else:
            stmt = mysql_dialect.insert(mailboxes).values(values).on_duplicate_key_update(
                address=mailboxes.c.address
            )
        await conn.execute(stmt)
        self._known_mailboxes[address] = None
        if len(self._known_mailboxes) > _KNOWN_MAILBOXES:
            self._known_mailboxes.popitem(last=False)

    # --- registrations ---------------------------------------------------------------------------------------

    async def upsert_registration(
        self, data: RegistrationInput, tenant: str | None, backend: Backend
    ) -> UpsertResult:
        fingerprint = token_fingerprint(data.token)

        async def work(conn: AsyncConnection) -> UpsertResult:
            now = self._clock.now()
            await self._ensure_mailbox(conn, data.mailbox, tenant, backend)
            r = registrations.c
            rows = (
                await conn.execute(
                    sa.select(registrations)
                    .where(
                        sa.or_(
                            sa.and_(r.mailbox == data.mailbox, r.device_id == data.device_id),
                            r.token_hash == fingerprint,
                        )
                    )
                    .with_for_update()
                )
            ).mappings().all()
            existing = next(
                (row for row in rows if row["mailbox"] == data.mailbox and row["device_id"] == data.device_id),
                None,
            )
            displaced = [row for row in rows if row is not existing]
            if displaced:
                await conn.execute(sa.delete(registrations).where(r.id.in_([row["id"] for row in displaced])))
            values: dict[str, Any] = {
                "platform": data.platform.value,
                "token": data.token,
                "token_hash": fingerprint,
                "app_id": data.app_id,
                "environment": data.environment.value,
                "locale": data.locale,
                "timezone": data.timezone,
                "settings": data.settings.model_dump(mode="json"),
                "updated_at": now,
                "last_seen_at": now,
            }
            if existing is not None:
                await conn.execute(sa.update(registrations).where(r.id == existing["id"]).values(values))
                stored = {**existing, **values}
            else:
                stored = {
                    **values,
                    "id": uuid.uuid4().hex,
                    "mailbox": data.mailbox,
                    "device_id": data.device_id,
                    "created_at": now,
                    "last_push_at": None,
                }
                await conn.execute(sa.insert(registrations).values(stored))
            return UpsertResult(
                registration=_row_to_registration(stored),
                created=existing is None,
                displaced=tuple(_row_to_registration(row) for row in displaced),
            )

        result: UpsertResult = await self._retrying(work)
        return result

    async def get_registration(self, registration_id: str) -> Registration | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(sa.select(registrations).where(registrations.c.id == registration_id))
            ).mappings().first()
        return None if row is None else _row_to_registration(row)

    async def list_registrations(self, mailbox: str) -> Sequence[Registration]:
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(registrations)
                    .where(registrations.c.mailbox == mailbox)
                    .order_by(registrations.c.created_at, registrations.c.id)
                )
            ).mappings().all()
        return [_row_to_registration(row) for row in rows]

    async def update_registration(
        self, registration_id: str, changes: Mapping[str, object]
    ) -> Registration | None:
        unknown = set(changes) - MUTABLE_FIELDS
        if unknown:
            raise ValueError(f"not updatable: {', '.join(sorted(unknown))}")

        async def work(conn: AsyncConnection) -> Registration | None:
            r = registrations.c
            row = (
                await conn.execute(sa.select(registrations).where(r.id == registration_id).with_for_update())
            ).mappings().first()
            if row is None:
                return None
            values: dict[str, Any] = {}
            for key, value in changes.items():
                if isinstance(value, DeviceSettings):
                    value = value.model_dump(mode="json")
                elif isinstance(value, Environment):
                    value = value.value
                values[key] = value
            if "token" in values:
                values["token_hash"] = token_fingerprint(str(values["token"]))
                await conn.execute(
                    sa.delete(registrations).where(r.token_hash == values["token_hash"], r.id != registration_id)
                )
            now = self._clock.now()
            values["updated_at"] = now
            values["last_seen_at"] = now
            await conn.execute(sa.update(registrations).where(r.id == registration_id).values(values))
            return _row_to_registration({**row, **values})

        updated: Registration | None = await self._retrying(work)
        return updated

    async def delete_registration(self, registration_id: str) -> Registration | None:
        async def work(conn: AsyncConnection) -> Registration | None:
            row = (
                await conn.execute(
                    sa.select(registrations).where(registrations.c.id == registration_id).with_for_update()
                )
            ).mappings().first()
            if row is None:
                return None
            await conn.execute(sa.delete(registrations).where(registrations.c.id == registration_id))
            return _row_to_registration(row)

        deleted: Registration | None = await self._retrying(work)
        return deleted

    # --- health ----------------------------------------------------------------------------------------------

    async def ping(self) -> None:
        async with self._engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def schema_status(self) -> SchemaStatus:
        return await schema.schema_status(self._engine)

    async def close(self) -> None:
        await self._engine.dispose()
