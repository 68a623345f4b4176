"""GetStreamingEvents on aiohttp against small hand-written HTTP/1.1 servers on loopback that send the bytes
Exchange sends (chunked envelopes, heartbeats, Closed, faults, resets, silence), and the auth schemes against
real acceptors: Basic, NTLM (pyspnego's server, with and without TLS channel binding), Bearer, and an OAuth2
client-credentials token endpoint."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest
import spnego
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from multidict import CIMultiDict
from spnego.channel_bindings import GssChannelBindings
from spnego.exceptions import SpnegoError

from bemsmail.devservices import free_port
from bemsmail.mocks.tls import TestPki
from bemsmail.sources.ews import httpauth
from bemsmail.sources.ews.httpauth import (
    BasicAuth,
    BearerAuth,
    ClientCredentialsTokens,
    EwsAuthError,
    NtlmAuth,
    TokenError,
)
from bemsmail.sources.ews.soap import EwsProtocolError, SoapFault, StreamMessage, get_streaming_events_request
from bemsmail.sources.ews.stream import (
    StreamConnectError,
    StreamConnection,
    StreamDropped,
    StreamHttpError,
    StreamSilent,
    response_cookie,
    stream_events,
)
from tests.test_ews_soap import ERROR_CLOSED, HEARTBEAT, NEW_MAIL, SERVER_BUSY, streaming

PASSWORD = "Pa55w0rd!-never-shown"
CLIENT_SECRET = "cs~NEVER-SHOWN-secret-value"
COOKIE = "CO1PR06MB222.namprd06.prod.outlook.com~1941996295"
BOUND = 10.0  # every wait in these tests ends within this, pass or fail
BODY = get_streaming_events_request(["sub-1", "sub-2"], 30, impersonate="anchor@example.com")
HEADERS = {"X-AnchorMailbox": "anchor@example.com", "X-PreferServerAffinity": "true",
           "X-BackEndOverrideCookie": COOKIE, "Cookie": f"X-BackEndOverrideCookie={COOKIE}"}
CLOSED = ('<m:GetStreamingEventsResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>'
          "<m:ConnectionStatus>Closed</m:ConnectionStatus></m:GetStreamingEventsResponseMessage>")
DECLARATION = b'<?xml version="1.0" encoding="utf-8"?>'


# --- a hand-written HTTP/1.1 server --------------------------------------------------------------------------


@dataclass
class Conn:
    """One accepted TCP connection."""

    number: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer_closed: asyncio.Event = field(default_factory=asyncio.Event)
    state: dict[str, Any] = field(default_factory=dict)

    async def head(self, status: int = 200, reason: str = "OK", headers: list[tuple[str, str]] | None = None,
                   chunked: bool = True) -> None:
        lines = [f"HTTP/1.1 {status} {reason}", "Cache-Control: private", "Server: Microsoft-IIS/10.0",
                 "X-AspNet-Version: 4.0.30319", "X-Powered-By: ASP.NET"]
        if chunked:
            lines += ["Transfer-Encoding: chunked", "Content-Type: text/xml; charset=utf-8"]
        lines += [f"{k}: {v}" for k, v in headers or []]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await self.writer.drain()

    async def chunk(self, data: bytes) -> None:
        self.writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await self.writer.drain()

    async def end(self) -> None:
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()

    async def full(self, status: int, reason: str, body: bytes, headers: list[tuple[str, str]] | None = None) -> None:
        await self.head(status, reason, [*(headers or []), ("Content-Length", str(len(body)))], chunked=False)
        self.writer.write(body)
        await self.writer.drain()

    async def until_peer_closes(self) -> None:
        """Wait (bounded) for the client to close the connection; that is recorded in `peer_closed`."""
        async with asyncio.timeout(BOUND):
            while await self.reader.read(65536):
                pass
        self.peer_closed.set()


@dataclass
class Request:
    method: str
    target: str
    headers: CIMultiDict[str]
    body: bytes
    conn: Conn


Handler = Callable[[Request], Awaitable[bool]]  # returns whether to keep the connection for another request


class RawServer:
    def __init__(self, handler: Handler, ssl: Any = None) -> None:
        self.handler = handler
        self.ssl = ssl
        self.conns: list[Conn] = []
        self.requests: list[Request] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl else 'http'}://localhost:{self.port}/EWS/Exchange.asmx"

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.conns:
            conn.writer.close()
        await asyncio.wait_for(self._server.wait_closed(), BOUND)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(len(self.conns), reader, writer)
        self.conns.append(conn)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    conn.peer_closed.set()
                    return
                first, *lines = head.decode("latin-1").split("\r\n")
                method, target, _ = first.split(" ", 2)
                headers: CIMultiDict[str] = CIMultiDict()
                for line in lines:
                    if line:
                        name, _, value = line.partition(":")
                        headers.add(name.strip(), value.strip())
                body = await reader.readexactly(int(headers.get("Content-Length", "0")))
                request = Request(method, target, headers, body, conn)
                self.requests.append(request)
                if not await self.handler(request):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            conn.peer_closed.set()
        finally:
            writer.close()


def session(**kwargs: Any) -> aiohttp.ClientSession:
    """A stream's own session: a pool of one connection, no cookie jar of its own."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1, **kwargs),
                                 cookie_jar=aiohttp.DummyCookieJar())


