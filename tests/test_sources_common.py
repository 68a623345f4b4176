"""The event pump every source shares: what was queued is handed on before it stops."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from bemsmail.core.model import EventKind, MailboxEvent
from bemsmail.sources.common import EventPump


async def test_stopping_hands_on_every_queued_event_first() -> None:
    handed: list[str] = []

    async def slow_sink(event: MailboxEvent) -> None:
        await asyncio.sleep(0.01)
        handed.append(event.item_id)

    pump = EventPump(slow_sink, size=100, workers=2, name="test")
    pump.start()
    for n in range(20):
        assert pump.offer(MailboxEvent("a@example.com", "Inbox", f"item-{n}", EventKind.NEW_MAIL,
                                       datetime.now(UTC)))
    await pump.stop()
    assert sorted(handed) == sorted(f"item-{n}" for n in range(20))


async def test_a_stalled_sink_does_not_hold_the_stop_past_its_deadline() -> None:
    async def stalled(_event: MailboxEvent) -> None:
        await asyncio.Event().wait()

    pump = EventPump(stalled, size=10, workers=1, name="test")
    pump.start()
    pump.offer(MailboxEvent("a@example.com", "Inbox", "x", EventKind.NEW_MAIL, datetime.now(UTC)))
    async with asyncio.timeout(5):
        await pump.stop(drain_seconds=0.05)  # returns: the worker is cancelled after the deadline
    assert all(task.cancelled() for task in pump._tasks)
