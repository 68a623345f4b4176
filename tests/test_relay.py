"""The relay pipeline on a fake clock over the real SQL store: dedupe, coalesce, rules, payload choice, and
what it records from each final outcome."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bemsmail.cluster.memory import InProcessBus
from bemsmail.config import DatabaseConfig
from bemsmail.core.clock import FakeClock
from bemsmail.core.model import (
    Backend,
    Category,
    DeviceSettings,
    EventKind,
    MailboxEvent,
    Outcome,
    OutcomeKind,
    Platform,
    PushKind,
    PushMessage,
    QuietHours,
    RegistrationInput,
)
from bemsmail.core.registrations import RegistrationService
from bemsmail.core.relay import Relay, RelayPolicy, collapse_id
from bemsmail.core.rules import RulePolicy
from bemsmail.core.tenants import Tenant, TenantDirectory
from bemsmail.store.engine import create_engine
from bemsmail.store.schema import migrate
from bemsmail.store.sql import SqlStore

START = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # a Monday, noon UTC
ALICE = "alice@example.com"


class CapturingDispatch:
    """Stands where the dispatcher stands; the test decides each push's final outcome."""

    def __init__(self) -> None:
        self.messages: list[PushMessage] = []
        self.futures: list[asyncio.Future[Outcome]] = []

    def submit(self, message: PushMessage) -> asyncio.Future[Outcome]:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.messages.append(message)
        self.futures.append(future)
        return future

    def answer_all(self, outcome: Outcome) -> None:
        for future in self.futures:
            if not future.done():
                future.set_result(outcome)


@dataclass
class Harness:
    relay: Relay
    dispatch: CapturingDispatch
    store: SqlStore
    service: RegistrationService
    clock: FakeClock
    bus: InProcessBus

    async def register(self, device: str = "iphone", token: str = "ab" * 32, mailbox: str = ALICE,
                       **extra: object) -> str:
        data = RegistrationInput(mailbox=mailbox, device_id=device, platform=Platform.IOS, token=token,
                                 app_id="com.example.mail", **extra)  # type: ignore[arg-type]
        return (await self.service.register(data)).registration.id


