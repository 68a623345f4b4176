"""The APNs sender: renders one app's pushes and sends them over aioapns (HTTP/2), mapping every answer to an Outcome.

aioapns 4.0 keeps the parts it does well here: the connection pool (lazy connections, retry of unsent requests on
another connection) and the TLS / client-certificate set-up. Its per-connection protocol is replaced by a subclass
(the documented way to change the host) that also fixes what a long-running relay cannot live with in the stock
one, each seen against the mock:

- it never acknowledges received DATA, so after ~64 KiB of error bodies on one connection the server cannot send
  another answer and every later error hangs; we acknowledge every frame;
- it json-decodes each DATA frame on its own and dies on an empty or split one; we decode the whole body at
  END_STREAM and tolerate anything;
- a stream reset by the server, or never answered, hangs forever; we fail a reset one and cancel (RST_STREAM) one
  left unanswered well past our deadline, so its slot is freed;
- answers are matched by the echoed apns-id, so two sends of one notification on a connection (a retry after a
  deadline) collide; we match by stream id;
- a cancelled send makes its connection-lost handler crash and strand the other requests; we never touch a done
  future;
- on GOAWAY it re-sends every in-flight request, processed or not; we re-send only streams the server says it did
  not process (id above last_stream_id, RFC 9113 §6.8), and report the others as transport failures;
- every connection signs its own provider JWT; ours share one per app (Apple limits token refreshes);
- it closes connections idle for 10 s; we keep them for 10 min (a new connection costs a TLS handshake);
- it reads no Retry-After; we pass it on;
- it has no connect timeout, and its HTTP CONNECT proxy path fails on Python 3.11 (it hands asyncio's
  TransportSocket wrapper to create_connection); we connect ourselves, tunnel included, under the deadline.

Sending is also cheaper per push than stock aioapns (see scripts/bench_push.py): h2's per-request
header validation is skipped for our own checked values, HPACK indexes what repeats and not what is unique, and
literals are not Huffman-coded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import re
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NoReturn, cast
from urllib.parse import unquote

import jwt
import structlog
from aioapns import APNs
from aioapns.common import NotificationRequest, NotificationResult, PushType
from aioapns.connection import APNsBaseClientProtocol, APNsTLSClientProtocol, AuthorizationHeaderProvider
from aioapns.exceptions import ConnectionClosed, MaxAttemptsExceeded
from aioapns.exceptions import ConnectionError as ApnsConnectionError
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from hpack import Encoder, NeverIndexedHeaderTuple

from bemsmail.config import ApnsAppConfig
from bemsmail.core.model import Environment, Outcome, OutcomeKind, PushKind, PushMessage, token_fingerprint
from bemsmail.push.outcomes import apns_outcome, transport_failure
from bemsmail.push.text import fit, json_cost

log = structlog.get_logger(__name__)

PRODUCTION_HOST = "api.push.apple.com"
SANDBOX_HOST = "api.sandbox.push.apple.com"
APNS_PORT = 443
MAX_PAYLOAD = 4096
MAX_COLLAPSE_ID = 64
JWT_REFRESH_SECONDS = 30 * 60  # Apple: refresh no more than every 20 min and no less than every 60 min
IDLE_CLOSE_SECONDS = 600.0
CONNECT_ATTEMPTS = 3  # aioapns sleeps 1 s between attempts; the dispatcher does the longer retrying
MAX_ABANDONED = 10_000
STREAM_GUARD_EXTRA = 5.0
TITLE_SHARE = 256  # bytes of sender kept when sender and subject together do not fit

_TOKEN = re.compile(r"[0-9a-fA-F]{1,512}")
_APNS_ID_NAMESPACE = uuid.UUID("6f1b8f5e-2a9c-4c53-9d0e-2f3b1f0a7c41")


class PayloadTooLarge(ValueError):
    """The rendered payload cannot be made to fit APNs' 4096 bytes (only rich text is ever shortened)."""


class _StreamFailed(Exception):
    """A stream ended without an answer: timed out, reset by the server, or lost with its connection."""


# --- rendering ----------------------------------------------------------------------------------------------