async def collect(stream: StreamConnection, into: list[StreamMessage] | None = None) -> list[StreamMessage]:
    """Every message of `stream` (also into `into`, so what came before an exception can be looked at)."""
    messages = [] if into is None else into
    async with asyncio.timeout(BOUND):
        async for message in stream:
            messages.append(message)
    return messages


def no_secrets(*texts: object) -> None:
    for text in texts:
        shown = text if isinstance(text, str) else "".join(traceback.format_exception(text)) \
            if isinstance(text, BaseException) else repr(text)
        for secret in (PASSWORD, CLIENT_SECRET, "TlRMTVNT", "tok-"):
            assert secret not in shown, f"{secret!r} shown in {shown[:200]!r}"


class NoAuth:
    async def authorize(self, session: aiohttp.ClientSession, url: str, body: bytes, headers: Any, *,
                        client_timeout: aiohttp.ClientTimeout | None = None) -> aiohttp.ClientResponse:
        return await session.post(url, data=body, headers=headers, timeout=client_timeout or session.timeout)


def cut(data: bytes, *sizes: int) -> Iterator[bytes]:
    """`data` in pieces of the given sizes (the rest last): chunk boundaries inside tags, as TCP allows."""
    at = 0
    for size in sizes:
        yield data[at:at + size]
        at += size
    yield data[at:]


# --- the stream ----------------------------------------------------------------------------------------------


async def test_messages_arrive_as_sent_heartbeats_included_and_closed_ends_normally() -> None:
    received: list[Request] = []

    async def exchange(request: Request) -> bool:
        received.append(request)
        await request.conn.head(headers=[("Set-Cookie", f"X-BackEndOverrideCookie={COOKIE}; path=/; secure; "
                                          "HttpOnly")])
        first = DECLARATION + streaming(HEARTBEAT)
        for piece in cut(first, 3, 50, 7):  # boundaries inside the declaration and inside tags
            await request.conn.chunk(piece)
        await request.conn.chunk(b"\r\n" + streaming(NEW_MAIL) + DECLARATION)
        await request.conn.chunk(streaming(HEARTBEAT) + streaming(CLOSED)[:-10])
        await request.conn.chunk(streaming(CLOSED)[-10:])
        await request.conn.end()
        return True

    async with RawServer(exchange) as server, session() as s:
        stream = stream_events(s, server.url, NoAuth(), BODY, headers=HEADERS, watchdog_seconds=5)
        messages = await collect(stream)
    assert [m.is_heartbeat for m in messages] == [True, False, True, False]
    assert messages[1].notifications[0].events[1].kind == "NewMailEvent"
    assert messages[-1].connection_status == "Closed"
    assert stream.status == 200 and stream.backend_cookie == COOKIE
    [request] = received
    assert (request.method, request.target, request.body) == ("POST", "/EWS/Exchange.asmx", BODY)
    assert request.headers["Content-Type"] == "text/xml; charset=utf-8"
    for name, value in HEADERS.items():
        assert request.headers[name] == value


