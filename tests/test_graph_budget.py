"""The sliding-window write budget and the renewal spread, on a clock that moves only when told to."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta

from bemsmail.config import GraphConfig
from bemsmail.core.clock import FakeClock
from bemsmail.sources.graph.budget import WindowBudget


def max_in_window(stamps: list[float], window: float) -> int:
    stamps = sorted(stamps)
    best, start = 0, 0
    for end, at in enumerate(stamps):
        while stamps[start] <= at - window:
            start += 1
        best = max(best, end - start + 1)
    return best


async def spend(budget: WindowBudget, clock: FakeClock, count: int, stamps: list[float]) -> None:
    for _ in range(count):
        await budget.acquire()
        stamps.append(clock.monotonic())


async def test_no_window_holds_more_than_the_limit_however_many_ask_at_once() -> None:
    clock = FakeClock()
    budget = WindowBudget(50, 20.0, clock)
    stamps: list[float] = []
    workers = [asyncio.create_task(spend(budget, clock, 40, stamps)) for _ in range(8)]  # 320 writes
    while not all(w.done() for w in workers):
        await clock.advance(0.5)
    assert len(stamps) == 320
    assert max_in_window(stamps, 20.0) == 50  # the budget is used, and never exceeded
    assert stamps[-1] >= 20.0 * (320 // 50)  # 320 writes need six full windows after the first
    assert budget.used() <= 50


async def test_a_pause_holds_every_write_until_it_ends() -> None:
    clock = FakeClock()
    budget = WindowBudget(10, 20.0, clock)
    stamps: list[float] = []
    await spend(budget, clock, 1, stamps)
    budget.pause(30.0)  # a 429 with Retry-After: 30
    task = asyncio.create_task(spend(budget, clock, 3, stamps))
    while not task.done():
        await clock.advance(1.0)
    assert stamps[0] == 0.0
    assert all(at >= 30.0 for at in stamps[1:])


def graph_config(**overrides: object) -> GraphConfig:
    return GraphConfig.model_validate({
        "tenant_id": "t", "client_id": "c", "client_secret": "s", "notification_url": "https://hooks.example.com",
        **overrides})


async def test_renewals_of_subscriptions_made_together_are_spread_over_the_window() -> None:
    from bemsmail.sources.graph.source import GraphSource

    clock = FakeClock()
    settings = graph_config(subscription_minutes=10_070, renew_before_minutes=1440, renew_spread_minutes=1440)
    source = GraphSource(settings, store=None, clock=clock, sink=None)  # type: ignore[arg-type]
    random.seed(7)
    expires = clock.now() + timedelta(minutes=10_070)
    delays = [source.renewal_delay(expires) for _ in range(100_000)]
    lifetime = 10_070 * 60
    assert all(lifetime - 2880 * 60 <= d <= lifetime - 1440 * 60 for d in delays)
    # 100,000 made at once fall due over a day: the busiest 20 s hold far fewer than Graph's 1,000 writes
    assert max_in_window(delays, 20.0) < 100
    await source.client.close()


def test_renewal_window_must_fit_in_the_lifetime() -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="renew_before_minutes"):
        graph_config(subscription_minutes=60, renew_before_minutes=30, renew_spread_minutes=30)
    with pytest.raises(ValidationError, match="10070"):
        graph_config(subscription_minutes=10_080)
