"""Watch: which mailboxes this node watches and with which folders, kept in step with their registrations.

The first registration of a mailbox starts watching it, the last one leaving stops it, and a device asking for
other folders changes what is watched. Changes arriving together are settled once per mailbox, so a burst of
registrations costs one read for them all, not one per registration.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Protocol

import structlog

from bemsmail.core.model import RegistrationChanged
from bemsmail.core.ports import Bus, Clock, MailSource, Ownership
from bemsmail.core.registrations import REGISTRATION_TOPIC
from bemsmail.core.tenants import TenantDirectory

log = structlog.get_logger(__name__)

START_PAGE = 2000


class WatchStore(Protocol):
    async def mailbox_folders(self, mailboxes: Sequence[str]) -> Mapping[str, frozenset[str]]: ...

    async def watched_mailboxes(self, after: str | None, limit: int) -> Sequence[tuple[str, frozenset[str]]]: ...


class Watcher:
    """The one home of the *watch* verb: tells each backend's MailSource what to watch."""

    def __init__(self, store: WatchStore, bus: Bus, clock: Clock, ownership: Ownership, tenants: TenantDirectory,
                 sources: Mapping[str, MailSource], settle_seconds: float = 0.2) -> None:
        """`sources`: the MailSource of each tenant, by tenant name (tenants without one are not watched)."""
        self._store = store
        self._clock = clock
        self._ownership = ownership
        self._tenants = tenants
        self._sources = sources
        self._settle = settle_seconds
        self._watched: dict[str, frozenset[str]] = {}
        self._interned: dict[frozenset[str], frozenset[str]] = {}
        self._pending: dict[str, None] = {}
        self._refreshing: set[str] = set()  # read, but their watch not yet brought in line with that read
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: settling a batch of changed mailboxes right now
        self.busy = False
        bus.subscribe(REGISTRATION_TOPIC, self._registration_changed)

    async def start(self) -> int:
        """Watch every owned mailbox that has registrations; returns how many."""
        cursor: str | None = None
        while True:
            page = await self._store.watched_mailboxes(cursor, START_PAGE)
            if not page:
                break
            for mailbox, folders in page:
                await self._apply(mailbox, folders)
            cursor = page[-1][0]
        self._task = asyncio.create_task(self._settle_loop(), name="watcher")
        log.info("watching_started", mailboxes=len(self._watched))
        return len(self._watched)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    @property
    def watched(self) -> Mapping[str, frozenset[str]]:
        return self._watched

    async def _registration_changed(self, message: object) -> None:
        if isinstance(message, RegistrationChanged) and not self._leaves_watch_as_is(message):
            self._pending[message.mailbox] = None
            self._wake.set()

    def _leaves_watch_as_is(self, change: RegistrationChanged) -> bool:
        """True when the change can neither drop a folder from the mailbox's watch (the registration asks for
        all it asked for before) nor add one (all it asks for is watched already), so re-reading is no use:
        a device re-registering with its settings unchanged, or a new device of a watched mailbox asking for
        watched folders. Deletions and changes whose folders the publisher does not know are always re-read."""
        watched = self._watched.get(change.mailbox)
        if (watched is None or change.folders is None or change.folders_before is None
                or change.mailbox in self._refreshing):  # what is watched may be about to change to a stale read
            return False
        return set(change.folders_before) <= set(change.folders) <= watched

    async def _settle_loop(self) -> None:
        while True:
            await self._wake.wait()
            await self._clock.sleep(self._settle)
            self._wake.clear()
            batch, self._pending = list(self._pending), {}
            self.busy = True
            try:
                failed = await self.refresh(batch)
            except Exception:  # the store is down: keep the whole batch for a later try
                log.exception("watch_refresh_failed", mailboxes=len(batch))
                failed = batch
            if failed:
                self._pending.update(dict.fromkeys(failed))
                self._wake.set()
            self.busy = False
            if self._wake.is_set():
                await self._clock.sleep(1.0)  # back off before retrying failures

    async def refresh(self, mailboxes: Sequence[str]) -> list[str]:
        """Bring these mailboxes' watches in line with their registrations now, in one read; returns those whose
        source failed (to retry). A mailbox neither watched nor watchable here (another node's, or a tenant
        without a source) needs no read."""
        wanted = [m for m in mailboxes if m in self._watched or self._watchable(m)]
        self._refreshing.update(wanted)
        try:
            folders = await self._store.mailbox_folders(wanted) if wanted else {}
            failed = []
            for mailbox in wanted:
                try:
                    await self._apply(mailbox, folders.get(mailbox, frozenset()))
                except Exception:  # one mailbox's source failure must not hold up the others
                    log.exception("watch_refresh_failed", mailbox=mailbox)
                    failed.append(mailbox)
                self._refreshing.discard(mailbox)
            return failed
        finally:
            self._refreshing.difference_update(wanted)

    def _source_of(self, mailbox: str) -> MailSource | None:
        """The MailSource of the mailbox's tenant, owned here or not."""
        tenant = self._tenants.resolve(mailbox)
        return self._sources.get(tenant.name) if tenant is not None else None

    def _watchable(self, mailbox: str) -> bool:
        return self._source_of(mailbox) is not None and self._ownership.owns(mailbox)

    async def _apply(self, mailbox: str, folders: frozenset[str]) -> None:
        source = self._source_of(mailbox)
        current = self._watched.get(mailbox)
        if not folders or source is None or not self._ownership.owns(mailbox):
            if current is not None:
                if source is not None:
                    await source.unwatch(mailbox)
                del self._watched[mailbox]
            return
        if current == folders:
            return
        await source.watch(mailbox, folders)  # recorded after it succeeded, so a failure is retried
        self._watched[mailbox] = self._interned.setdefault(folders, folders)
