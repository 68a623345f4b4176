"""The SQL store, run unchanged on the embedded SQLite default and on a real MariaDB server."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from bemsmail.config import DatabaseConfig
from bemsmail.core.clock import FakeClock
from bemsmail.core.model import (
    Backend,
    DeviceSettings,
    Environment,
    FolderState,
    Platform,
    QuietHours,
    RegistrationInput,
    token_fingerprint,
)
from bemsmail.store.engine import create_engine
from bemsmail.store.schema import head_revision, migrate, schema_problem, schema_status
from bemsmail.store.sql import SqlStore
from bemsmail.store.tables import registrations


def reg(mailbox: str = "alice@example.com", device: str = "d1", token: str = "ab" * 32,
        **extra: object) -> RegistrationInput:
    return RegistrationInput(mailbox=mailbox, device_id=device, platform=Platform.IOS, token=token,
                             app_id="com.example.mail", **extra)  # type: ignore[arg-type]


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[SqlStore]:
    engine = create_engine(DatabaseConfig(url=db_url))
    await migrate(engine)
    s = SqlStore(engine, FakeClock(datetime(2026, 3, 1, tzinfo=UTC)))
    yield s
    await s.close()


async def test_migrations_reach_head_and_report_status(db_url: str) -> None:
    engine = create_engine(DatabaseConfig(url=db_url))
    try:
        before = await schema_status(engine)
        assert before.current is None and "bemsmail migrate" in (schema_problem(before) or "")
        after = await migrate(engine)
        assert after.is_current and after.current == head_revision() and schema_problem(after) is None
        assert (await migrate(engine)).is_current  # idempotent
        async with engine.begin() as conn:
            tables = await conn.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
            assert {"mailboxes", "registrations", "subscriptions", "nodes"} <= tables
            await conn.execute(sa.text("UPDATE alembic_version SET version_num = 'fffffffffff'"))
        problem = schema_problem(await schema_status(engine))
        assert problem is not None and "newer than this build" in problem
    finally:
        await engine.dispose()


async def test_upsert_creates_then_updates_the_same_row(store: SqlStore) -> None:
    first = await store.upsert_registration(reg(), "example", Backend.EWS)
    assert first.created and not first.displaced
    settings = DeviceSettings(folders=("Inbox", "VIP"), quiet_hours=QuietHours(start="22:00", end="07:00"))  # type: ignore[arg-type]
    second = await store.upsert_registration(
        reg(token="cd" * 32, environment=Environment.SANDBOX, timezone="Europe/Berlin", settings=settings),
        "example", Backend.EWS,
    )
    assert not second.created
    got = await store.get_registration(first.registration.id)
    assert got is not None
    assert got.id == first.registration.id and got.token == "cd" * 32
    assert got.environment is Environment.SANDBOX and got.timezone == "Europe/Berlin"
    assert got.settings == settings
    assert got.created_at == first.registration.created_at
    assert [r.id for r in await store.list_registrations("alice@example.com")] == [got.id]


async def test_a_token_moves_and_is_never_duplicated(store: SqlStore) -> None:
    token = "ef" * 32
    a = await store.upsert_registration(reg(device="old", token=token), "example", Backend.EWS)
    moved = await store.upsert_registration(reg(mailbox="bob@example.com", device="new", token=token),
                                            "example", Backend.EWS)
    assert moved.created
    assert [d.id for d in moved.displaced] == [a.registration.id]
    assert await store.get_registration(a.registration.id) is None
    assert await store.list_registrations("alice@example.com") == []
    async with store.engine.connect() as conn:
        holders = (await conn.execute(
            sa.select(sa.func.count()).where(registrations.c.token_hash == token_fingerprint(token))
        )).scalar_one()
    assert holders == 1


async def test_concurrent_upserts_end_as_if_sequential(store: SqlStore) -> None:
    """A burst of upserts (group-committed) keeps both invariants: one row per device, one holder per token."""
    rnd = random.Random(7)
    tokens = [f"{i:02x}" * 32 for i in range(40)]
    items = [reg(mailbox=f"u{rnd.randrange(10)}@example.com", device=f"d{rnd.randrange(5)}",
                 token=rnd.choice(tokens)) for _ in range(300)]
    results = await asyncio.gather(*(store.upsert_registration(i, "example", Backend.EWS) for i in items))
    # The last write for each token wins its device; replay sequentially to get the expected final state.
    expected: dict[tuple[str, str], str] = {}
    for item in items:
        expected = {k: t for k, t in expected.items() if t != item.token}
        expected[(item.mailbox, item.device_id)] = item.token
    stored = {}
    for n in range(10):
        for r in await store.list_registrations(f"u{n}@example.com"):
            stored[(r.mailbox, r.device_id)] = r.token
    assert stored == expected
    assert sum(r.created for r in results) >= len(expected)


async def test_update_and_delete(store: SqlStore) -> None:
    a = (await store.upsert_registration(reg(device="a", token="01" * 32), "example", Backend.EWS)).registration
    b = (await store.upsert_registration(reg(device="b", token="02" * 32), "example", Backend.EWS)).registration
    updated = await store.update_registration(a.id, {"token": "02" * 32, "locale": "de-DE"})
    assert updated is not None and updated.token == "02" * 32 and updated.locale == "de-DE"
    assert await store.get_registration(b.id) is None  # b's token moved to a
    assert await store.update_registration("missing", {"locale": "en"}) is None
    with pytest.raises(ValueError, match="not updatable"):
        await store.update_registration(a.id, {"mailbox": "x@example.com"})
    deleted = await store.delete_registration(a.id)
    assert deleted is not None and deleted.id == a.id
    assert await store.delete_registration(a.id) is None
    assert await store.list_registrations("alice@example.com") == []


async def test_registrations_survive_a_new_engine(db_url: str) -> None:
    engine = create_engine(DatabaseConfig(url=db_url))
    await migrate(engine)
    first = SqlStore(engine, FakeClock())
    created = await first.upsert_registration(reg(), "example", Backend.EWS)
    await first.close()
    second = SqlStore(create_engine(DatabaseConfig(url=db_url)), FakeClock())
    try:
        again = await second.get_registration(created.registration.id)
        assert again is not None and again.token == "ab" * 32 and again.mailbox == "alice@example.com"
        assert again.created_at.tzinfo is not None
    finally:
        await second.close()


async def test_timestamps_keep_microseconds_and_utc(store: SqlStore) -> None:
    clock = FakeClock(datetime(2026, 7, 1, 12, 0, 0, 123456, tzinfo=UTC))
    s = SqlStore(store.engine, clock)
    created = await s.upsert_registration(reg(), "example", Backend.EWS)
    await clock.advance(90)
    await s.upsert_registration(reg(), "example", Backend.EWS)
    got = await s.get_registration(created.registration.id)
    assert got is not None
    assert got.created_at == datetime(2026, 7, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert got.last_seen_at - got.created_at == timedelta(seconds=90)


async def test_watched_mailboxes_page_through_mailboxes_with_devices(store: SqlStore) -> None:
    for n in range(7):
        await store.upsert_registration(reg(f"u{n}@example.com", token=f"{n:02d}" * 32), "example", Backend.EWS)
    await store.upsert_registration(
        reg("u3@example.com", device="d2", token="ff" * 32, settings=DeviceSettings(folders=("Inbox", "Projects"))),
        "example", Backend.EWS)
    gone = await store.upsert_registration(reg("u4@example.com", device="d9", token="ee" * 32), "example",
                                           Backend.EWS)
    four = [r.id for r in await store.list_registrations("u4@example.com")]
    for registration_id in four:
        await store.delete_registration(registration_id)
    assert gone.registration.id in four
    seen: list[tuple[str, frozenset[str]]] = []
    cursor = None
    while page := await store.watched_mailboxes(cursor, 2):
        seen += page
        cursor = page[-1][0]
    assert [m for m, _ in seen] == [f"u{n}@example.com" for n in (0, 1, 2, 3, 5, 6)]  # u4 has no devices left
    assert dict(seen)["u3@example.com"] == {"Inbox", "Projects"}
    assert dict(seen)["u0@example.com"] == {"Inbox"}


async def test_folder_states_are_upserted_and_forgotten(store: SqlStore) -> None:
    await store.upsert_registration(reg("a@example.com"), "example", Backend.EWS)
    await store.upsert_registration(reg("b@example.com", token="cd" * 32), "example", Backend.EWS)
    when = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    await store.save_folder_states(Backend.EWS, [
        FolderState("a@example.com", "Inbox", sync_state="S1"),
        FolderState("b@example.com", "Inbox", sync_state="S9", seen_through=when),
    ])
    await store.save_folder_states(Backend.EWS, [
        FolderState("a@example.com", "Inbox", "S2", when, "sub-1", "W", seen_ids=("id-1", "id-2"))])
    states = await store.folder_states(Backend.EWS, ["a@example.com", "b@example.com", "c@example.com"])
    assert states[("a@example.com", "Inbox")] == FolderState("a@example.com", "Inbox", "S2", when, "sub-1", "W",
                                                             ("id-1", "id-2"))
    assert states[("b@example.com", "Inbox")].seen_through == when
    assert await store.folder_states(Backend.GRAPH, ["a@example.com"]) == {}
    await store.delete_folder_states(Backend.EWS, "a@example.com")
    assert set(await store.folder_states(Backend.EWS, ["a@example.com", "b@example.com"])) == {
        ("b@example.com", "Inbox")}


async def test_concurrent_reads_share_queries_and_each_gets_its_own_devices(store: SqlStore) -> None:
    for n in range(20):
        await store.upsert_registration(reg(f"r{n}@example.com", token=f"{n:02d}" * 32), "example", Backend.EWS)
    await store.upsert_registration(reg("r3@example.com", device="d2", token="ff" * 32), "example", Backend.EWS)
    wanted = [f"r{n}@example.com" for n in range(20)] + ["r3@example.com", "nobody@example.com"]
    results = await asyncio.gather(*(store.list_registrations(m) for m in wanted))
    for mailbox, found in zip(wanted, results, strict=True):
        assert all(r.mailbox == mailbox for r in found)
    assert {r.device_id for r in results[3]} == {"d1", "d2"} == {r.device_id for r in results[20]}
    assert results[-1] == []


async def test_a_mailbox_backend_is_recorded_and_moved(store: SqlStore) -> None:
    """A migration's bookkeeping: where each mailbox is watched, on both databases."""
    await store.upsert_registration(reg(), "example", Backend.EWS)
    await store.upsert_registration(reg(mailbox="bob@example.com", token="cd" * 32), "example", Backend.EWS)
    await store.upsert_registration(reg(mailbox="carol@other.example", token="ef" * 32), "other", Backend.GRAPH)
    assert await store.mailbox_backends("example") == {"alice@example.com": Backend.EWS,
                                                       "bob@example.com": Backend.EWS}
    await store.set_mailbox_backend("alice@example.com", Backend.GRAPH)
    assert await store.mailbox_backend("alice@example.com") is Backend.GRAPH
    assert await store.mailbox_backend("bob@example.com") is Backend.EWS
    assert await store.mailbox_backend("nobody@example.com") is None
    # a registration upserted again keeps the recorded backend: the migration's move is not undone
    await store.upsert_registration(reg(token="12" * 32), "example", Backend.EWS)
    assert await store.mailbox_backend("alice@example.com") is Backend.GRAPH


