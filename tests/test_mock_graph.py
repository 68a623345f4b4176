"""The mock Graph on the wire: Entra's token endpoint (secret and certificate), Graph's subscription rules, the
validation handshake it makes, the write limit, delta rounds, messages and folders, batched notifications with
redelivery, lifecycle events, scripted faults, the control API and the command line."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from bemsmail.mocks.graph import GRAPH_SCOPE, Fault, GraphApp, MockGraph
from bemsmail.mocks.tls import TestPki
from tests.support import until

TENANT = "tenant-1"
CLIENT = "client-1"
SECRET = "s3cret-value-for-tests"


@dataclass
class Endpoint:
    """A webhook standing in for the daemon: answers the handshake, records posts, answers what it is told."""

    url: str = ""
    posts: list[dict[str, Any]] = field(default_factory=list)
    lifecycle: list[dict[str, Any]] = field(default_factory=list)
    validations: list[str] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)  # statuses to give before answering 202
    echo_wrong: bool = False

    async def handle(self, request: web.Request) -> web.Response:
        token = request.query.get("validationToken")
        if token is not None:
            self.validations.append(token)
            assert request.content_type == "text/plain" and await request.read() == b""
            return web.Response(text=token + ("x" if self.echo_wrong else ""), content_type="text/plain")
        body = await request.json()
        (self.lifecycle if request.path.endswith("/lifecycle") else self.posts).append(body)
        return web.Response(status=self.answers.pop(0) if self.answers else 202)


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    hook = Endpoint()
    app = web.Application()
    app.router.add_post("/notificationClient", hook.handle)
    app.router.add_post("/notificationClient/lifecycle", hook.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    hook.url = f"http://127.0.0.1:{port}/notificationClient"
    yield hook
    await runner.cleanup()


@dataclass
class Graph:
    mock: MockGraph
    http: aiohttp.ClientSession
    token: str

    async def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                   token: str | None = None) -> tuple[int, Any, Any]:
        auth = {"Authorization": f"Bearer {token if token is not None else self.token}"}
        async with self.http.request(method, self.mock.graph_url + path, json=body,
                                     headers={**auth, **(headers or {})}) as answer:
            text = await answer.text()
            return answer.status, json.loads(text) if text else None, answer.headers

    async def url(self, url: str) -> tuple[int, Any]:
        async with self.http.get(url, headers={"Authorization": f"Bearer {self.token}",
                                               "Prefer": "odata.maxpagesize=2"}) as answer:
            return answer.status, await answer.json()

    async def subscribe(self, hook: Endpoint, mailbox: str = "alice@example.com", minutes: int = 600,
                        **extra: Any) -> tuple[int, Any]:
        body = {"changeType": "created", "notificationUrl": hook.url,
                "lifecycleNotificationUrl": hook.url + "/lifecycle",
                "resource": f"users/{mailbox}/mailFolders('inbox')/messages", "clientState": "state-" + mailbox,
                "expirationDateTime": (datetime.now(UTC) + timedelta(minutes=minutes)).isoformat(), **extra}
        status, answer, _ = await self.call("POST", "/subscriptions", body)
        return status, answer


async def token(http: aiohttp.ClientSession, mock: MockGraph, **form: str) -> tuple[int, Any]:
    data = {"grant_type": "client_credentials", "client_id": CLIENT, "client_secret": SECRET,
            "scope": GRAPH_SCOPE, **form}
    async with http.post(f"{mock.url}/{TENANT}/oauth2/v2.0/token", data=data) as answer:
        return answer.status, await answer.json()


@pytest.fixture
async def graph(pki: TestPki) -> AsyncIterator[Graph]:
    async with MockGraph(pki, [GraphApp(TENANT, CLIENT, SECRET)], retry_seconds=0.05, retry_max_seconds=0.1) as mock, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=pki.client_context())) as http:
        status, answer = await token(http, mock)
        assert status == 200
        yield Graph(mock, http, answer["access_token"])


async def test_the_token_endpoint_checks_client_scope_and_secret(graph: Graph) -> None:
    status, answer = await token(graph.http, graph.mock)
    assert status == 200 and answer["token_type"] == "Bearer" and answer["expires_in"] > 3000
    assert (await token(graph.http, graph.mock, client_secret="wrong"))[0] == 401
    status, answer = await token(graph.http, graph.mock, scope="https://127.0.0.1/.default")
    assert status == 400 and answer["error"] == "invalid_resource" and "AADSTS500011" in answer["error_description"]
    assert (await token(graph.http, graph.mock, client_id="someone-else"))[1]["error"] == "unauthorized_client"
    assert (await graph.call("GET", "/subscriptions", token="forged"))[0] == 401
    status, answer, _ = await graph.call("GET", "/subscriptions", token="")
    assert status == 401 and answer["error"]["code"] == "InvalidAuthenticationToken"


async def test_azure_identity_gets_a_token_with_a_certificate(pki: TestPki, tmp_path: Path) -> None:
    from azure.identity.aio import CertificateCredential

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bemsmail-test")])
    now = dt.datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    pem = tmp_path / "app.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()) + cert_pem)
    async with MockGraph(pki, [GraphApp(TENANT, CLIENT, certificate_pem=cert_pem)]) as mock:
        credential = CertificateCredential(TENANT, CLIENT, certificate_path=str(pem), authority=mock.url,
                                           connection_verify=str(pki.ca_cert))
        try:
            assert (await credential.get_token(GRAPH_SCOPE)).token in mock.tokens
        finally:
            await credential.close()
        assert mock.stats.tokens_issued == 1


async def test_create_validates_both_urls_and_applies_graphs_rules(graph: Graph, endpoint: Endpoint) -> None:
    status, made = await graph.subscribe(endpoint)
    assert status == 201 and made["clientState"] == "state-alice@example.com"
    assert len(endpoint.validations) == 2  # notificationUrl and lifecycleNotificationUrl
    assert endpoint.validations[0].startswith("Validation: Testing client application reachability")

    status, answer = await graph.subscribe(endpoint)
    assert status == 409 and "already exists" in answer["error"]["message"]
    status, answer = await graph.subscribe(endpoint, mailbox="b@example.com", minutes=10_071)
    assert status == 400 and "10070 minutes" in answer["error"]["message"]
    status, answer = await graph.subscribe(endpoint, mailbox="b@example.com", minutes=-1)
    assert status == 400
    status, answer = await graph.subscribe(endpoint, mailbox="b@example.com", clientState="x" * 129)
    assert status == 400 and "128" in answer["error"]["message"]
    status, short = await graph.subscribe(endpoint, mailbox="b@example.com", minutes=5)
    expires = datetime.fromisoformat(short["expirationDateTime"].replace("Z", "+00:00"))
    assert expires - datetime.now(UTC) > timedelta(minutes=44)  # raised to Graph's minimum of 45

    endpoint.echo_wrong = True
    status, answer = await graph.subscribe(endpoint, mailbox="c@example.com")
    assert status == 400 and answer["error"]["code"] == "ValidationError"
    assert graph.mock.stats.validations_failed == 1
    assert not any(s["mailbox"] == "c@example.com" for s in graph.mock.subscription_list())

    graph.mock.require_https = True
    status, answer = await graph.subscribe(endpoint, mailbox="d@example.com")
    assert status == 400 and "scheme='http' is not supported" in answer["error"]["message"]


async def test_list_pages_without_client_state_and_patch_delete_reauthorize(graph: Graph,
                                                                              endpoint: Endpoint) -> None:
    for i in range(120):
        assert (await graph.subscribe(endpoint, mailbox=f"u{i}@example.com"))[0] == 201
    status, page, _ = await graph.call("GET", "/subscriptions")
    assert status == 200 and len(page["value"]) == 100 and "@odata.nextLink" in page
    assert all(s["clientState"] is None for s in page["value"])  # Graph never lists the secret
    status, rest = await graph.url(page["@odata.nextLink"])
    assert len(rest["value"]) == 20 and "@odata.nextLink" not in rest

    sub_id = page["value"][0]["id"]
    later = (datetime.now(UTC) + timedelta(days=6)).isoformat()
    status, renewed, _ = await graph.call("PATCH", f"/subscriptions/{sub_id}", {"expirationDateTime": later})
    assert status == 200 and renewed["expirationDateTime"].startswith(later[:16])
    assert (await graph.call("POST", f"/subscriptions/{sub_id}/reauthorize"))[0] == 200
    assert (await graph.call("DELETE", f"/subscriptions/{sub_id}"))[0] == 204
    status, answer, _ = await graph.call("DELETE", f"/subscriptions/{sub_id}")
    assert status == 404 and answer["error"]["code"] == "ResourceNotFound"
    assert (await graph.call("PATCH", f"/subscriptions/{sub_id}", {"expirationDateTime": later}))[0] == 404


async def test_writes_over_the_20_second_limit_get_429_with_retry_after(graph: Graph, endpoint: Endpoint) -> None:
    graph.mock.writes_per_app = 3
    for i in range(3):
        assert (await graph.subscribe(endpoint, mailbox=f"w{i}@example.com"))[0] == 201
    status, _, headers = await graph.call("POST", "/subscriptions", {})
    assert status == 429 and 1 <= int(headers["Retry-After"]) <= 20
    assert graph.mock.stats.throttled == 1 and graph.mock.max_writes_in_window() == 3
    status, _, _ = await graph.call("GET", "/subscriptions")  # reads are not writes
    assert status == 200


async def test_delta_rounds_page_then_link_and_report_new_and_removed_mail(graph: Graph) -> None:
    mock, box = graph.mock, "alice@example.com"
    old = mock.add_mail(box, received_at=datetime.now(UTC) - timedelta(days=2))
    ids = [mock.add_mail(box, subject=f"m{i}") for i in range(4)]
    since = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    status, page = await graph.url(f"{mock.graph_url}/users/{box}/mailFolders/inbox/messages/delta()"
                                   f"?$select=subject,from&changeType=created&$filter=receivedDateTime ge {since}")
    seen: list[str] = []
    while "@odata.nextLink" in page:
        assert len(page["value"]) == 2
        seen += [m["id"] for m in page["value"]]
        status, page = await graph.url(page["@odata.nextLink"])
    seen += [m["id"] for m in page["value"]]
    assert seen == ids and old not in seen  # the filter kept the old mail out
    assert set(page["value"][0]) <= {"@odata.type", "@odata.etag", "id", "subject", "from"}
    link = page["@odata.deltaLink"]

    new = mock.add_mail(box, subject="new")
    mock.delete_mail(box, ids[0])
    status, page = await graph.url(link.replace("changeType=created", ""))
    assert [m["id"] for m in page["value"]] == [new] and "@odata.deltaLink" in page  # changeType=created stays

    status, fresh = await graph.url(f"{mock.graph_url}/users/{box}/mailFolders('inbox')/messages/delta")
    while "@odata.nextLink" in fresh:
        status, fresh = await graph.url(fresh["@odata.nextLink"])
    mock.delete_mail(box, ids[1])
    status, page = await graph.url(fresh["@odata.deltaLink"])
    assert page["value"] == [{"@odata.type": "#microsoft.graph.message", "id": ids[1],
                              "@removed": {"reason": "deleted"}}]

    mock.expire_delta_links(box)
    status, page = await graph.url(link)
    assert status == 410 and page["error"]["code"] == "SyncStateNotFound"


async def test_messages_and_the_inbox_unread_count(graph: Graph) -> None:
    mock, box = graph.mock, "alice@example.com"
    first = mock.add_mail(box, subject="Budget", sender="boss@example.org", importance="high")
    mock.add_mail(box, meeting=True)
    status, message, _ = await graph.call("GET", f"/users/{box}/messages/{first}?$select=subject,from,importance")
    assert status == 200 and message["subject"] == "Budget" and message["importance"] == "high"
    assert message["from"]["emailAddress"]["address"] == "boss@example.org" and "isRead" not in message
    status, folder, _ = await graph.call("GET", f"/users/{box}/mailFolders/inbox?$select=unreadItemCount")
    assert (status, folder["unreadItemCount"]) == (200, 2) and set(folder) == {"id", "unreadItemCount"}
    mock.mark_read(box, first)
    assert (await graph.call("GET", f"/users/{box}/mailFolders/inbox"))[1]["unreadItemCount"] == 1
    status, answer, _ = await graph.call("GET", f"/users/{box}/messages/AAMkNOPE")
    assert status == 404 and answer["error"]["code"] == "ErrorItemNotFound"
    mock.auto_users = False
    assert (await graph.call("GET", "/users/nobody@example.com/mailFolders/inbox"))[0] == 404


async def test_notifications_are_batched_and_redelivered_after_a_failure(graph: Graph, endpoint: Endpoint) -> None:
    graph.mock.batch_wait_ms = 100
    _, made = await graph.subscribe(endpoint)
    endpoint.answers = [503]
    ids = [graph.mock.add_mail("alice@example.com") for _ in range(3)]
    await graph.mock.drained()
    assert len(endpoint.posts) == 2  # the batch, and its redelivery after the 503
    assert endpoint.posts[0] == endpoint.posts[1]
    items = endpoint.posts[1]["value"]
    assert [i["resourceData"]["id"] for i in items] == ids
    assert {i["subscriptionId"] for i in items} == {made["id"]} and items[0]["clientState"] == made["clientState"]
    assert items[0]["resource"].startswith("Users/") and "/Messages/" in items[0]["resource"]
    assert graph.mock.stats.notifications_delivered == 3 and graph.mock.stats.notification_failures == 3


async def test_undeliverable_notifications_are_discarded_with_a_missed_event(graph: Graph, endpoint: Endpoint) -> None:
    graph.mock.retry_for_seconds = 0.2
    await graph.subscribe(endpoint)
    endpoint.answers = [500] * 100
    graph.mock.add_mail("alice@example.com")
    await until(lambda: graph.mock.stats.notifications_discarded == 1, "the notification given up")
    endpoint.answers = []
    await graph.mock.drained()
    # (the endpoint records every post, also those it answered 500: the event may have been redelivered)
    assert {e["lifecycleEvent"] for b in endpoint.lifecycle for e in b["value"]} == {"missed"}
    assert graph.mock.stats.lifecycle_delivered == 1


async def test_lifecycle_events_reach_the_lifecycle_url(graph: Graph, endpoint: Endpoint) -> None:
    graph.mock.reauthorize_grace_seconds = 0
    _, made = await graph.subscribe(endpoint)
    graph.mock.send_lifecycle(made["id"], "reauthorizationRequired")
    graph.mock.add_mail("alice@example.com")  # paused: not reauthorized within the grace
    graph.mock.send_lifecycle(made["id"], "subscriptionRemoved")
    await graph.mock.drained()
    events = [e for b in endpoint.lifecycle for e in b["value"]]
    assert [e["lifecycleEvent"] for e in events] == ["reauthorizationRequired", "subscriptionRemoved"]
    assert events[0]["clientState"] == made["clientState"] and events[0]["subscriptionId"] == made["id"]
    assert graph.mock.stats.notifications_paused == 1 and not endpoint.posts
    assert made["id"] not in graph.mock.subscriptions


async def test_scripted_faults_answer_then_stop(graph: Graph, endpoint: Endpoint) -> None:
    graph.mock.add_fault(Fault("list", status=503, code="ServiceUnavailable", retry_after=7))
    graph.mock.add_fault(Fault("create", status=403, code="ExtensionError", mailbox="x@example.com", times=None))
    graph.mock.add_fault(Fault("delta", drop=True, times=None))
    status, _, headers = await graph.call("GET", "/subscriptions")
    assert status == 503 and headers["Retry-After"] == "7"
    assert (await graph.call("GET", "/subscriptions"))[0] == 200
    assert (await graph.subscribe(endpoint, mailbox="x@example.com"))[0] == 403
    assert (await graph.subscribe(endpoint, mailbox="x@example.com"))[0] == 403
    assert (await graph.subscribe(endpoint, mailbox="y@example.com"))[0] == 201
    with pytest.raises(aiohttp.ClientError):
        await graph.call("GET", "/users/y@example.com/mailFolders/inbox/messages/delta")
    with pytest.raises(ValueError, match="unknown operation"):
        graph.mock.add_fault(Fault("nonsense"))


async def test_the_control_api_makes_mail_and_lists_subscriptions(graph: Graph, endpoint: Endpoint) -> None:
    await graph.subscribe(endpoint)
    control = graph.mock.url + "/_mock"
    async with graph.http.post(f"{control}/mail", json={"mailbox": "alice@example.com", "count": 2}) as answer:
        assert answer.status == 200 and len((await answer.json())["ids"]) == 2
    async with graph.http.get(f"{control}/subscriptions") as answer:
        [sub] = (await answer.json())["value"]
        assert sub["mailbox"] == "alice@example.com" and sub["clientState"] == "state-alice@example.com"
    async with graph.http.post(f"{control}/faults", json={"operation": "nope"}) as answer:
        assert answer.status == 400
    async with graph.http.post(f"{control}/lifecycle", json={"subscription_id": sub["id"], "event": "missed"}
                               ) as answer:
        assert answer.status == 200
    await graph.mock.drained()
    async with graph.http.get(f"{control}/stats") as answer:
        stats = await answer.json()
    assert stats["mails"] == 2 and stats["notifications_delivered"] == 2 and stats["lifecycle_delivered"] == 1
    query = parse_qs(urlsplit(endpoint.url).query)
    assert query == {}


async def test_the_command_line_serves_until_stopped(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bemsmail", "mock", "graph", "--cert-dir", str(tmp_path / "pki"), "--tenant-id",
        TENANT, "--client-id", CLIENT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "BEMSMAIL_MOCK_GRAPH_SECRET": SECRET})
    try:
        assert process.stdout is not None
        ready = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))
        assert ready["event"] == "mock_graph_ready"
        context = TestPki(tmp_path / "pki", Path(ready["ca_file"]), Path(), Path(), Path()).client_context()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http, http.post(
                f"{ready['url']}/{TENANT}/oauth2/v2.0/token",
                data={"grant_type": "client_credentials", "client_id": CLIENT, "client_secret": SECRET,
                      "scope": GRAPH_SCOPE}) as answer:
            assert answer.status == 200
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0
    missing = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bemsmail", "mock", "graph", "--cert-dir", str(tmp_path / "pki"), "--tenant-id", "t",
        "--client-id", "c", stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "BEMSMAIL_MOCK_GRAPH_SECRET"})
    _, err = await missing.communicate()
    assert missing.returncode == 2 and b"BEMSMAIL_MOCK_GRAPH_SECRET" in err