def encode_payload(payload: dict[str, Any]) -> bytes:
    """The bytes sent: compact JSON, UTF-8 as is (what is measured against the 4096-byte limit)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def render_payload(message: PushMessage, limit: int = MAX_PAYLOAD) -> bytes:
    """The APNs JSON body of `message`, at most `limit` bytes.

    Content-free by default: the alert names a localization key (the category) and the app shows its own text.
    Sender and subject appear only when `message.rich` is set, shortened to fit. `message.data` becomes top-level
    custom keys. Raises PayloadTooLarge when even the content-free form is too big."""
    category = message.category.value
    aps: dict[str, Any]
    alert: dict[str, str] | None = None
    if message.kind is PushKind.BACKGROUND:
        aps = {"content-available": 1}
    elif message.kind is PushKind.BADGE:
        aps = {} if message.badge is None else {"badge": message.badge}
    else:
        alert = {"title-loc-key": f"{category}_TITLE", "loc-key": category}
        aps = {"alert": alert}
        if message.badge is not None:
            aps["badge"] = message.badge
        if message.sound:
            aps["sound"] = message.sound
        aps["category"] = category
        if message.collapse_id:
            aps["thread-id"] = message.collapse_id
    payload: dict[str, Any] = {k: v for k, v in message.data.items() if k != "aps"}
    payload["aps"] = aps
    rich = message.rich if alert is not None else None
    if rich is not None and alert is not None:
        if rich.sender:
            del alert["title-loc-key"]
            alert["title"] = rich.sender
        if rich.subject:
            del alert["loc-key"]
            alert["body"] = rich.subject
        payload["importance"] = rich.importance
    body = encode_payload(payload)
    if len(body) <= limit:
        return body
    if rich is None or alert is None or not ("title" in alert or "body" in alert):
        raise PayloadTooLarge(f"payload is {len(body)} bytes, over {limit}")
    title, text = alert.get("title", ""), alert.get("body", "")
    for key in ("title", "body"):
        if key in alert:
            alert[key] = ""
    room = limit - len(encode_payload(payload))
    if room < 0:
        raise PayloadTooLarge(f"payload without its rich text is over {limit} bytes")
    text_len = json_cost(text)
    title = fit(title, max(min(room, TITLE_SHARE), room - text_len))
    text = fit(text, room - json_cost(title))
    if "title" in alert:
        alert["title"] = title
    if "body" in alert:
        alert["body"] = text
    return encode_payload(payload)


def apns_id(notification_id: str) -> str:
    """The apns-id for a notification: its id if that is a UUID (canonical form), else a UUID derived from it,
    so every retry of one notification carries the same apns-id."""
    try:
        return str(uuid.UUID(notification_id))
    except ValueError:
        return str(uuid.uuid5(_APNS_ID_NAMESPACE, notification_id))


def collapse_id(value: str) -> str:
    """APNs refuses collapse ids over 64 bytes, and a header value must be plain text: anything else is replaced
    by its (stable) SHA-256, so the same group still collapses."""
    if len(value) <= MAX_COLLAPSE_ID and value.isascii() and value.isprintable() and value == value.strip():
        return value
    return hashlib.sha256(value.encode()).hexdigest()


# --- the wire: aioapns' protocol, fixed ----------------------------------------------------------------------


class _Request(NotificationRequest):
    __slots__ = ("body", "expiration")

    def __init__(self, token: str, body: bytes, notification_id: str, expiration: int | None, priority: int,
                 collapse: str | None, push_type: PushType) -> None:
        super().__init__(token, {}, notification_id, None, priority, collapse, push_type)
        self.body = body
        self.expiration = expiration


class _Result(NotificationResult):
    __slots__ = ("retry_after",)

    def __init__(self, notification_id: str, status: str, reason: str | None, timestamp: int | None,
                 retry_after: float | None) -> None:
        super().__init__(notification_id, status, reason, timestamp)
        self.retry_after = retry_after


class _Unindexed(NeverIndexedHeaderTuple):
    """A header HPACK must not add to its table (h2 keeps the tuple class through to the encoder)."""


class _PlainEncoder(Encoder):
    """HPACK without Huffman coding of literals: on a CPU-bound sender (and the Python mock) the pure-Python
    Huffman coder costs more than the few bytes it saves on a 100-byte request."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


class _Stream:
    __slots__ = ("body", "future", "notification_id", "retry_after", "status", "timer")

    def __init__(self, future: asyncio.Future[NotificationResult], notification_id: str) -> None:
        self.future = future
        self.notification_id = notification_id
        self.status = ""
        self.body = b""
        self.retry_after: float | None = None
        self.timer: asyncio.TimerHandle | None = None