async def test_mailbox_folders_are_the_union_of_each_mailboxs_devices(store: SqlStore) -> None:
    for n in range(3):
        await store.upsert_registration(reg(f"f{n}@example.com", token=f"{n:02d}" * 32), "example", Backend.EWS)
    await store.upsert_registration(
        reg("f1@example.com", device="d2", token="ff" * 32, settings=DeviceSettings(folders=("Inbox", "Projects"))),
        "example", Backend.EWS)
    wanted = [f"f{n}@example.com" for n in range(3)] + ["nobody@example.com"]
    assert await store.mailbox_folders(wanted) == {
        "f0@example.com": {"Inbox"}, "f1@example.com": {"Inbox", "Projects"}, "f2@example.com": {"Inbox"}}
    assert await store.mailbox_folders([]) == {}


async def test_an_upsert_reports_the_folders_asked_for_before(store: SqlStore) -> None:
    created = await store.upsert_registration(reg("fb@example.com"), "example", Backend.EWS)
    assert created.created and created.folders_before == ()
    vip = reg("fb@example.com", settings=DeviceSettings(folders=("Inbox", "VIP")))
    assert (await store.upsert_registration(vip, "example", Backend.EWS)).folders_before == ("Inbox",)
    again = await store.upsert_registration(reg("fb@example.com"), "example", Backend.EWS)
    assert again.folders_before == ("Inbox", "VIP")