async def test_an_error_message_is_yielded_and_its_closed_ends_the_stream() -> None:
    async def exchange(request: Request) -> bool:
        await request.conn.head()
        await request.conn.chunk(streaming(ERROR_CLOSED))
        await request.conn.until_peer_closes()  # the client stops at Closed, without waiting for the body's end
        return False

    async with RawServer(exchange) as server, session() as s:
        messages = await collect(stream_events(s, server.url, NoAuth(), BODY, headers=HEADERS, watchdog_seconds=5))
        await asyncio.wait_for(server.conns[0].peer_closed.wait(), BOUND)
    [error] = messages
    assert (error.response_code, error.error_subscription_ids) == ("ErrorInvalidSubscription", ("bad-1", "bad-2"))


async def test_silence_trips_the_watchdog_and_closes_the_connection() -> None:
    async def silent(request: Request) -> bool:
        await request.conn.head()
        await request.conn.chunk(streaming(HEARTBEAT))
        await request.conn.until_peer_closes()  # then nothing, not even a heartbeat
        return False

    async with RawServer(silent) as server, session() as s:
        seen: list[StreamMessage] = []
        with pytest.raises(StreamSilent, match="nothing from localhost"):
            await collect(stream_events(s, server.url, NoAuth(), BODY, headers=HEADERS, watchdog_seconds=0.3), seen)
        await asyncio.wait_for(server.conns[0].peer_closed.wait(), BOUND)
    assert len(seen) == 1


async def test_the_watchdog_covers_waiting_for_the_response_headers() -> None:
    async def mute(request: Request) -> bool:
        await request.conn.until_peer_closes()
        return False

    async with RawServer(mute) as server, session() as s:
        with pytest.raises(StreamSilent, match="no response"):
            await collect(stream_events(s, server.url, NoAuth(), BODY, headers=HEADERS, watchdog_seconds=0.3))


async def test_heartbeats_keep_a_stream_alive_past_the_watchdog() -> None:
    async def slow(request: Request) -> bool:
        await request.conn.head()
        for _ in range(15):  # 1.5 s of heartbeats in all, beyond the 1 s watchdog, but never 1 s of silence
            await request.conn.chunk(streaming(HEARTBEAT))
            await asyncio.sleep(0.1)
        await request.conn.chunk(streaming(CLOSED))
        await request.conn.end()
        return True

    async with RawServer(slow) as server, session() as s:
        messages = await collect(stream_events(s, server.url, NoAuth(), BODY, headers=HEADERS, watchdog_seconds=1))
    assert len(messages) == 16


async def test_a_reset_mid_body_is_a_drop() -> None:
    async def reset(request: Request) -> bool:
        await request.conn.head()
        await request.conn.chunk(streaming(HEARTBEAT))
        half = streaming(NEW_MAIL)
        request.conn.writer.write(f"{len(half):x}\r\n".encode() + half[:200])  # a chunk cut short
        await request.conn.writer.drain()
        request.conn.writer.transport.abort()
        return False

    async with RawServer(reset) as server, session() as s:
        seen: list[StreamMessage] = []
        with pytest.raises(StreamDropped, match="dropped") as caught:
            await collect(stream_events(s, server.url, NoAuth(), BODY, headers=HEADERS), seen)
    assert len(seen) == 1
    assert isinstance(caught.value.__cause__, aiohttp.ClientError)


@pytest.mark.parametrize("ending", ["terminating chunk", "connection closed"])
async def test_a_body_ending_without_closed_is_a_drop(ending: str) -> None:
    async def early(request: Request) -> bool:
        await request.conn.head()
        await request.conn.chunk(streaming(HEARTBEAT))
        if ending == "terminating chunk":
            await request.conn.end()
            return True
        return False  # FIN without the terminating chunk

    async with RawServer(early) as server, session() as s:
        with pytest.raises(StreamDropped):
            await collect(stream_events(s, server.url, NoAuth(), BODY, headers=HEADERS))


async def test_503_with_retry_after() -> None:
    async def busy(request: Request) -> bool:
        await request.conn.full(503, "Service Unavailable", b"<html>busy</html>",
                                [("Retry-After", "17"), ("Content-Type", "text/html")])
        return True

    async with RawServer(busy) as server, session() as s:
        stream = stream_events(s, server.url, NoAuth(), BODY, headers=HEADERS)
        with pytest.raises(StreamHttpError) as caught:
            await collect(stream)
    assert (caught.value.status, caught.value.retry_after, caught.value.message) == (503, 17.0, None)
    assert stream.status == 503


