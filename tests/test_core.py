"""The pure core: settings validation, tenant lookup, the fake clock and the in-process bus."""

from __future__ import annotations

import asyncio
from datetime import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from bemsmail.cluster.memory import InProcessBus, OwnsEverything
from bemsmail.core.clock import FakeClock
from bemsmail.core.model import Backend, DeviceSettings, QuietHours, normalize_mailbox, token_fingerprint
from bemsmail.core.tenants import Tenant, TenantDirectory


def test_settings_defaults_are_inbox_minimal_content() -> None:
    s = DeviceSettings()
    assert s.folders == ("Inbox",) and s.content == "minimal" and s.new_mail and s.calendar and s.badge


def test_settings_refuse_unknown_keys_and_bad_vips() -> None:
    with pytest.raises(ValidationError):
        DeviceSettings.model_validate({"colour": "red"})
    with pytest.raises(ValidationError):
        DeviceSettings.model_validate({"vip_senders": ["no-at-sign"]})
    assert DeviceSettings.model_validate({"vip_senders": ["Boss@Example.COM"]}).vip_senders == ("boss@example.com",)


def test_quiet_hours_may_cross_midnight_but_not_be_empty() -> None:
    q = QuietHours(start=time(22), end=time(7))
    assert q.start > q.end
    with pytest.raises(ValidationError):
        QuietHours(start=time(7), end=time(7))


@given(st.emails())
def test_mailbox_identity_is_lowercase_and_trimmed(address: str) -> None:
    once = normalize_mailbox(f"  {address.upper()} ")
    assert once == normalize_mailbox(once) == address.strip().lower()


def test_token_fingerprint_is_stable_and_not_the_token() -> None:
    token = "ab" * 32
    assert token_fingerprint(token) == token_fingerprint(token)
    assert token not in token_fingerprint(token) and len(token_fingerprint(token)) == 64


def test_tenant_directory_by_exact_domain() -> None:
    directory = TenantDirectory([Tenant("onprem", Backend.EWS, ("example.com",)),
                                 Tenant("cloud", Backend.GRAPH, ("corp.onmicrosoft.com",))])
    assert directory.resolve("alice@Example.com").name == "onprem"  # type: ignore[union-attr]
    assert directory.resolve("bob@corp.onmicrosoft.com").backend is Backend.GRAPH  # type: ignore[union-attr]
    assert directory.resolve("eve@sub.example.com") is None
    assert directory.resolve("nobody") is None


async def test_fake_clock_wakes_sleepers_in_order() -> None:
    clock = FakeClock()
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(f"{name}@{clock.monotonic():g}")

    tasks = [asyncio.create_task(sleeper("b", 5)), asyncio.create_task(sleeper("a", 2))]
    await asyncio.sleep(0)
    start = clock.now()
    await clock.advance(3)
    assert woke == ["a@2"]
    await clock.advance(10)
    assert woke == ["a@2", "b@5"]
    assert (clock.now() - start).total_seconds() == 13
    await asyncio.gather(*tasks)


async def test_bus_delivers_to_every_handler_even_if_one_fails() -> None:
    bus = InProcessBus()
    got: list[object] = []

    async def broken(message: object) -> None:
        raise RuntimeError("boom")

    async def good(message: object) -> None:
        got.append(message)

    bus.subscribe("t", broken)
    bus.subscribe("t", good)
    await bus.publish("t", "hello")
    await bus.publish("other", "ignored")
    assert got == ["hello"]
    assert OwnsEverything().owns("anyone@example.com")


def test_folder_state_remembers_what_was_handed_on_in_the_last_second() -> None:
    from datetime import UTC, datetime, timedelta

    from bemsmail.core.model import FolderState

    t = datetime(2026, 3, 1, 12, 0, 5, tzinfo=UTC)
    state = FolderState("a@example.com", "Inbox").after("one", t).after("two", t)
    assert state.seen_through == t and state.seen_ids == ("one", "two")
    assert state.handed_on("one", t) and not state.handed_on("three", t)  # same second, another item: new
    assert state.handed_on("old", t - timedelta(seconds=1)) and not state.handed_on("new", t + timedelta(seconds=1))
    later = state.after("three", t + timedelta(seconds=1))
    assert later.seen_ids == ("three",)
    assert later.after("one", t) is later  # an older sighting changes nothing
