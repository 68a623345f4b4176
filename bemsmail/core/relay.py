"""Relay: the pipeline from a MailboxEvent to pushes — dedupe, the mailbox's devices, per-device rules,
coalesce, dispatch, record the outcome. Driven by a Clock, so tests run it without sleeping.

    event ─► dedupe ─► coalesce (per mailbox) ─► registrations (cached) ─► rules ─► PushMessage ─► dispatch
                                                                                                  │
                          store: last_push_at, delete dead tokens ◄── record ◄── final Outcome ◄──┘

Coalescing is leading-edge: the first event for a mailbox is pushed at once and opens a window; events arriving
inside the window become one push at its end, carrying the latest badge, and open the next window.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from bemsmail.core.model import (
    Category,
    DeviceSettings,
    EventKind,
    MailboxEvent,
    Outcome,
    OutcomeKind,
    Priority,
    PushKind,
    PushMessage,
    Registration,
    RegistrationChange,
    RegistrationChanged,
    RichContent,
)
from bemsmail.core.ports import Bus, Clock, MailDetails
from bemsmail.core.registrations import REGISTRATION_TOPIC
from bemsmail.core.rules import Action, RulePolicy, Verdict, decide

MAX_COLLAPSE_ID_BYTES = 64
MAX_PENDING_DELETIONS = 100_000


class RelayStore(Protocol):
    """What the relay needs from the store."""

    async def list_registrations(self, mailbox: str) -> Sequence[Registration]: ...

    async def delete_invalid_registration(
        self, registration_id: str, token: str, invalid_since: datetime | None
    ) -> Registration | None:
        """Delete if it still holds `token` and was not updated after `invalid_since`; the deleted one or None."""
        ...

    async def mark_pushed(self, registration_ids: Sequence[str], at: datetime) -> None: ...

    async def delete_expired_registrations(self, seen_before: datetime, limit: int) -> Sequence[Registration]: ...


class Dispatch(Protocol):
    """Hands a push to its app's lane; the future resolves with the final outcome after any retries."""

    def submit(self, message: PushMessage) -> asyncio.Future[Outcome]: ...


class RelayObserver:
    """What the relay reports; the metrics adapter overrides these. The default does nothing."""

    def event(self, event: MailboxEvent, result: str) -> None: ...

    def verdict(self, verdict: Verdict) -> None: ...

    def outcome(self, message: PushMessage, outcome: Outcome) -> None: ...

    def token_deleted(self, registration: Registration, reason: str) -> None: ...

    def store_failed(self, operation: str, error: Exception) -> None: ...


@dataclass(frozen=True, slots=True)
class RelayPolicy:
    rules: RulePolicy
    dedupe_window_seconds: float = 3600.0
    dedupe_max_entries: int = 250_000
    coalesce_seconds: float = 1.0
    push_ttl_seconds: float = 86_400.0
    registration_cache_mailboxes: int = 100_000
    record_interval_seconds: float = 1.0
    sweep_interval_seconds: float = 3600.0
    #: mailbox domains whose tenant lets devices ask for sender and subject in pushes
    rich_content: Callable[[str], bool] = field(default=lambda _mailbox: False)
    #: app ids whose pushes wake the app to fetch (content-available) instead of showing an alert
    background_apps: frozenset[str] = frozenset()
    #: how long a push may wait for item details or the unread count before it goes without them
    details_timeout_seconds: float = 2.0


class Deduper:
    """Remembers event keys for a window; insertion order is time order, so expiry pops from the front.
    Keys are kept as 16-byte digests: the memory per remembered event is about half that of the key itself."""

    def __init__(self, clock: Clock, window: float, max_entries: int) -> None:
        self._clock = clock
        self._window = window
        self._max = max_entries
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def first_time(self, key: str) -> bool:
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        now = self._clock.monotonic()
        while self._seen:
            oldest_key, expires = next(iter(self._seen.items()))
            if expires > now and len(self._seen) < self._max:
                break
            del self._seen[oldest_key]
        if digest in self._seen:
            return False
        if self._window > 0:
            self._seen[digest] = now + self._window
        return True

    def __len__(self) -> int:
        return len(self._seen)