async def test_500_fault_server_busy_raises_soap_fault_with_back_off() -> None:
    async def fault(request: Request) -> bool:
        await request.conn.full(500, "Internal Server Error", SERVER_BUSY,
                                [("Content-Type", "text/xml; charset=utf-8")])
        return True

    async with RawServer(fault) as server, session() as s:
        with pytest.raises(SoapFault) as caught:
            await collect(stream_events(s, server.url, NoAuth(), BODY, headers=HEADERS))
    assert (caught.value.code, caught.value.back_off_ms) == ("ErrorServerBusy", 297749)


async def test_500_without_a_fault_and_a_fault_inside_a_200_stream() -> None:
    async def plain(request: Request) -> bool:
        if len(request.conn.state) == 0:
            request.conn.state["seen"] = True
            await request.conn.full(500, "Internal Server Error", b"<html>oops</html>")
            return True
        await request.conn.head()
        await request.conn.chunk(streaming(HEARTBEAT) + SERVER_BUSY.replace(DECLARATION, b""))
        await request.conn.end()
        return True

    async with RawServer(plain) as server, session() as s:
        with pytest.raises(StreamHttpError) as caught:
            await collect(stream_events(s, server.url, NoAuth(), BODY, headers=HEADERS))
        assert (caught.value.status, caught.value.message) == (500, None)
        with pytest.raises(SoapFault):
            await collect(stream_events(s, server.url, NoAuth(), BODY, headers=HEADERS))


async def test_a_200_that_is_not_the_stream_is_a_protocol_error() -> None:
    async def portal(request: Request) -> bool:
        await request.conn.full(200, "OK", b"<html><body>Sign in to continue</body></html>",
                                [("Content-Type", "text/html")])
        return True

    async with RawServer(portal) as server, session() as s:
        with pytest.raises(EwsProtocolError, match="expected a SOAP Envelope"):
            await collect(stream_events(s, server.url, NoAuth(), BODY, headers=HEADERS))


async def test_no_server_is_a_connect_error() -> None:
    async with session() as s:
        with pytest.raises(StreamConnectError):
            await collect(stream_events(s, f"http://127.0.0.1:{free_port()}/EWS/Exchange.asmx", NoAuth(), BODY,
                                        headers=HEADERS, connect_timeout=2))


async def test_consumer_aclose_closes_the_connection_at_once() -> None:
    async def forever(request: Request) -> bool:
        await request.conn.head()
        await request.conn.chunk(streaming(HEARTBEAT))
        await request.conn.until_peer_closes()  # a real stream would go on for 30 minutes
        return False

    async with RawServer(forever) as server, session() as s:
        stream = stream_events(s, server.url, NoAuth(), BODY, headers=HEADERS, watchdog_seconds=60)
        first = await asyncio.wait_for(anext(stream), BOUND)
        assert first.is_heartbeat
        await asyncio.wait_for(stream.aclose(), BOUND)
        await asyncio.wait_for(server.conns[0].peer_closed.wait(), BOUND)  # long before any watchdog
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        # and the same through `async with`
        async with stream_events(s, server.url, NoAuth(), BODY, headers=HEADERS, watchdog_seconds=60) as again:
            await asyncio.wait_for(anext(again), BOUND)
        await asyncio.wait_for(server.conns[1].peer_closed.wait(), BOUND)


async def test_a_cancelled_consumer_closes_the_connection() -> None:
    async def forever(request: Request) -> bool:
        await request.conn.head()
        await request.conn.chunk(streaming(HEARTBEAT))
        await request.conn.until_peer_closes()
        return False

    async with RawServer(forever) as server, session() as s:
        got_one = asyncio.Event()

        async def consume() -> None:
            async with stream_events(s, server.url, NoAuth(), BODY, headers=HEADERS, watchdog_seconds=60) as st:
                async for _ in st:
                    got_one.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_one.wait(), BOUND)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, BOUND)
        await asyncio.wait_for(server.conns[0].peer_closed.wait(), BOUND)


