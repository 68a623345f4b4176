"""The mock Exchange server, driven by exchangelib itself (in threads: it is blocking) and by raw SOAP over aiohttp
where the wire details matter (chunked envelopes, headers, cookies)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from exchangelib import IMPERSONATION, NTLM, Account, Configuration, Credentials, FailFast
from exchangelib.autodiscover.protocol import AutodiscoverProtocol
from exchangelib.errors import (
    ErrorInvalidPullSubscriptionId,
    ErrorInvalidSyncStateData,
    ErrorItemNotFound,
    ErrorMailboxStoreUnavailable,
    ErrorNewEventStreamConnectionOpened,
    ErrorNonExistentMailbox,
    ErrorSchemaValidation,
    ErrorServerBusy,
    ErrorSubscriptionNotFound,
    UnauthorizedError,
)
from exchangelib.items import MeetingRequest, Message
from exchangelib.properties import CreatedEvent, ModifiedEvent, NewMailEvent, StatusEvent
from exchangelib.services import GetUserSettings, SendNotification
from exchangelib.transport import BASIC

from bemsmail.mocks import ews
from bemsmail.mocks.ews import MockExchange, serve_in_thread
from tests.ews_support import (
    M,
    Soap,
    T,
    account,
    addresses_on_distinct_backends,
    codes,
    connection_status,
    envelope,
    error_ids,
    has_notifications,
    is_heartbeat,
    streaming_body,
    subscribe_body,
)
from tests.support import until as wait_for

pytestmark = pytest.mark.timeout(60)

ANN = "ann@example.com"
BOB = "bob@example.com"


@pytest.fixture
async def mock() -> AsyncIterator[MockExchange]:
    async with MockExchange(minute_seconds=0.2, heartbeat_seconds=0.1) as server:
        yield server


@pytest.fixture
async def soap(mock: MockExchange) -> AsyncIterator[Soap]:
    async with aiohttp.ClientSession() as session:
        yield Soap(mock, session)


# --- streaming through exchangelib ------------------------------------------------------------------------------------


async def test_streaming_subscription_sees_new_mail(mock: MockExchange) -> None:
    acct = account(mock, ANN)
    sid = await asyncio.to_thread(lambda: acct.inbox.subscribe_to_streaming())
    assert 60 <= len(sid) <= 80
    inbox_id = acct.inbox.id
    consumer = asyncio.create_task(asyncio.to_thread(
        lambda: list(acct.inbox.get_streaming_events(sid, connection_timeout=30, max_notifications_returned=1))))
    await wait_for(lambda: mock.stats.open_streams == 1, what="the stream")
    item_id = mock.create_mail(ANN, subject="Quarterly numbers")
    notifications = await asyncio.wait_for(consumer, 20)
    assert len(notifications) == 1
    note = notifications[0]
    assert note.subscription_id == sid
    assert [type(e) for e in note.events] == [CreatedEvent, NewMailEvent, ModifiedEvent]
    created, new_mail, folder = note.events
    assert created.item_id.id == new_mail.item_id.id == item_id
    assert new_mail.parent_folder_id.id == inbox_id
    assert folder.event_type == "folder" and folder.folder_id.id == inbox_id and folder.unread_count == 1
    assert new_mail.watermark is None  # streaming events carry no watermark (research §A.3)
    await wait_for(lambda: mock.stats.open_streams == 0, what="the stream to end after exchangelib stopped reading")


async def test_stream_ends_with_closed_after_connection_timeout(mock: MockExchange) -> None:
    acct = account(mock, ANN)
    sid = await asyncio.to_thread(lambda: acct.subscribe_to_streaming())
    # exchangelib stops at ConnectionStatus Closed: one protocol minute later the generator ends empty
    notifications = await asyncio.wait_for(asyncio.to_thread(
        lambda: list(acct.inbox.get_streaming_events(sid, connection_timeout=1))), 20)
    assert notifications == []
    assert mock.subscription(sid).alive and not mock.subscription(sid).on_stream


async def test_raw_stream_is_chunked_with_heartbeats_then_closed(soap: Soap) -> None:
    async with MockExchange(minute_seconds=0.5, heartbeat_seconds=0.05) as mock:
        soap.mock = mock
        sid = await soap.subscribe(ANN)
        reader = await soap.open_stream([sid], impersonate=ANN)
        assert reader.response.status == 200
        assert reader.response.headers["Transfer-Encoding"] == "chunked"
        assert reader.response.headers["Content-Type"].startswith("text/xml")
        docs = []
        while (doc := await reader.next()) is not None:
            docs.append(doc)
        heartbeats = [d for d in docs if is_heartbeat(d)]
        assert len(heartbeats) >= 3
        assert connection_status(docs[-1]) == ["Closed"] and codes(docs[-1]) == ["NoError"]
        # every envelope is a complete SOAP document with the server version header
        assert all(d.find(f".//{T}ServerVersionInfo") is not None for d in docs)


# --- pull -------------------------------------------------------------------------------------------------------------


async def test_pull_watermark_chain(mock: MockExchange) -> None:
    acct = account(mock, ANN)
    sid, watermark = await asyncio.to_thread(lambda: acct.inbox.subscribe_to_pull(timeout=10))
    first = mock.create_mail(ANN, subject="one")
    notes = await asyncio.to_thread(lambda: list(acct.inbox.get_events(sid, watermark)))
    assert len(notes) == 1
    assert notes[0].previous_watermark == watermark and notes[0].more_events is False
    events = notes[0].events
    assert [type(e) for e in events] == [CreatedEvent, NewMailEvent, ModifiedEvent]
    assert events[0].item_id.id == first
    marks = [e.watermark for e in events]
    assert len(set(marks)) == 3 and watermark not in marks

    second = mock.create_mail(ANN, subject="two")
    last = marks[-1]
    notes = await asyncio.to_thread(lambda: list(acct.inbox.get_events(sid, last)))
    assert notes[0].previous_watermark == last
    assert [e.item_id.id for e in notes[0].events if isinstance(e, NewMailEvent)] == [second]

    # nothing new: a StatusEvent carrying the watermark to use next
    last = notes[0].events[-1].watermark
    notes = await asyncio.to_thread(lambda: list(acct.inbox.get_events(sid, last)))
    assert [type(e) for e in notes[0].events] == [StatusEvent]

    # more than 50 events: MoreEvents, and exchangelib's loop (which re-sends its first watermark) gets each once
    ids = [mock.create_mail(ANN, subject=f"bulk {i}") for i in range(40)]
    start = notes[0].events[-1].watermark
    notes = await asyncio.to_thread(lambda: list(acct.inbox.get_events(sid, start)))
    assert [n.more_events for n in notes] == [True, True, False]
    assert [len(n.events) for n in notes] == [50, 50, 20]
    assert [e.item_id.id for n in notes for e in n.events if isinstance(e, NewMailEvent)] == ids

    # an unknown watermark is refused
    with pytest.raises(Exception, match=r"ErrorInvalidWatermark|watermark"):
        await asyncio.to_thread(lambda: list(acct.inbox.get_events(sid, "AAAAAAAAAAA=")))


async def test_events_follow_event_types_and_folders(mock: MockExchange) -> None:
    acct = account(mock, ANN)
    sid, watermark = await asyncio.to_thread(lambda: acct.inbox.subscribe_to_pull(event_types=["NewMailEvent"]))
    all_sid, all_watermark = await asyncio.to_thread(lambda: acct.subscribe_to_pull())  # SubscribeToAllFolders
    mock.create_mail(ANN, folder="sentitems")
    inbox_mail = mock.create_mail(ANN)
    mock.mark_read(ANN, inbox_mail)
    notes = await asyncio.to_thread(lambda: list(acct.inbox.get_events(sid, watermark)))
    assert [(type(e), e.item_id.id) for e in notes[0].events] == [(NewMailEvent, inbox_mail)]
    notes = await asyncio.to_thread(lambda: list(acct.inbox.get_events(all_sid, all_watermark)))
    kinds = [(type(e).__name__, e.event_type) for e in notes[0].events]
    assert kinds == [("CreatedEvent", "item"), ("NewMailEvent", "item"), ("ModifiedEvent", "folder")] * 2 + [
        ("ModifiedEvent", "item"), ("ModifiedEvent", "folder")]
    assert notes[0].events[-1].unread_count == 0  # after mark_read
    assert mock.subscription(sid).event_types == ("NewMailEvent",) and mock.subscription(sid).folders == ("inbox",)
    assert mock.subscription(all_sid).folders is None


async def test_pull_resubscribe_from_watermark_replays_changes(mock: MockExchange) -> None:
    acct = account(mock, ANN)
    old_sid, watermark = await asyncio.to_thread(lambda: acct.inbox.subscribe_to_pull())
    await asyncio.to_thread(lambda: acct.inbox.unsubscribe(old_sid))
    missed = mock.create_mail(ANN, subject="while away")
    sid, resumed = await asyncio.to_thread(lambda: acct.inbox.subscribe_to_pull(watermark=watermark))
    assert sid != old_sid and resumed == watermark
    notes = await asyncio.to_thread(lambda: list(acct.inbox.get_events(sid, resumed)))
    assert [e.item_id.id for e in notes[0].events if isinstance(e, NewMailEvent)] == [missed]
    with pytest.raises(Exception, match=r"ErrorInvalidWatermark|watermark"):
        await asyncio.to_thread(lambda: account(mock, BOB).inbox.subscribe_to_pull(watermark=watermark))


async def test_missed_events_are_reported(mock: MockExchange, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ews, "MAX_PENDING_EVENTS", 4)
    acct = account(mock, ANN)
    sid, watermark = await asyncio.to_thread(lambda: acct.inbox.subscribe_to_pull())
    mock.create_mail(ANN)
    mock.create_mail(ANN)  # 6 events for a queue of 4
    assert mock.stats.events_dropped == 2
    with pytest.raises(Exception, match=r"ErrorMissedNotificationEvents|missed"):
        await asyncio.to_thread(lambda: list(acct.inbox.get_events(sid, watermark)))
    notes = await asyncio.to_thread(lambda: list(acct.inbox.get_events(sid, watermark)))  # the subscription stays
    assert len(notes[0].events) == 4


async def test_pull_subscription_times_out_without_get_events() -> None:
    async with MockExchange(minute_seconds=0.05) as mock:
        acct = account(mock, ANN)
        sid, _ = await asyncio.to_thread(lambda: acct.inbox.subscribe_to_pull(timeout=1))
        await wait_for(lambda: not mock.subscription(sid).alive, what="the pull subscription to time out")


# --- push -------------------------------------------------------------------------------------------------------------


class Callback:
    """The client's push endpoint: records each SendNotification and answers with exchangelib's own payloads."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.answer = "OK"
        self.status = 200
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.posts.append((dict(request.headers), await request.read()))
        if self.status != 200:
            return web.Response(status=self.status, text="no")
        service = SendNotification(protocol=None)
        payload = service.ok_payload() if self.answer == "OK" else service.unsubscribe_payload()
        return web.Response(body=payload, content_type="text/xml", charset="utf-8")

    def notifications(self, index: int) -> list[Any]:
        return list(SendNotification(protocol=None).parse(self.posts[index][1]))

    async def __aenter__(self) -> Callback:
        app = web.Application()
        app.router.add_post("/ews/push", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/ews/push"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def test_push_subscription_delivers_send_notification(mock: MockExchange) -> None:
    acct = account(mock, ANN)
    async with Callback() as callback:
        sid, watermark = await asyncio.to_thread(
            lambda: acct.inbox.subscribe_to_push(callback.url, status_frequency=1))
        await wait_for(lambda: len(callback.posts) == 1, what="the initial StatusEvent")
        headers, _ = callback.posts[0]
        assert headers["SOAPAction"] == ews.SEND_NOTIFICATION_ACTION
        assert headers["Content-Type"] == "text/xml; charset=utf-8"
        [status] = callback.notifications(0)
        assert status.subscription_id == sid and status.previous_watermark == watermark
        assert [type(e) for e in status.events] == [StatusEvent]
        last_seen = status.events[-1].watermark

        item_id = mock.create_mail(ANN, subject="pushed")
        await wait_for(lambda: len(callback.posts) == 2, what="the NewMailEvent")
        [note] = callback.notifications(1)
        assert note.previous_watermark == last_seen
        assert [type(e) for e in note.events] == [CreatedEvent, NewMailEvent, ModifiedEvent]
        assert note.events[1].item_id.id == item_id
        last_seen = note.events[-1].watermark

        # a skipped notification: the next PreviousWatermark is not the last watermark the client saw
        mock.skip_push_notifications(sid)
        mock.create_mail(ANN, subject="lost")
        await wait_for(lambda: mock.stats.push_skipped == 1, what="the skip")
        mock.create_mail(ANN, subject="after the gap")
        await wait_for(lambda: len(callback.posts) == 3, what="the notification after the gap")
        [note] = callback.notifications(2)
        assert note.previous_watermark != last_seen

        # answering Unsubscribe ends the subscription
        callback.answer = "Unsubscribe"
        mock.create_mail(ANN, subject="last one")
        await wait_for(lambda: not mock.subscription(sid).alive, what="the unsubscribe")
        assert len(callback.posts) == 4
        assert mock.stats.subscriptions_ended["push-unsubscribed"] == 1
        mock.create_mail(ANN, subject="nobody listens")
        assert mock.subscriptions_of(ANN) == [] and mock.subscription(sid).pending_events == 0


async def test_push_status_events_keep_coming_when_quiet(mock: MockExchange) -> None:
    acct = account(mock, ANN)
    async with Callback() as callback:
        _, watermark = await asyncio.to_thread(lambda: acct.inbox.subscribe_to_push(callback.url, status_frequency=1))
        await wait_for(lambda: len(callback.posts) >= 3, what="three StatusEvents (one per protocol minute)")
        notes = [callback.notifications(i)[0] for i in range(3)]
        assert all([type(e) for e in n.events] == [StatusEvent] for n in notes)
        assert all(n.previous_watermark == watermark == n.events[0].watermark for n in notes)


async def test_push_failures_are_retried_until_status_frequency_is_used_up(mock: MockExchange) -> None:
    acct = account(mock, ANN)
    async with Callback() as callback:
        callback.status = 500
        sid, _ = await asyncio.to_thread(lambda: acct.inbox.subscribe_to_push(callback.url, status_frequency=1))
        # 1 protocol minute = 0.2 s: fail at 0, retry after 30 protocol-s, the next retry (60 s more) would exceed it
        await wait_for(lambda: not mock.subscription(sid).alive, what="the push subscription to die")
        assert len(callback.posts) == 2
        assert mock.stats.push_failures == 2 and mock.stats.subscriptions_ended["push-failed"] == 1


async def test_push_urls_must_be_loopback(mock: MockExchange) -> None:
    acct = account(mock, ANN)
    with pytest.raises(Exception, match=r"ErrorInvalidPushSubscriptionUrl|loopback"):
        await asyncio.to_thread(lambda: acct.inbox.subscribe_to_push("http://192.0.2.1/push"))


# --- sync, items, folders ---------------------------------------------------------------------------------------------


async def test_sync_items_from_scratch_then_from_state(mock: MockExchange) -> None:
    acct = account(mock, ANN)
    ids = [mock.create_mail(ANN, subject=f"mail {i}") for i in range(3)]
    changes = await asyncio.to_thread(lambda: list(acct.inbox.sync_items(max_changes_returned=2)))
    assert [(kind, item.subject) for kind, item in changes] == [("create", "mail 0"), ("create", "mail 1"),
                                                               ("create", "mail 2")]
    assert [item.id for _, item in changes] == ids
    state = acct.inbox.item_sync_state
    assert state

    mock.mark_read(ANN, ids[0])
    fourth = mock.create_mail(ANN, subject="mail 3")
    mock.delete_mail(ANN, ids[1])
    changes = await asyncio.to_thread(lambda: list(acct.inbox.sync_items()))
    assert [kind for kind, _ in changes] == ["read_flag_change", "create", "delete"]
    (read_id, is_read), created, deleted = (change for _, change in changes)
    assert read_id.id == ids[0] and is_read is True
    assert created.id == fourth and created.subject == "mail 3"
    assert deleted.id == ids[1]
    assert await asyncio.to_thread(lambda: list(acct.inbox.sync_items())) == []  # nothing since

    # the old state still works: everything after it again
    again = await asyncio.to_thread(lambda: list(acct.inbox.sync_items(sync_state=state)))
    assert [kind for kind, _ in again] == ["read_flag_change", "create", "delete"]
    with pytest.raises(ErrorInvalidSyncStateData):
        await asyncio.to_thread(lambda: list(acct.inbox.sync_items(sync_state="H4sIAAAAAAAEAO29")))
    with pytest.raises(ErrorSchemaValidation):
        await asyncio.to_thread(lambda: list(acct.inbox.sync_items(max_changes_returned=513)))


async def test_get_item_details_meeting_request_and_missing_item(mock: MockExchange) -> None:
    acct = account(mock, ANN)
    mail = mock.create_mail(ANN, subject="Budget", sender="Carol Jones <carol@example.org>", importance="High")
    meeting = mock.create_mail(ANN, subject="Sync-up", item_class="IPM.Schedule.Meeting.Request")
    gone = mock.create_mail(ANN, subject="gone")
    mock.delete_mail(ANN, gone)
    items = await asyncio.to_thread(lambda: list(acct.fetch(ids=[(mail, None), (meeting, None), (gone, None)])))
    message, request, missing = items
    assert isinstance(message, Message) and not isinstance(message, MeetingRequest)
    assert message.subject == "Budget" and message.importance == "High" and message.is_read is False
    assert message.sender.email_address == "carol@example.org" and message.sender.name == "Carol Jones"
    assert message.item_class == "IPM.Note" and message.datetime_received is not None
    assert isinstance(request, MeetingRequest) and request.subject == "Sync-up"
    assert request.item_class == "IPM.Schedule.Meeting.Request"
    assert isinstance(missing, ErrorItemNotFound)


async def test_get_folder_unread_count_and_find_folder(mock: MockExchange) -> None:
    acct = account(mock, ANN)
    projects = mock.create_folder(ANN, "Projects")
    first = mock.create_mail(ANN)
    mock.create_mail(ANN)
    mock.create_mail(ANN, folder=projects)
    mock.mark_read(ANN, first)
    inbox = await asyncio.to_thread(lambda: acct.inbox)
    assert inbox.unread_count == 1 and inbox.total_count == 2 and inbox.child_folder_count == 1
    mock.create_mail(ANN)
    await asyncio.to_thread(inbox.refresh)
    assert inbox.unread_count == 2 and inbox.total_count == 3
    sub = await asyncio.to_thread(lambda: inbox / "Projects")
    assert sub.id == projects and sub.total_count == 1 and sub.parent.id == inbox.id
    assert await asyncio.to_thread(lambda: [c.name for c in inbox.children]) == ["Projects"]
    shallow = await asyncio.to_thread(lambda: inbox // "projects")  # FindFolder with a DisplayName restriction
    assert shallow.id == projects


async def test_unsubscribe(mock: MockExchange) -> None:
    acct = account(mock, ANN)
    sid = await asyncio.to_thread(lambda: acct.inbox.subscribe_to_streaming())
    assert await asyncio.to_thread(lambda: acct.inbox.unsubscribe(sid)) is True
    assert not mock.subscription(sid).alive
    with pytest.raises(ErrorSubscriptionNotFound):
        await asyncio.to_thread(lambda: list(acct.inbox.get_streaming_events(sid, connection_timeout=1)))
    push_sid, _ = await asyncio.to_thread(lambda: acct.inbox.subscribe_to_push("http://127.0.0.1:9/push"))
    with pytest.raises(ErrorInvalidPullSubscriptionId):
        await asyncio.to_thread(lambda: acct.inbox.unsubscribe(push_sid))


# --- autodiscover and authentication ----------------------------------------------------------------------------------


async def test_exchangelib_detects_auth_and_guesses_the_version(mock: MockExchange) -> None:
    def run() -> tuple[Any, Any, str]:
        config = Configuration(service_endpoint=mock.ews_url + "?guess", credentials=Credentials("svc", "secret"),
                               retry_policy=FailFast())
        acct = Account(ANN, config=config, autodiscover=False, access_type=IMPERSONATION)
        return acct.root, acct.version, config.auth_type

    root, version, auth_type = await asyncio.to_thread(run)
    assert root.id and auth_type == BASIC
    assert version.api_version == "Exchange2016" and version.build.major_version == 15
    assert [r.operation for r in mock.requests()] == ["ConvertId", "GetFolder"]


def test_serve_in_thread_for_blocking_callers() -> None:
    with serve_in_thread(MockExchange(minute_seconds=0.2, heartbeat_seconds=0.1)) as mock:
        acct = account(mock, ANN)
        sid = acct.inbox.subscribe_to_streaming()
        item_id = mock.create_mail(ANN)  # from this thread: it runs on the mock's loop
        notes = list(acct.inbox.get_streaming_events(sid, connection_timeout=1, max_notifications_returned=1))
        assert [e.item_id.id for e in notes[0].events if isinstance(e, NewMailEvent)] == [item_id]


async def test_autodiscover_get_user_settings(mock: MockExchange) -> None:
    def run() -> tuple[Any, list[Any], str]:
        # exchangelib's Autodiscovery only tries https://DOMAIN...; its protocol class takes any URL, as its own
        # tests do. auth_type None makes it detect Basic from the 401.
        protocol = AutodiscoverProtocol(config=Configuration(
            service_endpoint=mock.autodiscover_url, credentials=Credentials("svc", "secret"),
            retry_policy=FailFast()))
        one = protocol.get_user_settings(user=ANN)  # every setting exchangelib knows
        several = list(GetUserSettings(protocol=protocol).call(
            users=[ANN, BOB, "eve@elsewhere.test"], settings=["external_ews_url", "grouping_information"]))
        return one, several, protocol.auth_type

    one, several, auth_type = await asyncio.to_thread(run)
    assert auth_type == BASIC
    assert one.ews_url == mock.ews_url
    assert one.user_settings["grouping_information"] == mock.grouping(ANN)
    assert one.autodiscover_smtp_address == ANN and one.version.api_version == "Exchange2016"
    assert [r.user_settings["grouping_information"] for r in several[:2]] == [mock.grouping(ANN), mock.grouping(BOB)]
    assert several[2].error_code == "InvalidUser"
    with pytest.raises(ErrorNonExistentMailbox):
        several[2].raise_errors()


async def test_basic_auth_refusal(mock: MockExchange, soap: Soap) -> None:
    async with soap.session.post(mock.ews_url, data=envelope(subscribe_body())) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Basic realm=")
    with pytest.raises(UnauthorizedError):
        await asyncio.to_thread(lambda: account(mock, ANN, password="wrong").root)
    assert mock.stats.unauthorized == 2


async def test_ntlm_authentication(soap: Soap) -> None:
    async with MockExchange(auth="ntlm", users={"svc": "secret"}) as mock:
        root = await asyncio.to_thread(lambda: account(mock, ANN, auth_type=NTLM).root)
        assert root.id
        assert {r.user for r in mock.requests()} == {"svc"}
        async with soap.session.post(mock.ews_url, data=envelope(subscribe_body())) as response:
            assert response.status == 401 and response.headers["WWW-Authenticate"] == "NTLM"
        with pytest.raises(UnauthorizedError):
            await asyncio.to_thread(lambda: account(mock, ANN, password="nope", auth_type=NTLM).root)


async def test_doctype_is_refused(mock: MockExchange, soap: Soap) -> None:
    body = (b'<?xml version="1.0"?><!DOCTYPE s [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            + envelope("<m:GetFolder/>").split(b"?>", 1)[1])
    async with soap.session.post(mock.ews_url, data=body, headers=soap.auth_header) as response:
        assert response.status == 500
        text = await response.text()
    assert "ErrorSchemaValidation" in text and "passwd" not in text and "root:" not in text


# --- fault injection --------------------------------------------------------------------------------------------------


async def test_fault_injection(mock: MockExchange) -> None:
    mock.fail_next("GetFolder", "ErrorServerBusy", back_off_ms=297749)
    with pytest.raises(ErrorServerBusy) as busy:
        await asyncio.to_thread(lambda: account(mock, ANN).root)
    assert busy.value.back_off == pytest.approx(297.749)

    mock.fail_next("GetFolder", "ErrorServerBusy", http_status=503)
    with pytest.raises(ErrorServerBusy):
        await asyncio.to_thread(lambda: account(mock, ANN, endpoint_suffix="?2").root)

    mock.fail_next("Subscribe", "ErrorMailboxStoreUnavailable", mailbox=BOB)
    assert await asyncio.to_thread(lambda: account(mock, ANN).subscribe_to_streaming())
    with pytest.raises(ErrorMailboxStoreUnavailable):
        await asyncio.to_thread(lambda: account(mock, BOB).subscribe_to_streaming())
    assert await asyncio.to_thread(lambda: account(mock, BOB).subscribe_to_streaming())  # used up
    assert mock.stats.faults_injected == {"GetFolder": 2, "Subscribe": 1}
    mock.reset()
    assert mock.stats.faults_injected == {} and mock.stats.requests == {}


# --- affinity ---------------------------------------------------------------------------------------------------------


async def test_affinity_cookie_routing(mock: MockExchange, soap: Soap) -> None:
    anchor, member = addresses_on_distinct_backends(mock)
    status, root, headers = await soap.post(subscribe_body(), impersonate=anchor,
                                            headers={"X-AnchorMailbox": anchor, "X-PreferServerAffinity": "true"})
    assert status == 200
    set_cookie = headers["Set-Cookie"]
    assert set_cookie.startswith(f"X-BackEndOverrideCookie={mock.grouping(anchor)}.mock.local~")
    assert "path=/" in set_cookie and "HttpOnly" in set_cookie
    cookie = set_cookie.split(";", 1)[0].split("=", 1)[1]
    anchor_sid = str(root.findtext(f".//{M}SubscriptionId"))
    assert mock.subscription(anchor_sid).backend == mock.grouping(anchor)

    # a member subscribed with the anchor's cookie lives on the anchor's backend, whatever its own is
    member_sid = await soap.subscribe(member, headers={"X-AnchorMailbox": anchor, "X-PreferServerAffinity": "true",
                                                       "Cookie": f"X-BackEndOverrideCookie={cookie}"})
    assert mock.subscription(member_sid).backend == mock.grouping(anchor) != mock.grouping(member)

    # streaming it routed by the member's own anchor (no cookie) lands on the wrong backend
    reader = await soap.open_stream([member_sid], impersonate=member, headers={"X-AnchorMailbox": member})
    doc = await reader.next()
    assert codes(doc) == ["ErrorSubscriptionNotFound"] and error_ids(doc) == [member_sid]
    assert connection_status(doc) == ["Closed"]
    assert mock.stats.affinity_misroutes == 1
    reader.close()

    # the group's stream, routed by the cookie sent as exchangelib does (a header), gets both
    reader = await soap.open_stream([anchor_sid, member_sid], impersonate=anchor,
                                    headers={"X-PreferServerAffinity": "true", "X-BackEndOverrideCookie": cookie})
    await wait_for(lambda: mock.stats.open_streams == 1, what="the group stream")
    mock.create_mail(member)
    doc = await reader.next_matching(has_notifications)
    assert [n.findtext(f"{T}SubscriptionId") for n in doc.iter(f"{M}Notification")] == [member_sid]
    reader.close()


async def test_affinity_with_exchangelib(mock: MockExchange) -> None:
    anchor, member = addresses_on_distinct_backends(mock)
    anchor_acct = account(mock, anchor)
    await asyncio.to_thread(lambda: anchor_acct.subscribe_to_streaming())
    cookie = anchor_acct.affinity_cookie  # copied from the session's cookie jar by exchangelib
    assert cookie and cookie.startswith(mock.grouping(anchor))
    member_acct = account(mock, member, endpoint_suffix="?member")  # its own Protocol: no shared cookie jar
    member_acct.affinity_cookie = cookie
    sid = await asyncio.to_thread(lambda: member_acct.subscribe_to_streaming())
    assert mock.subscription(sid).backend == mock.grouping(anchor)
    last = mock.requests()[-1]
    assert last.backend_override_cookie == cookie and last.anchor_mailbox == member
    assert last.prefer_server_affinity == "True" and last.impersonated == member


# --- stream management ------------------------------------------------------------------------------------------------


async def test_second_stream_takes_a_subscription_over(mock: MockExchange, soap: Soap) -> None:
    first_sid = await soap.subscribe(ANN)
    other_sid = await soap.subscribe(ANN)
    first = await soap.open_stream([first_sid, other_sid], impersonate=ANN, minutes=30)
    await wait_for(lambda: mock.stats.open_streams == 1, what="the first stream")
    second = await soap.open_stream([first_sid], impersonate=ANN, minutes=30)
    doc = await first.next_matching(lambda d: "ErrorNewEventStreamConnectionOpened" in codes(d))
    assert error_ids(doc) == [first_sid] and connection_status(doc) == ["OK"]
    assert mock.stats.second_stream_opened == 1 and mock.stats.streams_per_subscription_max == 2
    mock.create_mail(ANN)
    on_second = await second.next_matching(has_notifications)
    on_first = await first.next_matching(has_notifications)
    sid_of = f"{T}SubscriptionId"
    assert [n.findtext(sid_of) for n in on_second.iter(f"{M}Notification")] == [first_sid]
    assert [n.findtext(sid_of) for n in on_first.iter(f"{M}Notification")] == [other_sid]
    assert mock.subscription(first_sid).on_stream
    first.close()
    second.close()


async def test_second_stream_with_exchangelib(mock: MockExchange, soap: Soap) -> None:
    acct = account(mock, ANN)
    sid = await asyncio.to_thread(lambda: acct.subscribe_to_streaming())
    consumer = asyncio.create_task(asyncio.to_thread(
        lambda: list(acct.inbox.get_streaming_events(sid, connection_timeout=30))))
    await wait_for(lambda: mock.stats.open_streams == 1, what="exchangelib's stream")
    second = await soap.open_stream([sid], impersonate=ANN)
    with pytest.raises(ErrorNewEventStreamConnectionOpened, match="subscription IDs"):
        await asyncio.wait_for(consumer, 20)
    second.close()


async def test_expire_subscriptions(mock: MockExchange, soap: Soap) -> None:
    gone, kept = await soap.subscribe(ANN), await soap.subscribe(ANN)
    reader = await soap.open_stream([gone, kept], impersonate=ANN, minutes=30)
    await wait_for(lambda: mock.stats.open_streams == 1, what="the stream")
    assert mock.expire_subscriptions([gone]) == 1
    doc = await reader.next_matching(lambda d: "ErrorSubscriptionNotFound" in codes(d))
    assert error_ids(doc) == [gone] and connection_status(doc) == ["OK"]
    mock.create_mail(ANN)
    doc = await reader.next_matching(has_notifications)
    assert [n.findtext(f"{T}SubscriptionId") for n in doc.iter(f"{M}Notification")] == [kept]
    assert mock.expire_subscriptions() == 1
    doc = await reader.next_matching(lambda d: "ErrorSubscriptionNotFound" in codes(d))
    assert error_ids(doc) == [kept] and connection_status(doc) == ["Closed"]
    assert await reader.next() is None  # the body ended
    assert mock.stats.subscriptions_ended["expired"] == 2


async def test_expired_subscription_fails_exchangelib_stream(mock: MockExchange) -> None:
    acct = account(mock, ANN)
    sid = await asyncio.to_thread(lambda: acct.subscribe_to_streaming())
    consumer = asyncio.create_task(asyncio.to_thread(
        lambda: list(acct.inbox.get_streaming_events(sid, connection_timeout=30))))
    await wait_for(lambda: mock.stats.open_streams == 1, what="exchangelib's stream")
    mock.expire_subscriptions([sid])
    with pytest.raises(ErrorSubscriptionNotFound, match=sid.replace("+", r"\+")):
        await asyncio.wait_for(consumer, 20)


async def test_drop_and_close_streams(mock: MockExchange, soap: Soap) -> None:
    sid = await soap.subscribe(ANN)
    reader = await soap.open_stream([sid], impersonate=ANN, minutes=30)
    await wait_for(lambda: mock.stats.open_streams == 1, what="the stream")
    assert mock.drop_streams() == 1
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        await reader.drain()
    await wait_for(lambda: mock.stats.open_streams == 0, what="the dropped stream to be gone")
    assert not mock.subscription(sid).on_stream

    reader = await soap.open_stream([sid], impersonate=ANN, minutes=30)
    await wait_for(lambda: mock.stats.open_streams == 1, what="the new stream")
    assert mock.close_streams() == 1
    doc = await reader.next_matching(lambda d: connection_status(d) == ["Closed"])
    assert codes(doc) == ["NoError"]
    assert await reader.next() is None


async def test_silenced_streams_send_nothing_until_the_silence_ends(mock: MockExchange, soap: Soap) -> None:
    sid = await soap.subscribe(ANN)
    reader = await soap.open_stream([sid], impersonate=ANN, minutes=30)
    await wait_for(lambda: mock.stats.open_streams == 1, what="the stream")
    await reader.next_matching(is_heartbeat)
    mock.silence_streams(60)
    mock.create_mail(ANN)
    with pytest.raises(TimeoutError):
        await reader.next(within=0.5)  # not even a heartbeat, though they are due every 0.1 s
    mock.silence_streams(0)  # lifting the silence releases what was held
    doc = await reader.next_matching(has_notifications, within=10)
    assert len(list(doc.iter(f"{M}Notification"))) == 1
    reader.close()


async def test_subscription_id_limits_and_bad_ids(mock: MockExchange, soap: Soap) -> None:
    status, root, _ = await soap.post(streaming_body([f"id{i}" for i in range(201)]), impersonate=ANN)
    assert status == 200 and codes(root) == ["ErrorInvalidArgument"] and connection_status(root) == ["Closed"]

    good = await soap.subscribe(ANN)
    status, root, _ = await soap.post(streaming_body(["bogus1", "bogus2"]), impersonate=ANN)
    assert codes(root) == ["ErrorSubscriptionNotFound"] and error_ids(root) == ["bogus1", "bogus2"]
    assert connection_status(root) == ["Closed"]

    # some bad: the bad ones are reported first, the good one keeps streaming
    reader = await soap.open_stream([good, "bogus"], impersonate=ANN)
    doc = await reader.next()
    assert codes(doc) == ["ErrorSubscriptionNotFound"] and error_ids(doc) == ["bogus"]
    assert connection_status(doc) == ["OK"]
    assert is_heartbeat(await reader.next())
    reader.close()

    status, root, _ = await soap.post(streaming_body([good], minutes=31), impersonate=ANN)
    assert status == 500 and root.find(".//faultcode").text == "a:ErrorSchemaValidation"


async def test_stream_connection_limit_per_impersonated_mailbox(soap: Soap) -> None:
    async with MockExchange(minute_seconds=0.2, heartbeat_seconds=0.1, max_stream_connections_per_mailbox=2) as mock:
        soap.mock = mock
        sids = [await soap.subscribe(ANN) for _ in range(3)]
        readers = [await soap.open_stream([sid], impersonate=ANN, minutes=30) for sid in sids[:2]]
        await wait_for(lambda: mock.stats.open_streams == 2, what="two streams")
        _, root, _ = await soap.post(streaming_body([sids[2]]), impersonate=ANN)
        assert codes(root) == ["ErrorExceededConnectionCount"] and connection_status(root) == ["Closed"]
        other = await soap.subscribe(BOB)
        readers.append(await soap.open_stream([other], impersonate=BOB, minutes=30))  # another mailbox's budget
        await wait_for(lambda: mock.stats.open_streams == 3, what="bob's stream")
        assert mock.stats.stream_connections_by_impersonated == {ANN: 2, BOB: 1}
        for reader in readers:
            reader.close()


async def test_idle_streaming_subscription_expires(soap: Soap) -> None:
    async with MockExchange(minute_seconds=0.05, subscription_idle_minutes=2) as mock:
        soap.mock = mock
        sid = await soap.subscribe(ANN)
        await wait_for(lambda: not mock.subscription(sid).alive, what="the idle subscription to expire")
        _, root, _ = await soap.post(streaming_body([sid]), impersonate=ANN)
        assert codes(root) == ["ErrorSubscriptionNotFound"]


async def test_many_subscriptions_on_one_stream(mock: MockExchange, soap: Soap) -> None:
    mailboxes = [f"user{i}@example.com" for i in range(200)]
    sem = asyncio.Semaphore(32)

    async def subscribe(address: str) -> str:
        async with sem:
            return await soap.subscribe(address, headers={"X-AnchorMailbox": mailboxes[0]})

    sids = await asyncio.gather(*(subscribe(m) for m in mailboxes))
    reader = await soap.open_stream(sids, impersonate=mailboxes[0], minutes=30)
    await wait_for(lambda: mock.stats.open_streams == 1, what="the stream")
    assert len(mock.create_mails(mailboxes)) == 200
    seen: set[str] = set()
    while len(seen) < 200:
        doc = await reader.next_matching(has_notifications)
        seen.update(str(n.findtext(f"{T}SubscriptionId")) for n in doc.iter(f"{M}Notification"))
    assert seen == set(sids)
    reader.close()


# --- control API, scale, process --------------------------------------------------------------------------------------


async def test_control_api(mock: MockExchange, soap: Soap) -> None:
    base = mock.base_url + "/_mock"
    session = soap.session
    async with session.post(f"{base}/mail", json={"mailbox": ANN, "subject": "via http", "count": 2}) as r:
        assert r.status == 200
        ids = (await r.json())["item_ids"]
    assert len(ids) == 2
    async with session.post(f"{base}/mail/bulk", json={"mailboxes": [BOB, "carl@example.com"]}) as r:
        bulk = await r.json()
    assert bulk["created"] == 2 and len(set(bulk["item_ids"])) == 2
    async with session.post(f"{base}/mail", json={"mailbox": "x@not-served.test"}) as r:
        assert r.status == 400
    async with session.post(f"{base}/fault", json={"operation": "Subscribe", "code": "ErrorServerBusy",
                                                   "back_off_ms": 1000}) as r:
        assert r.status == 200
    status, root, _ = await soap.post(subscribe_body(), impersonate=ANN)
    assert status == 500 and root.find(".//faultcode").text == "a:ErrorServerBusy"
    assert root.findtext(f".//{T}Value") == "1000"

    sid = await soap.subscribe(ANN)
    reader = await soap.open_stream([sid], impersonate=ANN, minutes=30)
    await wait_for(lambda: mock.stats.open_streams == 1, what="the stream")
    async with session.post(f"{base}/silence", json={"seconds": 0.01}) as r:
        assert r.status == 200
    async with session.post(f"{base}/close-streams") as r:
        assert (await r.json()) == {"closed": 1}
    await reader.next_matching(lambda d: connection_status(d) == ["Closed"])
    reader = await soap.open_stream([sid], impersonate=ANN, minutes=30)
    await wait_for(lambda: mock.stats.open_streams == 1, what="the new stream")
    async with session.post(f"{base}/drop-streams") as r:
        assert (await r.json()) == {"dropped": 1}
    async with session.post(f"{base}/expire", json={"subscription_ids": [sid]}) as r:
        assert (await r.json()) == {"expired": 1}
    async with session.get(f"{base}/stats") as r:
        stats = await r.json()
    assert stats["requests"]["Subscribe"] == 2 and stats["faults_injected"] == {"Subscribe": 1}
    assert stats["mailboxes"] == 3
    async with session.get(f"{base}/requests?limit=1") as r:
        [last] = await r.json()
    assert last["operation"] == "GetStreamingEvents" and last["impersonated"] == ANN
    async with session.post(f"{base}/reset") as r:
        assert r.status == 200
    assert mock.stats.requests == {}


async def test_one_mail_in_each_of_100000_mailboxes_stays_compact() -> None:
    count = 100_000
    async with MockExchange(domains=("load.example",)) as mock:
        names = [f"user{i:06d}@load.example" for i in range(count)]
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            assert len(mock.create_mails(names, subject="load")) == count
            used = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert mock.mailbox_count() == count
        per_mailbox = used / count
        assert per_mailbox < 1024, f"{per_mailbox:.0f} bytes per mailbox"
        acct = account(mock, names[-1])
        inbox = await asyncio.to_thread(lambda: acct.inbox)
        assert inbox.total_count == 1 and inbox.unread_count == 1


async def test_main_runs_as_a_process_and_stops_on_sigterm(tmp_path: Any) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from bemsmail.mocks.ews import main; sys.exit(main(sys.argv[1:]))",
        "--port", "0", "--auth", "basic", "--user", "svc:secret", "--domain", "example.com", "--backends", "2",
        "--minute-seconds", "0.2", "--heartbeat-seconds", "0.1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        base = line.removeprefix("listening on ")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/_mock/health") as r:
                assert (await r.json()) == {"ok": True}
            async with session.post(f"{base}{ews.EWS_PATH}", data=envelope(subscribe_body(), impersonate=ANN),
                                    headers={"Authorization": aiohttp.encode_basic_auth("svc", "secret")}) as r:
                assert r.status == 200 and "SubscriptionId" in await r.text()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
