"""Watching follows registrations: the first device of a mailbox starts its watch, other folders change it, the
last device leaving stops it; at start-up every mailbox with devices is watched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bemsmail.cluster.memory import InProcessBus
from bemsmail.config import DatabaseConfig
from bemsmail.core.clock import FakeClock
from bemsmail.core.model import Backend, DeviceSettings, Platform, RegistrationInput
from bemsmail.core.registrations import RegistrationService
from bemsmail.core.tenants import Tenant, TenantDirectory
from bemsmail.core.watching import Watcher
from bemsmail.store.engine import create_engine
from bemsmail.store.schema import migrate
from bemsmail.store.sql import SqlStore


class RecordingSource:
    """A MailSource that records what it was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, frozenset[str] | None]] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def watch(self, mailbox: str, folders: frozenset[str]) -> None:
        self.calls.append(("watch", mailbox, folders))

    async def unwatch(self, mailbox: str) -> None:
        self.calls.append(("unwatch", mailbox, None))


class NotMine:
    def owns(self, mailbox: str) -> bool:
        return not mailbox.startswith("other")


@dataclass
class World:
    watcher: Watcher
    source: RecordingSource
    service: RegistrationService
    clock: FakeClock
    store: SqlStore

    async def register(self, mailbox: str, device: str = "d1", **settings: object) -> str:
        data = RegistrationInput(mailbox=mailbox, device_id=device, platform=Platform.IOS,
                                 token=f"{abs(hash((mailbox, device))):064x}", app_id="app",
                                 settings=DeviceSettings(**settings))  # type: ignore[arg-type]
        return (await self.service.register(data)).registration.id


async def settled(world: World) -> None:
    """Let the watcher's settle delay pass and its store reads (real I/O) finish."""
    for _ in range(5):
        await asyncio.sleep(0)  # the settle loop registers its sleep on the fake clock
    await world.clock.advance(0.5)
    for _ in range(200):
        if not world.watcher.busy and not world.watcher._wake.is_set():
            break
        await asyncio.sleep(0.01)


def folder_reads(world: World) -> list[list[str]]:
    """Records the mailboxes of each folders read the Watcher makes from now on."""
    reads: list[list[str]] = []
    read = world.store.mailbox_folders

    async def counted(mailboxes_: Sequence[str]) -> dict[str, frozenset[str]]:
        reads.append(list(mailboxes_))
        return await read(mailboxes_)

    world.store.mailbox_folders = counted  # type: ignore[method-assign]
    return reads


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    clock = FakeClock(datetime(2026, 3, 2, tzinfo=UTC))
    engine = create_engine(DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path / 'w.db'}"))
    await migrate(engine)
    store = SqlStore(engine, clock)
    bus = InProcessBus()
    tenants = TenantDirectory([Tenant("onprem", Backend.EWS, ("example.com",)),
                               Tenant("cloud", Backend.GRAPH, ("cloud.example",))])
    service = RegistrationService(store, bus, tenants, {"app": Platform.IOS})
    source = RecordingSource()
    watcher = Watcher(store, bus, clock, NotMine(), tenants, {"onprem": source})
    yield World(watcher, source, service, clock, store)
    await watcher.stop()
    await store.close()


async def test_start_watches_every_owned_mailbox_with_devices(world: World) -> None:
    for n in range(5):
        await world.register(f"u{n}@example.com")
    await world.register("u1@example.com", device="d2", folders=("Inbox", "Projects"))
    await world.register("other@example.com")  # another node's
    await world.register("x@cloud.example")  # a tenant without a source here
    assert await world.watcher.start() == 5
    assert ("watch", "u1@example.com", frozenset({"Inbox", "Projects"})) in world.source.calls
    assert {c[1] for c in world.source.calls} == {f"u{n}@example.com" for n in range(5)}


async def test_registrations_start_change_and_stop_a_watch(world: World) -> None:
    await world.watcher.start()
    first = await world.register("alice@example.com")
    await world.register("alice@example.com", device="d2")  # settles with the first: one watch
    await settled(world)
    assert world.source.calls == [("watch", "alice@example.com", frozenset({"Inbox"}))]

    ipad = await world.register("alice@example.com", device="d3", folders=("Inbox", "VIP"))
    await settled(world)
    assert world.source.calls[-1] == ("watch", "alice@example.com", frozenset({"Inbox", "VIP"})), world.source.calls

    await world.service.delete(ipad)
    await settled(world)
    assert world.source.calls[-1] == ("watch", "alice@example.com", frozenset({"Inbox"}))
    calls = len(world.source.calls)
    await world.service.delete(first)
    await settled(world)
    assert len(world.source.calls) == calls  # one device is left: nothing changes
    for registration in await world.store.list_registrations("alice@example.com"):
        await world.service.delete(registration.id)
    await settled(world)
    assert world.source.calls[-1] == ("unwatch", "alice@example.com", None)
    assert "alice@example.com" not in world.watcher.watched