def test_response_cookie() -> None:
    headers: CIMultiDict[str] = CIMultiDict()
    assert response_cookie(headers) is None
    headers.add("Set-Cookie", "exchangecookie=abc; path=/")
    headers.add("Set-Cookie", f"X-BackEndOverrideCookie={COOKIE}; path=/; secure; HttpOnly")
    assert response_cookie(headers) == COOKIE
    headers.add("Set-Cookie", "X-BackEndOverrideCookie=; expires=Thu, 01-Jan-1970 00:00:00 GMT; path=/")
    assert response_cookie(headers) is None
    assert response_cookie({"set-cookie": f'X-BackEndOverrideCookie="{COOKIE}"'}) == COOKIE


# --- Basic -----------------------------------------------------------------------------------------------------


def basic_server(expected: str) -> Handler:
    async def handler(request: Request) -> bool:
        if request.headers.get("Authorization") != expected:
            await request.conn.full(401, "Unauthorized", b"", [("WWW-Authenticate", 'Basic realm="EWS"')])
            return True
        await request.conn.head()
        await request.conn.chunk(streaming(CLOSED))
        await request.conn.end()
        return True

    return handler


async def test_basic_auth_accepted_and_refused() -> None:
    expected = "Basic " + base64.b64encode(f"CORP\\alice:{PASSWORD}".encode()).decode()
    async with RawServer(basic_server(expected)) as server, session() as s:
        good = BasicAuth("CORP\\alice", PASSWORD)
        assert [m.connection_status for m in await collect(stream_events(s, server.url, good, BODY,
                                                                         headers=HEADERS))] == ["Closed"]
        with pytest.raises(StreamHttpError) as caught:
            await collect(stream_events(s, server.url, BasicAuth("CORP\\alice", "wrong"), BODY, headers=HEADERS))
    assert caught.value.status == 401
    no_secrets(good, caught.value, str(caught.value))
    with pytest.raises(ValueError):
        BasicAuth("a:b", PASSWORD)


# --- NTLM ------------------------------------------------------------------------------------------------------


