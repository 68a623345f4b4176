"""Watch: which mailboxes this node watches and with which folders, kept in step with their registrations.

The first registration of a mailbox starts watching it, the last one leaving stops it, and a device asking for
other folders changes what is watched. Changes arriving together are settled once per mailbox, so a burst of
registrations costs one read per mailbox, not one per registration.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Protocol

import structlog

from bemsmail.core.model import Registration, RegistrationChanged
from bemsmail.core.ports import Bus, Clock, MailSource, Ownership
from bemsmail.core.registrations import REGISTRATION_TOPIC
from bemsmail.core.tenants import TenantDirectory

log = structlog.get_logger(__name__)

START_PAGE = 2000


class WatchStore(Protocol):
    async def list_registrations(self, mailbox: str) -> Sequence[Registration]: ...

    async def watched_mailboxes(self, after: str | None, limit: int) -> Sequence[tuple[str, frozenset[str]]]: ...


def folders_of(registrations: Sequence[Registration]) -> frozenset[str]:
    """The folders a mailbox must be watched in: every folder any of its devices asks for."""
    return frozenset(name for r in registrations for name in r.settings.folders)


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
        if isinstance(message, RegistrationChanged):
            self._pending[message.mailbox] = None
            self._wake.set()

    async def _settle_loop(self) -> None:
        while True:
            await self._wake.wait()
            await self._clock.sleep(self._settle)
            self._wake.clear()
            batch, self._pending = list(self._pending), {}
            self.busy = True
            for mailbox in batch:
                try:
                    await self.refresh(mailbox)
                except Exception:  # one mailbox's failure (store down) must not stop the others; retried later
                    log.exception("watch_refresh_failed")
                    self._pending[mailbox] = None
                    self._wake.set()
            self.busy = False
            if self._wake.is_set():
                await self._clock.sleep(1.0)  # back off before retrying failures

    async def refresh(self, mailbox: str) -> None:
        """Bring one mailbox's watch in line with its registrations now."""
        await self._apply(mailbox, folders_of(await self._store.list_registrations(mailbox)))

    async def _apply(self, mailbox: str, folders: frozenset[str]) -> None:
        tenant = self._tenants.resolve(mailbox)
        source = self._sources.get(tenant.name) if tenant is not None else None
        current = self._watched.get(mailbox)
        if not folders or source is None or not self._ownership.owns(mailbox):
            if current is not None:
                del self._watched[mailbox]
                if source is not None:
                    await source.unwatch(mailbox)
            return
        if current == folders:
            return
        folders = self._interned.setdefault(folders, folders)
        self._watched[mailbox] = folders
        await source.watch(mailbox, folders)
