"""The Microsoft Graph mail source: one change-notification subscription per watched mailbox's Inbox, renewed
well before it expires within Graph's /subscriptions write limit, notifications taken from /notificationClient,
lifecycle events acted on, and delta rounds so that nothing is lost across gaps and restarts.

    watch(mailbox) ─► write queue ─► POST /subscriptions (Graph validates /notificationClient first)
                        ▲    ▲                          │
     renewal timer ─────┘    └─ lifecycle: reauthorize, │  notifications ─► accept() ─► MailboxEvent ─► relay
                                  recreate              ▼
                               catch-up queue ─► delta rounds from the stored delta link (missed, removed,
                                                 restart, periodic safety net)

Every write (create, renew, reauthorize, delete) spends from one sliding 20-second budget per tenant, so no
window ever exceeds Graph's limit however many subscriptions fall due together; renewals are spread over
`renew_spread_minutes` so that they do not fall due together in the first place.

No loss: a mailbox's subscription exists before its first delta round, and after a gap (daemon down, missed,
subscriptionRemoved, an expired subscription) a round from the stored delta link finds what notifications did
not bring. No duplicates: the latest items handed on are kept with the folder's state (`seen_ids`), and the relay
drops a second sighting of an item within its window. The clientState of each subscription is random and only its
digest is stored and compared (in constant time).
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import hmac
import random
import secrets
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog

from bemsmail.config import GraphConfig
from bemsmail.core.model import Backend, EventKind, FolderState, ItemDetails, MailboxEvent
from bemsmail.core.ports import Clock
from bemsmail.sources.common import EventPump, EventSink, StateStore, StateWriter
from bemsmail.sources.graph.budget import WindowBudget
from bemsmail.sources.graph.client import DeltaItem, GraphCallError, GraphClient, inbox_resource

log = structlog.get_logger(__name__)

FOLDER = "Inbox"
WINDOW_SECONDS = 20.0
WRITE_GUARD_SECONDS = 1.0
WRITERS = 8
CATCH_UP_WORKERS = 8
EVENT_QUEUE = 100_000
EVENT_WORKERS = 64
FLUSH_SECONDS = 2.0
SEEN_KEEP = 32
RETRY_INITIAL = 2.0
RETRY_MAX = 600.0
REFUSED_RETRY = 1800.0  # the mailbox or permission is refused (403/404): retried rarely
#: a notification for a subscription not (yet) known waits this long for creates in flight
PARK_SECONDS = 30.0
PARK_MAX = 10_000
SYNC_STATE_GONE = frozenset({"SyncStateNotFound", "SyncStateInvalid", "ResyncRequired", "syncStateNotFound"})


class Priority:
    REAUTHORIZE = 0
    CREATE = 1
    RENEW = 2
    DELETE = 3


def digest(client_state: str) -> str:
    return hashlib.sha256(client_state.encode("utf-8")).hexdigest()


@dataclass(slots=True)
class _Watch:
    mailbox: str
    state: FolderState
    watched: bool = True
    #: a write for it is queued or running (create or renew)
    writing: bool = False
    catching_up: bool = False
    catch_up_again: bool = False
    retry_delay: float = RETRY_INITIAL
    renew_at: float = 0.0  # monotonic
    last_delta: float = 0.0  # monotonic

    @property
    def subscription_id(self) -> str | None:
        return self.state.remote_id


@dataclass(order=True, slots=True)
class _Write:
    priority: int
    seq: int
    kind: str = field(compare=False)
    watch: _Watch | None = field(compare=False, default=None)
    subscription_id: str | None = field(compare=False, default=None)


@dataclass(slots=True)
class Accepted:
    """What one webhook post brought, for the answer and the metrics."""

    accepted: int = 0
    duplicate: int = 0
    forged: int = 0
    unknown: int = 0
    malformed: int = 0
    refused: int = 0  # the event queue was full: Graph must redeliver


@dataclass(slots=True)
class GraphStats:
    creates: int = 0
    create_failures: int = 0
    renewals: int = 0
    renew_failures: int = 0
    reauthorizations: int = 0
    deletes: int = 0
    throttled: int = 0
    refused_mailboxes: int = 0
    notifications: int = 0
    forged: int = 0
    unknown: int = 0
    malformed: int = 0
    duplicates: int = 0
    lifecycle: dict[str, int] = field(default_factory=dict)
    catch_ups: int = 0
    catch_up_failures: int = 0
    caught_up_items: int = 0
    orphans_deleted: int = 0


class GraphStore(StateStore, Protocol):
    async def all_folder_states(self, backend: Backend) -> list[FolderState]: ...


class GraphSource:
    """MailSource and MailDetails for the mailboxes of one Graph tenant, and the receiver of its webhook posts."""

    def __init__(self, settings: GraphConfig, store: GraphStore, clock: Clock, sink: EventSink, *,
                 name: str = "graph", client: GraphClient | None = None, queue_limit: int = EVENT_QUEUE) -> None:
        self.settings = settings
        self.name = name
        self._store = store
        self._clock = clock
        self.client = client or GraphClient(settings)
        self.stats = GraphStats()
        # Graph counts a write when it arrives, we when we start it: the guard covers the time in between, so that
        # no 20 s window at Graph's side holds more than the budget either
        self.budget = WindowBudget(settings.writes_per_20s, WINDOW_SECONDS + WRITE_GUARD_SECONDS, clock)
        self._events = EventPump(sink, size=queue_limit, workers=EVENT_WORKERS, name=f"graph-{name}")
        self._states = StateWriter(store, Backend.GRAPH, FLUSH_SECONDS)
        self._watches: dict[str, _Watch] = {}
        self._by_subscription: dict[str, _Watch] = {}
        #: subscriptions found in the store at start that no watch claimed yet
        self._stored: dict[str, FolderState] = {}
        self._writes: list[_Write] = []
        self._write_ready = asyncio.Event()
        self._seq = 0
        self._renewals: list[tuple[float, int, _Watch]] = []
        self._catch_ups: asyncio.Queue[_Watch] = asyncio.Queue()
        self._creating = 0
        self._parked: deque[tuple[float, dict[str, Any]]] = deque()
        self._unread: dict[str, tuple[float, int | None]] = {}
        self._unread_pending: dict[str, asyncio.Future[int | None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.reconciled = asyncio.Event()

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every stored subscription first, so that notifications arriving before their mailbox is watched
        again are recognised; then reconcile with Graph in the background."""
        for state in await self._store.all_folder_states(Backend.GRAPH):
            self._stored[state.mailbox] = state
            if state.remote_id:
                self._by_subscription[state.remote_id] = _Watch(state.mailbox, state, watched=False)
        self._events.start()
        self._states.start()
        self._tasks = [asyncio.create_task(self._writer(), name="graph-writer") for _ in range(WRITERS)]
        self._tasks += [asyncio.create_task(self._catch_up_worker(), name="graph-catch-up")
                        for _ in range(CATCH_UP_WORKERS)]
        self._tasks.append(asyncio.create_task(self._renewal_timer(), name="graph-renewals"))
        self._tasks.append(asyncio.create_task(self._refresh_timer(), name="graph-refresh"))
        self._tasks.append(asyncio.create_task(self._reconcile(), name="graph-reconcile"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._events.stop()
        await self._states.stop()
        await self.client.close()

    async def watch(self, mailbox: str, folders: frozenset[str]) -> None:
        """Watch the mailbox's Inbox (Graph subscriptions here are per Inbox; other folders are not watched)."""
        if mailbox in self._watches:
            return
        stored = self._stored.pop(mailbox, None)
        known = self._by_subscription.get(stored.remote_id) if stored and stored.remote_id else None
        if known is not None:
            watch = known
            watch.watched = True
        elif stored is not None:  # its subscription is gone (reconciliation found so): keep only the delta link
            watch = _Watch(mailbox, replace(stored, remote_id=None, client_state=None, expires_at=None))
        else:
            watch = _Watch(mailbox, FolderState(mailbox, FOLDER))
        self._watches[mailbox] = watch
        expires = watch.state.expires_at
        if watch.subscription_id and expires and expires - self._clock.now() > timedelta(minutes=10):
            self._schedule_renewal(watch)
            self._want_catch_up(watch)  # what arrived while nobody listened (a restart)
        else:
            self._forget_subscription(watch)
            self._queue_write(Priority.CREATE, "create", watch)

    async def unwatch(self, mailbox: str) -> None:
        watch = self._watches.pop(mailbox, None)
        if watch is None:
            return
        watch.watched = False
        if watch.subscription_id:
            self._queue_write(Priority.DELETE, "delete", subscription_id=watch.subscription_id)
        self._forget_subscription(watch)
        self._states.forget(mailbox)
        try:
            await self._store.delete_folder_states(Backend.GRAPH, mailbox)
        except Exception:
            log.exception("graph_forget_failed")

    def _forget_subscription(self, watch: _Watch) -> None:
        if watch.subscription_id:
            self._by_subscription.pop(watch.subscription_id, None)
            watch.state = replace(watch.state, remote_id=None, client_state=None, expires_at=None)

    # --- the webhook -----------------------------------------------------------------------------------------

    def accept(self, items: Iterable[Any]) -> tuple[Accepted, list[dict[str, Any]]]:
        """Take a webhook post's change notifications for this tenant's subscriptions. Returns the counts and the
        items that are not ours (another tenant's source may know them). Never waits: the answer goes first."""
        result = Accepted()
        others: list[dict[str, Any]] = []
        now = self._clock.now()
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("subscriptionId"), str):
                result.malformed += 1
                continue
            watch = self._by_subscription.get(item["subscriptionId"])
            if watch is None:
                others.append(item)
                continue
            if not self._authentic(watch, item.get("clientState")):
                result.forged += 1
                continue
            item_id = _item_id(item)
            if item_id is None:
                result.malformed += 1
                continue
            if item.get("changeType", "created") != "created":
                continue
            if item_id in watch.state.seen_ids:
                result.duplicate += 1
                continue
            event = MailboxEvent(watch.mailbox, FOLDER, item_id, EventKind.NEW_MAIL, now)
            if not self._events.offer(event):
                result.refused += 1
                continue
            self._seen(watch, item_id)
            result.accepted += 1
        self.stats.notifications += result.accepted
        self.stats.forged += result.forged
        self.stats.malformed += result.malformed
        self.stats.duplicates += result.duplicate
        if result.forged:
            log.warning("graph_notification_forged", tenant=self.name, count=result.forged)
        return result, others

    def park(self, items: Sequence[dict[str, Any]]) -> bool:
        """Notifications no source knows: kept a while if creates are in flight (Graph may notify before its
        create answer reached us). Returns whether they were kept."""
        if not self._creating:
            return False
        now = self._clock.monotonic()
        for item in items:
            if len(self._parked) >= PARK_MAX:
                self._parked.popleft()
                self.stats.unknown += 1
            self._parked.append((now, item))
        return True

    def ignore(self, count: int) -> None:
        self.stats.unknown += count

    def _unpark(self) -> None:
        if not self._parked:
            return
        now = self._clock.monotonic()
        parked, self._parked = self._parked, deque()
        fresh = [item for at, item in parked if now - at <= PARK_SECONDS]
        self.stats.unknown += len(parked) - len(fresh)
        _, unknown = self.accept(fresh)
        if self._creating:
            self._parked.extend((now, item) for item in unknown)
        else:
            self.stats.unknown += len(unknown)

    def accept_lifecycle(self, items: Iterable[Any]) -> tuple[Accepted, list[dict[str, Any]]]:
        result = Accepted()
        others: list[dict[str, Any]] = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("subscriptionId"), str) \
                    or not isinstance(item.get("lifecycleEvent"), str):
                result.malformed += 1
                continue
            watch = self._by_subscription.get(item["subscriptionId"])
            if watch is None:
                others.append(item)
                continue
            if not self._authentic(watch, item.get("clientState")):
                result.forged += 1
                continue
            result.accepted += 1
            self._lifecycle(watch, item["lifecycleEvent"])
        self.stats.forged += result.forged
        self.stats.malformed += result.malformed
        return result, others

    def _authentic(self, watch: _Watch, client_state: object) -> bool:
        expected = watch.state.client_state
        if not isinstance(client_state, str) or expected is None:
            return False
        return hmac.compare_digest(digest(client_state), expected)

    def _lifecycle(self, watch: _Watch, event: str) -> None:
        self.stats.lifecycle[event] = self.stats.lifecycle.get(event, 0) + 1
        log.info("graph_lifecycle", tenant=self.name, lifecycle_event=event, mailbox=watch.mailbox)
        if event == "reauthorizationRequired":
            # a renewal re-authorizes too, and moves the expiry out
            self._queue_write(Priority.REAUTHORIZE, "renew", watch)
        elif event == "subscriptionRemoved":
            self._forget_subscription(watch)
            if watch.watched:
                self._queue_write(Priority.CREATE, "create", watch)  # then a catch-up from the delta link
        elif event == "missed":
            self._want_catch_up(watch)
        else:
            log.warning("graph_lifecycle_unknown", tenant=self.name, lifecycle_event=event[:64])

    def _seen(self, watch: _Watch, item_id: str) -> None:
        seen = watch.state.seen_ids
        if item_id in seen:
            return
        watch.state = replace(watch.state, seen_ids=(*seen, item_id)[-SEEN_KEEP:])
        if watch.watched:
            self._states.changed(watch.state)

    # --- writes ----------------------------------------------------------------------------------------------

    def _queue_write(self, priority: int, kind: str, watch: _Watch | None = None, *,
                     subscription_id: str | None = None) -> None:
        if watch is not None:
            if watch.writing:
                return
            watch.writing = True
        self._seq += 1
        heapq.heappush(self._writes, _Write(priority, self._seq, kind, watch, subscription_id))
        self._write_ready.set()

    async def _writer(self) -> None:
        while True:
            while not self._writes:
                self._write_ready.clear()
                await self._write_ready.wait()
            write = heapq.heappop(self._writes)
            await self.budget.acquire()
            try:
                await self._do_write(write)
            except GraphCallError as exc:
                self._write_failed(write, exc)
            except Exception:
                log.exception("graph_write_crashed", kind=write.kind)
                self._write_failed(write, GraphCallError(0, "crash"))
            else:
                if write.watch is not None:
                    write.watch.writing = False
                    write.watch.retry_delay = RETRY_INITIAL

    async def _do_write(self, write: _Write) -> None:
        watch = write.watch
        if write.kind == "delete":
            assert write.subscription_id is not None
            try:
                await self.client.delete_subscription(write.subscription_id)
            except GraphCallError as exc:
                if exc.status != 404:
                    raise
            self.stats.deletes += 1
            return
        assert watch is not None
        if not watch.watched:
            return
        if write.kind == "create" or watch.subscription_id is None:
            await self._create(watch)
        else:
            await self._renew(watch)

    async def _create(self, watch: _Watch) -> None:
        secret = secrets.token_urlsafe(32)
        self._creating += 1
        try:
            try:
                made = await self.client.create_subscription(watch.mailbox, secret,
                                                             self.settings.subscription_minutes)
            except GraphCallError as exc:
                if exc.status != 409:
                    raise
                await self._delete_conflicting(watch.mailbox)  # its clientState is lost with it: make a new one
                made = await self.client.create_subscription(watch.mailbox, secret,
                                                             self.settings.subscription_minutes)
            self.stats.creates += 1
            if not watch.watched:  # unwatched while creating
                self._queue_write(Priority.DELETE, "delete", subscription_id=made.id)
                return
            watch.state = replace(watch.state, remote_id=made.id, client_state=digest(secret),
                                  expires_at=made.expires_at or self._expiry())
            self._by_subscription[made.id] = watch
            self._states.changed(watch.state)
            self._schedule_renewal(watch)
            self._unpark()
        finally:
            self._creating -= 1
        # a first delta round takes the baseline; a later one finds what came during the gap
        self._want_catch_up(watch)

    async def _delete_conflicting(self, mailbox: str) -> None:
        resource = inbox_resource(mailbox).lower()
        async for remote in self.client.subscriptions():
            if remote.resource.lstrip("/").lower() == resource and remote.notification_url == \
                    self.settings.webhook_url:
                log.info("graph_subscription_conflict", tenant=self.name, mailbox=mailbox)
                await self.budget.acquire()
                await self.client.delete_subscription(remote.id)
                self._by_subscription.pop(remote.id, None)

    async def _renew(self, watch: _Watch) -> None:
        assert watch.subscription_id is not None
        try:
            expires = await self.client.renew(watch.subscription_id, self.settings.subscription_minutes)
        except GraphCallError as exc:
            if exc.status == 404:  # gone (expired or removed): a new one, then a catch-up
                self.stats.renew_failures += 1
                self._forget_subscription(watch)
                await self._create(watch)
                return
            raise
        self.stats.renewals += 1
        watch.state = replace(watch.state, expires_at=expires or self._expiry())
        self._states.changed(watch.state)
        self._schedule_renewal(watch)

    def _write_failed(self, write: _Write, exc: GraphCallError) -> None:
        watch = write.watch
        if exc.status == 429:
            self.stats.throttled += 1
            self.budget.pause(exc.retry_after if exc.retry_after is not None else 10.0)
        if write.kind == "create":
            self.stats.create_failures += 1
        elif write.kind == "renew":
            self.stats.renew_failures += 1
        if watch is None:  # a delete: it expires by itself if this keeps failing
            log.info("graph_delete_failed", tenant=self.name, status=exc.status, code=exc.code)
            return
        watch.writing = False
        if not watch.watched:
            return
        if exc.status in (403, 404) and write.kind == "create":
            self.stats.refused_mailboxes += 1
            delay = REFUSED_RETRY
            log.warning("graph_mailbox_refused", tenant=self.name, mailbox=watch.mailbox, status=exc.status,
                        code=exc.code, detail=exc.message[:300], retry_in=delay)
        elif exc.status == 429 and exc.retry_after is not None:
            delay = exc.retry_after
        else:
            delay = watch.retry_delay * (0.5 + random.random())  # noqa: S311
            watch.retry_delay = min(RETRY_MAX, watch.retry_delay * 2)
            log.warning("graph_write_failed", tenant=self.name, kind=write.kind, status=exc.status, code=exc.code,
                        detail=exc.message[:300], retry_in=round(delay, 1))
        asyncio.get_running_loop().call_later(delay, self._retry_write, write)

    def _retry_write(self, write: _Write) -> None:
        watch = write.watch
        if watch is not None and watch.watched and self._watches.get(watch.mailbox) is watch:
            self._queue_write(write.priority, write.kind, watch)

    # --- renewals --------------------------------------------------------------------------------------------

    def _expiry(self) -> datetime:
        return self._clock.now() + timedelta(minutes=self.settings.subscription_minutes)

    def renewal_delay(self, expires_at: datetime) -> float:
        """Seconds from now until this subscription is renewed: `renew_before_minutes` before it expires, at a
        random point of the spread before that, so that subscriptions made together are not renewed together."""
        before = self.settings.renew_before_minutes * 60
        spread = self.settings.renew_spread_minutes * 60
        left = (expires_at - self._clock.now()).total_seconds()
        return max(0.0, left - before - random.uniform(0, spread))  # noqa: S311

    def _schedule_renewal(self, watch: _Watch) -> None:
        if watch.state.expires_at is None:
            return
        watch.renew_at = self._clock.monotonic() + self.renewal_delay(watch.state.expires_at)
        self._seq += 1
        heapq.heappush(self._renewals, (watch.renew_at, self._seq, watch))

    def renewals_due(self, within_seconds: float) -> list[float]:
        """When each live subscription will be renewed (seconds from now), for the ones due within the horizon."""
        now = self._clock.monotonic()
        return sorted(w.renew_at - now for w in self._by_subscription.values()
                      if w.watched and w.renew_at - now <= within_seconds)

    async def _renewal_timer(self) -> None:
        while True:
            now = self._clock.monotonic()
            while self._renewals and self._renewals[0][0] <= now:
                at, _, watch = heapq.heappop(self._renewals)
                if watch.renew_at == at and watch.watched and watch.subscription_id:
                    self._queue_write(Priority.RENEW, "renew", watch)
            await self._clock.sleep(1.0)

    # --- catch-up --------------------------------------------------------------------------------------------

    def _want_catch_up(self, watch: _Watch) -> None:
        if watch.catching_up:
            watch.catch_up_again = True
            return
        watch.catching_up = True
        self._catch_ups.put_nowait(watch)

    async def _catch_up_worker(self) -> None:
        while True:
            watch = await self._catch_ups.get()
            try:
                while watch.watched:
                    watch.catch_up_again = False
                    try:
                        await self.catch_up(watch)
                    except GraphCallError as exc:
                        self.stats.catch_up_failures += 1
                        log.warning("graph_catch_up_failed", tenant=self.name, status=exc.status, code=exc.code)
                        asyncio.get_running_loop().call_later(
                            exc.retry_after or watch.retry_delay, self._want_catch_up, watch)
                        break
                    if not watch.catch_up_again:
                        break
            finally:
                watch.catching_up = False

    async def catch_up(self, watch: _Watch) -> int:
        """One delta round of the Inbox from the stored delta link; hands on new unread mail not seen before and
        not older than `catch_up_max_age_minutes`. The first round of a mailbox only takes the baseline."""
        now = self._clock.now()
        oldest = now - timedelta(minutes=self.settings.catch_up_max_age_minutes)
        link = watch.state.sync_state
        baseline = link is None
        since: datetime | None = now - timedelta(minutes=1) if baseline else None
        handed = 0
        while True:
            try:
                page = await self.client.delta(watch.mailbox, link, since)
            except GraphCallError as exc:
                if exc.status not in (400, 404, 410) or exc.code not in SYNC_STATE_GONE or link is None:
                    raise
                # the delta link expired: a new round over what the age limit allows (seen_ids stop repeats)
                log.info("graph_delta_reset", tenant=self.name, code=exc.code)
                link, since, baseline = None, oldest, False
                continue
            if not baseline:
                for item in page.items:
                    if await self._hand_on(watch, item, oldest):
                        handed += 1
            if page.next_link:
                link, since = page.next_link, None
                continue
            if page.delta_link:
                watch.state = replace(watch.state, sync_state=page.delta_link)
                if watch.watched:
                    self._states.changed(watch.state)
            break
        watch.last_delta = self._clock.monotonic()
        self.stats.catch_ups += 1
        self.stats.caught_up_items += handed
        return handed

    async def _hand_on(self, watch: _Watch, item: DeltaItem, oldest: datetime) -> bool:
        if item.removed or item.is_read or item.id in watch.state.seen_ids:
            return False
        if item.received_at is not None and item.received_at < oldest:
            return False
        event = MailboxEvent(watch.mailbox, FOLDER, item.id, EventKind.NEW_MAIL,
                             item.received_at or self._clock.now())
        if item.details is not None:
            event = event.with_details(item.details)
        await self._events.put(event)  # waits when the relay is behind: the delta link moves on only after
        self._seen(watch, item.id)
        return True

    async def _refresh_timer(self) -> None:
        """The safety net: every mailbox gets a delta round at least every `delta_refresh_minutes`, spread out."""
        period = self.settings.delta_refresh_minutes * 60
        while True:
            await self._clock.sleep(min(30.0, period / 4))
            now = self._clock.monotonic()
            for watch in list(self._watches.values()):
                if watch.last_delta and now - watch.last_delta >= period * (0.9 + 0.2 * random.random()):  # noqa: S311
                    self._want_catch_up(watch)

    # --- reconciliation --------------------------------------------------------------------------------------

    async def _reconcile(self) -> None:
        """At start: Graph's list of our subscriptions against the store. Ours that Graph no longer has are made
        again (with a catch-up); ones Graph has that we do not know (a crash between create and save, a mailbox
        no longer watched) are deleted. Subscriptions of other deployments (another notification URL) are left."""
        known_before = dict(self._by_subscription)
        while True:
            try:
                remote: dict[str, Any] = {}
                async for sub in self.client.subscriptions():
                    if sub.notification_url == self.settings.webhook_url:
                        remote[sub.id] = sub
                break
            except GraphCallError as exc:
                log.warning("graph_reconcile_failed", tenant=self.name, status=exc.status, code=exc.code)
                await self._clock.sleep(exc.retry_after or 30.0)
        for sub_id, sub in remote.items():
            watch = self._by_subscription.get(sub_id)
            if watch is not None:
                if sub.expires_at is not None and watch.state.expires_at != sub.expires_at:
                    watch.state = replace(watch.state, expires_at=sub.expires_at)
                continue
            owner = self._watches.get(_mailbox_of(sub.resource))
            if owner is not None and owner.writing:
                continue  # perhaps the create in flight for this mailbox
            self.stats.orphans_deleted += 1
            self._queue_write(Priority.DELETE, "delete", subscription_id=sub_id)
        for sub_id, watch in known_before.items():
            if sub_id in remote or self._by_subscription.get(sub_id) is not watch or watch.writing:
                continue
            log.info("graph_subscription_gone", tenant=self.name, mailbox=watch.mailbox)
            self._forget_subscription(watch)
            if watch.watched:
                self._queue_write(Priority.CREATE, "create", watch)
        self.reconciled.set()

    # --- details on demand -----------------------------------------------------------------------------------

    async def item_details(self, mailbox: str, item_ids: Sequence[str]) -> Mapping[str, ItemDetails]:
        found = await asyncio.gather(*(self.client.message(mailbox, i) for i in item_ids), return_exceptions=True)
        return {i: d for i, d in zip(item_ids, found, strict=True) if isinstance(d, ItemDetails)}

    async def unread_count(self, mailbox: str) -> int | None:
        """The Inbox's unread count for badges: cached briefly, and one request per mailbox however many pushes
        wait for it (a burst of mail to one mailbox must not become a burst of Graph calls: Outlook allows four
        concurrent requests per mailbox)."""
        cached = self._unread.get(mailbox)
        if cached is not None and self._clock.monotonic() - cached[0] <= self.settings.unread_cache_seconds:
            return cached[1]
        pending = self._unread_pending.get(mailbox)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch_unread(mailbox))
            self._unread_pending[mailbox] = pending
            pending.add_done_callback(lambda _: self._unread_pending.pop(mailbox, None))
        return await asyncio.shield(pending)

    async def _fetch_unread(self, mailbox: str) -> int | None:
        count = await self.client.unread_count(mailbox)
        if len(self._unread) > 200_000:
            self._unread.clear()
        self._unread[mailbox] = (self._clock.monotonic(), count)
        return count

    # --- introspection ---------------------------------------------------------------------------------------

    def subscribed(self) -> int:
        return sum(1 for w in self._by_subscription.values() if w.watched)

    def live(self, mailbox: str) -> bool:
        """Whether Graph now tells us of the mailbox's new mail: it is watched, its subscription was made (through
        the validation handshake) and a delta round has set the baseline that later rounds catch up from."""
        watch = self._watches.get(mailbox)
        if watch is None or watch.subscription_id is None or watch.state.sync_state is None:
            return False
        return self._by_subscription.get(watch.subscription_id) is watch

    def pending_writes(self) -> int:
        return len(self._writes)

    def events_pending(self) -> int:
        return self._events.pending()


def _mailbox_of(resource: str) -> str:
    """The mailbox in a resource we made (users/{address}/mailFolders('inbox')/messages)."""
    parts = resource.strip("/").split("/")
    return parts[1].lower() if len(parts) > 1 and parts[0].lower() == "users" else ""


def _item_id(item: Mapping[str, Any]) -> str | None:
    data = item.get("resourceData")
    if isinstance(data, dict) and isinstance(data.get("id"), str) and data["id"]:
        return str(data["id"])
    resource = item.get("resource")
    if isinstance(resource, str) and "/messages/" in resource.lower():
        return resource.rsplit("/", 1)[-1] or None
    return None