@pytest.fixture
def ntlm_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyspnego's NTLM acceptor reads its users from the file named by NTLM_USER_FILE (DOMAIN:USER:PASSWORD)."""
    users = tmp_path / "ntlm-users"
    users.write_text(f"CORP:alice:{PASSWORD}\n:bob@corp.example:{PASSWORD}\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(users))


def ntlm_server(bindings: GssChannelBindings | None = None, close_after_challenge: bool = False) -> Handler:
    """IIS's connection-based NTLM: a challenge per connection, the authenticate leg judged on that connection."""

    async def handler(request: Request) -> bool:
        conn = request.conn
        value = request.headers.get("Authorization", "")
        if not value.startswith("NTLM "):
            await conn.full(401, "Unauthorized", b"", [("WWW-Authenticate", "Negotiate"),
                                                         ("WWW-Authenticate", "NTLM")])
            return True
        token = base64.b64decode(value[5:])
        context = conn.state.get("ntlm")
        if context is None:  # the negotiate leg (anything else on a fresh connection is refused)
            context = spnego.server(protocol="ntlm")
            try:
                challenge = context.step(token)
            except (SpnegoError, ValueError):
                await conn.full(401, "Unauthorized", b"", [("WWW-Authenticate", "NTLM")])
                return True
            conn.state["ntlm"] = context
            assert challenge is not None
            conn.state.setdefault("legs", []).append("negotiate")
            extra = [("Connection", "close")] if close_after_challenge else []
            await conn.full(401, "Unauthorized", b"<html>401 - Unauthorized</html>",
                            [("WWW-Authenticate", "NTLM " + base64.b64encode(challenge).decode()),
                             ("Content-Type", "text/html"), *extra])
            return not close_after_challenge
        conn.state.setdefault("legs", []).append("authenticate")
        try:
            context.step(token, channel_bindings=bindings)
        except SpnegoError:
            del conn.state["ntlm"]
            await conn.full(401, "Unauthorized", b"", [("WWW-Authenticate", "NTLM")])
            return True
        conn.state["user"] = context.client_principal
        conn.state["body"] = request.body
        await conn.head()
        await conn.chunk(streaming(HEARTBEAT))
        await conn.chunk(streaming(CLOSED))
        await conn.end()
        return True

    return handler


@pytest.mark.usefixtures("ntlm_users")
@pytest.mark.parametrize(("auth", "principal"), [
    (NtlmAuth("CORP\\alice", PASSWORD), "CORP\\alice"),
    (NtlmAuth("alice", PASSWORD, domain="CORP"), "CORP\\alice"),
    (NtlmAuth("bob@corp.example", PASSWORD), "bob@corp.example"),
])
async def test_ntlm_handshake_on_one_connection(auth: NtlmAuth, principal: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with RawServer(ntlm_server()) as server, session() as s:
        messages = await collect(stream_events(s, server.url, auth, BODY, headers=HEADERS))
    assert [m.connection_status for m in messages] == ["OK", "Closed"]
    [conn] = server.conns  # both legs on one TCP connection
    assert conn.state["legs"] == ["negotiate", "authenticate"]
    assert conn.state["user"] == principal
    assert conn.state["body"] == BODY
    assert [r.body for r in server.requests] == [b"", BODY]  # the negotiate leg carries no body
    assert all(r.headers["X-AnchorMailbox"] == "anchor@example.com" for r in server.requests)
    # pyspnego logs every token at DEBUG; ours are filtered out (the client's and, here, the server's too)
    no_secrets(caplog.text, auth)
    assert "NTLM step" not in caplog.text


@pytest.mark.usefixtures("ntlm_users")
async def test_ntlm_wrong_password_is_a_401() -> None:
    async with RawServer(ntlm_server()) as server, session() as s:
        with pytest.raises(StreamHttpError) as caught:
            await collect(stream_events(s, server.url, NtlmAuth("CORP\\alice", "wrong-one"), BODY, headers=HEADERS))
    assert caught.value.status == 401
    no_secrets(caught.value)


@pytest.mark.usefixtures("ntlm_users")
async def test_ntlm_notices_a_second_leg_on_a_new_connection() -> None:
    async with RawServer(ntlm_server(close_after_challenge=True)) as server, session() as s:
        with pytest.raises(EwsAuthError, match="closed the connection after the NTLM challenge") as caught:
            await collect(stream_events(s, server.url, NtlmAuth("CORP\\alice", PASSWORD), BODY, headers=HEADERS))
    assert len(server.conns) == 1  # noticed before sending the authenticate leg anywhere
    no_secrets(caught.value)


async def test_ntlm_malformed_challenge_is_an_auth_error() -> None:
    async def garbled(request: Request) -> bool:
        await request.conn.full(401, "Unauthorized", b"", [("WWW-Authenticate", "NTLM AAAAAAAAAAAA")])
        return True

    async with RawServer(garbled) as server, session() as s:
        with pytest.raises(EwsAuthError, match="challenge could not be answered") as caught:
            await collect(stream_events(s, server.url, NtlmAuth("CORP\\alice", PASSWORD), BODY, headers=HEADERS))
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    no_secrets(caught.value)


async def test_ntlm_refuses_a_shared_pool() -> None:
    async with aiohttp.ClientSession() as shared:  # the default pool of 100
        with pytest.raises(EwsAuthError, match="limit=1"):
            await collect(stream_events(shared, "http://127.0.0.1:9/", NtlmAuth("CORP\\alice", PASSWORD), BODY,
                                        headers=HEADERS))
    with pytest.raises(ValueError):
        NtlmAuth("CORP\\alice", PASSWORD, domain="CORP")


def _end_point_bindings(pki: TestPki) -> GssChannelBindings:
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    digest = hashes.Hash(hashes.SHA256())  # the test CA signs with SHA-256
    digest.update(der)
    return GssChannelBindings(application_data=b"tls-server-end-point:" + digest.finalize())


@pytest.mark.usefixtures("ntlm_users")
async def test_ntlm_over_tls_binds_the_channel(pki: TestPki, monkeypatch: pytest.MonkeyPatch) -> None:
    bindings = _end_point_bindings(pki)
    tls = pki.server_context(alpn=(), client_auth=False)
    async with RawServer(ntlm_server(bindings=bindings), ssl=tls) as server:
        async with session(ssl=pki.client_context()) as s:
            messages = await collect(stream_events(s, server.url, NtlmAuth("CORP\\alice", PASSWORD), BODY,
                                                   headers=HEADERS))
        assert messages[-1].connection_status == "Closed"
        assert server.conns[0].state["user"] == "CORP\\alice"
        # Without the binding, Extended Protection refuses the same credentials.
        monkeypatch.setattr(httpauth, "_channel_bindings", lambda protocol: None)
        async with session(ssl=pki.client_context()) as s:
            with pytest.raises(StreamHttpError) as caught:
                await collect(stream_events(s, server.url, NtlmAuth("CORP\\alice", PASSWORD), BODY,
                                            headers=HEADERS))
        assert caught.value.status == 401


# --- Bearer and client credentials ------------------------------------------------------------------------------


def bearer_server(valid: set[str]) -> Handler:
    async def handler(request: Request) -> bool:
        request.conn.state.setdefault("seen", []).append(request.headers.get("Authorization"))
        if request.headers.get("Authorization", "").removeprefix("Bearer ") not in valid:
            await request.conn.full(401, "Unauthorized", b"", [("WWW-Authenticate", 'Bearer error="invalid_token"')])
            return True
        await request.conn.head()
        await request.conn.chunk(streaming(CLOSED))
        await request.conn.end()
        return True

    return handler


async def test_bearer_gets_one_fresh_token_on_401() -> None:
    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        return {1: "tok-stale", 2: "tok-fresh"}.get(calls, f"tok-revoked-{calls}")

    async with RawServer(bearer_server({"tok-fresh"})) as server, session() as s:
        messages = await collect(stream_events(s, server.url, BearerAuth(provider), BODY, headers=HEADERS))
        assert messages[-1].connection_status == "Closed"
        assert calls == 2
        assert [r.headers["Authorization"] for r in server.requests] == ["Bearer tok-stale", "Bearer tok-fresh"]
        # A second refusal is the answer: no loop of retries.
        with pytest.raises(StreamHttpError) as caught:
            await collect(stream_events(s, server.url, BearerAuth(provider), BODY, headers=HEADERS))
    assert caught.value.status == 401 and calls == 4
    no_secrets(caught.value, BearerAuth(provider))


@dataclass
class TokenEndpoint:
    """An Entra-style v2.0 token endpoint: tok-1, tok-2, ... for the right client secret."""

    expires_in: int = 3600
    gate: asyncio.Event | None = None  # when set, answers wait for it
    forms: list[dict[str, list[str]]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, request: Request) -> bool:
        form = parse_qs(request.body.decode())
        self.forms.append(form)
        self.paths.append(request.target)
        self.arrived.set()
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), BOUND)
        if form.get("client_secret") != [CLIENT_SECRET]:
            body = {"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided. "
                    f"Ensure the secret being sent is the client secret value. Trace ID: x {form['client_secret']}"}
            await request.conn.full(401, "Unauthorized", json.dumps(body).encode(),
                                    [("Content-Type", "application/json")])
            return True
        token = {"token_type": "Bearer", "expires_in": self.expires_in, "ext_expires_in": self.expires_in,
                 "access_token": f"tok-{len(self.forms)}"}
        await request.conn.full(200, "OK", json.dumps(token).encode(), [("Content-Type", "application/json")])
        return True


