"""One GetStreamingEvents connection on aiohttp: every response message as it arrives, heartbeats included,
with a silence watchdog, and every way it can end sorted into one exception.

Why not exchangelib's ``get_streaming_events``: it holds a thread and a pooled requests session per stream, reads
the body a byte at a time, swallows heartbeats (so no watchdog can be built on it), reads with a timeout of
``connection_timeout*60+60`` s, and fails all 200 subscriptions of a stream for one bad id. Here the caller sees
each `StreamMessage` — including error messages naming their ``ErrorSubscriptionIds`` — and decides.

How a stream ends:

- a message with ``ConnectionStatus`` Closed (the ConnectionTimeout ran out, or an error closed it): the
  iterator is exhausted normally after yielding it;
- no byte at all, not even a heartbeat, for `watchdog_seconds` (while waiting for the response headers or for
  any read of the body): `StreamSilent` — the connection is treated as dead and closed;
- a reset, a broken chunked body, or a body that ends without Closed: `StreamDropped`;
- no connection at all (refused, DNS, TLS, connect timeout): `StreamConnectError`;
- an HTTP status other than 200: `StreamHttpError` (401/403 are credentials or EWS being disabled, 503 is
  throttling with `retry_after`), except an HTTP 500 carrying a SOAP Fault, which raises `SoapFault` (e.g.
  ``ErrorServerBusy`` with `back_off_ms`); a Fault inside the 200 stream raises it too;
- bytes that are not the EWS stream: `EwsProtocolError`; an authentication that cannot be carried out:
  `EwsAuthError`.

The response is closed in every case — including the consumer's ``aclose()`` (or leaving ``async with``),
which closes the TCP connection at once. There is no total timeout (a stream lives up to 30 minutes): only the
connect timeout and the per-read watchdog, aiohttp's ``sock_read``, which measures the peer (it is paused while a
slow consumer lets the buffer fill, so a busy consumer is not mistaken for a dead server).

The caller makes one ``ClientSession`` per stream, ``TCPConnector(limit=1)`` (NTLM authenticates a connection;
see `httpauth`), and sets the affinity headers: ``X-AnchorMailbox``, ``X-PreferServerAffinity: true``,
``X-BackEndOverrideCookie`` and ``Cookie: X-BackEndOverrideCookie=…``. A ``cookie_jar=aiohttp.DummyCookieJar()``
keeps the session's jar from re-sending cookies of its own choosing; any affinity cookie the response sets is
on `StreamConnection.backend_cookie`.
"""

from __future__ import annotations

import email.utils
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from types import TracebackType

import aiohttp
from multidict import MultiMapping
from yarl import URL

from bemsmail.sources.ews.httpauth import EwsAuth
from bemsmail.sources.ews.soap import (
    DEFAULT_MAX_ENVELOPE_BYTES,
    EnvelopeSplitter,
    StreamMessage,
    parse_error_response,
    parse_streaming_envelope,
)

BACKEND_COOKIE = "X-BackEndOverrideCookie"
#: how much of a non-200 answer is read to look for a fault or an error message
MAX_ERROR_BODY = 1 * 2**20


class StreamError(Exception):
    """A GetStreamingEvents connection ended other than by ConnectionStatus Closed."""


class StreamHttpError(StreamError):
    """EWS answered a status other than 200; `message` is the EWS error message of its body, if it had one."""

    def __init__(self, status: int, retry_after: float | None = None, message: StreamMessage | None = None) -> None:
        detail = f", retry after {retry_after:g} s" if retry_after is not None else ""
        if message is not None:
            detail += f", {message.response_code}"
        super().__init__(f"EWS answered HTTP {status}{detail}")
        self.status = status
        self.retry_after = retry_after
        self.message = message


class StreamSilent(StreamError):
    """Nothing at all arrived, not even a heartbeat, for the watchdog's time: the connection is taken for dead."""


class StreamDropped(StreamError):
    """The connection broke, or the body ended without ConnectionStatus Closed."""


class StreamConnectError(StreamError):
    """No connection could be made (refused, name resolution, TLS, connect timeout)."""


def response_cookie(response_headers: Mapping[str, str]) -> str | None:
    """The X-BackEndOverrideCookie value a response sets (the last one; an emptied cookie is None)."""
    if isinstance(response_headers, MultiMapping):
        values = response_headers.getall("Set-Cookie", [])
    else:
        values = [v for k, v in response_headers.items() if k.lower() == "set-cookie"]
    found: str | None = None
    matched = False
    for value in values:
        name, _, rest = value.partition(";")[0].partition("=")
        if name.strip().lower() == BACKEND_COOKIE.lower():
            matched = True
            found = rest.strip().strip('"') or None
    return found if matched else None


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    try:
        while size < limit and (chunk := await response.content.read(min(65536, limit - size))):
            parts.append(chunk)
            size += len(chunk)
    except (aiohttp.ClientError, TimeoutError):
        pass  # what arrived is all there is to judge
    return b"".join(parts)


