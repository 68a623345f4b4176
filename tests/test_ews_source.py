"""The EWS source against the mock Exchange: affinity groups of at most group_size, the affinity headers, every
stream error, reconnects, catch-up after downtime with no loss and no duplicate, and unwatching."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bemsmail.config import DatabaseConfig, EwsConfig
from bemsmail.core.clock import SystemClock
from bemsmail.core.model import Backend, EventKind, MailboxEvent, Platform, RegistrationInput
from bemsmail.mocks.ews import MockExchange
from bemsmail.sources.ews.source import EwsSource
from bemsmail.store.engine import create_engine
from bemsmail.store.schema import migrate
from bemsmail.store.sql import SqlStore
from tests.support import until as eventually

INBOX = frozenset({"Inbox"})


@dataclass
class Sink:
    events: list[MailboxEvent] = field(default_factory=list)

    async def __call__(self, event: MailboxEvent) -> None:
        self.events.append(event)

    def items(self) -> list[str]:
        return [e.item_id for e in self.events]


def settings(mock: MockExchange, **overrides: Any) -> EwsConfig:
    values: dict[str, Any] = {"url": mock.ews_url, "auth": "basic", "username": "svc", "password": "secret",
                              "group_size": 3, "connection_timeout_minutes": 1, "watchdog_seconds": 1.0,
                              "threads": 8, "catch_up_max_age_minutes": 60}
    values.update(overrides)
    return EwsConfig.model_validate(values)


@pytest.fixture
async def mock() -> AsyncIterator[MockExchange]:
    async with MockExchange(auth="basic", users={"svc": "secret"}, domains=("example.com",), backends=4,
                            heartbeat_seconds=0.2, minute_seconds=2.0) as server:
        yield server


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlStore]:
    engine = create_engine(DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path / 'ews.db'}"))
    await migrate(engine)
    s = SqlStore(engine, SystemClock())
    yield s
    await s.close()


async def registered(store: SqlStore, *mailboxes: str) -> None:
    """Folder state rows hang off mailbox rows, which registrations create."""
    for n, mailbox in enumerate(mailboxes):
        await store.upsert_registration(
            RegistrationInput(mailbox=mailbox, device_id="d", platform=Platform.IOS, token=f"{n:064x}",
                              app_id="app"), "onprem", Backend.EWS)


Started = Callable[..., Awaitable[tuple[EwsSource, Sink]]]


@pytest.fixture
async def start(mock: MockExchange, store: SqlStore) -> AsyncIterator[Started]:
    running: list[EwsSource] = []

    async def starter(**overrides: Any) -> tuple[EwsSource, Sink]:
        sink = Sink()
        source = EwsSource(settings(mock, **overrides), store, SystemClock(), sink)
        await source.start()
        running.append(source)
        return source, sink

    yield starter
    for source in running:
        await source.stop()


def users(n: int, prefix: str = "user") -> list[str]:
    return [f"{prefix}{i:03d}@example.com" for i in range(n)]


async def watch_all(source: EwsSource, mailboxes: list[str], folders: frozenset[str] = INBOX) -> None:
    for mailbox in mailboxes:
        await source.watch(mailbox, folders)
    await eventually(lambda: source.subscribed() == len(mailboxes), "every mailbox subscribed")
    await eventually(lambda: source.streaming_groups() == len(source.groups), "every group streaming")
    await eventually(lambda: source.stats.catch_ups >= len(mailboxes), "first catch-ups done")


# --- grouping and affinity ------------------------------------------------------------------------------------

async def test_groups_hold_at_most_group_size_and_keep_affinity(start: Started, mock: MockExchange,
                                                                 store: SqlStore) -> None:
    mailboxes = users(7)
    await registered(store, *mailboxes)
    source, sink = await start()
    await watch_all(source, mailboxes)
    assert sorted(len(g.members) for g in source.groups) == [1, 3, 3]
    assert mock.stats.affinity_misroutes == 0 and mock.stats.second_stream_opened == 0
    for group in source.groups:
        assert group.cookie is not None
        backends = {mock.subscription(sid).backend for sid in group.members}
        assert len(backends) == 1  # every member was placed where the anchor's cookie points
    streams = [r for r in mock.requests() if r.operation == "GetStreamingEvents"]
    assert streams
    anchors = {g.anchor for g in source.groups}
    for record in streams:
        assert record.anchor_mailbox in anchors
        assert (record.prefer_server_affinity or "").lower() == "true"
        assert record.cookie and "X-BackEndOverrideCookie=" in record.cookie
        assert record.backend_override_cookie
    # one stream per group, each impersonating its own anchor: within the per-mailbox connection budget
    assert max(mock.stats.stream_connections_by_impersonated.values()) <= len(source.groups)

    item = mock.create_mail(mailboxes[4], subject="hello")
    await eventually(lambda: item in sink.items(), "the new mail handed on")
    event = next(e for e in sink.events if e.item_id == item)
    assert event.mailbox == mailboxes[4] and event.folder == "Inbox" and event.kind is EventKind.NEW_MAIL
    assert event.unread_count == 1  # from the folder's ModifiedEvent on the same notification


async def test_a_stream_closed_at_its_timeout_reconnects_without_catch_up(start: Started, mock: MockExchange,
                                                                          store: SqlStore) -> None:
    mailboxes = users(2)
    await registered(store, *mailboxes)
    source, sink = await start()
    await watch_all(source, mailboxes)
    connections, catch_ups = source.stats.connections, source.stats.catch_ups
    await eventually(lambda: source.stats.connections > connections, "a reconnect after ConnectionStatus Closed")
    assert source.stats.catch_ups == catch_ups and source.stats.stream_failures == 0
    item = mock.create_mail(mailboxes[0])
    await eventually(lambda: item in sink.items(), "mail after the rotation")


# --- errors ---------------------------------------------------------------------------------------------------

async def test_expired_ids_are_resubscribed_alone(start: Started, mock: MockExchange, store: SqlStore) -> None:
    mailboxes = users(3)
    await registered(store, *mailboxes)
    source, sink = await start()
    await watch_all(source, mailboxes)
    [group] = source.groups
    victim = next(sid for sid, w in group.members.items() if w.mailbox == mailboxes[1])
    subscribes = mock.stats.requests["Subscribe"]
    assert mock.expire_subscriptions([victim]) == 1
    await eventually(lambda: victim not in source._by_subscription and source.subscribed() == 3,
                     "the expired subscription replaced")
    assert mock.stats.requests["Subscribe"] == subscribes + 1  # only the failing id, not the whole group
    for mailbox in mailboxes:
        item = mock.create_mail(mailbox)
        await eventually(lambda item=item: item in sink.items(), f"mail for {mailbox}")


async def test_dropped_streams_come_back_and_lose_nothing(start: Started, mock: MockExchange,
                                                          store: SqlStore) -> None:
    mailboxes = users(6)
    await registered(store, *mailboxes)
    source, sink = await start()
    await watch_all(source, mailboxes)
    failures = source.stats.stream_failures
    assert mock.drop_streams() == len(source.groups)
    during = [mock.create_mail(m) for m in mailboxes]  # while nobody is connected
    await eventually(lambda: source.stats.stream_failures >= failures + len(source.groups), "drops noticed")
    await eventually(lambda: source.streaming_groups() == len(source.groups), "all groups streaming again")
    await eventually(lambda: set(during) <= set(sink.items()), "every mail from the gap handed on")
    after = mock.create_mail(mailboxes[0])
    await eventually(lambda: after in sink.items(), "mail after the reconnect")
    assert mock.stats.second_stream_opened == 0


async def test_silence_past_the_watchdog_reconnects(start: Started, mock: MockExchange, store: SqlStore) -> None:
    mailboxes = users(2)
    await registered(store, *mailboxes)
    source, sink = await start()
    await watch_all(source, mailboxes)
    failures = source.stats.stream_failures
    mock.silence_streams(3.0)
    await eventually(lambda: source.stats.stream_failures > failures, "the watchdog fired")
    item = mock.create_mail(mailboxes[1])
    await eventually(lambda: item in sink.items(), "mail after the watchdog reconnect")


async def test_server_busy_back_off_and_503_are_honoured(start: Started, mock: MockExchange,
                                                         store: SqlStore) -> None:
    mailboxes = users(2)
    await registered(store, *mailboxes)
    mock.fail_next("Subscribe", "ErrorServerBusy", back_off_ms=300)
    mock.fail_next("GetStreamingEvents", "ErrorServerBusy", http_status=503)
    source, sink = await start()
    await watch_all(source, mailboxes)
    assert source.stats.subscribe_failures == 1 and source.stats.stream_failures >= 1
    item = mock.create_mail(mailboxes[0])
    await eventually(lambda: item in sink.items(), "mail once the server is no longer busy")


# --- catch-up -------------------------------------------------------------------------------------------------

async def test_mail_that_came_while_down_is_handed_on_once_and_old_mail_never(start: Started, mock: MockExchange,
                                                                               store: SqlStore) -> None:
    mailboxes = users(4)
    await registered(store, *mailboxes)
    old = mock.create_mail(mailboxes[0], subject="before we watched")
    first, sink = await start()
    await watch_all(first, mailboxes)
    streamed = mock.create_mail(mailboxes[1], subject="seen on the stream")
    await eventually(lambda: streamed in sink.items(), "streamed mail")
    await first.stop()

    down = [mock.create_mail(m, subject="while down") for m in mailboxes]
    stale = mock.create_mail(mailboxes[2], subject="too old to push",
                             received_at=datetime.now(UTC) - timedelta(hours=3))
    second, sink2 = await start()
    await watch_all(second, mailboxes)
    await eventually(lambda: set(down) <= set(sink2.items()), "mail from the downtime")
    assert old not in sink.items() + sink2.items()  # what was there before the first watch is not news
    assert streamed not in sink2.items()  # handed on before the restart: not again
    assert stale not in sink2.items()  # older than catch_up_max_age_minutes
    assert len(sink2.items()) == len(set(sink2.items()))
    caught = [e for e in sink2.events if e.item_id in down]
    assert all(e.details_known and e.subject == "while down" for e in caught)


async def test_unwatch_unsubscribes_and_forgets(start: Started, mock: MockExchange, store: SqlStore) -> None:
    mailboxes = users(3)
    await registered(store, *mailboxes)
    source, sink = await start()
    await watch_all(source, mailboxes)
    [group] = source.groups
    gone = next(sid for sid, w in group.members.items() if w.mailbox == mailboxes[2])
    await source.unwatch(mailboxes[2])
    await eventually(lambda: mock.stats.requests["Unsubscribe"] == 1, "Unsubscribe sent")
    assert not mock.subscription(gone).alive
    assert await store.folder_states(Backend.EWS, [mailboxes[2]]) == {}
    item = mock.create_mail(mailboxes[2])
    other = mock.create_mail(mailboxes[0])
    await eventually(lambda: other in sink.items(), "the others still stream")
    assert item not in sink.items()


async def test_subfolders_are_watched_when_a_device_asks(start: Started, mock: MockExchange,
                                                         store: SqlStore) -> None:
    mailbox = "folders@example.com"
    await registered(store, mailbox)
    projects = mock.create_folder(mailbox, "Projects")
    source, sink = await start()
    await watch_all(source, [mailbox], frozenset({"Inbox", "Inbox/Projects"}))
    item = mock.create_mail(mailbox, folder=projects)
    await eventually(lambda: item in sink.items(), "mail filed into the sub-folder")
    assert next(e for e in sink.events if e.item_id == item).folder == "Inbox/Projects"


async def test_details_and_unread_count_on_demand(start: Started, mock: MockExchange, store: SqlStore) -> None:
    mailbox = "details@example.com"
    await registered(store, mailbox)
    source, _ = await start()
    await watch_all(source, [mailbox])
    note = mock.create_mail(mailbox, subject="Numbers", sender="boss@example.com", importance="High")
    meeting = mock.create_mail(mailbox, subject="Sync", item_class="IPM.Schedule.Meeting.Request")
    gone = mock.create_mail(mailbox)
    mock.delete_mail(mailbox, gone)
    found = await source.item_details(mailbox, [note, meeting, gone])
    assert found[note].subject == "Numbers" and found[note].importance == "high"
    assert "boss@example.com" in (found[note].sender or "")
    assert found[meeting].kind is EventKind.MEETING_REQUEST
    assert gone not in found
    source._unread.clear()
    assert await source.unread_count(mailbox) == 2


# --- push subscriptions ---------------------------------------------------------------------------------------

@dataclass
class Callback:
    """Our real callback route (/ews/notification) on a small server of its own, fronting one source."""

    runner: Any
    url: str


async def callback_server(receivers: list[EwsSource]) -> Callback:
    from aiohttp import web

    from bemsmail.api import ews_push
    from bemsmail.api.app import IN_FLIGHT, InFlight, observe
    from bemsmail.api.context import METRICS
    from bemsmail.metrics import Metrics

    app = web.Application(middlewares=[observe])
    app[METRICS] = Metrics()
    app[IN_FLIGHT] = InFlight()
    ews_push.add_routes(app, receivers)  # type: ignore[arg-type]
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return Callback(runner, f"http://127.0.0.1:{port}{ews_push.PATH}")


@pytest.fixture
async def push_source(mock: MockExchange, store: SqlStore) -> AsyncIterator[tuple[EwsSource, Sink, Callback]]:
    receivers: list[EwsSource] = []
    callback = await callback_server(receivers)
    sink = Sink()
    source = EwsSource(settings(mock, mode="push", push_url=callback.url, status_frequency_minutes=1), store,
                       SystemClock(), sink)
    receivers.append(source)
    await source.start()
    yield source, sink, callback
    await source.stop()
    await callback.runner.cleanup()


async def test_push_notifications_arrive_and_gaps_are_replayed(push_source: tuple[EwsSource, Sink, Callback],
                                                               mock: MockExchange, store: SqlStore) -> None:
    source, sink, _ = push_source
    mailbox = "pushed@example.com"
    await registered(store, mailbox)
    await source.watch(mailbox, INBOX)
    await eventually(lambda: source.subscribed() == 1 and source.stats.push_notifications >= 1,
                     "subscribed, and the first status notification answered")
    [subscription_id] = list(source._by_subscription)
    first = mock.create_mail(mailbox, subject="one")
    await eventually(lambda: first in sink.items(), "a pushed notification handed on")

    mock.skip_push_notifications(subscription_id)
    lost = mock.create_mail(mailbox, subject="skipped by Exchange")
    after = mock.create_mail(mailbox, subject="after the gap")
    await eventually(lambda: source.stats.push_gaps == 1, "the gap seen through PreviousWatermark")
    await eventually(lambda: {lost, after} <= set(sink.items()), "the skipped mail replayed from the watermark")
    assert not mock.subscription(subscription_id).alive  # answered Unsubscribe; a new one replaced it
    assert source.subscribed() == 1


async def test_push_posts_for_unknown_subscriptions_are_unsubscribed(
        push_source: tuple[EwsSource, Sink, Callback], mock: MockExchange, store: SqlStore) -> None:
    import aiohttp

    source, sink, callback = push_source
    mailbox = "leaving@example.com"
    await registered(store, mailbox)
    await source.watch(mailbox, INBOX)
    await eventually(lambda: source.subscribed() == 1, "subscribed")
    [subscription_id] = list(source._by_subscription)
    await source.unwatch(mailbox)
    mock.create_mail(mailbox)
    await eventually(lambda: not mock.subscription(subscription_id).alive, "Exchange told to unsubscribe")
    assert source.stats.push_unknown >= 1 and sink.items() == []

    async with aiohttp.ClientSession() as http:
        async with http.post(callback.url + "?t=forged", data=b"<x/>",
                             headers={"Content-Type": "text/xml"}) as forged:
            assert forged.status == 403
        good = callback.url.split("?")[0] + "?t=" + source.push_path_token
        async with http.post(good, data=b"<not-soap", headers={"Content-Type": "text/xml"}) as broken:
            assert broken.status == 400
            assert broken.content_type == "application/problem+json"


async def test_silent_push_subscriptions_are_replaced(push_source: tuple[EwsSource, Sink, Callback],
                                                      mock: MockExchange, store: SqlStore) -> None:
    source, sink, _ = push_source
    mailbox = "quiet@example.com"
    await registered(store, mailbox)
    await source.watch(mailbox, INBOX)
    await eventually(lambda: source.subscribed() == 1, "subscribed")
    [old] = list(source._by_subscription)
    source._by_subscription[old].last_heard -= 3 * 60  # more than twice StatusFrequency (1 minute) ago
    assert source.check_push_silence() == 1
    await eventually(lambda: list(source._by_subscription) not in ([], [old]), "resubscribed")
    item = mock.create_mail(mailbox)
    await eventually(lambda: item in sink.items(), "mail on the new subscription")


# --- autodiscover, NTLM, affinity isolation, secrets -----------------------------------------------------------

async def test_autodiscover_groups_mailboxes_by_grouping_information(mock: MockExchange, store: SqlStore) -> None:
    mailboxes = users(12, prefix="ad")
    await registered(store, *mailboxes)
    sink = Sink()
    source = EwsSource(settings(mock, url=None, autodiscover_url=mock.autodiscover_url, group_size=200), store,
                       SystemClock(), sink)
    await source.start()
    try:
        await watch_all(source, mailboxes)
        for group in source.groups:
            assert group.key[0] == mock.ews_url  # ExternalEwsUrl from GetUserSettings
            assert {mock.grouping(w.mailbox) for w in group.members.values()} == {group.key[1]}
        assert len(source.groups) == len({mock.grouping(m) for m in mailboxes})
        assert mock.stats.requests["GetUserSettings"] >= 1
        item = mock.create_mail(mailboxes[5])
        await eventually(lambda: item in sink.items(), "mail through the discovered endpoint")
    finally:
        await source.stop()


async def test_ntlm_for_exchangelib_calls_and_our_streams(store: SqlStore) -> None:
    mailboxes = users(3, prefix="ntlm")
    await registered(store, *mailboxes)
    async with MockExchange(auth="ntlm", users={"svc": "secret"}, heartbeat_seconds=0.2, minute_seconds=2.0) as mock:
        sink = Sink()
        source = EwsSource(settings(mock, auth="ntlm"), store, SystemClock(), sink)
        await source.start()
        try:
            await watch_all(source, mailboxes)
            item = mock.create_mail(mailboxes[2])
            await eventually(lambda: item in sink.items(), "mail over an NTLM-authenticated stream")
            assert {r.user for r in mock.requests()} == {"svc"}
        finally:
            await source.stop()


async def test_affinity_cookies_never_cross_groups(start: Started, mock: MockExchange, store: SqlStore) -> None:
    mailboxes = users(12, prefix="aff")
    await registered(store, *mailboxes)
    source, _ = await start()
    await watch_all(source, mailboxes)
    cookie_of = {w.mailbox: g.cookie for g in source.groups for w in g.members.values()}
    assert all(cookie_of.values())  # each group pinned by its own anchor's answer
    for record in mock.requests():
        if record.operation == "Subscribe" and record.impersonated in cookie_of:
            sent = {c for c in (record.backend_override_cookie,
                                (record.cookie or "").removeprefix("X-BackEndOverrideCookie=")) if c}
            assert sent <= {cookie_of[record.impersonated]}, "a cookie of another group rode along"


async def test_no_password_in_logs_or_errors(mock: MockExchange, store: SqlStore) -> None:
    from structlog.testing import capture_logs

    await registered(store, "wrong@example.com")
    sink = Sink()
    secret = "s3cr3t-Pa55word"
    source = EwsSource(settings(mock, password=secret), store, SystemClock(), sink)
    with capture_logs() as logs:
        await source.start()
        try:
            await source.watch("wrong@example.com", INBOX)
            await eventually(lambda: source.stats.subscribe_failures >= 1, "the refused subscribe")
        finally:
            await source.stop()
    assert logs and secret not in repr(logs)
    assert secret not in repr(source.settings) and secret not in repr(source.client.settings)