@pytest.fixture
async def token_http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_client_credentials_request_and_caching(token_http: aiohttp.ClientSession) -> None:
    endpoint = TokenEndpoint()
    now = [1000.0]
    async with RawServer(endpoint) as server:
        tokens = ClientCredentialsTokens(f"http://127.0.0.1:{server.port}/", "contoso.onmicrosoft.com", "app-id",
                                         CLIENT_SECRET, session=token_http, clock=lambda: now[0])
        assert await tokens.token() == "tok-1"
        assert await tokens() == "tok-1"
        now[0] += 3600 - 300 - 1  # until 5 minutes before expiry: the cached one
        assert await tokens.token() == "tok-1"
        now[0] += 1
        assert await tokens.token() == "tok-2"
        tokens.invalidate("tok-1")  # not the cached one any more: nothing happens
        assert await tokens.token() == "tok-2"
        tokens.invalidate("tok-2")
        assert await tokens.token() == "tok-3"
    assert tokens.fetches == 3
    assert endpoint.paths[0] == "/contoso.onmicrosoft.com/oauth2/v2.0/token"
    assert endpoint.forms[0] == {"grant_type": ["client_credentials"], "client_id": ["app-id"],
                                 "client_secret": [CLIENT_SECRET], "scope": ["https://outlook.office365.com/.default"]}
    no_secrets(tokens)