class _ProviderToken(AuthorizationHeaderProvider):
    """One provider JWT for every connection of an app, re-signed every 30 minutes."""

    def __init__(self, key_pem: str, key_id: str, team_id: str) -> None:
        self._key = key_pem
        self._key_id = key_id
        self._team_id = team_id
        self._header = ""
        self._issued_at = 0.0

    def get_header(self) -> str:
        now = time.time()
        if not self._header or now - self._issued_at >= JWT_REFRESH_SECONDS:
            token = jwt.encode({"iss": self._team_id, "iat": int(now)}, self._key, algorithm="ES256",
                               headers={"kid": self._key_id})
            self._header = f"bearer {token}"
            self._issued_at = now
        return self._header


def _retry_after(value: bytes | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:  # an HTTP date: rare from APNs; the dispatcher's quota floor still applies
        return None


class _Protocol(APNsTLSClientProtocol):
    """One HTTP/2 connection to APNs (see the module docstring for what differs from aioapns')."""

    APNS_SERVER = PRODUCTION_HOST
    APNS_PORT = APNS_PORT
    INACTIVITY_TIME = IDLE_CLOSE_SECONDS  # type: ignore[assignment]  # aioapns declares an int
    STREAM_TIMEOUT = 10.0
    SHARED_AUTH: AuthorizationHeaderProvider | None = None

    def __init__(
        self,
        apns_topic: str,
        loop: asyncio.AbstractEventLoop | None = None,
        on_connection_lost: Callable[[APNsBaseClientProtocol], Any] | None = None,
        auth_provider: AuthorizationHeaderProvider | None = None,
    ) -> None:
        lost = cast(Callable[[APNsBaseClientProtocol], NoReturn] | None, on_connection_lost)  # aioapns' odd hint
        super().__init__(apns_topic, loop, lost, self.SHARED_AUTH or auth_provider)
        # Only our own, already checked header values go out, so h2's per-request normalization and validation
        # (a third of the client's CPU) are skipped. That also lets HPACK index the provider token, which h2 would
        # send never-indexed and re-encode on every request; HPACK indexes whole values only, so a token with a
        # 256-bit signature cannot be guessed through it (RFC 7541 §7.1.3 is about short secrets).
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None,
                                                 validate_outbound_headers=False, normalize_outbound_headers=False))
        self.conn.encoder = _PlainEncoder()
        self._streams: dict[int, _Stream] = {}
        self._unsent: dict[int, bytes] = {}
        self._active_at = 0.0
        self._discarded = False
        self._goaway = False
        self._lost = False
        host = f"[{self.APNS_SERVER}]" if ":" in self.APNS_SERVER else self.APNS_SERVER
        self._authority = (host if self.APNS_PORT == 443 else f"{host}:{self.APNS_PORT}").encode()

    @property
    def is_busy(self) -> bool:
        return self._goaway or self._lost or self.free_channels.is_busy

    # --- sending ---

    async def send_notification(self, request: NotificationRequest) -> NotificationResult:
        if self._goaway or self._lost:
            raise ConnectionClosed("connection is closing")  # nothing sent: the pool tries another connection
        stream_id = await self.free_channels.acquire()
        if self._goaway or self._lost:
            self.free_channels.release()
            raise ConnectionClosed("connection is closing")
        # Values unique to one request are sent without indexing, so they do not churn the HPACK table out of the
        # values that repeat (authority, topic, push type, priority, provider token), which then cost one byte each.
        headers: list[tuple[bytes, bytes]] = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", self._authority),
            _Unindexed(b":path", b"/3/device/" + request.device_token.encode()),
            _Unindexed(b"apns-id", request.notification_id.encode()),
            (b"apns-topic", (request.apns_topic or self.apns_topic).encode()),
        ]
        if request.push_type is not None:
            headers.append((b"apns-push-type", request.push_type.value.encode()))
        if request.priority is not None:
            headers.append((b"apns-priority", str(request.priority).encode()))
        if isinstance(request, _Request):
            body = request.body
            if request.expiration is not None:
                headers.append((b"apns-expiration", str(request.expiration).encode()))
        else:
            body = json.dumps(request.message, ensure_ascii=False).encode()
            if request.time_to_live is not None:
                headers.append((b"apns-expiration", str(int(time.time()) + request.time_to_live).encode()))
        if request.collapse_key is not None:
            headers.append(_Unindexed(b"apns-collapse-id", request.collapse_key.encode()))
        if self.auth_provider is not None:
            headers.append((b"authorization", self.auth_provider.get_header().encode()))
        try:
            self.conn.send_headers(stream_id, headers)
        except ProtocolError as exc:  # the h2 state is closed: nothing reached the server
            self.free_channels.release()
            raise ConnectionClosed(str(exc)) from exc
        stream = _Stream(self.loop.create_future(), request.notification_id)
        self._streams[stream_id] = stream
        self._send_body(stream_id, body)
        self.flush()
        stream.timer = self.loop.call_later(self.STREAM_TIMEOUT, self._expire, stream_id)
        return await stream.future

    def _send_body(self, stream_id: int, body: bytes) -> None:
        """As much as the server's flow-control window allows; the rest goes on WINDOW_UPDATE."""
        while body:
            room = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if room <= 0:
                self._unsent[stream_id] = body
                return
            chunk, body = body[:room], body[room:]
            self.conn.send_data(stream_id, chunk, end_stream=not body)
        self._unsent.pop(stream_id, None)

    def _resume(self) -> None:
        for stream_id, body in list(self._unsent.items()):
            try:
                self._send_body(stream_id, body)
            except ProtocolError:
                self._unsent.pop(stream_id, None)
                self._fail(stream_id, _StreamFailed("stream closed while sending"))

    def flush(self) -> None:
        # Written at once: coalescing writes per loop iteration was measured to cut throughput by a third.
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
        self.refresh_inactivity_timer()

    def refresh_inactivity_timer(self) -> None:
        # aioapns re-arms a timer on every write; a timestamp and one lazy timer cost less at thousands/s.
        self._active_at = self.loop.time()
        if self.inactivity_timer is None and not self._lost:
            self.inactivity_timer = self.loop.call_later(self.INACTIVITY_TIME, self._check_idle)

    def _check_idle(self) -> None:
        self.inactivity_timer = None
        idle = self.loop.time() - self._active_at
        if idle >= self.INACTIVITY_TIME and not self._streams:
            self.close()
        elif not self._lost:
            self.inactivity_timer = self.loop.call_later(max(1.0, self.INACTIVITY_TIME - idle), self._check_idle)

    # --- receiving ---

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError:
            log.warning("apns_protocol_error", server=self.APNS_SERVER)
            self.flush()
            self.close()
            return
        for event in events:
            if isinstance(event, ResponseReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    for name, value in event.headers:
                        if name == b":status":
                            stream.status = bytes(value).decode("ascii", "replace")
                        elif name == b"retry-after":
                            stream.retry_after = _retry_after(bytes(value))
            elif isinstance(event, DataReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream.body += event.data
                # Give the window back, or after ~64 KiB of error bodies the server can answer nothing more.
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                self._finish(event.stream_id)
            elif isinstance(event, StreamReset):
                if event.error_code == ErrorCodes.REFUSED_STREAM:  # not processed: safe to send again
                    self._fail(event.stream_id, ConnectionClosed("stream refused"))
                else:
                    self._fail(event.stream_id, _StreamFailed(f"stream reset by server ({event.error_code!s})"))
            elif isinstance(event, WindowUpdated):
                self._resume()
            elif isinstance(event, RemoteSettingsChanged):
                self.on_remote_settings_changed(event.changed_settings)  # type: ignore[arg-type]  # int keys
            elif isinstance(event, ConnectionTerminated):
                self._on_goaway(event)
        self.flush()

    def _release(self, stream_id: int) -> _Stream | None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return None
        self._unsent.pop(stream_id, None)
        if stream.timer is not None:
            stream.timer.cancel()
        self.free_channels.release()
        if self._goaway and not self._streams:
            self.close()
        return stream

    def _finish(self, stream_id: int) -> None:
        stream = self._release(stream_id)
        if stream is None or stream.future.done():
            return
        if not stream.status:
            stream.future.set_exception(_StreamFailed("stream ended without a status"))
            return
        reason: str | None = None
        timestamp: int | None = None
        if stream.body:
            try:
                data = json.loads(stream.body)
            except ValueError:
                data = None
            if isinstance(data, dict):
                reason = str(data.get("reason") or "") or None
                raw = data.get("timestamp")
                timestamp = int(raw) if isinstance(raw, int | float) else None
        stream.future.set_result(_Result(stream.notification_id, stream.status, reason, timestamp,
                                         stream.retry_after))

    def _fail(self, stream_id: int, exc: Exception) -> None:
        stream = self._release(stream_id)
        if stream is not None and not stream.future.done():
            stream.future.set_exception(exc)

    def _expire(self, stream_id: int) -> None:
        if stream_id not in self._streams:
            return
        with contextlib.suppress(H2Error):  # the stream closed meanwhile: nothing to cancel
            self.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
        self._fail(stream_id, _StreamFailed(f"no answer within {self.STREAM_TIMEOUT:g}s"))
        self.flush()

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        self._goaway = True
        self._discard()
        last = event.last_stream_id if event.last_stream_id is not None else 0
        log.info("apns_goaway", server=self.APNS_SERVER, code=str(event.error_code), last_stream_id=last,
                 data=(event.additional_data or b"")[:200].decode("utf-8", "replace"))
        for stream_id in [s for s in self._streams if s > last]:
            self._fail(stream_id, ConnectionClosed("GOAWAY: stream not processed"))
        if not self._streams:
            self.close()

    def _discard(self) -> None:
        """Leave the pool exactly once (aioapns issue #55: a second removal raises ValueError)."""
        if self._discarded:
            return
        self._discarded = True
        callback = cast(Callable[[APNsBaseClientProtocol], None] | None, self.on_connection_lost)
        if callback is not None:
            with contextlib.suppress(ValueError):
                callback(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self.inactivity_timer is not None:
            self.inactivity_timer.cancel()
            self.inactivity_timer = None
        self._discard()
        self.free_channels.destroy(ConnectionClosed(str(exc)))  # waiting for a slot: never sent, safe to retry
        for stream_id in list(self._streams):
            self._fail(stream_id, _StreamFailed(f"connection lost ({exc or 'closed'})"))


def _bound_protocol(host: str, port: int, stream_timeout: float,
                    auth: AuthorizationHeaderProvider | None) -> type[_Protocol]:
    class Bound(_Protocol):
        APNS_SERVER = host
        APNS_PORT = port
        STREAM_TIMEOUT = stream_timeout
        SHARED_AUTH = auth

    return Bound


@dataclass(frozen=True, slots=True)
class _Proxy:
    host: str
    port: int
    basic_auth: str | None = field(default=None, repr=False)


async def _tunnel(proxy: _Proxy, host: str, port: int) -> socket.socket:
    """A TCP socket to host:port through an HTTP CONNECT proxy, ready for TLS."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"cannot resolve proxy {proxy.host}")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        if proxy.basic_auth:
            request += f"Proxy-Authorization: Basic {proxy.basic_auth}\r\n"
        await loop.sock_sendall(sock, (request + "\r\n").encode())
        reply = b""
        while b"\r\n\r\n" not in reply:  # TLS speaks client-first: nothing follows the reply's header
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk or len(reply) > 16384:
                raise OSError("proxy closed the connection during CONNECT")
            reply += chunk
        status_line = reply.split(b"\r\n", 1)[0]
        status = status_line.split(None, 2)
        if len(status) < 2 or status[1] != b"200":
            raise OSError(f"proxy refused CONNECT: {status_line[:120]!r}")
    except BaseException:
        sock.close()
        raise
    return sock


# --- the sender ------------------------------------------------------------------------------------------------

_TRANSPORT_ERRORS = (MaxAttemptsExceeded, ApnsConnectionError, ConnectionClosed, _StreamFailed, OSError, H2Error,
                     asyncio.IncompleteReadError)


async def _quiet(request: NotificationRequest, result: NotificationResult) -> None:
    """aioapns logs every rejection at ERROR unless given this; the relay records outcomes itself."""


class ApnsSender:
    """The PushSender for one configured APNs app: one aioapns client per environment, built on first use."""

    def __init__(self, config: ApnsAppConfig) -> None:
        self.config = config
        self.app_id = config.id
        self.timeout = config.timeout_seconds
        self._clients: dict[Environment, APNs] = {}
        self._abandoned: dict[asyncio.Task[NotificationResult], None] = {}
        self._closed = False
        self._connect_error: tuple[float, str] = (0.0, "")
        self._auth: _ProviderToken | None = None
        self._expiry: datetime | None = None
        if config.auth == "token":
            assert config.key_file and config.key_id and config.team_id  # checked by the config model
            self._auth = _ProviderToken(config.key_file.read_text(encoding="utf-8"), config.key_id, config.team_id)
        else:
            assert config.cert_file is not None
            from cryptography import x509

            self._expiry = x509.load_pem_x509_certificate(config.cert_file.read_bytes()).not_valid_after_utc
        endpoint = config.endpoint
        if endpoint is None:
            self._endpoints = {Environment.PRODUCTION: (PRODUCTION_HOST, APNS_PORT),
                               Environment.SANDBOX: (SANDBOX_HOST, APNS_PORT)}
        else:
            self._endpoints = {
                Environment.PRODUCTION: (endpoint.host, endpoint.port),
                Environment.SANDBOX: (endpoint.sandbox_host or endpoint.host, endpoint.sandbox_port or endpoint.port),
            }
        proxy = config.proxy_url
        self._proxy: _Proxy | None = None
        if proxy is not None and proxy.host:
            credentials = None
            if proxy.username:
                user_pass = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
                credentials = base64.b64encode(user_pass.encode()).decode()
            self._proxy = _Proxy(proxy.host.strip("[]"), proxy.port or 80, credentials)

    async def start(self) -> None:
        """Build both environments' clients and sign the provider token now, so a bad credential shows at start
        (logged; sends then report it as a configuration failure). Connections open on the first send."""
        for environment in (Environment.PRODUCTION, Environment.SANDBOX):
            try:
                self._client(environment)
            except (ValueError, TypeError, OSError, jwt.PyJWTError) as exc:
                log.error("apns_client_failed", app=self.app_id, environment=environment.value,
                          error=f"{type(exc).__name__}: {exc}")

    def credential_expiry(self) -> datetime | None:
        """When the provider certificate in use expires (certificate auth); None for a .p8 token key."""
        return self._expiry

    # --- clients ---

    def _ssl_context(self) -> ssl.SSLContext:
        endpoint = self.config.endpoint
        cafile = str(endpoint.ca_file) if endpoint is not None and endpoint.ca_file is not None else None
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.set_alpn_protocols(["h2"])  # aioapns sets none; APNs speaks only HTTP/2
        return ctx

    def _client(self, environment: Environment) -> APNs:
        client = self._clients.get(environment)
        if client is None:
            client = self._build(environment)
            self._clients[environment] = client
        return client

    def _build(self, environment: Environment) -> APNs:
        """Inside the running loop (aioapns binds its pool to it)."""
        config = self.config
        host, port = self._endpoints[environment]
        common: dict[str, Any] = {
            "topic": config.topic,
            "max_connections": config.max_connections,
            "max_connection_attempts": CONNECT_ATTEMPTS,
            "use_sandbox": environment is Environment.SANDBOX,
            "ssl_context": self._ssl_context(),
            "err_func": _quiet,
        }
        if self._auth is not None:
            self._auth.get_header()  # sign once now: a bad key is a configuration failure, not a send error
            assert config.key_id and config.team_id
            client = APNs(key=self._auth._key, key_id=config.key_id, team_id=config.team_id, **common)
        else:
            client = APNs(client_cert=str(config.cert_file), **common)
        pool = client.pool
        # The per-stream guard only frees the slot of a stream APNs never answers; our own deadline (below) decides
        # the outcome first, so the guard sits well after it.
        protocol = _bound_protocol(host, port, max(2 * self.timeout, self.timeout + STREAM_GUARD_EXTRA), self._auth)
        pool.protocol_class = protocol
        ssl_context = pool.ssl_context
        proxy = self._proxy
        timeout = self.timeout

        async def connect() -> APNsBaseClientProtocol:
            loop = asyncio.get_running_loop()
            factory = functools.partial(protocol, config.topic, loop, pool.discard_connection)
            if proxy is None:
                _, conn = await loop.create_connection(factory, host, port, ssl=ssl_context)
            else:
                sock = await _tunnel(proxy, host, port)
                try:
                    _, conn = await loop.create_connection(factory, sock=sock, ssl=ssl_context,
                                                           server_hostname=host)
                except BaseException:
                    sock.close()
                    raise
            return conn

        async def connect_with_deadline() -> APNsBaseClientProtocol:
            # aioapns has no connect timeout (a black-holed host would hold the pool's lock for minutes), and its
            # proxy path hands asyncio's TransportSocket wrapper to create_connection, which fails on 3.11.
            try:
                return await asyncio.wait_for(connect(), timeout)
            except Exception as exc:
                # aioapns turns this into a bare ConnectionError and retries; keep the cause for the outcome.
                self._connect_error = (time.monotonic(), f"{type(exc).__name__}: {exc}"[:300])
                raise

        pool.create_connection = connect_with_deadline  # type: ignore[method-assign]
        log.info("apns_client_ready", app=self.app_id, environment=environment.value, host=host, port=port,
                 auth=config.auth, proxy=bool(self._proxy))
        return client

    # --- sending ---

    async def send(self, message: PushMessage) -> Outcome:
        """Send one push within `timeout` seconds; never raises for APNs or network trouble."""
        if self._closed:
            return transport_failure("APNs sender closed")
        if not _TOKEN.fullmatch(message.token):
            return apns_outcome(400, "BadDeviceToken")  # what APNs would say; not worth a round trip
        try:
            body = render_payload(message)
        except PayloadTooLarge:
            return apns_outcome(413, "PayloadTooLarge")
        background = message.kind is PushKind.BACKGROUND
        request = _Request(
            message.token,
            body,
            apns_id(message.notification_id),
            max(0, int(message.expires_at.timestamp())),
            5 if background else int(message.priority),
            collapse_id(message.collapse_id) if message.collapse_id else None,
            PushType.BACKGROUND if background else PushType.ALERT,
        )
        try:
            client = self._client(message.environment)
        except (ValueError, TypeError, OSError, jwt.PyJWTError) as exc:  # unreadable key or certificate
            log.error("apns_client_failed", app=self.app_id, error=f"{type(exc).__name__}: {exc}")
            return Outcome(OutcomeKind.CONFIG_FAILURE, f"APNs credentials unusable: {type(exc).__name__}")
        task = asyncio.create_task(client.send_notification(request))
        try:
            # shield: a cancelled aioapns send corrupts its connection; the task runs on and is discarded.
            result = await asyncio.wait_for(asyncio.shield(task), self.timeout)
        except TimeoutError:
            self._abandon(task)
            return self._failed(message, self._with_cause(f"no answer within {self.timeout:g}s"))
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        except _TRANSPORT_ERRORS as exc:
            return self._failed(message, self._with_cause(f"{type(exc).__name__}: {exc}" if str(exc)
                                                          else type(exc).__name__))
        status = int(result.status) if result.status.isdigit() else 0
        if not status:
            return self._failed(message, f"unreadable status {result.status!r}")
        return apns_outcome(status, result.description, result.timestamp,
                            result.retry_after if isinstance(result, _Result) else None)

    def _with_cause(self, what: str) -> str:
        """Name the connect failure of this send, if any: aioapns reports only that its attempts ran out."""
        failed_at, error = self._connect_error
        if error and time.monotonic() - failed_at <= self.timeout:
            what += f" (connecting failed: {error})"
        return what

    def _failed(self, message: PushMessage, what: str) -> Outcome:
        log.debug("apns_transport_failure", app=self.app_id, token=token_fingerprint(message.token)[:12], error=what)
        return transport_failure(what)

    def _abandon(self, task: asyncio.Task[NotificationResult]) -> None:
        """Keep a timed-out send referenced until it ends on its own (its stream times out or its connection goes)."""
        self._abandoned[task] = None
        task.add_done_callback(self._abandoned_done)
        if len(self._abandoned) > MAX_ABANDONED:
            next(iter(self._abandoned)).cancel()  # oldest first; our protocol copes with cancelled sends

    def _abandoned_done(self, task: asyncio.Task[NotificationResult]) -> None:
        self._abandoned.pop(task, None)
        if not task.cancelled():
            exc = task.exception()  # retrieved, so asyncio does not warn
            if exc is not None and not isinstance(exc, _TRANSPORT_ERRORS):
                log.warning("apns_abandoned_send_failed", app=self.app_id, error=type(exc).__name__)

    async def close(self) -> None:
        """Cancel abandoned sends and close every connection."""
        self._closed = True
        pending = list(self._abandoned)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for client in self._clients.values():
            client.pool.close()
        self._clients.clear()
        await asyncio.sleep(0)  # let the transports run their connection_lost


__all__ = ["ApnsSender", "PayloadTooLarge", "apns_id", "collapse_id", "encode_payload", "render_payload"]
