"""A tenant's move from EWS to Graph: mailboxes move at a bounded rate with no gap, and EWS answering 403 is
reported (and, if configured, answered by moving the mailbox).

    watch(m) ─► recorded on Graph? ─► graph.watch(m)
                   └─ still on EWS ─► ews.watch(m) ─► move queue ─► ≤ users_per_batch starts per every_minutes
                                                                    │
        move(m): graph.watch(m) ─► wait until Graph is live for m ─► store: m on Graph ─► ews.unwatch(m)

No gap: EWS keeps watching until Graph has made the subscription (through the validation handshake) and taken its
delta baseline. No duplicates in the overlap: an Exchange Online item's EWS ItemId and its Graph id are the same
bytes in two base64 alphabets, so EWS ids are handed on in Graph's form and the relay sees one item. Restart-safe:
the store records where each mailbox is watched, and a moved mailbox is watched by Graph only.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import structlog

from bemsmail.config import MigrationConfig
from bemsmail.core.model import Backend, ItemDetails, MailboxEvent
from bemsmail.core.ports import Clock
from bemsmail.sources.common import EventSink
from bemsmail.sources.ews.exchange import EWS_DISABLED, EwsCallError
from bemsmail.sources.ews.source import EwsSource
from bemsmail.sources.graph.source import GraphSource

log = structlog.get_logger(__name__)

#: how often a move looks whether Graph is live for its mailbox yet
LIVE_POLL_SECONDS = 0.25
#: a rate-bounded move whose mailbox Graph does not make live within this long is undone (EWS never stopped) and
#: queued again, so that mailboxes Graph refuses do not pile up as moves in flight
LIVE_TIMEOUT_SECONDS = 900.0
STORE_RETRY_SECONDS = 5.0
RECENT_STARTS = 10_000

_TO_REST = str.maketrans("/+", "-_")
_TO_EWS = str.maketrans("-_", "/+")


def rest_id(ews_id: str) -> str:
    """An EWS ItemId in Graph's (REST) form: the same base64 with '-' for '/' and '_' for '+'."""
    return ews_id.translate(_TO_REST)


def ews_id(graph_id: str) -> str:
    """The EWS ItemId of an id in Graph's (REST) form."""
    return graph_id.translate(_TO_EWS)


def rest_id_sink(sink: EventSink) -> EventSink:
    """The sink for a migrating tenant's EwsSource: its item ids reach the relay in Graph's form, so an item that
    EWS and Graph both report while a mailbox moves is one item to the relay's duplicate check."""

    async def translated(event: MailboxEvent) -> None:
        await sink(dataclasses.replace(event, item_id=rest_id(event.item_id)))

    return translated


class MigrationStore(Protocol):
    async def mailbox_backends(self, tenant: str) -> dict[str, Backend]: ...

    async def mailbox_backend(self, address: str) -> Backend | None: ...

    async def set_mailbox_backend(self, address: str, backend: Backend) -> None: ...


@dataclass(slots=True)
class MigrationStats:
    """A tenant's migration as the metrics read it."""

    moved: int = 0
    #: mailboxes still on EWS waiting for their move to start
    pending: int = 0
    #: moves started and waiting for Graph to be live
    moving: int = 0
    #: moves undone because Graph did not become live in time (queued again)
    stalled: int = 0
    #: EWS answers of 403 Forbidden (EWS switched off in Exchange Online)
    ews_disabled: int = 0
    #: when each recent move started (monotonic seconds): the rate bound's own bookkeeping
    move_starts: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STARTS))


class EwsDisabledReport:
    """Watches an EwsSource's failed calls for 403 Forbidden: one error line per tenant saying what to do, a count of
    every such answer, and (when given) `then(mailbox)` for each."""

    def __init__(self, tenant: str, stats: MigrationStats, *, action: str,
                 then: Callable[[str], None] | None = None) -> None:
        self.tenant = tenant
        self.stats = stats
        self._action = action
        self._then = then
        self._reported = False

    def __call__(self, mailbox: str, error: EwsCallError) -> None:
        if error.code != EWS_DISABLED:
            return
        self.stats.ews_disabled += 1
        if not self._reported:
            self._reported = True
            log.error("ews_disabled", tenant=self.tenant,
                      message="EWS in Exchange Online answered 403 Forbidden: EWS is disabled for this tenant, "
                              "app or mailbox, so its mailboxes get no notifications through EWS",
                      action=self._action)
        if self._then is not None:
            self._then(mailbox)