class RegistrationCache:
    """The devices of recently active mailboxes. An invalidation that races a load wins: the load's result is
    not cached if the mailbox changed while it was read."""

    def __init__(self, store: RelayStore, max_mailboxes: int) -> None:
        self._store = store
        self._max = max_mailboxes
        self._entries: OrderedDict[str, tuple[Registration, ...]] = OrderedDict()
        self._generation: dict[str, int] = {}

    async def get(self, mailbox: str) -> tuple[Registration, ...]:
        cached = self._entries.get(mailbox)
        if cached is not None:
            self._entries.move_to_end(mailbox)
            return cached
        generation = self._generation.get(mailbox, 0)
        loaded = tuple(await self._store.list_registrations(mailbox))
        if self._generation.get(mailbox, 0) == generation:
            self._entries[mailbox] = loaded
            while len(self._entries) > self._max:
                evicted, _ = self._entries.popitem(last=False)
                self._generation.pop(evicted, None)
        return loaded

    def invalidate(self, mailbox: str) -> None:
        self._entries.pop(mailbox, None)
        self._generation[mailbox] = self._generation.get(mailbox, 0) + 1


@dataclass(slots=True)
class _Window:
    """A mailbox's open coalescing window and the events waiting for its end."""

    waiting: list[MailboxEvent] = field(default_factory=list)


def _needs_details(settings: DeviceSettings, rich_allowed: bool) -> bool:
    """Whether this device's rules or content depend on more than "new item in folder X"."""
    return (bool(settings.vip_senders) or settings.important_only or not settings.calendar or not settings.new_mail
            or (settings.content == "rich" and rich_allowed))


