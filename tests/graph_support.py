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
from bemsmail.devconfig import write_dev_config
from bemsmail.mocks.apns import MockApns, load_provider_key
from bemsmail.mocks.graph import GraphApp, MockGraph
from bemsmail.mocks.tls import ensure_test_pki
from bemsmail.sources.graph.source import GraphSource
from tests.support import IOS_APP, IOS_TOKEN, free_port

ALICE = "alice@example.com"
TENANT_ID = "7d1d5a54-0000-4000-8000-00000000c0de"
CLIENT_ID = "0c7e11a5-0000-4000-8000-0000000b3a55"


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


def _graph_tenant(path: Path, graph: MockGraph, port: int) -> str:
    """Rewrite the dev config's example tenant from EWS to Graph; returns the client secret."""
    secret = secrets.token_urlsafe(24)
    secret_file = path.parent / "secrets" / "graph-client-secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    text = path.read_text()
    start = text.index('backend = "ews"')
    end = text.index("\n[[apns.apps]]")
    path.write_text(text[:start] + f'''backend = "graph"

[tenants.graph]
tenant_id = "{TENANT_ID}"
client_id = "{CLIENT_ID}"
client_secret_file = "{secret_file}"
notification_url = "http://127.0.0.1:{port}"
authority = "{graph.url}"
graph_url = "{graph.graph_url}"
ca_file = "{graph.ca_file}"
''' + text[end:])
    return secret


@contextlib.asynccontextmanager
async def graph_world(tmp_path: Path, **mock_options: Any) -> AsyncIterator[GraphWorld]:
    path = tmp_path / "bemsmail.toml"
    write_dev_config(path)
    app = load_config(path, {}).apns.apps[0]
    assert app.key_file is not None and app.key_id and app.team_id
    keys = [load_provider_key(app.key_id, app.team_id, app.key_file)]
    pki = ensure_test_pki(tmp_path / "pki")
    port = free_port()
    graph = MockGraph(pki, [], **{"retry_seconds": 0.2, **mock_options})
    async with graph, MockApns(pki, topics=[app.topic], keys=keys, control_port=None) as apns:
        secret = _graph_tenant(path, graph, port)
        graph.apps[CLIENT_ID] = GraphApp(TENANT_ID, CLIENT_ID, secret)
        yield GraphWorld(path, graph, apns, port, secret)


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

