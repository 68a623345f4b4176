"""Test support: a development config with real generated credentials, and a running API on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from bemsmail.app import Node
from bemsmail.config import Config, load_config
from bemsmail.devconfig import write_dev_config
from bemsmail.devservices import free_port
from bemsmail.mocks.apns import ProviderKey, load_provider_key

IOS_APP = "com.example.mail"
ANDROID_APP = "com.example.mail.android"
IOS_TOKEN = "ab" * 32
ANDROID_TOKEN = "fcm-token-" + "x" * 40 + ":APA91b" + "y" * 60


async def until(condition: Callable[[], bool | Awaitable[bool]], what: str = "the condition",
                within: float = 20.0) -> None:
    """Poll a condition the mocks, the store or the node reach on their own (they have no event for each);
    `within` bounds the wait and is never a timing assertion."""
    try:
        async with asyncio.timeout(within):
            while True:
                result = condition()
                if not isinstance(result, bool):
                    result = await result
                if result:
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"waited {within:g} s for {what}") from None


def dev_config_with_apns_key(path: Path) -> tuple[str, list[ProviderKey]]:
    """Write a development config at `path`; the topic of its APNs app and the key a mock APNs must accept."""
    write_dev_config(path)
    app = load_config(path, {}).apns.apps[0]
    assert app.key_file is not None and app.key_id and app.team_id
    return app.topic, [load_provider_key(app.key_id, app.team_id, app.key_file)]


def dev_config(tmp_path: Path, db_url: str | None = None, env: Mapping[str, str] | None = None) -> tuple[Config, str]:
    """A valid config (tenant example.com, one APNs and one FCM app) and its API key."""
    path = tmp_path / "bemsmail.toml"
    key = write_dev_config(path)
    environ = {"BEMSMAIL_SERVER__PORT": str(free_port())}
    if db_url:
        environ["BEMSMAIL_DATABASE__URL"] = db_url
    environ.update(env or {})
    return load_config(path, environ), key


@dataclass
class Api:
    client: TestClient  # type: ignore[type-arg]
    node: Node
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key}


@contextlib.asynccontextmanager
async def running_api(config: Config, key: str, migrate: bool = True) -> AsyncIterator[Api]:
    """The real composition root's API served on a loopback socket, without the listener of `Node.start`."""
    from bemsmail.store.schema import migrate as run_migrations

    node = Node(config)
    if migrate:
        await run_migrations(node.store.engine)
    await node.authenticator.start()
    app = node.build_api()
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield Api(client, node, key)
    finally:
        await client.close()
        await node.stop()


def registration(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "mailbox": "Alice@Example.com",
        "device_id": "iphone-1",
        "platform": "ios",
        "token": IOS_TOKEN,
        "app_id": IOS_APP,
    }
    body.update(overrides)
    return body
