"""What every mail source needs between its protocol and the relay: a bounded event queue drained by workers, and
folder states written back in batches."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import structlog

from bemsmail.core.model import Backend, FolderState, MailboxEvent

log = structlog.get_logger(__name__)

EventSink = Callable[[MailboxEvent], Awaitable[None]]
DRAIN_SECONDS = 10.0


class StateStore(Protocol):
    async def folder_states(self, backend: Backend, mailboxes: Sequence[str]) -> dict[tuple[str, str], FolderState]:
        ...

    async def save_folder_states(self, backend: Backend, states: Sequence[FolderState]) -> None: ...

    async def delete_folder_states(self, backend: Backend, mailbox: str) -> None: ...


class EventPump:
    """Events from a source's protocol tasks, handed to the relay by `workers` tasks: enough of them for the relay
    to batch its registration reads, and a bound so that a stalled relay shows as refusals, not as memory."""

    def __init__(self, sink: EventSink, *, size: int, workers: int, name: str) -> None:
        self._sink = sink
        self._queue: asyncio.Queue[MailboxEvent] = asyncio.Queue(size)
        self._workers = workers
        self._name = name
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"{self._name}-events") for _ in range(self._workers)]

    async def stop(self, drain_seconds: float = DRAIN_SECONDS) -> None:
        """Hand on what is queued first (within `drain_seconds`): the source has already recorded these items
        as seen, so an event dropped here would never come back."""
        if self._tasks:
            try:
                await asyncio.wait_for(self._queue.join(), drain_seconds)
            except TimeoutError:
                log.warning("source_events_not_drained", source=self._name, left=self._queue.qsize())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def offer(self, event: MailboxEvent) -> bool:
        """Queue an event; False when the queue is full."""
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            return False
        return True

    async def put(self, event: MailboxEvent) -> None:
        await self._queue.put(event)

    def room(self) -> int:
        return self._queue.maxsize - self._queue.qsize()

    def pending(self) -> int:
        return self._queue.qsize()

    async def _work(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._sink(event)
            except Exception:
                log.exception("source_event_failed", source=self._name)
            finally:
                self._queue.task_done()


class StateWriter:
    """Folder states changed since the last write, saved together every `interval` seconds (and at stop)."""

    def __init__(self, store: StateStore, backend: Backend, interval: float) -> None:
        self._store = store
        self._backend = backend
        self._interval = interval
        self._dirty: dict[tuple[str, str], FolderState] = {}
        self._task: asyncio.Task[None] | None = None

    def changed(self, state: FolderState) -> None:
        self._dirty[(state.mailbox, state.folder)] = state

    def forget(self, mailbox: str) -> None:
        for key in [k for k in self._dirty if k[0] == mailbox]:
            del self._dirty[key]

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"{self._backend.value}-state-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> None:
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, {}
        try:
            await self._store.save_folder_states(self._backend, list(dirty.values()))
        except Exception:
            log.exception("source_state_save_failed", backend=self._backend.value)
            for key, state in dirty.items():
                self._dirty.setdefault(key, state)
