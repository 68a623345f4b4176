"""A world for Graph tests: the mock Graph (with one registered app), the mock APNs, and configs for nodes whose
only tenant, example.com, is on Exchange Online through that mock."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bemsmail.app import Node
from bemsmail.config import Config, load_config
from bemsmail.core.model import DeviceSettings, Platform, RegistrationInput
from bemsmail.devconfig import MOCK_GRAPH_CLIENT_ID, MOCK_GRAPH_TENANT_ID, use_mock_graph
from bemsmail.mocks.apns import MockApns
from bemsmail.mocks.graph import GraphApp, MockGraph
from bemsmail.mocks.tls import ensure_test_pki
from bemsmail.sources.graph.source import GraphSource
from tests.support import IOS_APP, IOS_TOKEN, dev_config_with_apns_key, free_port, until

ALICE = "alice@example.com"
TENANT_ID = MOCK_GRAPH_TENANT_ID
CLIENT_ID = MOCK_GRAPH_CLIENT_ID


@dataclass
class GraphWorld:
    path: Path
    graph: MockGraph
    apns: MockApns
    port: int
    secret: str

    def config(self, env: Mapping[str, str] | None = None, port: int | None = None) -> Config:
        """A node config; every node of one world listens on the same port, as the notification URL names it."""
        endpoint = {"host": "127.0.0.1", "port": self.apns.port, "ca_file": str(self.apns.ca_file)}
        return load_config(self.path, {
            "BEMSMAIL_SERVER__PORT": str(port or self.port),
            "BEMSMAIL_APNS__APPS__0__ENDPOINT": json.dumps(endpoint),
            "BEMSMAIL_RELAY__COALESCE_SECONDS": "0",
            "BEMSMAIL_SERVER__SHUTDOWN_GRACE_SECONDS": "1",
            **(env or {}),
        })

    def pushes(self) -> list[Any]:
        return [r for r in self.apns.recent() if r.status == 200]


@contextlib.asynccontextmanager
async def graph_world(tmp_path: Path, **mock_options: Any) -> AsyncIterator[GraphWorld]:
    path = tmp_path / "bemsmail.toml"
    topic, keys = dev_config_with_apns_key(path)
    pki = ensure_test_pki(tmp_path / "pki")
    port = free_port()
    graph = MockGraph(pki, [], **{"retry_seconds": 0.2, **mock_options})
    async with graph, MockApns(pki, topics=[topic], keys=keys, control_port=None) as apns:
        secret = secrets.token_urlsafe(24)
        use_mock_graph(path, secret=secret, notification_url=f"http://127.0.0.1:{port}", authority=graph.url,
                       graph_url=graph.graph_url, ca_file=graph.ca_file)
        graph.apps[CLIENT_ID] = GraphApp(TENANT_ID, CLIENT_ID, secret)
        yield GraphWorld(path, graph, apns, port, secret)


@contextlib.asynccontextmanager
async def alice_watched(world: GraphWorld) -> AsyncIterator[GraphSource]:
    """The Graph source of a node with Alice's iPhone registered, her Inbox subscribed and its baseline delta round
    done."""
    node = await started(world.config())
    try:
        source = source_of(node)
        await register(node)
        await until(lambda: source.subscribed() == 1 and source.stats.catch_ups == 1, "Alice subscribed")
        yield source
    finally:
        await node.stop()


async def started(config: Config) -> Node:
    node = Node(config, migrate_schema=True)
    await node.start()
    return node


def source_of(node: Node) -> GraphSource:
    [source] = node.sources.values()
    assert isinstance(source, GraphSource)
    return source


async def register(node: Node, mailbox: str = ALICE, device: str = "iphone", token: str = IOS_TOKEN,
                   **settings: Any) -> str:
    data = RegistrationInput(mailbox=mailbox, device_id=device, platform=Platform.IOS, token=token, app_id=IOS_APP,
                             settings=DeviceSettings(**settings))
    return (await node.service.register(data)).registration.id