def collapse_id(mailbox: str) -> str:
    """Per mailbox, so a burst collapses on the phone; a hash, so the address is not in a header."""
    return "m-" + hashlib.sha256(mailbox.encode()).hexdigest()[: MAX_COLLAPSE_ID_BYTES // 2]


class Relay:
    """The one home of the *relay* verb."""

    def __init__(self, store: RelayStore, dispatch: Dispatch, bus: Bus, clock: Clock, policy: RelayPolicy,
                 observer: RelayObserver | None = None, details: MailDetails | None = None) -> None:
        self._store = store
        self._details = details
        self._dispatch = dispatch
        self._bus = bus
        self._clock = clock
        self._policy = policy
        self._observer = observer or RelayObserver()
        self._dedupe = Deduper(clock, policy.dedupe_window_seconds, policy.dedupe_max_entries)
        self._cache = RegistrationCache(store, policy.registration_cache_mailboxes)
        self._windows: dict[str, _Window] = {}
        # Every window lasts coalesce_seconds, so windows end in the order they opened: one queue and one task
        # serve them all (a task per window cost ~40 µs per push in the benchmark).
        self._window_ends: collections.deque[tuple[float, str, _Window]] = collections.deque()
        self._window_opened = asyncio.Event()
        self._pushed: dict[str, None] = {}
        self._dead: list[tuple[PushMessage, Outcome]] = []
        self._to_record = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        bus.subscribe(REGISTRATION_TOPIC, self._registration_changed)

    # --- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._record_loop(), name="relay-recorder"),
                       asyncio.create_task(self._sweep_loop(), name="relay-sweeper"),
                       asyncio.create_task(self._window_loop(), name="relay-windows")]

    async def stop(self) -> None:
        """Flush coalesced events and recorded outcomes; the dispatcher is stopped by the composition root."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._window_ends.clear()
        for mailbox in list(self._windows):
            window = self._windows.pop(mailbox)
            if window.waiting:
                await self._push(mailbox, window.waiting)
        await self.flush_records()

    # --- the pipeline --------------------------------------------------------------------------------------

    async def on_event(self, event: MailboxEvent) -> None:
        """Entry point for the mail sources. Returns once the event's pushes (if any) are queued."""
        if not self._dedupe.first_time(event.dedupe_key):
            self._observer.event(event, "duplicate")
            return
        window = self._windows.get(event.mailbox)
        if window is not None:
            window.waiting.append(event)
            self._observer.event(event, "coalesced")
            return
        if self._policy.coalesce_seconds > 0:
            self._open_window(event.mailbox, _Window())
        await self._push(event.mailbox, [event])

    def _open_window(self, mailbox: str, window: _Window) -> None:
        self._windows[mailbox] = window
        self._window_ends.append((self._clock.monotonic() + self._policy.coalesce_seconds, mailbox, window))
        self._window_opened.set()

    async def _window_loop(self) -> None:
        while True:
            if not self._window_ends:
                self._window_opened.clear()
                await self._window_opened.wait()
                continue
            ends, mailbox, window = self._window_ends[0]
            delay = ends - self._clock.monotonic()
            if delay > 0:
                await self._clock.sleep(delay)
                continue
            self._window_ends.popleft()
            if not window.waiting:
                if self._windows.get(mailbox) is window:
                    del self._windows[mailbox]
                continue
            events, window.waiting = window.waiting, []
            self._open_window(mailbox, window)  # the push at a window's end opens the next window
            try:
                await self._push(mailbox, events)
            except Exception as exc:  # one mailbox's failure must not end coalescing for all others
                self._observer.store_failed("push_coalesced", exc)

    async def _push(self, mailbox: str, events: Sequence[MailboxEvent]) -> None:
        devices = await self._cache.get(mailbox)
        if not devices:
            self._observer.event(events[-1], "no_devices")
            return
        if self._details is not None:
            events = await self._enrich(mailbox, events, devices)
        now = self._clock.now()
        pushed = False
        for registration in devices:
            message = self._message_for(registration, events, now)
            if message is not None:
                future = self._dispatch.submit(message)
                future.add_done_callback(self._recorder(message))
                pushed = True
        self._observer.event(events[-1], "pushed" if pushed else "filtered")

    async def _enrich(self, mailbox: str, events: Sequence[MailboxEvent],
                      devices: Sequence[Registration]) -> Sequence[MailboxEvent]:
        """Ask the source for what the notification lacked, only when some device's rules or content need it:
        sender/subject/importance/kind by one batched item request, the unread count for the badge."""
        assert self._details is not None
        rich = self._policy.rich_content(mailbox)
        missing = [e.item_id for e in events if not e.details_known]
        want_details = bool(missing) and any(_needs_details(r.settings, rich) for r in devices)
        want_badge = (all(e.unread_count is None for e in events)
                      and any(r.settings.badge and r.app_id not in self._policy.background_apps for r in devices))
        if not want_details and not want_badge:
            return events
        timeout = self._policy.details_timeout_seconds
        enriched = list(events)
        if want_details:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that races the result
                async with asyncio.timeout(timeout):
                    found = await self._details.item_details(mailbox, missing)
            except Exception as exc:  # details are a nicety: the push goes out with what the notification had
                self._observer.store_failed("item_details", exc)
                found = {}
            enriched = [e.with_details(found[e.item_id]) if e.item_id in found else e for e in enriched]
        if want_badge:
            try:
                async with asyncio.timeout(timeout):
                    unread = await self._details.unread_count(mailbox)
            except Exception as exc:
                self._observer.store_failed("unread_count", exc)
                unread = None
            if unread is not None:
                enriched[-1] = dataclasses.replace(enriched[-1], unread_count=unread)
        return enriched

    def _message_for(self, registration: Registration, events: Sequence[MailboxEvent],
                     now: datetime) -> PushMessage | None:
        """One push for this device for these events, or None if its rules filter all of them."""
        alerting: list[MailboxEvent] = []
        silent = False
        for event in events:
            verdict = decide(registration, event, now, self._policy.rules)
            self._observer.verdict(verdict)
            if verdict.action is Action.ALERT:
                alerting.append(event)
            elif verdict.action is Action.SILENT:
                silent = True
        if not alerting and not silent:
            return None
        settings = registration.settings
        latest = (alerting or list(events))[-1]
        badge = next((e.unread_count for e in reversed(events) if e.unread_count is not None), None)
        if registration.app_id in self._policy.background_apps:
            kind = PushKind.BACKGROUND
        else:
            kind = PushKind.ALERT if alerting else PushKind.BADGE
        if kind is PushKind.BADGE and (badge is None or not settings.badge):
            return None  # a silent update with nothing to update
        rich = None
        if (kind is PushKind.ALERT and settings.content == "rich" and (latest.sender or latest.subject)
                and self._policy.rich_content(registration.mailbox)):
            rich = RichContent(latest.sender, latest.subject, latest.importance)
        category = Category.MEETING_REQUEST if latest.kind is EventKind.MEETING_REQUEST else Category.NEW_MAIL
        # item_id: the newest message the push is about, so a tap can open it (and a load test can match it);
        # an opaque store id, no content
        data = {"account": registration.mailbox, "folder": latest.folder, "count": str(len(alerting) or len(events)),
                "item_id": latest.item_id}
        return PushMessage(
            registration_id=registration.id,
            mailbox=registration.mailbox,
            platform=registration.platform,
            app_id=registration.app_id,
            environment=registration.environment,
            token=registration.token,
            notification_id=str(uuid.uuid4()),
            kind=kind,
            category=category,
            collapse_id=collapse_id(registration.mailbox),
            priority=Priority.ALERT if kind is PushKind.ALERT else Priority.BACKGROUND,
            expires_at=now + timedelta(seconds=self._policy.push_ttl_seconds),
            badge=badge if settings.badge else None,
            sound=settings.sound if kind is PushKind.ALERT else None,
            rich=rich,
            data=data,
        )

    # --- recording outcomes --------------------------------------------------------------------------------

    def _recorder(self, message: PushMessage) -> Callable[[asyncio.Future[Outcome]], None]:
        def record(future: asyncio.Future[Outcome]) -> None:
            if future.cancelled():
                return
            outcome = future.result()
            self._observer.outcome(message, outcome)
            if outcome.kind is OutcomeKind.DELIVERED:
                self._pushed[message.registration_id] = None
                self._to_record.set()
            elif outcome.kind is OutcomeKind.INVALID_TOKEN:
                self._dead.append((message, outcome))
                self._to_record.set()

        return record

    async def _record_loop(self) -> None:
        # Wake only when there is something to write, then gather for an interval: one statement per batch.
        while True:
            await self._to_record.wait()
            await self._clock.sleep(self._policy.record_interval_seconds)
            await self.flush_records()

    async def flush_records(self) -> None:
        """Write last_push_at for delivered pushes (one statement per batch) and delete dead tokens."""
        self._to_record.clear()
        if self._pushed:
            ids, self._pushed = list(self._pushed), {}
            try:
                await self._store.mark_pushed(ids, self._clock.now())
            except Exception as exc:  # bookkeeping: losing one batch of last_push_at must not stop the relay
                self._observer.store_failed("mark_pushed", exc)
        dead, self._dead = self._dead, []
        for message, outcome in dead:
            try:
                gone = await self._store.delete_invalid_registration(
                    message.registration_id, message.token, outcome.invalid_since
                )
            except Exception as exc:
                self._observer.store_failed("delete_invalid_registration", exc)
                if len(self._dead) < MAX_PENDING_DELETIONS:
                    self._dead.append((message, outcome))  # try again next round
                    self._to_record.set()
                continue
            if gone is not None:
                self._observer.token_deleted(gone, outcome.reason)
                await self._deleted(gone)

    async def _sweep_loop(self) -> None:
        while True:
            try:
                await self.sweep_expired()
            except Exception as exc:
                self._observer.store_failed("delete_expired_registrations", exc)
            await self._clock.sleep(self._policy.sweep_interval_seconds)

    async def sweep_expired(self) -> int:
        """Delete registrations not refreshed for `delete_after` (BEMS: 30 days); returns how many."""
        cutoff = self._clock.now() - self._policy.rules.delete_after
        total = 0
        while True:
            batch = await self._store.delete_expired_registrations(cutoff, 500)
            for gone in batch:
                self._observer.token_deleted(gone, "expired")
                await self._deleted(gone)
            total += len(batch)
            if len(batch) < 500:
                return total

    async def _deleted(self, registration: Registration) -> None:
        await self._bus.publish(
            REGISTRATION_TOPIC, RegistrationChanged(registration.mailbox, registration.id, RegistrationChange.DELETED)
        )

    async def _registration_changed(self, message: object) -> None:
        if isinstance(message, RegistrationChanged):
            self._cache.invalidate(message.mailbox)

    # --- introspection for metrics and tests ---------------------------------------------------------------

    @property
    def open_windows(self) -> int:
        return len(self._windows)

    @property
    def dedupe_entries(self) -> int:
        return len(self._dedupe)

