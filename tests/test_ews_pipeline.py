"""A whole node against the mock Exchange and the mock APNs: a registration starts a watch within seconds, new
mail becomes a push, removing the last device stops the watch, and a node restart loses nothing."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bemsmail.app import Node
from bemsmail.config import Config, load_config
from bemsmail.core.model import Platform, RegistrationInput
from bemsmail.devconfig import MOCK_EWS_URL
from bemsmail.mocks.apns import MockApns
from bemsmail.mocks.ews import MockExchange
from bemsmail.mocks.tls import ensure_test_pki
from tests.support import IOS_APP, IOS_TOKEN, dev_config_with_apns_key, free_port, until

ALICE = "alice@example.com"


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[Callable[[], Config], MockExchange, MockApns]]:
    path = tmp_path / "bemsmail.toml"
    topic, keys = dev_config_with_apns_key(path)
    password = (tmp_path / "secrets" / "ews-password").read_text().strip()
    pki = ensure_test_pki(tmp_path / "pki")
    async with MockExchange(auth="basic", users={"svc-bemsmail@example.com": password}, heartbeat_seconds=0.5) as ews, \
            MockApns(pki, topics=[topic], keys=keys, control_port=None) as apns:
        endpoint = {"host": "127.0.0.1", "port": apns.port, "ca_file": str(apns.ca_file)}

        def config() -> Config:
            return load_config(path, {
                "BEMSMAIL_SERVER__PORT": str(free_port()),
                "BEMSMAIL_TENANTS__0__EWS__URL": ews.ews_url,
                "BEMSMAIL_APNS__APPS__0__ENDPOINT": json.dumps(endpoint),
                "BEMSMAIL_RELAY__COALESCE_SECONDS": "0",
                "BEMSMAIL_SERVER__SHUTDOWN_GRACE_SECONDS": "1",
            })

        yield config, ews, apns


async def started(config: Config) -> Node:
    node = Node(config, migrate_schema=True)
    await node.start()
    return node


async def register(node: Node, device: str = "iphone", token: str = IOS_TOKEN) -> str:
    data = RegistrationInput(mailbox=ALICE, device_id=device, platform=Platform.IOS, token=token, app_id=IOS_APP)
    return (await node.service.register(data)).registration.id


def pushes_for(apns: MockApns) -> list[Any]:
    return [r for r in apns.recent() if r.status == 200]


async def test_register_watch_mail_push_unregister(world: tuple[Callable[[], Config], MockExchange, MockApns]
                                                   ) -> None:
    config, ews, apns = world
    node = await started(config())
    try:
        [source] = node.sources.values()
        registration = await register(node)
        await until(lambda: source.subscribed() == 1 and source.streaming_groups() == 1, "the mailbox watched")
        await until(lambda: source.stats.catch_ups == 1, "its first sync")
        ews.create_mail(ALICE, subject="Quarterly numbers")
        await until(lambda: len(pushes_for(apns)) == 1, "the push")
        [push] = pushes_for(apns)
        assert push.token == IOS_TOKEN and push.payload["aps"]["badge"] == 1
        assert "Quarterly" not in json.dumps(push.payload)  # content-free by default
        scrape = node.metrics.render().decode()
        assert 'bemsmail_ews_subscriptions{tenant="example"} 1.0' in scrape
        assert 'bemsmail_ews_groups{state="streaming",tenant="example"} 1.0' in scrape
        assert ALICE not in scrape and IOS_TOKEN not in scrape
        [subscription_id] = list(source._by_subscription)
        await node.service.delete(registration)
        await until(lambda: not ews.subscription(subscription_id).alive, "the last device gone: unsubscribed")
        assert source.subscribed() == 0
    finally:
        await node.stop()


async def test_mail_during_a_restart_is_pushed_once(world: tuple[Callable[[], Config], MockExchange, MockApns]
                                                    ) -> None:
    config, ews, apns = world
    node = await started(config())
    [source] = node.sources.values()
    await register(node)
    await until(lambda: source.subscribed() == 1 and source.stats.catch_ups == 1, "watched and synced")
    ews.create_mail(ALICE, subject="before")
    await until(lambda: len(pushes_for(apns)) == 1, "the first push")
    await node.stop()

    ews.create_mail(ALICE, subject="while the node was down")
    node = await started(config())
    try:
        [source] = node.sources.values()
        await until(lambda: source.stats.catch_ups >= 1, "the catch-up after the restart")
        await until(lambda: len(pushes_for(apns)) == 2, "the missed mail pushed")
        await asyncio.sleep(0.5)  # anything re-sent would have arrived by now; this is not a timing assertion
        assert len(pushes_for(apns)) == 2
    finally:
        await node.stop()


async def test_check_config_connect_reaches_each_ews_tenant(
        world: tuple[Callable[[], Config], MockExchange, MockApns], tmp_path: Path) -> None:
    import os
    import sys

    from bemsmail.store.engine import create_engine
    from bemsmail.store.schema import migrate

    config, ews, _ = world
    engine = create_engine(config().database)
    await migrate(engine)
    await engine.dispose()

    async def check(config_file: str = "bemsmail.toml", **env: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bemsmail", "check-config", "--config", str(tmp_path / config_file),
            "--connect", "--mailbox", ALICE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **({"BEMSMAIL_TENANTS__0__EWS__URL": ews.ews_url} if config_file == "bemsmail.toml"
                                  else {}), **{k: v for k, v in env.items() if v}})
        out, _ = await process.communicate()
        return process.returncode or 0, out.decode()

    code, out = await check()
    assert code == 0, out
    assert f"EWS reachable at {ews.ews_url}" in out and "0 unread" in out
    text = (tmp_path / "bemsmail.toml").read_text()
    (tmp_path / "discover.toml").write_text(
        re.sub(f'(?m)^url = "{re.escape(MOCK_EWS_URL)}"$', f'autodiscover_url = "{ews.autodiscover_url}"', text))
    code, out = await check("discover.toml", BEMSMAIL_TENANTS__0__EWS__URL="")
    assert code == 0, out
    assert "autodiscover: " in out and ews.grouping(ALICE) in out
    (tmp_path / "wrong").write_text("not-the-password")
    code, out = await check(BEMSMAIL_TENANTS__0__EWS__PASSWORD_FILE=str(tmp_path / "wrong"))
    assert code != 0 and "EWS call for alice@example.com failed" in out
    assert "not-the-password" not in out