async def test_per_mailbox_statements_use_an_index_on_both_databases(store: SqlStore) -> None:
    """Every statement of a per-mailbox or per-registration operation finds its rows through an index: a full
    scan costs nothing on a test table and a lot on a million registrations (the upsert's key lookup once
    scanned the whole table on SQLite). The tables are filled enough for MariaDB's optimizer to prefer an index;
    SQLite is left without statistics, as the daemon leaves it."""
    n = 2000
    await asyncio.gather(*(store.upsert_registration(reg(f"p{i}@example.com", token=f"{i:064x}"), "example",
                                                     Backend.EWS) for i in range(n)))
    await store.save_folder_states(Backend.EWS, [FolderState(f"p{i}@example.com", "Inbox", "S") for i in range(n)])
    engine = store.engine
    sqlite = engine.dialect.name == "sqlite"
    if not sqlite:  # what InnoDB's automatic statistics would soon do; SQLite has none unless ANALYZEd, as here
        async with engine.begin() as conn:
            for table in ("mailboxes", "registrations", "subscriptions"):
                await conn.exec_driver_sql(f"ANALYZE TABLE {table}")

    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if not executemany and statement.lstrip().split(None, 1)[0].upper() in {"SELECT", "UPDATE", "DELETE"}:
            seen.append((statement, parameters))

    sa.event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        # two at once make one batch, whose key lookup is a list (a single key is planned as an equality)
        moved, _ = await asyncio.gather(
            store.upsert_registration(reg("p1@example.com", device="d2", token=f"{2:064x}"), "example",
                                      Backend.EWS),  # a new device, and a token moving to it
            store.upsert_registration(reg("p3@example.com", token=f"{3:064x}"), "example", Backend.EWS))
        assert len(await store.list_registrations("p4@example.com")) == 1
        assert set(await store.mailbox_folders(["p5@example.com", "p6@example.com"])) == {"p5@example.com",
                                                                                        "p6@example.com"}
        assert await store.get_registration(moved.registration.id) is not None
        await store.update_registration(moved.registration.id, {"locale": "de-DE"})
        await store.mark_pushed([moved.registration.id], datetime(2026, 3, 1, 13, tzinfo=UTC))
        await store.folder_states(Backend.EWS, ["p7@example.com"])
        await store.delete_folder_states(Backend.EWS, "p8@example.com")
        await store.mailbox_backend("p9@example.com")
        assert len(await store.watched_mailboxes("p10@example.com", 5)) == 5
        p11 = (await store.list_registrations("p11@example.com"))[0]
        assert await store.delete_invalid_registration(p11.id, p11.token, None) is not None
        await store.delete_expired_registrations(datetime(2026, 2, 1, tzinfo=UTC), 100)  # none that old
        assert await store.delete_registration(moved.registration.id) is not None
    finally:
        sa.event.remove(engine.sync_engine, "before_cursor_execute", record)

    statements = {statement for statement, _ in seen}
    assert len(statements) >= 12, statements  # the operations above really ran their own statements
    assert any("token_hash IN" in st and len(params) == 8 for st, params in seen)  # the two made one batch
    scans = []
    async with engine.connect() as conn:
        for statement, parameters in seen:
            if sqlite:
                plan = (await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)).all()
                scans += [(statement, row[3]) for row in plan
                          if re.match(r"SCAN (mailboxes|registrations|subscriptions)\b", row[3])]
            else:
                plan = (await conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)).mappings().all()
                scans += [(statement, dict(row)) for row in plan if row["type"] in {"ALL", "index"}]
    assert scans == []
