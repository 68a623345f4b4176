"""Group commit: a lone write goes at once, what arrives while a batch is in the database goes together in the
next, and each caller gets its own item's outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from bemsmail.store.batching import Batcher


class HeldDatabase:
    """A run_batch whose batches stay "in the database" until released, recording what each batch held."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gates: list[asyncio.Event] = []
        self.running = 0
        self.most_running = 0

    async def run(self, items: Sequence[str]) -> list[str | BaseException]:
        self.batches.append(list(items))
        gate = asyncio.Event()
        self.gates.append(gate)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await gate.wait()
        finally:
            self.running -= 1
        return [ValueError(item) if item.startswith("bad") else item.upper() for item in items]

    async def release(self, index: int) -> None:
        for _ in range(5):
            if len(self.gates) > index:
                break
            await asyncio.sleep(0)  # let the batch the test expects reach the database
        self.gates[index].set()
        for _ in range(5):
            await asyncio.sleep(0)


async def test_a_lone_item_goes_at_once_and_what_arrives_meanwhile_goes_together() -> None:
    db = HeldDatabase()
    batcher: Batcher[str, str] = Batcher(db.run, max_batch=2)
    first = asyncio.create_task(batcher.submit("a"))
    await asyncio.sleep(0)
    later = [asyncio.create_task(batcher.submit(x)) for x in ("b", "c", "d")]
    for index in range(3):
        await db.release(index)
    assert [await first, *[await t for t in later]] == ["A", "B", "C", "D"]
    assert db.batches == [["a"], ["b", "c"], ["d"]]  # in order, at most max_batch at a time
    assert db.most_running == 1


async def test_a_failed_item_fails_its_caller_only_and_close_waits_for_the_writes() -> None:
    db = HeldDatabase()
    batcher: Batcher[str, str] = Batcher(db.run)
    first = asyncio.create_task(batcher.submit("first"))
    await asyncio.sleep(0)
    good = asyncio.create_task(batcher.submit("ok"))
    bad = asyncio.create_task(batcher.submit("bad"))
    await asyncio.sleep(0)
    closing = asyncio.create_task(batcher.close())
    await db.release(0)
    assert not closing.done()  # the second batch is still in the database
    await db.release(1)
    await closing
    assert (await first, await good) == ("FIRST", "OK")
    with pytest.raises(ValueError, match="bad"):
        await bad


async def test_a_batch_that_raises_fails_every_caller_in_it_and_the_next_batch_still_runs() -> None:
    calls: list[list[str]] = []

    async def flaky(items: Sequence[str]) -> list[str | BaseException]:
        calls.append(list(items))
        if len(calls) == 1:
            raise ConnectionError("database gone")
        return [item.upper() for item in items]

    batcher: Batcher[str, str] = Batcher(flaky)
    results = await asyncio.gather(batcher.submit("a"), batcher.submit("b"), return_exceptions=True)
    assert calls == [["a", "b"]]
    assert all(isinstance(r, ConnectionError) for r in results)
    assert await batcher.submit("c") == "C"  # the failure did not wedge the batcher