async def test_a_burst_of_changes_is_settled_in_one_read_of_the_watchable_mailboxes(world: World) -> None:
    await world.watcher.start()
    reads = folder_reads(world)
    for n in range(30):
        await world.register(f"burst{n}@example.com")
    await world.register("burst7@example.com", device="d2", folders=("Inbox", "Projects"))
    await world.register("other@example.com")  # another node's: not read
    await world.register("x@cloud.example")  # no source for this tenant here: not read
    await settled(world)
    assert len(reads) == 1
    assert sorted(reads[0]) == sorted(f"burst{n}@example.com" for n in range(30))
    assert world.watcher.watched["burst7@example.com"] == {"Inbox", "Projects"}
    assert {c[1] for c in world.source.calls} == {f"burst{n}@example.com" for n in range(30)}


async def test_a_failing_watch_is_retried_without_holding_up_the_others(world: World) -> None:
    await world.watcher.start()
    refusals = {"b@example.com": 1}
    watch = world.source.watch

    async def flaky(mailbox: str, folders: frozenset[str]) -> None:
        if refusals.get(mailbox):
            refusals[mailbox] -= 1
            raise ConnectionError("source unavailable")
        await watch(mailbox, folders)

    world.source.watch = flaky  # type: ignore[method-assign]
    for name in ("a", "b", "c"):
        await world.register(f"{name}@example.com")
    await settled(world)
    assert set(world.watcher.watched) == {"a@example.com", "c@example.com"}  # b's failure is not recorded as done
    await world.clock.advance(1.0)  # the back-off before the retry
    await settled(world)
    assert set(world.watcher.watched) == {"a@example.com", "b@example.com", "c@example.com"}
    assert [c[1] for c in world.source.calls].count("b@example.com") == 1


async def test_changes_that_leave_the_watch_as_is_cost_no_read(world: World) -> None:
    await world.watcher.start()
    reads = folder_reads(world)
    await world.register("alice@example.com")
    await settled(world)
    assert len(reads) == 1  # a new mailbox is read

    await world.register("alice@example.com")  # the same device again, settings unchanged
    await world.register("alice@example.com", device="d2")  # a new device asking for the watched Inbox
    await settled(world)
    assert len(reads) == 1
    assert world.source.calls == [("watch", "alice@example.com", frozenset({"Inbox"}))]

    await world.register("alice@example.com", device="d3", folders=("Inbox", "VIP"))  # adds a folder
    await settled(world)
    assert len(reads) == 2 and world.watcher.watched["alice@example.com"] == {"Inbox", "VIP"}
    await world.register("alice@example.com", device="d3", folders=("Inbox",))  # drops one: read again
    await settled(world)
    assert len(reads) == 3 and world.watcher.watched["alice@example.com"] == {"Inbox"}

    [first, *_] = await world.store.list_registrations("alice@example.com")
    await world.service.delete(first.id)  # a deletion is always read
    await settled(world)
    assert len(reads) == 4
    assert world.watcher.watched["alice@example.com"] == {"Inbox"}


async def test_a_change_arriving_between_a_read_and_its_watch_is_read_again(world: World) -> None:
    await world.watcher.start()
    await world.register("bob@example.com")
    vip = await world.register("bob@example.com", device="d2", folders=("Inbox", "VIP"))
    await settled(world)
    assert world.watcher.watched["bob@example.com"] == {"Inbox", "VIP"}

    gate, held = asyncio.Event(), asyncio.Event()
    watch = world.source.watch

    async def slow(mailbox: str, folders: frozenset[str]) -> None:
        if mailbox == "amy@example.com":
            held.set()
            await gate.wait()
        await watch(mailbox, folders)

    world.source.watch = slow  # type: ignore[method-assign]
    await world.register("amy@example.com")  # settled first, its watch held up
    await world.service.delete(vip)  # Bob's read will say {Inbox}
    for _ in range(5):
        await asyncio.sleep(0)
    await world.clock.advance(0.5)
    await asyncio.wait_for(held.wait(), 5)  # the read has run and Amy's watch is waiting
    # Bob's iPad comes back asking for VIP: the watch still says {Inbox, VIP}, but the read about to be applied
    # does not include it, so this change must not be skipped
    await world.register("bob@example.com", device="d3", folders=("Inbox", "VIP"))
    gate.set()
    await settled(world)
    await world.clock.advance(1.0)
    await settled(world)
    assert world.watcher.watched["bob@example.com"] == {"Inbox", "VIP"}
