"""A sliding-window request budget: at most `limit` requests in any `window` seconds, with a pause when the server
says so (429 Retry-After). Graph counts /subscriptions writes per app per tenant in 20-second windows."""

from __future__ import annotations

import asyncio
from collections import deque

from bemsmail.core.ports import Clock


class WindowBudget:
    def __init__(self, limit: int, window: float, clock: Clock) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._spent: deque[float] = deque()
        self._paused_until = 0.0
        self._lock = asyncio.Lock()  # first come, first served

    def used(self) -> int:
        """Requests spent in the current window."""
        self._forget(self._clock.monotonic())
        return len(self._spent)

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, self._clock.monotonic() + seconds)

    def _forget(self, now: float) -> None:
        while self._spent and self._spent[0] <= now - self.window:
            self._spent.popleft()

    async def acquire(self) -> None:
        """Wait until one more request fits, and count it."""
        async with self._lock:
            while True:
                now = self._clock.monotonic()
                self._forget(now)
                wait = self._paused_until - now
                if wait <= 0 and len(self._spent) < self.limit:
                    self._spent.append(now)
                    return
                if wait <= 0:
                    wait = self._spent[0] + self.window - now
                await self._clock.sleep(max(wait, 0.001))