class StreamConnection(AsyncIterator[StreamMessage]):
    """The messages of one GetStreamingEvents connection; also an async context manager that closes it.

    Nothing is sent before the first ``__anext__``. `status`, `response_headers` and `backend_cookie` are set
    once the response headers have arrived.
    """

    def __init__(self, session: aiohttp.ClientSession, url: str, auth: EwsAuth, body: bytes, *,
                 headers: Mapping[str, str], watchdog_seconds: float, connect_timeout: float,
                 max_envelope_bytes: int, on_open: Callable[[], None] | None = None) -> None:
        if watchdog_seconds <= 0 or connect_timeout <= 0:
            raise ValueError("watchdog_seconds and connect_timeout must be positive")
        self.url = url
        self.status: int | None = None
        self.response_headers: Mapping[str, str] | None = None
        self.backend_cookie: str | None = None
        self._session = session
        self._auth = auth
        self._body = body
        self._headers = {**headers, "Content-Type": "text/xml; charset=utf-8", "Accept": "text/xml"}
        self._watchdog = watchdog_seconds
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_connect=connect_timeout,
                                              sock_read=watchdog_seconds)
        self._max_envelope = max_envelope_bytes
        self._on_open = on_open
        self._messages = self._run()

    def __repr__(self) -> str:
        return f"StreamConnection(url={self.url!r}, status={self.status!r})"

    def __aiter__(self) -> StreamConnection:
        return self

    async def __anext__(self) -> StreamMessage:
        return await self._messages.__anext__()

    async def aclose(self) -> None:
        """Stop reading and close the connection now."""
        await self._messages.aclose()

    async def __aenter__(self) -> StreamConnection:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def _connect(self) -> aiohttp.ClientResponse:
        try:
            return await self._auth.authorize(self._session, self.url, self._body, self._headers,
                                              client_timeout=self._timeout)
        except aiohttp.ConnectionTimeoutError as exc:
            raise StreamConnectError(f"no connection to {self._host} (connect timeout)") from exc
        except aiohttp.SocketTimeoutError as exc:
            raise StreamSilent(f"no response from {self._host} within {self._watchdog:g} s") from exc
        except aiohttp.ClientConnectorError as exc:
            raise StreamConnectError(f"no connection to {self._host} ({type(exc).__name__})") from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise StreamDropped(f"{self._host} dropped the connection before answering ({type(exc).__name__})") \
                from exc

    @property
    def _host(self) -> str:
        return URL(self.url).host or "?"

    async def _run(self) -> AsyncGenerator[StreamMessage, None]:
        response = await self._connect()
        try:
            self.status = response.status
            self.response_headers = response.headers
            self.backend_cookie = response_cookie(response.headers)
            if response.status != 200:
                await self._fail(response)
            if self._on_open is not None:
                # The server took the request: its subscriptions exist, and the first envelope may be a
                # heartbeat a while away, so the caller need not wait for it to know the stream is up.
                self._on_open()
            splitter = EnvelopeSplitter(self._max_envelope)
            while True:
                try:
                    chunk = await response.content.readany()
                except aiohttp.SocketTimeoutError as exc:
                    raise StreamSilent(f"nothing from {self._host} for {self._watchdog:g} s") from exc
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError) as exc:
                    raise StreamDropped(f"{self._host} dropped the stream ({type(exc).__name__})") from exc
                if not chunk:
                    raise StreamDropped(f"{self._host} ended the stream without ConnectionStatus Closed")
                for envelope in splitter.feed(chunk):
                    closed = False
                    for message in parse_streaming_envelope(envelope):
                        closed = closed or message.connection_status == "Closed"
                        yield message
                    if closed:
                        return
        finally:
            # Close, not release: the body is unfinished (or was just ended by Closed), and aclose() must
            # end the TCP connection at once rather than leave it to drain.
            response.close()

    async def _fail(self, response: aiohttp.ClientResponse) -> None:
        status = response.status
        retry_after = _retry_after(response.headers.get("Retry-After"))
        body = await _read_bounded(response, MAX_ERROR_BODY)
        message = parse_error_response(body) if status == 500 else None  # a Fault raises SoapFault here
        raise StreamHttpError(status, retry_after, message)


def stream_events(session: aiohttp.ClientSession, url: str, auth: EwsAuth, body: bytes, *,
                  headers: Mapping[str, str], watchdog_seconds: float = 90.0, connect_timeout: float = 30.0,
                  max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
                  on_open: Callable[[], None] | None = None) -> StreamConnection:
    """Open (on first iteration) one GetStreamingEvents connection and yield every message of every envelope as
    it arrives. Use ``async with stream_events(...) as stream: async for message in stream: ...``."""
    return StreamConnection(session, url, auth, body, headers=headers, watchdog_seconds=watchdog_seconds,
                            connect_timeout=connect_timeout, max_envelope_bytes=max_envelope_bytes, on_open=on_open)
