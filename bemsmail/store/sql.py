"""The Store port on SQLAlchemy Core: the same queries on SQLite and MySQL/MariaDB."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import mysql as mysql_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bemsmail.core.model import (
    Backend,
    DeviceSettings,
    Environment,
    FolderState,
    MailboxState,
    Platform,
    Registration,
    RegistrationInput,
    UpsertResult,
    token_fingerprint,
)
from bemsmail.core.ports import Clock, SchemaStatus
from bemsmail.store import schema
from bemsmail.store.batching import Batcher
from bemsmail.store.tables import mailboxes, registrations, subscriptions

T = TypeVar("T")

# MySQL error codes worth retrying the whole transaction for: deadlock, lock wait timeout, duplicate key
# (two clients inserting the same new key at once: the loser retries and finds the winner's row).
_RETRYABLE_MYSQL = {1213, 1205, 1062}
_MAX_ATTEMPTS = 5
_KNOWN_MAILBOXES = 100_000
_BACKENDS = frozenset(b.value for b in Backend)
_DEFAULT_FOLDERS = DeviceSettings().folders

_FOLDER_STATE_FIELDS = ("sync_state", "seen_through", "seen_ids", "remote_id", "watermark", "client_state",
                        "expires_at", "updated_at")
_STATE_COLUMNS = sa.select(
    subscriptions.c.mailbox, subscriptions.c.folder, subscriptions.c.sync_state, subscriptions.c.seen_through,
    subscriptions.c.remote_id, subscriptions.c.watermark, subscriptions.c.seen_ids, subscriptions.c.client_state,
    subscriptions.c.expires_at)


def _folder_state(row: Any) -> FolderState:
    return FolderState(row.mailbox, row.folder, row.sync_state, row.seen_through, row.remote_id, row.watermark,
                       tuple(row.seen_ids.split("\n")) if row.seen_ids else (), row.client_state, row.expires_at)


# The hot path's statements, built once: building and cache-keying the upsert's SELECT cost ~300 µs of CPU a
# batch, and one-mailbox reads ~100 µs each, more than executing them. IN lists are expanding
# parameters, rendered at execution as the literal lists were.
_r = registrations.c
# The mailbox IN is implied by the key IN and is there for SQLite: it renders the key IN as a VALUES subquery,
# which its planner cannot match to an index, and scanned the whole table for every batch.
_UPSERT_ROWS = (
    sa.select(registrations)
    .where(sa.or_(sa.and_(_r.mailbox.in_(sa.bindparam("mailboxes", expanding=True)),
                          sa.tuple_(_r.mailbox, _r.device_id).in_(sa.bindparam("keys", expanding=True))),
                  _r.token_hash.in_(sa.bindparam("hashes", expanding=True))))
    .order_by(_r.id)
    .with_for_update()
)
_DELETE_BY_IDS = sa.delete(registrations).where(_r.id.in_(sa.bindparam("ids", expanding=True)))
_INSERT_REGISTRATIONS = sa.insert(registrations)
_READ_MAILBOXES = (
    sa.select(registrations).where(_r.mailbox.in_(sa.bindparam("mailboxes", expanding=True)))
    .order_by(_r.mailbox, _r.created_at, _r.id)
)
_READ_FOLDERS = sa.select(_r.mailbox, _r.settings).where(_r.mailbox.in_(sa.bindparam("mailboxes", expanding=True)))
_INSERT_MAILBOXES_SQLITE = sqlite_dialect.insert(mailboxes).on_conflict_do_nothing()
_mysql_insert = mysql_dialect.insert(mailboxes)
_INSERT_MAILBOXES_MYSQL = _mysql_insert.on_duplicate_key_update(address=_mysql_insert.inserted.address)

MUTABLE_FIELDS = frozenset({"token", "app_id", "environment", "locale", "timezone", "settings"})


@dataclass(frozen=True, slots=True)
class _Upsert:
    data: RegistrationInput
    tenant: str | None
    backend: Backend


class StoreConflict(Exception):
    """A write kept colliding with concurrent writes and was given up after several attempts."""


def _row_to_registration(row: Mapping[Any, Any], settings: DeviceSettings | None = None) -> Registration:
    """`settings`: the already validated settings the row was written from, to skip validating them again."""
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
        settings=settings if settings is not None else DeviceSettings.model_validate(row["settings"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_seen_at=row["last_seen_at"],
        last_push_at=row["last_push_at"],
    )


def _folders_in(settings: object) -> tuple[str, ...]:
    """The folders a stored settings document asks for (DeviceSettings' default when it names none)."""
    folders = settings.get("folders") if isinstance(settings, dict) else None
    return tuple(folders) if isinstance(folders, list | tuple) else _DEFAULT_FOLDERS


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
        self._upserts: Batcher[_Upsert, UpsertResult] = Batcher(self._upsert_batch)
        self._reads: Batcher[str, Sequence[Registration]] = Batcher(self._read_batch, max_batch=500)

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

    async def _retrying(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        for attempt in range(_MAX_ATTEMPTS):
            try:
                async with self._transaction() as conn:
                    return await work(conn)
            except DBAPIError as exc:
                if exc.connection_invalidated and attempt < _MAX_ATTEMPTS - 1:
                    continue  # a pooled connection had died (server restart, idle timeout): use a fresh one
                if not _retryable(exc) or attempt == _MAX_ATTEMPTS - 1:
                    if _retryable(exc):
                        raise StoreConflict("gave up after repeated write conflicts") from exc
                    raise
                await asyncio.sleep(0.005 * (2**attempt))
        raise AssertionError("unreachable")

    # --- mailboxes -------------------------------------------------------------------------------------------

    async def _insert_mailboxes(self, conn: AsyncConnection, batch: Sequence[_Upsert]) -> list[str]:
        """Insert-if-absent the batch's mailboxes not known to exist; returns those to remember after commit."""
        unknown = {item.data.mailbox: item for item in batch if item.data.mailbox not in self._known_mailboxes}
        if not unknown:
            return []
        now = self._clock.now()
        rows = [
            {"address": address, "tenant": item.tenant, "backend": item.backend.value,
             "state": MailboxState.ACTIVE.value, "created_at": now, "updated_at": now}
            for address, item in sorted(unknown.items())
        ]
        await conn.execute(_INSERT_MAILBOXES_SQLITE if self._sqlite else _INSERT_MAILBOXES_MYSQL, rows)
        return list(unknown)

    def _remember_mailboxes(self, addresses: Sequence[str]) -> None:
        """Mailbox rows are never deleted while registrations point at them, so "it exists" stays true."""
        for address in addresses:
            self._known_mailboxes[address] = None
            self._known_mailboxes.move_to_end(address)
        while len(self._known_mailboxes) > _KNOWN_MAILBOXES:
            self._known_mailboxes.popitem(last=False)

    async def mailbox_backends(self, tenant: str) -> dict[str, Backend]:
        """The backend each of a tenant's mailboxes is recorded on (a migration's starting point)."""
        m = mailboxes.c
        async with self._engine.connect() as conn:
            rows = (await conn.execute(sa.select(m.address, m.backend).where(m.tenant == tenant))).all()
        return {address: Backend(backend) for address, backend in rows if backend in _BACKENDS}

    async def mailbox_backend(self, address: str) -> Backend | None:
        m = mailboxes.c
        async with self._engine.connect() as conn:
            value = (await conn.execute(sa.select(m.backend).where(m.address == address))).scalar()
        return Backend(value) if value in _BACKENDS else None

    async def set_mailbox_backend(self, address: str, backend: Backend) -> None:
        """Record that the mailbox is now watched through `backend` (a migration moved it)."""
        m = mailboxes.c

        async def work(conn: AsyncConnection) -> None:
            await conn.execute(sa.update(mailboxes).where(m.address == address)
                               .values(backend=backend.value, updated_at=self._clock.now()))

        await self._retrying(work)

    # --- registrations ---------------------------------------------------------------------------------------

    async def upsert_registration(
        self, data: RegistrationInput, tenant: str | None, backend: Backend
    ) -> UpsertResult:
        return await self._upserts.submit(_Upsert(data, tenant, backend))

    async def _upsert_batch(self, batch: Sequence[_Upsert]) -> list[UpsertResult | BaseException]:
        try:
            results, inserted = await self._retrying(lambda conn: self._upsert_all(conn, batch))
        except (DBAPIError, StoreConflict) as exc:
            if len(batch) == 1:
                return [exc]
            # One bad item must not fail the others: write them one by one.
            return [(await self._upsert_batch([item]))[0] for item in batch]
        self._remember_mailboxes(inserted)
        return list(results)

    async def _upsert_all(
        self, conn: AsyncConnection, batch: Sequence[_Upsert]
    ) -> tuple[list[UpsertResult], list[str]]:
        """Apply the batch as if its upserts ran one after another, in a handful of statements."""
        now = self._clock.now()
        inserted_mailboxes = await self._insert_mailboxes(conn, batch)
        fingerprints = [token_fingerprint(item.data.token) for item in batch]
        keys = sorted({(item.data.mailbox, item.data.device_id) for item in batch})
        rows = (
            await conn.execute(_UPSERT_ROWS, {"mailboxes": sorted({mailbox for mailbox, _ in keys}), "keys": keys,
                                              "hashes": sorted(set(fingerprints))})
        ).mappings().all()
        stored = {row["id"]: dict(row) for row in rows}
        by_key = {(row["mailbox"], row["device_id"]): row["id"] for row in stored.values()}
        by_hash = {row["token_hash"]: row["id"] for row in stored.values()}
        live: dict[str, dict[str, Any]] = dict(stored)
        touched: set[str] = set()
        results = []
        for item, fingerprint in zip(batch, fingerprints, strict=True):
            data = item.data
            key = (data.mailbox, data.device_id)
            displaced = []
            holder = by_hash.get(fingerprint)
            if holder is not None and (live[holder]["mailbox"], live[holder]["device_id"]) != key:
                gone = live.pop(holder)
                del by_key[(gone["mailbox"], gone["device_id"])]
                del by_hash[fingerprint]
                touched.add(holder)
                displaced.append(_row_to_registration(gone))
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
            existing_id = by_key.get(key)
            folders_before: tuple[str, ...] = ()
            if existing_id is not None:
                row = live[existing_id]
                folders_before = _folders_in(row["settings"])
                if by_hash.get(row["token_hash"]) == existing_id:
                    del by_hash[row["token_hash"]]
                row.update(values)
            else:
                row = {**values, "id": uuid.uuid4().hex, "mailbox": data.mailbox, "device_id": data.device_id,
                       "created_at": now, "last_push_at": None}
                live[row["id"]] = row
                by_key[key] = row["id"]
            by_hash[fingerprint] = row["id"]
            touched.add(row["id"])
            results.append(UpsertResult(_row_to_registration(row, data.settings), existing_id is None,
                                        tuple(displaced), folders_before))
        # Rewrite every touched row: delete the stored versions, insert the final ones. Unlike row-by-row
        # updates this cannot trip over a unique token that moves between rows within the batch.
        stale = sorted(touched & stored.keys())
        if stale:
            await conn.execute(_DELETE_BY_IDS, {"ids": stale})
        final = [live[i] for i in sorted(touched & live.keys())]
        if final:
            await conn.execute(_INSERT_REGISTRATIONS, final)
        return results, inserted_mailboxes

    async def get_registration(self, registration_id: str) -> Registration | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(sa.select(registrations).where(registrations.c.id == registration_id))
            ).mappings().first()
        return None if row is None else _row_to_registration(row)

    async def list_registrations(self, mailbox: str) -> Sequence[Registration]:
        """A mailbox's devices, oldest first. Reads arriving together share one query (the relay asks once per
        mailbox with new mail, so at a thousand mails a second this is one query per batch, not per mail)."""
        return await self._reads.submit(mailbox)

    async def _read_batch(self, batch: Sequence[str]) -> list[Sequence[Registration] | BaseException]:
        wanted = sorted(set(batch))
        found: dict[str, list[Registration]] = {m: [] for m in wanted}
        async with self._engine.connect() as conn:
            for start in range(0, len(wanted), 500):
                rows = (await conn.execute(_READ_MAILBOXES, {"mailboxes": wanted[start : start + 500]})
                        ).mappings().all()
                for row in rows:
                    found[row["mailbox"]].append(_row_to_registration(row))
        return [list(found[m]) for m in batch]

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

        return await self._retrying(work)

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

        return await self._retrying(work)

    # --- what the relay records -----------------------------------------------------------------------------

    async def delete_invalid_registration(
        self, registration_id: str, token: str, invalid_since: datetime | None
    ) -> Registration | None:
        """Delete a registration whose token the provider called dead, unless the device has since registered a
        new token, or refreshed after the moment the provider says the token died (APNs 410 timestamp)."""
        r = registrations.c

        async def work(conn: AsyncConnection) -> Registration | None:
            row = (
                await conn.execute(
                    sa.select(registrations)
                    .where(r.id == registration_id, r.token_hash == token_fingerprint(token))
                    .with_for_update()
                )
            ).mappings().first()
            if row is None or (invalid_since is not None and row["updated_at"] >= invalid_since):
                return None
            await conn.execute(sa.delete(registrations).where(r.id == registration_id))
            return _row_to_registration(row)

        return await self._retrying(work)

    async def mark_pushed(self, registration_ids: Sequence[str], at: datetime) -> None:
        r = registrations.c
        for start in range(0, len(registration_ids), 1000):
            chunk = sorted(registration_ids[start : start + 1000])

            async def work(conn: AsyncConnection, chunk: list[str] = chunk) -> None:
                await conn.execute(sa.update(registrations).where(r.id.in_(chunk)).values(last_push_at=at))

            await self._retrying(work)

    async def delete_expired_registrations(self, seen_before: datetime, limit: int) -> Sequence[Registration]:
        """Delete up to `limit` registrations last refreshed before `seen_before`; returns them."""
        r = registrations.c

        async def work(conn: AsyncConnection) -> list[Registration]:
            rows = (
                await conn.execute(
                    sa.select(registrations).where(r.last_seen_at < seen_before).order_by(r.last_seen_at)
                    .limit(limit).with_for_update()
                )
            ).mappings().all()
            if rows:
                await conn.execute(sa.delete(registrations).where(r.id.in_([row["id"] for row in rows])))
            return [_row_to_registration(row) for row in rows]

        return await self._retrying(work)

    # --- watched mailboxes and folder state ------------------------------------------------------------------

    async def watched_mailboxes(self, after: str | None, limit: int) -> Sequence[tuple[str, frozenset[str]]]:
        """The next mailboxes after `after` (address order) that have registrations, each with the union of its
        devices' folders: one page of what a node has to watch at start-up. Empty when there are no more."""
        m = mailboxes.c
        cursor = after or ""
        while True:
            async with self._engine.connect() as conn:
                page = (await conn.execute(
                    sa.select(m.address).where(m.address > cursor).order_by(m.address).limit(limit)
                )).scalars().all()
                if not page:
                    return []
                folders = await self._folders_of(conn, page)
            result = [(mailbox, folders[mailbox]) for mailbox in page if mailbox in folders]
            if result or len(page) < limit:
                return result
            cursor = page[-1]  # a full page of mailboxes whose devices are all gone: look further

    async def mailbox_folders(self, mailboxes_: Sequence[str]) -> dict[str, frozenset[str]]:
        """The union of the devices' folders of each of these mailboxes that has devices (absent: none left)."""
        found: dict[str, frozenset[str]] = {}
        async with self._engine.connect() as conn:
            for start in range(0, len(mailboxes_), 1000):
                found.update(await self._folders_of(conn, mailboxes_[start : start + 1000]))
        return found

    @staticmethod
    async def _folders_of(conn: AsyncConnection, mailboxes_: Sequence[str]) -> dict[str, frozenset[str]]:
        """Reads only the settings' folders (no Registration built): the Watcher's whole need, per changed mailbox."""
        rows = (await conn.execute(_READ_FOLDERS, {"mailboxes": list(mailboxes_)})).all()
        folders: dict[str, set[str]] = {}
        for mailbox, settings in rows:
            folders.setdefault(mailbox, set()).update(_folders_in(settings))
        return {mailbox: frozenset(names) for mailbox, names in folders.items()}

    async def folder_states(self, backend: Backend, mailboxes_: Sequence[str]) -> dict[tuple[str, str], FolderState]:
        """The stored state of every folder of these mailboxes, keyed by (mailbox, folder)."""
        found: dict[tuple[str, str], FolderState] = {}
        async with self._engine.connect() as conn:
            for start in range(0, len(mailboxes_), 1000):
                chunk = list(mailboxes_[start : start + 1000])
                rows = (await conn.execute(_STATE_COLUMNS.where(subscriptions.c.backend == backend.value,
                                                                subscriptions.c.mailbox.in_(chunk)))).all()
                for row in rows:
                    found[(row.mailbox, row.folder)] = _folder_state(row)
        return found

    async def all_folder_states(self, backend: Backend) -> list[FolderState]:
        """Every stored folder state of one backend (a source's index of its subscriptions at start)."""
        async with self._engine.connect() as conn:
            rows = (await conn.execute(_STATE_COLUMNS.where(subscriptions.c.backend == backend.value))).all()
        return [_folder_state(row) for row in rows]

    async def save_folder_states(self, backend: Backend, states: Sequence[FolderState]) -> None:
        """Insert or replace the state of these folders, in one statement per 500."""
        now = self._clock.now()
        for start in range(0, len(states), 500):
            rows = [
                {"mailbox": st.mailbox, "backend": backend.value, "folder": st.folder, "sync_state": st.sync_state,
                 "seen_through": st.seen_through, "seen_ids": "\n".join(st.seen_ids) or None,
                 "remote_id": st.remote_id, "watermark": st.watermark, "client_state": st.client_state,
                 "expires_at": st.expires_at,
                 "fencing_epoch": 0, "created_at": now, "updated_at": now}
                for st in sorted(states[start : start + 500], key=lambda st: (st.mailbox, st.folder))
            ]

            async def work(conn: AsyncConnection, rows: list[dict[str, Any]] = rows) -> None:
                stmt: sa.Executable
                if self._sqlite:
                    insert = sqlite_dialect.insert(subscriptions)
                    stmt = insert.on_conflict_do_update(
                        index_elements=["mailbox", "backend", "folder"],
                        set_={name: insert.excluded[name] for name in _FOLDER_STATE_FIELDS})
                else:
                    insert_my = mysql_dialect.insert(subscriptions)
                    stmt = insert_my.on_duplicate_key_update(
                        {name: insert_my.inserted[name] for name in _FOLDER_STATE_FIELDS})
                await conn.execute(stmt, rows)

            await self._retrying(work)

    async def delete_folder_states(self, backend: Backend, mailbox: str) -> None:
        c = subscriptions.c

        async def work(conn: AsyncConnection) -> None:
            await conn.execute(sa.delete(subscriptions).where(c.backend == backend.value, c.mailbox == mailbox))

        await self._retrying(work)

    # --- health ----------------------------------------------------------------------------------------------

    async def ping(self) -> None:
        async with self._engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def schema_status(self) -> SchemaStatus:
        return await schema.schema_status(self._engine)

    async def close(self) -> None:
        await self._upserts.close()
        await self._reads.close()
        await self._engine.dispose()
