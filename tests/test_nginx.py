"""The production reverse proxy (deploy/nginx/bemsmail.conf) on a real nginx in front of a real daemon: Graph's
handshake and notifications pass through unchanged, a whole subscription lives through it against the mock Graph,
a node that is down is skipped, every other path and method is refused by nginx without reaching the daemon, and
the daemon's allowlist sees the address nginx saw."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote_plus

import aiohttp
import pytest
from yarl import URL

from bemsmail.devservices import NGINX_SITE, Nginx, ServiceUnavailable, free_port, render_site
from bemsmail.mocks.tls import TestPki
from tests.conftest import need_service
from tests.graph_support import ALICE, graph_world, register, source_of, started
from tests.support import IOS_TOKEN, Api, dev_config, running_api, until

pytestmark = pytest.mark.service

# A real token's shape (microsoft-graph-docs #21160): spaces and colons, form-encoded with + and lower-case %3a
TOKEN = "Validation: Testing client application reachability for subscription Request-Id: 1f0e-2a <b>&</b>"
ENCODED = quote_plus(TOKEN).replace("%3A", "%3a")
NOTIFICATION = {"value": [{
    "subscriptionId": "8d1e3b6a-0000-4000-8000-000000000001", "clientState": "not-a-real-client-state",
    "changeType": "created", "resource": "Users/alice@example.com/Messages/AAMkAGI2",
    "resourceData": {"@odata.type": "#Microsoft.Graph.Message", "id": "AAMkAGI2"},
    "subscriptionExpirationDateTime": "2030-01-01T00:00:00Z", "tenantId": "7d1d5a54-0000-4000-8000-00000000c0de"}]}


def nginx_for(ports: int | list[int], pki: TestPki) -> Nginx:
    try:
        return Nginx(ports, pki.server_cert, pki.server_key)
    except ServiceUnavailable as exc:
        need_service(str(exc))
        raise


@contextlib.asynccontextmanager
async def serving(proxy: Nginx) -> AsyncIterator[Nginx]:
    """Start and stop nginx off the event loop (both block while they poll or wait)."""
    await asyncio.to_thread(proxy.__enter__)
    try:
        yield proxy
    finally:
        await asyncio.to_thread(proxy.close)


@contextlib.asynccontextmanager
async def proxied(tmp_path: Path, pki: TestPki, env: dict[str, str] | None = None) -> AsyncIterator[tuple[Api, Nginx]]:
    """A daemon (the real composition root's API on loopback) with nginx in front of it."""
    config, key = dev_config(tmp_path, env=env)
    async with running_api(config, key) as api, serving(nginx_for(api.client.server.port, pki)) as proxy:
        yield api, proxy


@contextlib.asynccontextmanager
async def client(pki: TestPki, source: str | None = None,
                 tls: ssl.TLSVersion | None = None) -> AsyncIterator[aiohttp.ClientSession]:
    """A client trusting only the test CA; `source` is the loopback address it connects from."""
    context = pki.client_context()
    if tls is not None:
        context.maximum_version = tls
    connector = aiohttp.TCPConnector(ssl=context, local_addr=(source, 0) if source else None)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


def answered(api: Api) -> dict[tuple[str, ...], float]:
    """Every request the daemon answered, by (route, method, status): what reached it."""
    return {tuple(s.labels.values()): s.value for metric in api.node.metrics.http_requests.collect()
            for s in metric.samples if s.name.endswith("_total")}


def test_every_marked_line_of_the_site_is_replaced_and_nothing_else() -> None:
    text = NGINX_SITE.read_text()
    values = {"listen": ["listen 127.0.0.1:1 ssl http2;"], "upstream": ["server 127.0.0.1:2;", "server 127.0.0.1:3;"],
              "certificate": ["ssl_certificate /t/c.pem;"], "certificate_key": ["ssl_certificate_key /t/k.pem;"]}
    rendered = render_site(text, values)
    assert "#@" not in rendered.replace('"#@name"', "")
    for production in ("listen 443", "listen [::]:443", "8443", "/etc/ssl/"):
        assert production not in rendered
    # a group is replaced in its place, at its indentation
    assert "\n    server 127.0.0.1:2;\n    server 127.0.0.1:3;\n    keepalive 32;\n" in rendered
    inserted = {line for lines in values.values() for line in lines}
    unmarked = [line for line in text.splitlines() if "#@" not in line or '"#@name"' in line]
    assert [line for line in rendered.splitlines() if line.strip() not in inserted] == unmarked
    with pytest.raises(ValueError, match="#@upstream"):
        render_site(text, {k: v for k, v in values.items() if k != "upstream"})
    with pytest.raises(ValueError, match="#@renamed"):
        render_site(text, {**values, "renamed": ["x"]})


@pytest.mark.parametrize("path", ["/notificationClient", "/notificationClient/lifecycle"])
async def test_the_handshake_passes_through_exactly(tmp_path: Path, pki: TestPki, path: str) -> None:
    async with proxied(tmp_path, pki) as (api, proxy), client(pki, tls=ssl.TLSVersion.TLSv1_2) as session:
        # as Graph sends it: POST, empty body, text/plain, TLS 1.2, the token form-encoded in the query string
        async with session.post(f"{proxy.url}{path}?validationToken={ENCODED}", data=b"",
                                headers={"Content-Type": "text/plain; charset=utf-8"}) as answer:
            assert answer.status == 200
            assert answer.content_type == "text/plain"
            assert await answer.text() == TOKEN  # exactly: nginx neither decoded nor re-encoded the query
            assert "X-Request-ID" in answer.headers  # the daemon's answer, not nginx's
        assert answered(api) == {(path, "POST", "200"): 1}


async def test_a_notification_passes_through_to_the_daemon(tmp_path: Path, pki: TestPki) -> None:
    async with proxied(tmp_path, pki) as (api, proxy), client(pki) as session:
        async with session.post(f"{proxy.url}/notificationClient", json=NOTIFICATION) as answer:
            assert answer.status == 202
            assert "X-Request-ID" in answer.headers
        lifecycle = {"value": [{"subscriptionId": "8d1e3b6a-0000-4000-8000-000000000001",
                                "lifecycleEvent": "reauthorizationRequired"}]}
        async with session.post(f"{proxy.url}/notificationClient/lifecycle", json=lifecycle) as answer:
            assert answer.status == 202
        # the daemon checked them (an unknown subscription is answered 202 and ignored); a body it refuses shows
        # that its checks, not nginx's, apply to what is forwarded
        async with session.post(f"{proxy.url}/notificationClient", data="{not json",
                                headers={"Content-Type": "application/json"}) as answer:
            assert answer.status == 400
            assert (await answer.json())["type"].endswith("malformed-json")
        # a batch larger than nginx keeps in memory goes through its temp directory (nginx as root needs
        # `user root;` for its workers to write there)
        batch = {"value": NOTIFICATION["value"] * 1000}
        async with session.post(f"{proxy.url}/notificationClient", json=batch) as answer:
            assert answer.status == 202
        assert answered(api) == {("/notificationClient", "POST", "202"): 2,
                                 ("/notificationClient/lifecycle", "POST", "202"): 1,
                                 ("/notificationClient", "POST", "400"): 1}


async def test_a_subscription_is_made_and_its_mail_pushed_through_nginx(tmp_path: Path, pki: TestPki) -> None:
    # the mock Graph validates and notifies https URLs only, trusting the CA of nginx's certificate
    async with graph_world(tmp_path, notify_ca_file=pki.ca_cert, require_https=True) as world, \
            serving(nginx_for(world.port, pki)) as proxy:
        node = await started(world.config({"BEMSMAIL_TENANTS__0__GRAPH__NOTIFICATION_URL": proxy.url}))
        try:
            source = source_of(node)
            await register(node)
            await until(lambda: source.subscribed() == 1 and source.stats.catch_ups == 1, "subscribed")
            [sub] = world.graph.subscription_list()
            assert sub["notificationUrl"] == f"{proxy.url}/notificationClient"
            assert sub["lifecycleNotificationUrl"] == f"{proxy.url}/notificationClient/lifecycle"
            assert world.graph.stats.validations == 2 and world.graph.stats.validations_failed == 0
            world.graph.add_mail(ALICE, subject="Through the proxy")
            await until(lambda: len(world.pushes()) == 1, "the push")
            assert world.pushes()[0].token == IOS_TOKEN
            assert source.stats.notifications == 1 and source.stats.forged == source.stats.unknown == 0
            access = proxy.dir / "access.log"

            def logged(request: str, status: int) -> bool:
                return any(f'"{request} HTTP/1.1" {status} ' in line for line in access.read_text().splitlines())

            # nginx logs a request once it has answered it: poll, bounded
            await until(lambda: logged("POST /notificationClient", 202), "the notification in nginx's log")
            assert any('"POST /notificationClient/lifecycle?validationToken=' in line
                       for line in access.read_text().splitlines())
        finally:
            await node.stop()


async def test_a_node_that_is_down_is_skipped(tmp_path: Path, pki: TestPki) -> None:
    config, key = dev_config(tmp_path)
    async with running_api(config, key) as api, \
            serving(nginx_for([free_port(), api.client.server.port], pki)) as proxy, client(pki) as session:
        for _ in range(4):  # round robin would pick the dead node for every other post
            async with session.post(f"{proxy.url}/notificationClient?validationToken={ENCODED}") as answer:
                assert (answer.status, await answer.text()) == (200, TOKEN)
        assert answered(api) == {("/notificationClient", "POST", "200"): 4}


REFUSED = [
    ("GET", "/api/v1/registrations?mailbox=alice%40example.com"),
    ("POST", "/api/v1/registrations"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/metrics"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("POST", "/ews/notification"),
    ("GET", "/"),
    ("GET", "/notificationClient"),
    ("GET", f"/notificationClient?validationToken={ENCODED}"),
    ("HEAD", "/notificationClient"),
    ("PUT", "/notificationClient"),
    ("DELETE", "/notificationClient/lifecycle"),
    ("POST", "/notificationClientX"),
    ("POST", "/notificationClient/"),
    ("POST", "/notificationClient/lifecycleX"),
    ("POST", "/notificationClient/other"),
    ("POST", "/notificationClient/../api/v1/registrations"),
    ("POST", "/notificationClient/%2e%2e/api/v1/registrations"),
    ("POST", "/notificationClient%2F..%2Fapi%2Fv1%2Fregistrations"),
]


async def test_every_other_path_and_method_is_refused_by_nginx(tmp_path: Path, pki: TestPki) -> None:
    async with proxied(tmp_path, pki) as (api, proxy), client(pki) as session:
        for method, path in REFUSED:
            url = URL(proxy.url + path, encoded=True)  # sent as written: no client-side normalisation
            async with session.request(method, url, headers=api.headers, json={} if method == "POST" else None) \
                    as answer:
                assert answer.status == 403, (method, path)
                assert "X-Request-ID" not in answer.headers, (method, path)  # nginx's answer
        assert answered(api) == {}  # not one reached the daemon


@pytest.mark.parametrize(("path", "route"), [
    ("//notificationClient", "/notificationClient"),
    ("/api/v1/../../notificationClient", "/notificationClient"),
    ("/%6EotificationClient", "/notificationClient"),
    ("/notificationClient/./lifecycle", "/notificationClient/lifecycle"),
    ("/notificationClient%2Flifecycle", "/notificationClient/lifecycle"),
])
async def test_spellings_nginx_resolves_to_the_webhook_reach_the_daemon_as_the_webhook(
        tmp_path: Path, pki: TestPki, path: str, route: str) -> None:
    """The URI passed on is the location's, not the client's: whatever nginx lets through, the daemon routes as
    the webhook (never, say, as //notificationClient, a 404, or as another of its routes)."""
    async with proxied(tmp_path, pki) as (api, proxy), client(pki) as session:
        url = URL(f"{proxy.url}{path}?validationToken={ENCODED}", encoded=True)
        async with session.post(url) as answer:
            assert (answer.status, await answer.text()) == (200, TOKEN)
        assert answered(api) == {(route, "POST", "200"): 1}


async def test_the_allowlist_sees_the_address_nginx_saw(tmp_path: Path, pki: TestPki) -> None:
    # the default webhook.trusted_proxies (loopback) includes this nginx at 127.0.0.1; the allowed poster is
    # 127.0.0.2 (a loopback address too, but not a trusted proxy)
    env = {"BEMSMAIL_WEBHOOK__ALLOWED_NETWORKS": '["127.0.0.2/32"]'}
    async with proxied(tmp_path, pki, env) as (api, proxy):
        base = f"https://127.0.0.1:{proxy.port}"  # IPv4, as the clients' source addresses are
        notification, handshake = f"{base}/notificationClient", f"{base}/notificationClient?validationToken=t"
        async with client(pki, source="127.0.0.2") as allowed:
            async with allowed.post(handshake) as answer:
                assert (answer.status, await answer.text()) == (200, "t")
            async with allowed.post(notification, json=NOTIFICATION) as answer:
                assert answer.status == 202
        async with client(pki, source="127.0.0.3") as other:
            for headers in ({}, {"X-Forwarded-For": "127.0.0.2"}):  # a client cannot claim an allowed address
                async with other.post(notification, json=NOTIFICATION, headers=headers) as answer:
                    assert answer.status == 403, headers
                    assert (await answer.json())["type"].endswith("source-not-allowed")  # the daemon refused it
        assert answered(api) == {("/notificationClient", "POST", "200"): 1, ("/notificationClient", "POST", "202"): 1,
                                 ("/notificationClient", "POST", "403"): 2}


async def test_without_trusting_nginx_every_post_comes_from_nginx(tmp_path: Path, pki: TestPki) -> None:
    env = {"BEMSMAIL_WEBHOOK__ALLOWED_NETWORKS": '["127.0.0.2/32"]', "BEMSMAIL_WEBHOOK__TRUSTED_PROXIES": "[]"}
    async with proxied(tmp_path, pki, env) as (_api, proxy), client(pki, source="127.0.0.2") as session, \
            session.post(f"https://127.0.0.1:{proxy.port}/notificationClient", json=NOTIFICATION) as answer:
        assert answer.status == 403  # the daemon sees nginx's 127.0.0.1 and ignores its X-Forwarded-For