REPORT_ACTION = ('configure [tenants.graph] and set backend = "graph", or set '
                 '[tenants.migration] on_ews_disabled = "migrate"')
MIGRATE_ACTION = "moving each mailbox EWS refuses to Graph now"


class MigratingSource:
    """MailSource and MailDetails for a tenant whose mailboxes move from EWS to Graph; each mailbox is served by
    the backend it is recorded on, and by both while it moves.

    `move_all`: the tenant was switched to Graph, so every mailbox still on EWS moves, at most `users_per_batch`
    moves starting in any `every_minutes`. Otherwise (an EWS tenant with on_ews_disabled = "migrate") only the
    mailboxes EWS answers 403 for move. Either way such a mailbox moves at once: EWS gives it nothing, and Graph's
    own write budget still bounds the subscription writes."""

    def __init__(self, tenant: str, ews: EwsSource, graph: GraphSource, store: MigrationStore, clock: Clock,
                 settings: MigrationConfig, *, move_all: bool) -> None:
        self.tenant = tenant
        self.ews = ews
        self.graph = graph
        self.settings = settings
        self.move_all = move_all
        self.stats = MigrationStats()
        self._store = store
        self._clock = clock
        self._on: dict[str, Backend] = {}
        self._folders: dict[str, frozenset[str]] = {}
        self._queue: dict[str, None] = {}  # insertion-ordered set
        self._wanted = asyncio.Event()
        self._moves: dict[str, asyncio.Task[None]] = {}
        self._recent: deque[float] = deque()
        self._mover: asyncio.Task[None] | None = None
        ews.call_failed = EwsDisabledReport(tenant, self.stats, action=MIGRATE_ACTION, then=self._ews_disabled)

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Where every mailbox of the tenant is recorded, in one read, before the watcher asks for any."""
        self._on = await self._store.mailbox_backends(self.tenant)
        await self.ews.start()
        await self.graph.start()
        self._mover = asyncio.create_task(self._run_moves(), name=f"migration-{self.tenant}")
        waiting = sum(1 for b in self._on.values() if b is not Backend.GRAPH)
        log.info("migration_started", tenant=self.tenant, move_all=self.move_all, on_ews=waiting,
                 users_per_batch=self.settings.users_per_batch, every_minutes=self.settings.every_minutes)

    async def stop(self) -> None:
        tasks = [t for t in (self._mover, *self._moves.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._moves.clear()
        await asyncio.gather(self.ews.stop(), self.graph.stop())

    # --- MailSource ------------------------------------------------------------------------------------------

    async def watch(self, mailbox: str, folders: frozenset[str]) -> None:
        self._folders[mailbox] = folders
        if await self._backend(mailbox) is Backend.GRAPH:
            await self.graph.watch(mailbox, folders)
            return
        await self.ews.watch(mailbox, folders)  # also while it moves: folder changes reach EWS
        if self.move_all and mailbox not in self._moves and mailbox not in self._queue:
            self._queue[mailbox] = None
            self._set_pending()
            self._wanted.set()

    async def unwatch(self, mailbox: str) -> None:
        self._folders.pop(mailbox, None)
        self._dequeue(mailbox)
        move = self._moves.pop(mailbox, None)
        if move is not None:
            move.cancel()
            await asyncio.gather(move, return_exceptions=True)
        await self.ews.unwatch(mailbox)
        await self.graph.unwatch(mailbox)

    def backend_of(self, mailbox: str) -> Backend | None:
        """Where the mailbox is recorded as watched (None: not known yet)."""
        return self._on.get(mailbox)

    def pending(self) -> int:
        return len(self._queue)

    async def _backend(self, mailbox: str) -> Backend:
        backend = self._on.get(mailbox)
        if backend is None:  # registered after start: its row says where the registration put it
            backend = await self._store.mailbox_backend(mailbox) or (Backend.GRAPH if self.move_all
                                                                     else Backend.EWS)
            self._on[mailbox] = backend
        return Backend.GRAPH if backend is Backend.GRAPH else Backend.EWS

    # --- moving ----------------------------------------------------------------------------------------------

    def _set_pending(self) -> None:
        self.stats.pending = len(self._queue)

    def _dequeue(self, mailbox: str) -> None:
        if mailbox in self._queue:
            del self._queue[mailbox]
            self._set_pending()

    def _ews_disabled(self, mailbox: str) -> None:
        """EWS answered 403 for the mailbox: it gets nothing through EWS, so it moves now, out of the queue."""
        if mailbox not in self._folders or mailbox in self._moves or self._on.get(mailbox) is Backend.GRAPH:
            return
        self._dequeue(mailbox)
        self._begin(mailbox, "ews_disabled")

    def _window_wait(self) -> float:
        """Seconds until another move may start: at most users_per_batch starts in any every_minutes."""
        period = self.settings.every_minutes * 60
        now = self._clock.monotonic()
        while self._recent and self._recent[0] <= now - period:
            self._recent.popleft()
        if len(self._recent) < self.settings.users_per_batch:
            return 0.0
        return self._recent[0] + period - now

    async def _run_moves(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            while self._queue:
                wait = self._window_wait()
                if wait > 0:
                    await self._clock.sleep(wait)
                    continue
                mailbox = next(iter(self._queue))
                del self._queue[mailbox]
                self._set_pending()
                if mailbox not in self._folders or mailbox in self._moves or self._on.get(mailbox) is Backend.GRAPH:
                    continue
                started = self._clock.monotonic()
                self._recent.append(started)
                self.stats.move_starts.append(started)
                self._begin(mailbox, "migration")

    def _begin(self, mailbox: str, reason: Literal["migration", "ews_disabled"]) -> None:
        task = asyncio.create_task(self._move(mailbox, reason), name=f"migration-move-{self.tenant}")
        self._moves[mailbox] = task
        self.stats.moving = len(self._moves)
        task.add_done_callback(lambda done: self._moved(mailbox, done))

    def _moved(self, mailbox: str, task: asyncio.Task[None]) -> None:
        if self._moves.get(mailbox) is task:
            del self._moves[mailbox]
        self.stats.moving = len(self._moves)
        if not task.cancelled() and task.exception() is not None:
            log.error("migration_move_crashed", tenant=self.tenant, mailbox=mailbox,
                      error=type(task.exception()).__name__)

    async def _move(self, mailbox: str, reason: Literal["migration", "ews_disabled"]) -> None:
        log.info("migration_move_started", tenant=self.tenant, mailbox=mailbox, reason=reason)
        await self.graph.watch(mailbox, self._folders.get(mailbox, frozenset({"Inbox"})))
        # A mailbox EWS refuses has nothing to lose by waiting: it stays on Graph however long Graph takes.
        deadline = self._clock.monotonic() + LIVE_TIMEOUT_SECONDS if reason == "migration" else None
        while not self.graph.live(mailbox):
            if deadline is not None and self._clock.monotonic() > deadline:
                self.stats.stalled += 1
                log.warning("migration_move_stalled", tenant=self.tenant, mailbox=mailbox,
                            waited_seconds=LIVE_TIMEOUT_SECONDS)
                await self.graph.unwatch(mailbox)
                if mailbox in self._folders:
                    self._queue[mailbox] = None
                    self._set_pending()
                    self._wanted.set()
                return
            await self._clock.sleep(LIVE_POLL_SECONDS)
        # Recorded before EWS lets go: if the write fails, EWS still watches and the write is tried again.
        while True:
            try:
                await self._store.set_mailbox_backend(mailbox, Backend.GRAPH)
                break
            except Exception as exc:
                log.warning("migration_store_failed", tenant=self.tenant, error=type(exc).__name__,
                            retry_in=STORE_RETRY_SECONDS)
                await self._clock.sleep(STORE_RETRY_SECONDS)
        self._on[mailbox] = Backend.GRAPH
        await self.ews.unwatch(mailbox)
        self.stats.moved += 1
        log.info("migration_moved", tenant=self.tenant, mailbox=mailbox, reason=reason, moved=self.stats.moved,
                 pending=len(self._queue))

    # --- MailDetails -----------------------------------------------------------------------------------------

    async def item_details(self, mailbox: str, item_ids: Sequence[str]) -> Mapping[str, ItemDetails]:
        if self._on.get(mailbox) is Backend.GRAPH:
            return await self.graph.item_details(mailbox, item_ids)
        # the ids were handed on in Graph's form (see rest_id_sink): EWS wants its own back
        wanted = {ews_id(i): i for i in item_ids}
        found = await self.ews.item_details(mailbox, list(wanted))
        return {wanted.get(i, rest_id(i)): details for i, details in found.items()}

    async def unread_count(self, mailbox: str) -> int | None:
        if self._on.get(mailbox) is Backend.GRAPH:
            return await self.graph.unread_count(mailbox)
        return await self.ews.unread_count(mailbox)
