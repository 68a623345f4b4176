"""Group commit: concurrent callers' writes are collected while the previous batch is in the database and then
written together in one transaction, so a burst costs a few round trips and one commit instead of one each."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

class Batcher(Generic[T, R]):
    """Runs `run_batch` on everything submitted while the previous batch ran; one batch in flight at a time.

    No timer: an idle system writes a lone item at once; a busy one naturally batches more."""

    def __init__(self, run_batch: Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]],
                 max_batch: int = 200) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._worker is None:
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    outcomes = await self._run_batch([item for item, _ in batch])
                except BaseException as exc:  # the whole batch failed: every caller sees why
                    outcomes = [exc] * len(batch)
                    if isinstance(exc, asyncio.CancelledError):
                        for _, future in batch + self._pending:
                            future.cancel()
                        raise
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():  # the caller went away (client disconnected); its write still happened
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._worker = None

    async def close(self) -> None:
        """Wait for writes already submitted."""
        if self._worker is not None:
            await asyncio.shield(self._worker)
