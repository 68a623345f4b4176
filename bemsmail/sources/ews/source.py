"""The EWS mail source: streaming subscriptions in affinity groups of up to 200 mailboxes, one GetStreamingEvents
connection per group, and catch-up with SyncFolderItems so that nothing is lost across drops and restarts.

    watch(mailbox) ─► subscribe queue ─► Subscribe (exchangelib, anchor + cookie of a group with room)
                                                   │
                       group stream task ◄─────────┘  GetStreamingEvents (aiohttp) with X-AnchorMailbox,
                        │   │                          X-PreferServerAffinity and the group's cookie
                        │   └─ error ids ─► resubscribe just those; missed events ─► catch-up
                        ▼
                 MailboxEvent ─► relay          catch-up queue ─► SyncFolderItems from the stored SyncState

Order matters for "no mail lost": a mailbox is subscribed and its stream is open before it is caught up, so
mail arriving during catch-up is seen at least once (the relay drops the second sighting by item id). Catch-up
skips what was already handed on (`seen_through`) and anything older than `catch_up_max_age_minutes`, so a long
outage does not flood phones.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import ssl
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import structlog

from bemsmail.config import EwsConfig
from bemsmail.core.model import Backend, EventKind, FolderState, ItemDetails, MailboxEvent
from bemsmail.core.ports import Clock
from bemsmail.sources.common import EventPump, EventSink, StateStore, StateWriter
from bemsmail.sources.ews.exchange import EWS_DISABLED, INBOX, EwsCallError, ExchangeClient, FolderRef
from bemsmail.sources.ews.httpauth import (
    BasicAuth,
    BearerAuth,
    ClientCredentialsTokens,
    EwsAuth,
    EwsAuthError,
    NtlmAuth,
)
from bemsmail.sources.ews.soap import (
    EwsNotification,
    EwsProtocolError,
    SoapFault,
    StreamMessage,
    get_streaming_events_request,
    parse_send_notification,
    send_notification_reply,
)
from bemsmail.sources.ews.stream import StreamError, StreamHttpError, stream_events

log = structlog.get_logger(__name__)

INBOX_NAME = "Inbox"
#: codes that mean "this subscription is gone": subscribe it again (and catch up)
GONE = frozenset({"ErrorSubscriptionNotFound", "ErrorExpiredSubscription", "ErrorInvalidSubscription",
                  "ErrorReadEventsFailed", "ErrorNewEventStreamConnectionOpened", "ErrorProxyRequestNotAllowed"})
MISSED = "ErrorMissedNotificationEvents"
RETRY_INITIAL = 1.0
RETRY_MAX = 300.0
EVENT_QUEUE = 10_000
EVENT_WORKERS = 64  # each waits on the relay (a registration read per new mailbox): enough to batch them
FLUSH_SECONDS = 2.0
LOAD_BATCH = 1000
#: how long a push post for an unknown subscription waits for Subscribes in flight (Exchange allows 30 s)
PUSH_CLAIM_SECONDS = 10.0

#: told of an EWS call for a mailbox that failed (subscribe, catch-up, or its group's stream); must not block
CallFailed = Callable[[str, EwsCallError], None]





def event_types(folders: frozenset[str]) -> tuple[str, ...]:
    """NewMail covers delivery to the Inbox; sub-folders get mail by rules (Created) or by hand (Moved); folder
    Modified events carry the unread count, which spares a GetFolder for the badge."""
    if all(f.strip().casefold() == "inbox" for f in folders):
        return ("NewMailEvent", "ModifiedEvent")
    return ("NewMailEvent", "CreatedEvent", "MovedEvent", "ModifiedEvent")


@dataclass(slots=True)
class _Watch:
    mailbox: str
    folders: frozenset[str]
    #: folder name → EWS folder; resolved on first subscribe
    refs: dict[str, FolderRef] = field(default_factory=dict)
    states: dict[str, FolderState] = field(default_factory=dict)
    subscription_id: str | None = None
    group: _Group | None = None
    retry_delay: float = RETRY_INITIAL
    queued: bool = False
    removed: bool = False
    loaded: bool = False
    #: push mode: the watermark of the last event seen, and when Exchange was last heard from
    watermark: str | None = None
    last_heard: float = 0.0

    def folder_name(self, folder_id: str | None) -> str:
        for name, ref in self.refs.items():
            if not ref.distinguished and ref.id == folder_id:
                return name
        return INBOX_NAME


@dataclass(eq=False, slots=True)
class _Group:
    """Up to group_size subscriptions that share an anchor mailbox, an affinity cookie and one stream."""

    key: tuple[str, str | None]
    number: int
    anchor: str
    cookie: str | None = None
    members: dict[str, _Watch] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    streaming: bool = False
    #: the next connection must be followed by a catch-up of every member (after a drop, silence or error)
    catch_up_all: bool = False
    reserved: int = 0  # subscribes in flight for this group
    pinning: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def size(self) -> int:
        return len(self.members) + self.reserved


class EwsSource:
    """MailSource and MailDetails for the mailboxes of one EWS tenant."""

    def __init__(self, settings: EwsConfig, store: StateStore, clock: Clock, sink: EventSink, *,
                 client: ExchangeClient | None = None) -> None:
        self.settings = settings
        self._store = store
        self._clock = clock
        self.client = client or ExchangeClient(settings)
        self._watches: dict[str, _Watch] = {}
        self._by_subscription: dict[str, _Watch] = {}
        self._groups: dict[tuple[str, str | None], list[_Group]] = {}
        self._group_count = 0
        self._subscribe_queue: asyncio.Queue[_Watch] = asyncio.Queue()
        self._catch_up_queue: asyncio.Queue[_Watch] = asyncio.Queue()
        self._catching_up: set[str] = set()
        self._unloaded: list[_Watch] = []
        self._load_wanted = asyncio.Event()
        #: subscribed since their last catch-up: caught up once their group's stream is open
        self._fresh: set[str] = set()
        self._events = EventPump(sink, size=EVENT_QUEUE, workers=EVENT_WORKERS, name="ews")
        self._states = StateWriter(store, Backend.EWS, FLUSH_SECONDS)
        self._unread: dict[str, tuple[float, int]] = {}
        self._discovered: dict[str, tuple[str, str | None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._auth: EwsAuth | None = None
        self._tokens: ClientCredentialsTokens | None = None
        self._stopping = False
        self._push_token = secrets.token_urlsafe(24)
        self._push_subscribing = 0
        self._push_registered = asyncio.Event()
        self.stats = SourceStats()
        #: an observer of failed calls (the migration notices EWS answering 403 through it); None: nobody
        self.call_failed: CallFailed | None = None

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._auth = self._stream_auth()
        workers = max(1, self.settings.threads * 3 // 4)
        catch_up_workers = max(1, self.settings.threads // 2)
        self._tasks = [asyncio.create_task(self._subscriber(), name="ews-subscribe") for _ in range(workers)]
        self._tasks += [asyncio.create_task(self._catch_up_worker(), name="ews-catch-up")
                        for _ in range(catch_up_workers)]
        self._events.start()
        self._states.start()
        self._tasks.append(asyncio.create_task(self._state_loader(), name="ews-state-loader"))
        if self.settings.mode == "push":
            self._tasks.append(asyncio.create_task(self._push_watchdog(), name="ews-push-watchdog"))

    async def stop(self) -> None:
        self._stopping = True
        groups = [g for gs in self._groups.values() for g in gs]
        for task in self._tasks + [g.task for g in groups if g.task is not None]:
            task.cancel()
        await asyncio.gather(*self._tasks, *(g.task for g in groups if g.task is not None), return_exceptions=True)
        await self._events.stop()
        await self._states.stop()
        if self._tokens is not None:
            await self._tokens.close()
        await self.client.close()

    def _stream_auth(self) -> EwsAuth:
        s = self.settings
        if s.auth == "oauth2":
            assert s.tenant_id and s.client_id and s.client_secret
            tokens = ClientCredentialsTokens(str(s.authority), s.tenant_id, s.client_id,
                                             s.client_secret.get_secret_value())
            self._tokens = tokens
            return BearerAuth(tokens.token)
        assert s.username and s.password is not None
        if s.auth == "basic":
            return BasicAuth(s.username, s.password.get_secret_value())
        return NtlmAuth(s.username, s.password.get_secret_value())

    # --- MailSource -----------------------------------------------------------------------------------------

    async def watch(self, mailbox: str, folders: frozenset[str]) -> None:
        watch = self._watches.get(mailbox)
        if watch is None:
            watch = _Watch(mailbox, folders)
            self._watches[mailbox] = watch
        elif watch.folders == folders:
            return
        else:
            watch.folders = folders
            self._leave_group(watch, unsubscribe=True)  # a new subscription with the new folders and events
        if watch.loaded:
            self._enqueue(watch)
        else:
            self._unloaded.append(watch)  # its stored state is read with others', one query per thousand
            self._load_wanted.set()

    async def unwatch(self, mailbox: str) -> None:
        watch = self._watches.pop(mailbox, None)
        if watch is None:
            return
        watch.removed = True
        self._leave_group(watch, unsubscribe=True)
        self._states.forget(mailbox)
        try:
            await self._store.delete_folder_states(Backend.EWS, mailbox)
        except Exception:
            log.exception("ews_forget_failed")

    def _enqueue(self, watch: _Watch) -> None:
        if not watch.queued and not watch.removed:
            watch.queued = True
            self._subscribe_queue.put_nowait(watch)

    def _leave_group(self, watch: _Watch, *, unsubscribe: bool) -> None:
        group, subscription_id = watch.group, watch.subscription_id
        watch.group = None
        watch.subscription_id = None
        if subscription_id is not None:
            self._by_subscription.pop(subscription_id, None)
        if group is not None and subscription_id is not None:
            group.members.pop(subscription_id, None)
            group.changed.set()
            if unsubscribe:
                self._background(self._unsubscribe(watch.mailbox, subscription_id, group))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _unsubscribe(self, mailbox: str, subscription_id: str, group: _Group) -> None:
        try:
            await self.client.unsubscribe(mailbox, subscription_id, anchor=group.anchor, cookie=group.cookie,
                                          ews_url=group.key[0])
        except EwsCallError as exc:  # it expires by itself once no stream carries it
            log.info("ews_unsubscribe_failed", code=exc.code)

    def _report(self, mailbox: str, exc: EwsCallError) -> None:
        if self.call_failed is not None:
            try:
                self.call_failed(mailbox, exc)
            except Exception:  # an observer's bug must not stop subscribing
                log.exception("ews_call_failed_observer_crashed")

    # --- subscribing ----------------------------------------------------------------------------------------

    async def _subscriber(self) -> None:
        while True:
            watch = await self._subscribe_queue.get()
            watch.queued = False
            try:
                if watch.removed or watch.subscription_id is not None:
                    continue
                await self._subscribe(watch)
                watch.retry_delay = RETRY_INITIAL
            except EwsCallError as exc:
                delay = exc.back_off if exc.back_off else watch.retry_delay * (0.5 + random.random())  # noqa: S311
                watch.retry_delay = min(RETRY_MAX, watch.retry_delay * 2)
                self.stats.subscribe_failures += 1
                log.warning("ews_subscribe_failed", code=exc.code, retry_in=round(delay, 1))
                self._report(watch.mailbox, exc)
                asyncio.get_running_loop().call_later(delay, self._enqueue, watch)
            except Exception:
                log.exception("ews_subscribe_crashed")
                asyncio.get_running_loop().call_later(watch.retry_delay, self._enqueue, watch)
            finally:
                self._subscribe_queue.task_done()

    async def _endpoint(self, mailbox: str) -> tuple[str, str | None]:
        if self.settings.url is not None:
            return str(self.settings.url), None
        found = self._discovered.get(mailbox)
        if found is None:
            discovered = (await self.client.discover([mailbox])).get(mailbox)
            if discovered is None or discovered.ews_url is None:
                raise EwsCallError("ErrorAutodiscoverFailed", "autodiscover found no EWS URL for the mailbox")
            found = (discovered.ews_url, discovered.grouping)
            self._discovered[mailbox] = found
        return found

    def _group_for(self, key: tuple[str, str | None], mailbox: str) -> _Group:
        groups = self._groups.setdefault(key, [])
        for group in groups:
            if group.size < self.settings.group_size:
                return group
        self._group_count += 1
        group = _Group(key, self._group_count, anchor=mailbox)
        groups.append(group)
        group.task = asyncio.create_task(self._run_group(group), name=f"ews-group-{group.number}")
        return group

    async def _subscribe(self, watch: _Watch) -> None:
        url, grouping = await self._endpoint(watch.mailbox)
        await self._resolve_folders(watch, url)
        if not watch.loaded:
            await self._load_states([watch])
        for name in watch.refs:
            watch.states.setdefault(name, FolderState(watch.mailbox, name))
        if self.settings.mode == "push":
            await self._subscribe_push(watch, url)
            return
        group = self._group_for((url, grouping), watch.mailbox)
        group.reserved += 1
        try:
            # Until the group has its cookie, subscribes go one at a time: the first answer sets the cookie
            # that pins every later member to the same server.
            async with contextlib.nullcontext() if group.cookie else group.pinning:
                subscription_id, cookie = await self.client.subscribe_streaming(
                    watch.mailbox, list(watch.refs.values()), event_types(watch.folders),
                    anchor=group.anchor, cookie=group.cookie, ews_url=url)
                if group.cookie is None and cookie:
                    group.cookie = cookie
        finally:
            group.reserved -= 1
        if watch.removed:
            self._background(self._unsubscribe(watch.mailbox, subscription_id, group))
            return
        watch.subscription_id = subscription_id
        watch.group = group
        group.members[subscription_id] = watch
        self._by_subscription[subscription_id] = watch
        self._fresh.add(watch.mailbox)
        self.stats.subscribed += 1
        group.changed.set()

    async def _resolve_folders(self, watch: _Watch, url: str) -> None:
        refs: dict[str, FolderRef] = {}
        for name in sorted(watch.folders):
            if name.strip().casefold() == "inbox":
                refs[INBOX_NAME] = INBOX
                continue
            ref = watch.refs.get(name) or await self.client.resolve_folder(watch.mailbox, name, url)
            if ref is not None:
                refs[name] = ref
            else:
                log.info("ews_folder_not_found", folder_count=len(watch.folders))
        watch.refs = refs or {INBOX_NAME: INBOX}

    async def _load_states(self, watches: Sequence[_Watch]) -> None:
        found = await self._store.folder_states(Backend.EWS, [w.mailbox for w in watches])
        by_mailbox: dict[str, dict[str, FolderState]] = {}
        for (mailbox, folder), state in found.items():
            by_mailbox.setdefault(mailbox, {})[folder] = state
        for watch in watches:
            watch.states = {**by_mailbox.get(watch.mailbox, {}), **watch.states}
            watch.loaded = True

    async def _state_loader(self) -> None:
        while True:
            await self._load_wanted.wait()
            self._load_wanted.clear()
            while self._unloaded:
                batch, self._unloaded = self._unloaded[:LOAD_BATCH], self._unloaded[LOAD_BATCH:]
                try:
                    await self._load_states(batch)
                except Exception:
                    log.exception("ews_state_load_failed")  # each loads its own on subscribe instead
                for watch in batch:
                    self._enqueue(watch)

    # --- streaming ------------------------------------------------------------------------------------------

    async def _run_group(self, group: _Group) -> None:
        """Keep this group's stream open with its current members, for as long as the source runs."""
        assert self._auth is not None
        delay = RETRY_INITIAL
        connector = aiohttp.TCPConnector(limit=1, ssl=self._ssl())  # NTLM authenticates one connection
        # No cookie jar: the group's affinity cookie is sent explicitly, nothing else rides along.
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
            while not self._stopping:
                group.changed.clear()
                if not group.members:
                    group.streaming = False
                    await group.changed.wait()
                    continue
                await asyncio.sleep(0.2)  # let a burst of subscribes land before (re)connecting
                group.changed.clear()
                ids = list(group.members)
                try:
                    ended_cleanly = await self._stream_once(session, group, ids)
                    delay = RETRY_INITIAL
                    if not ended_cleanly:
                        continue  # membership changed: reconnect with the new set at once
                except (StreamError, SoapFault, EwsProtocolError, EwsAuthError, aiohttp.ClientError, TimeoutError,
                        OSError) as exc:
                    group.streaming = False
                    group.catch_up_all = True
                    self.stats.stream_failures += 1
                    wait = self._stream_backoff(exc, delay)
                    delay = min(RETRY_MAX, delay * 2)
                    log.warning("ews_stream_failed", group=group.number, error=type(exc).__name__,
                                code=getattr(exc, "code", None), retry_in=round(wait, 1))
                    if isinstance(exc, StreamHttpError) and exc.status == 403:
                        refused = EwsCallError(EWS_DISABLED, "GetStreamingEvents answered HTTP 403 Forbidden")
                        for member in list(group.members.values()):
                            self._report(member.mailbox, refused)
                    await asyncio.sleep(wait)

    @staticmethod
    def _stream_backoff(exc: BaseException, delay: float) -> float:
        if isinstance(exc, SoapFault) and exc.back_off_ms:
            return exc.back_off_ms / 1000
        if isinstance(exc, StreamHttpError) and exc.retry_after:
            return exc.retry_after
        return delay * (0.5 + random.random())  # noqa: S311 - jitter, so groups do not reconnect in lockstep

    def _ssl(self) -> bool | ssl.SSLContext:
        if self.settings.ca_file:
            return ssl.create_default_context(cafile=str(self.settings.ca_file))
        return self.settings.verify_tls

    async def _stream_once(self, session: aiohttp.ClientSession, group: _Group, ids: list[str]) -> bool:
        """One GetStreamingEvents connection; True when the server closed it (ConnectionStatus Closed), False
        when the group's membership changed and it was closed here to reconnect."""
        assert self._auth is not None
        s = self.settings
        body = get_streaming_events_request(ids, s.connection_timeout_minutes,
                                            impersonate=group.anchor if s.impersonation else None,
                                            server_version=s.version)
        headers = {"X-AnchorMailbox": group.anchor, "X-PreferServerAffinity": "true"}
        if group.cookie:
            headers["X-BackEndOverrideCookie"] = group.cookie
            headers["Cookie"] = f"X-BackEndOverrideCookie={group.cookie}"
        back_off: float | None = None
        messages = stream_events(session, group.key[0], self._auth, body, headers=headers,
                                 watchdog_seconds=s.watchdog_seconds, on_open=lambda: self._connected(group))
        changed = asyncio.ensure_future(group.changed.wait())
        try:
            while True:
                next_message = asyncio.ensure_future(anext(messages))
                done, _ = await asyncio.wait({next_message, changed}, return_when=asyncio.FIRST_COMPLETED)
                if next_message not in done:
                    next_message.cancel()
                    with contextlib.suppress(BaseException):
                        await next_message
                    return False
                try:
                    message = next_message.result()
                except StopAsyncIteration:
                    break
                back_off = self._handle(group, message) or back_off
                if message.connection_status == "Closed":
                    break
        finally:
            changed.cancel()
            await messages.aclose()
        if back_off:
            await asyncio.sleep(back_off)
        return True

    def _connected(self, group: _Group) -> None:
        self.stats.connections += 1
        if not group.streaming:
            group.streaming = True
        for watch in list(group.members.values()):
            # New subscriptions are caught up from their stored state (mail that came while nobody watched);
            # after a failed connection every member is.
            if group.catch_up_all or watch.mailbox in self._fresh:
                self._queue_catch_up(watch)
        group.catch_up_all = False

    def _handle(self, group: _Group, message: StreamMessage) -> float | None:
        """Act on one response message; returns a back-off the server asked for, in seconds."""
        for notification in message.notifications:
            self._notified(notification)
        if message.response_class == "Error" or message.error_subscription_ids:
            code = message.response_code
            bad = message.error_subscription_ids or (tuple(group.members) if code in GONE else ())
            self.stats.stream_errors[code] = self.stats.stream_errors.get(code, 0) + 1
            for subscription_id in bad:
                watch = group.members.get(subscription_id)
                if watch is None:
                    continue
                if code == MISSED:
                    self._queue_catch_up(watch)  # the subscription stays; what it missed comes by sync
                    continue
                self._leave_group(watch, unsubscribe=False)
                self._enqueue(watch)  # a new subscription, then a catch-up once its stream is open
            log.info("ews_stream_error", group=group.number, code=code, ids=len(bad))
            if message.back_off_ms:
                return message.back_off_ms / 1000
        return None

    def _notified(self, notification: EwsNotification) -> None:
        watch = self._by_subscription.get(notification.subscription_id)
        if watch is None:
            return
        unread = next((e.unread_count for e in notification.events
                       if e.kind == "ModifiedEvent" and e.folder_id is not None and e.unread_count is not None
                       and watch.folder_name(e.folder_id) == INBOX_NAME), None)
        if unread is not None:
            self._unread[watch.mailbox] = (self._clock.monotonic(), unread)
        for event in notification.events:
            if event.kind not in ("NewMailEvent", "CreatedEvent", "MovedEvent") or event.item_id is None:
                continue
            folder = watch.folder_name(event.parent_folder_id)
            if folder not in watch.refs:
                continue
            received = event.timestamp or self._clock.now()
            self._seen(watch, folder, event.item_id, received)
            self.stats.stream_events += 1
            self._emit(MailboxEvent(watch.mailbox, folder, event.item_id, EventKind.NEW_MAIL, received,
                                    unread_count=unread))

    # --- push mode ------------------------------------------------------------------------------------------
    # Exchange posts SendNotification to push_url; the subscription resumes from the last watermark after a
    # gap, a silence or a restart, which replays what was missed (the relay drops what it had already seen).

    @property
    def push_path_token(self) -> str:
        """The secret query value in push_url that tells our own subscriptions' posts from anyone else's."""
        return self._push_token

    def push_callback_url(self) -> str:
        assert self.settings.push_url is not None
        base = str(self.settings.push_url)
        return f"{base}{'&' if '?' in base else '?'}t={self._push_token}"

    async def _subscribe_push(self, watch: _Watch, url: str) -> None:
        inbox = watch.states.get(INBOX_NAME) or FolderState(watch.mailbox, INBOX_NAME)
        resume = watch.watermark or inbox.watermark
        self._push_subscribing += 1
        try:
            subscription_id, watermark = await self._push_subscribe_call(watch, url, resume)
        except EwsCallError as exc:
            if exc.code != "ErrorInvalidWatermark" or resume is None:
                raise
            # Too old (about 30 days) or from another database: start afresh and let a sync find what was missed.
            watch.watermark = None
            watch.states[INBOX_NAME] = replace(inbox, watermark=None)
            subscription_id, watermark = await self._push_subscribe_call(watch, url, None)
            resume = None
        finally:
            self._push_subscribing -= 1
            self._push_registered.set()
        if watch.removed:
            return  # it is answered Unsubscribe on its next post
        watch.subscription_id = subscription_id
        # The first post of the new subscription starts the chain PreviousWatermark is checked against; until it
        # comes, the resume point (or the new subscription's own watermark) is what a restart would resume from.
        watch.watermark = None
        watch.states[INBOX_NAME] = replace(watch.states.get(INBOX_NAME) or inbox, watermark=resume or watermark)
        watch.last_heard = self._clock.monotonic()
        self._by_subscription[subscription_id] = watch
        self._push_registered.set()
        self._remember_push(watch)
        self.stats.subscribed += 1
        if resume is None:
            self._queue_catch_up(watch)  # nothing to replay from: establish (or use) the sync state

    async def _push_subscribe_call(self, watch: _Watch, url: str, watermark: str | None) -> tuple[str, str]:
        return await self.client.subscribe_push(
            watch.mailbox, list(watch.refs.values()), event_types(watch.folders), url=self.push_callback_url(),
            status_frequency=self.settings.status_frequency_minutes, watermark=watermark, ews_url=url)

    def _remember_push(self, watch: _Watch) -> None:
        inbox = watch.states.get(INBOX_NAME) or FolderState(watch.mailbox, INBOX_NAME)
        updated = replace(inbox, remote_id=watch.subscription_id, watermark=watch.watermark or inbox.watermark)
        watch.states[INBOX_NAME] = updated
        self._states.changed(updated)

    async def handle_push(self, body: bytes) -> bytes:
        """Answer one SendNotification post (already checked to carry our token): OK to keep the subscription,
        Unsubscribe for one that is not ours (any more) or that is being replaced after a gap."""
        status: str = "OK"
        for notification in parse_send_notification(body):
            watch = await self._push_watch(notification.subscription_id)
            if watch is None or watch.removed or self.settings.mode != "push":
                self.stats.push_unknown += 1
                status = "Unsubscribe"
                continue
            watch.last_heard = self._clock.monotonic()
            previous = notification.previous_watermark
            if previous and watch.watermark and previous != watch.watermark:
                # Exchange skipped notifications: resubscribe from the last watermark we saw, which replays them.
                self.stats.push_gaps += 1
                self._replace_push(watch)
                status = "Unsubscribe"
                continue
            self._notified(notification)
            for event in notification.events:
                if event.watermark:
                    watch.watermark = event.watermark
            self._remember_push(watch)
        self.stats.push_notifications += 1
        return send_notification_reply("Unsubscribe" if status == "Unsubscribe" else "OK")

    async def _push_watch(self, subscription_id: str) -> _Watch | None:
        """The watch a push subscription belongs to. Exchange posts a new subscription's first notification (with
        any replay) before its Subscribe has answered, so an unknown id waits for subscribes in flight."""
        watch = self._by_subscription.get(subscription_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PUSH_CLAIM_SECONDS):
                while watch is None and self._push_subscribing:
                    self._push_registered.clear()
                    await self._push_registered.wait()
                    watch = self._by_subscription.get(subscription_id)
        return watch

    def _replace_push(self, watch: _Watch) -> None:
        if watch.subscription_id is not None:
            self._by_subscription.pop(watch.subscription_id, None)
        watch.subscription_id = None
        self._enqueue(watch)

    def check_push_silence(self) -> int:
        """Resubscribe push subscriptions not heard from for over twice StatusFrequency; returns how many."""
        limit = 2 * self.settings.status_frequency_minutes * 60
        now = self._clock.monotonic()
        silent = [w for w in list(self._by_subscription.values()) if now - w.last_heard > limit]
        for watch in silent:
            self.stats.push_silent += 1
            self._replace_push(watch)
        return len(silent)

    async def _push_watchdog(self) -> None:
        while True:
            await asyncio.sleep(self.settings.status_frequency_minutes * 30)
            self.check_push_silence()

    # --- handing events on ----------------------------------------------------------------------------------

    def _emit(self, event: MailboxEvent) -> None:
        if not self._events.offer(event):
            # The relay is behind: the stream keeps reading, and the folder's next catch-up finds the mail.
            self.stats.events_dropped += 1
            watch = self._watches.get(event.mailbox)
            if watch is not None:
                self._queue_catch_up(watch)

    def _seen(self, watch: _Watch, folder: str, item_id: str, received: datetime) -> None:
        state = watch.states.get(folder) or FolderState(watch.mailbox, folder)
        updated = state.after(item_id, received)
        if updated is not state:
            watch.states[folder] = updated
            self._states.changed(updated)

    # --- catch-up -------------------------------------------------------------------------------------------

    def _queue_catch_up(self, watch: _Watch) -> None:
        if watch.mailbox not in self._catching_up:
            self._catching_up.add(watch.mailbox)
            self._catch_up_queue.put_nowait(watch)

    async def _catch_up_worker(self) -> None:
        while True:
            watch = await self._catch_up_queue.get()
            self._catching_up.discard(watch.mailbox)
            self._fresh.discard(watch.mailbox)
            if watch.removed or watch.subscription_id is None:
                continue  # unwatched, or being resubscribed: it is queued again once subscribed
            # Subscribes first: a subscribed mailbox already gets its new mail; a backfill can wait.
            await self._subscribe_queue.join()
            try:
                await self.catch_up(watch)
            except EwsCallError as exc:
                self.stats.catch_up_failures += 1
                delay = exc.back_off or 5.0
                log.warning("ews_catch_up_failed", code=exc.code, retry_in=delay)
                self._report(watch.mailbox, exc)
                asyncio.get_running_loop().call_later(delay, self._queue_catch_up, watch)

    async def catch_up(self, watch: _Watch) -> int:
        """Sync every watched folder from its stored state; hand on what is new. Returns how many were."""
        url = (await self._endpoint(watch.mailbox))[0]
        cutoff = self._clock.now() - timedelta(minutes=self.settings.catch_up_max_age_minutes)
        handed = 0
        for name, ref in list(watch.refs.items()):
            state = watch.states.get(name) or FolderState(watch.mailbox, name)
            first_sync = state.sync_state is None
            sync_state = state.sync_state
            while True:
                page = await self.client.sync_page(watch.mailbox, ref, sync_state, url)
                sync_state = page.sync_state
                for change in page.created:
                    received = change.received_at
                    if first_sync or received is None:
                        continue  # what was there before we watched is not news
                    if state.handed_on(change.item_id, received) or received < cutoff:
                        continue
                    handed += 1
                    self._seen(watch, name, change.item_id, received)
                    self._emit(MailboxEvent(watch.mailbox, name, change.item_id, change.kind, received,
                                            sender=change.details.sender, subject=change.details.subject,
                                            importance=change.details.importance, details_known=True))
                if page.last_page:
                    break
            current = watch.states.get(name) or state
            updated = replace(current, sync_state=sync_state)
            watch.states[name] = updated
            self._states.changed(updated)
        self.stats.catch_ups += 1
        self.stats.caught_up_items += handed
        return handed

    # --- MailDetails ----------------------------------------------------------------------------------------

    async def item_details(self, mailbox: str, item_ids: Sequence[str]) -> Mapping[str, ItemDetails]:
        url = await self._endpoint(mailbox)
        return await self.client.item_details(mailbox, item_ids, url[0])

    async def unread_count(self, mailbox: str) -> int | None:
        cached = self._unread.get(mailbox)
        if cached is not None and self._clock.monotonic() - cached[0] <= self.settings.unread_cache_seconds:
            return cached[1]
        url = await self._endpoint(mailbox)
        count = await self.client.unread_count(mailbox, url[0])
        self._unread[mailbox] = (self._clock.monotonic(), count)
        if len(self._unread) > 200_000:
            self._unread.clear()
        return count

    # --- introspection --------------------------------------------------------------------------------------

    @property
    def groups(self) -> list[_Group]:
        return [g for gs in self._groups.values() for g in gs]

    def streaming_groups(self) -> int:
        return sum(1 for g in self.groups if g.streaming and g.members)

    def subscribed(self) -> int:
        return len(self._by_subscription)


@dataclass(slots=True)
class SourceStats:
    subscribed: int = 0
    subscribe_failures: int = 0
    connections: int = 0
    stream_failures: int = 0
    stream_events: int = 0
    stream_errors: dict[str, int] = field(default_factory=dict)
    catch_ups: int = 0
    catch_up_failures: int = 0
    caught_up_items: int = 0
    events_dropped: int = 0
    push_notifications: int = 0
    push_unknown: int = 0
    push_gaps: int = 0
    push_silent: int = 0