async def test_client_credentials_short_lifetimes_refresh_at_half_life(token_http: aiohttp.ClientSession) -> None:
    now = [0.0]
    async with RawServer(TokenEndpoint(expires_in=120)) as server:
        tokens = ClientCredentialsTokens(f"http://127.0.0.1:{server.port}", "t", "app-id", CLIENT_SECRET,
                                         session=token_http, clock=lambda: now[0])
        assert await tokens.token() == "tok-1"
        now[0] = 59
        assert await tokens.token() == "tok-1"
        now[0] = 60
        assert await tokens.token() == "tok-2"


async def test_client_credentials_one_refresh_at_a_time(token_http: aiohttp.ClientSession) -> None:
    endpoint = TokenEndpoint(gate=asyncio.Event())
    async with RawServer(endpoint) as server:
        tokens = ClientCredentialsTokens(f"http://127.0.0.1:{server.port}", "t", "app-id", CLIENT_SECRET,
                                         session=token_http)
        waiting = [asyncio.create_task(tokens.token()) for _ in range(20)]
        await asyncio.wait_for(endpoint.arrived.wait(), BOUND)
        await asyncio.sleep(0)  # let every task reach the lock
        assert endpoint.gate is not None
        endpoint.gate.set()
        got = await asyncio.wait_for(asyncio.gather(*waiting), BOUND)
    assert got == ["tok-1"] * 20
    assert len(endpoint.forms) == 1 and tokens.fetches == 1


async def test_client_credentials_refusal_is_clear_shared_and_secret_free(token_http: aiohttp.ClientSession) -> None:
    endpoint = TokenEndpoint(gate=asyncio.Event())
    async with RawServer(endpoint) as server:
        tokens = ClientCredentialsTokens(f"http://127.0.0.1:{server.port}", "t", "app-id", CLIENT_SECRET + "x",
                                         session=token_http)
        waiting = [asyncio.create_task(tokens.token()) for _ in range(10)]
        await asyncio.wait_for(endpoint.arrived.wait(), BOUND)
        assert endpoint.gate is not None
        endpoint.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), BOUND)
    assert all(isinstance(r, TokenError) for r in results)
    assert len(endpoint.forms) == 1  # those who waited for the failing fetch share its failure
    error = results[0]
    assert isinstance(error, TokenError)
    assert (error.status, error.error) == (401, "invalid_client")
    assert "AADSTS7000215" in str(error) and "invalid_client" in str(error)
    no_secrets(*results, tokens)


async def test_client_credentials_unreachable(token_http: aiohttp.ClientSession) -> None:
    tokens = ClientCredentialsTokens(f"http://127.0.0.1:{free_port()}", "t", "app-id", CLIENT_SECRET,
                                     session=token_http, timeout=5)
    with pytest.raises(TokenError, match="not reached") as caught:
        await tokens.token()
    assert caught.value.status is None
    no_secrets(caught.value)


async def test_bearer_with_client_credentials_refetches_after_401() -> None:
    endpoint = TokenEndpoint()
    async with RawServer(endpoint) as token_server, RawServer(bearer_server({"tok-2"})) as ews:
        tokens = ClientCredentialsTokens(f"http://127.0.0.1:{token_server.port}", "t", "app-id", CLIENT_SECRET)
        try:
            async with session() as s:
                for provider in (tokens.token, tokens):  # a bound method or the object itself
                    messages = await collect(stream_events(s, ews.url, BearerAuth(provider), BODY, headers=HEADERS))
                    assert messages[-1].connection_status == "Closed"
        finally:
            await tokens.close()
    assert tokens.fetches == 2  # tok-1 refused and invalidated, tok-2 fetched once and then cached


def test_reprs_hide_every_secret() -> None:
    async def provider() -> str:
        return "tok-x"

    objects = [BasicAuth("alice", PASSWORD), NtlmAuth("CORP\\alice", PASSWORD), BearerAuth(provider),
               ClientCredentialsTokens("https://login.microsoftonline.com", "t", "app", CLIENT_SECRET)]
    no_secrets(*objects, *(str(o) for o in objects))
    assert "alice" in repr(objects[0]) and "app" in repr(objects[3])