def event(n: int = 1, mailbox: str = ALICE, **extra: object) -> MailboxEvent:
    fields: dict[str, object] = {"mailbox": mailbox, "folder": "Inbox", "item_id": f"item-{n}",
                                 "kind": EventKind.NEW_MAIL, "received_at": START, "sender": "boss@example.com",
                                 "subject": "Quarterly numbers", "unread_count": n}
    fields.update(extra)
    return MailboxEvent(**fields)  # type: ignore[arg-type]


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    clock = FakeClock(START)
    engine = create_engine(DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"))
    await migrate(engine)
    store = SqlStore(engine, clock)
    bus = InProcessBus()
    tenants = TenantDirectory([Tenant("example", Backend.EWS, ("example.com",), rich_content=True),
                               Tenant("plain", Backend.EWS, ("plain.example",))])
    service = RegistrationService(store, bus, tenants, {"com.example.mail": Platform.IOS})
    dispatch = CapturingDispatch()
    policy = RelayPolicy(rules=RulePolicy(stale_after=timedelta(hours=72), delete_after=timedelta(days=30)),
                         coalesce_seconds=1.0, dedupe_window_seconds=3600,
                         sweep_interval_seconds=10**9,  # the test sweeps by hand
                         rich_content=lambda m: (t := tenants.resolve(m)) is not None and t.rich_content)
    relay = Relay(store, dispatch, bus, clock, policy)
    relay.start()
    yield Harness(relay, dispatch, store, service, clock, bus)
    await relay.stop()
    await store.close()


async def test_one_push_per_device_content_free_by_default(harness: Harness) -> None:
    await harness.register("iphone", "01" * 32)
    await harness.register("ipad", "02" * 32)
    await harness.relay.on_event(event())
    pushes = harness.dispatch.messages
    assert sorted(p.token for p in pushes) == ["01" * 32, "02" * 32]
    for push in pushes:
        assert push.kind is PushKind.ALERT and push.category is Category.NEW_MAIL
        assert push.rich is None  # no sender or subject through Apple unless asked for
        assert push.badge == 1 and push.sound == "default"
        assert push.collapse_id == collapse_id(ALICE) and ALICE not in push.collapse_id
        assert push.expires_at > START
    assert len({p.notification_id for p in pushes}) == 2


async def test_the_same_event_twice_gives_one_push(harness: Harness) -> None:
    await harness.register()
    await harness.relay.on_event(event(1))
    await harness.clock.advance(5)
    await harness.relay.on_event(event(1))  # a reconnect or catch-up reports it again
    await harness.clock.advance(5)
    assert len(harness.dispatch.messages) == 1


async def test_a_burst_coalesces_into_one_more_push_with_the_latest_badge(harness: Harness) -> None:
    await harness.register()
    await harness.relay.on_event(event(1))
    assert len(harness.dispatch.messages) == 1  # the first is not delayed
    for n in (2, 3, 4):
        await harness.relay.on_event(event(n))
    assert len(harness.dispatch.messages) == 1
    await harness.clock.advance(1.0)
    await settle()
    assert len(harness.dispatch.messages) == 2
    last = harness.dispatch.messages[-1]
    assert last.badge == 4 and last.data["count"] == "3" and last.data["item_id"] == "item-4"  # the newest
    await harness.clock.advance(5)
    assert harness.relay.open_windows == 0


async def test_rules_filter_per_device(harness: Harness) -> None:
    await harness.register("inbox-only", "01" * 32)
    await harness.register("archive-too", "02" * 32, settings=DeviceSettings(folders=("Inbox", "Archive")))
    await harness.register("no-calendar", "03" * 32, settings=DeviceSettings(calendar=False))
    await harness.relay.on_event(event(1, folder="Archive"))
    assert [p.token for p in harness.dispatch.messages] == ["02" * 32]
    harness.dispatch.messages.clear()
    await harness.clock.advance(2)
    await harness.relay.on_event(event(2, kind=EventKind.MEETING_REQUEST))
    pushed = {p.token: p for p in harness.dispatch.messages}
    assert set(pushed) == {"01" * 32, "02" * 32}
    assert all(p.category is Category.MEETING_REQUEST for p in pushed.values())


async def test_quiet_hours_give_a_silent_badge_or_nothing(harness: Harness) -> None:
    quiet = QuietHours(start="11:00", end="14:00", silent_badge=True)  # type: ignore[arg-type]
    await harness.register("badge", "01" * 32, settings=DeviceSettings(quiet_hours=quiet), timezone="UTC")
    nothing = QuietHours(start="11:00", end="14:00")  # type: ignore[arg-type]
    await harness.register("silent", "02" * 32, settings=DeviceSettings(quiet_hours=nothing), timezone="UTC")
    await harness.relay.on_event(event(7))
    [push] = harness.dispatch.messages
    assert push.token == "01" * 32 and push.kind is PushKind.BADGE and push.badge == 7
    assert push.sound is None and push.rich is None


async def test_rich_content_needs_the_device_and_the_tenant(harness: Harness) -> None:
    rich = DeviceSettings(content="rich")
    await harness.register("rich", "01" * 32, settings=rich)
    await harness.register("rich-elsewhere", "02" * 32, mailbox="bob@plain.example", settings=rich)
    await harness.relay.on_event(event(1))
    await harness.relay.on_event(event(1, mailbox="bob@plain.example"))
    by_token = {p.token: p for p in harness.dispatch.messages}
    assert by_token["01" * 32].rich is not None and by_token["01" * 32].rich.subject == "Quarterly numbers"
    assert by_token["02" * 32].rich is None


async def test_a_dead_token_is_deleted_and_gets_no_more_pushes(harness: Harness) -> None:
    await harness.register()
    await harness.relay.on_event(event(1))
    harness.dispatch.answer_all(Outcome(OutcomeKind.INVALID_TOKEN, "400 BadDeviceToken"))
    await settle()
    await harness.relay.flush_records()
    assert await harness.store.list_registrations(ALICE) == []
    await harness.clock.advance(2)
    await harness.relay.on_event(event(2))
    assert len(harness.dispatch.messages) == 1  # the cache was invalidated through the bus


async def test_a_410_older_than_the_last_registration_keeps_it(harness: Harness) -> None:
    await harness.register()
    await harness.relay.on_event(event(1))
    harness.dispatch.answer_all(Outcome(OutcomeKind.INVALID_TOKEN, "410 Unregistered",
                                        invalid_since=START - timedelta(hours=1)))
    await settle()
    await harness.relay.flush_records()
    assert len(await harness.store.list_registrations(ALICE)) == 1


async def test_a_token_replaced_meanwhile_is_not_deleted(harness: Harness) -> None:
    await harness.register(token="01" * 32)
    await harness.relay.on_event(event(1))
    await harness.register(token="02" * 32)  # the app re-registered with a new token before the answer came
    harness.dispatch.answer_all(Outcome(OutcomeKind.INVALID_TOKEN, "410 Unregistered"))
    await settle()
    await harness.relay.flush_records()
    [kept] = await harness.store.list_registrations(ALICE)
    assert kept.token == "02" * 32


async def test_delivered_pushes_record_last_push_at(harness: Harness) -> None:
    rid = await harness.register()
    await harness.relay.on_event(event(1))
    harness.dispatch.answer_all(Outcome(OutcomeKind.DELIVERED))
    await settle()
    await harness.clock.advance(1.5)  # the recorder writes once per interval
    await settle()
    got = await harness.store.get_registration(rid)
    assert got is not None and got.last_push_at is not None


async def test_stale_registrations_get_nothing_and_expired_ones_are_deleted(harness: Harness) -> None:
    await harness.register()
    await harness.clock.advance(73 * 3600)
    await harness.relay.on_event(event(1))
    assert harness.dispatch.messages == []
    await harness.clock.advance(31 * 86400)
    assert await harness.relay.sweep_expired() == 1
    assert await harness.store.list_registrations(ALICE) == []
    await harness.register()
    assert await harness.relay.sweep_expired() == 0  # a fresh registration is not expired


async def test_new_registrations_are_seen_without_waiting(harness: Harness) -> None:
    await harness.relay.on_event(event(1))  # no devices yet: caches the empty list
    await harness.register()
    await harness.clock.advance(2)
    await harness.relay.on_event(event(2))
    assert len(harness.dispatch.messages) == 1


async def test_apps_that_fetch_on_wake_get_background_pushes(harness: Harness) -> None:
    dispatch = CapturingDispatch()
    policy = RelayPolicy(rules=RulePolicy(stale_after=timedelta(hours=72), delete_after=timedelta(days=30)),
                         background_apps=frozenset({"com.example.mail"}), sweep_interval_seconds=10**9)
    relay = Relay(harness.store, dispatch, harness.bus, harness.clock, policy)
    await harness.register(settings=DeviceSettings(content="rich"))
    await relay.on_event(event(2))
    [push] = dispatch.messages
    assert push.kind is PushKind.BACKGROUND and int(push.priority) == 5
    assert push.sound is None and push.rich is None and push.data["account"] == ALICE
    await relay.stop()


# --- details on demand --------------------------------------------------------------------------------------

class RecordingDetails:
    """A MailDetails port that answers from a table and records what it was asked."""

    def __init__(self, details: dict[str, object] | None = None, unread: int | None = 7) -> None:
        from bemsmail.core.model import ItemDetails

        self.table: dict[str, ItemDetails] = details or {}  # type: ignore[assignment]
        self.unread = unread
        self.item_calls: list[list[str]] = []
        self.unread_calls = 0

    async def item_details(self, mailbox: str, item_ids: list[str]) -> dict[str, object]:
        self.item_calls.append(list(item_ids))
        return {i: self.table[i] for i in item_ids if i in self.table}

    async def unread_count(self, mailbox: str) -> int | None:
        self.unread_calls += 1
        return self.unread


def bare(n: int = 1) -> MailboxEvent:
    """What a stream notification gives: an item id in a folder, nothing more."""
    return MailboxEvent(ALICE, "Inbox", f"item-{n}", EventKind.NEW_MAIL, START)


async def with_details(harness: Harness, details: RecordingDetails) -> Relay:
    relay = Relay(harness.store, harness.dispatch, harness.bus, harness.clock, harness.relay._policy,
                  details=details)  # type: ignore[arg-type]
    relay.start()
    return relay


async def test_minimal_devices_cost_no_item_lookup_and_get_the_badge(harness: Harness) -> None:
    await harness.register()
    details = RecordingDetails(unread=4)
    relay = await with_details(harness, details)
    await relay.on_event(bare())
    await relay.stop()
    assert details.item_calls == [] and details.unread_calls == 1
    assert harness.dispatch.messages[-1].badge == 4


async def test_an_unread_count_from_the_notification_spares_the_lookup(harness: Harness) -> None:
    await harness.register()
    details = RecordingDetails()
    relay = await with_details(harness, details)
    await relay.on_event(MailboxEvent(ALICE, "Inbox", "item-1", EventKind.NEW_MAIL, START, unread_count=2))
    await relay.stop()
    assert details.unread_calls == 0 and harness.dispatch.messages[-1].badge == 2


async def test_vip_rules_and_rich_content_fetch_details_once_per_push(harness: Harness) -> None:
    from bemsmail.core.model import ItemDetails

    await harness.register(settings=DeviceSettings(vip_senders=("boss@example.com",), content="rich"))
    details = RecordingDetails({
        "item-1": ItemDetails(EventKind.NEW_MAIL, "Boss <boss@example.com>", "Numbers", "high"),
        "item-2": ItemDetails(EventKind.NEW_MAIL, "spam@example.net", "Offer"),
    })
    relay = await with_details(harness, details)
    await relay.on_event(bare(1))
    await relay.on_event(bare(2))  # inside the coalescing window
    await harness.clock.advance(1.5)
    await relay.stop()
    assert details.item_calls == [["item-1"], ["item-2"]]
    assert len(harness.dispatch.messages) == 1  # item-2 is not from a VIP
    rich = harness.dispatch.messages[0].rich
    assert rich is not None and rich.subject == "Numbers" and rich.sender == "Boss <boss@example.com>"


async def test_a_meeting_request_is_told_apart_only_by_its_details(harness: Harness) -> None:
    from bemsmail.core.model import ItemDetails

    await harness.register(settings=DeviceSettings(calendar=False))
    details = RecordingDetails({"item-1": ItemDetails(EventKind.MEETING_REQUEST, "boss@example.com", "Sync")})
    relay = await with_details(harness, details)
    await relay.on_event(bare(1))
    await relay.stop()
    assert details.item_calls == [["item-1"]] and harness.dispatch.messages == []


async def test_failing_details_do_not_stop_the_push(harness: Harness) -> None:
    await harness.register(settings=DeviceSettings(content="rich"))

    class Broken(RecordingDetails):
        async def item_details(self, mailbox: str, item_ids: list[str]) -> dict[str, object]:
            raise ConnectionError("exchange is down")

        async def unread_count(self, mailbox: str) -> int | None:
            raise ConnectionError("exchange is down")

    relay = await with_details(harness, Broken())
    await relay.on_event(bare(1))
    await relay.stop()
    [message] = harness.dispatch.messages
    assert message.kind is PushKind.ALERT and message.rich is None and message.badge is None
