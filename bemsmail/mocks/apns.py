"""A mock APNs that is a real server: HTTP/2 over TLS on raw h2, checking what Apple checks, scriptable and counted.

Why raw h2 and not an ASGI server: real APNs answers 200 with HEADERS + END_STREAM only and errors with HEADERS and
one JSON DATA frame; aioapns json-decodes every DATA frame, so a server that ends streams with an empty DATA frame
(hypercorn does) breaks it. The per-request path is kept lean (no per-request parsing beyond headers, JWTs verified
once per exact string) so one mock process is not the bottleneck of a load test.

In-process: ``async with MockApns(cert_dir, topics=[...], keys=[...]) as mock: ...`` (port 0 picks free ports).
As a process: ``python -m bemsmail.mocks.apns --cert-dir DIR --topic T --key-id K --team-id T --public-key-file F``
prints one JSON line with its ports when ready and serves until SIGTERM/SIGINT. The control API (plain HTTP/1.1):
``POST /mock/script``, ``GET /mock/stats``, ``GET /mock/requests?limit=N``, ``GET /mock/received?after=N`` (every
push after the N-th, for load tests), ``POST /mock/reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import re
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hpack import Encoder, NeverIndexedHeaderTuple

from bemsmail.mocks.feed import MAX_PAGE, received_handler, rows_after
from bemsmail.mocks.tls import TestPki, ensure_test_pki

MAX_PAYLOAD = 4096
JWT_MAX_AGE = 3600  # Apple refuses provider tokens older than one hour
JWT_CACHE_SIZE = 10_000
PUSH_TYPES = frozenset(
    b"alert background voip complication fileprovider mdm liveactivity location pushtotalk widgets".split()
)
PRIORITIES = frozenset((b"1", b"5", b"10"))
_HEX = re.compile(rb"[0-9a-fA-F]+")
_UUID = re.compile(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_DIGITS = re.compile(rb"[0-9]+")
_PATH_PREFIX = b"/3/device/"
_UNLIMITED = 2**31 - 1

Action = Literal["answer", "hang", "reset"]


def _memoize_hpack_huffman() -> None:
    """hpack decodes Huffman in pure Python (~70 us for a provider JWT, the largest share of a request's cost);
    the JWT and most other values repeat on every request, so remember the results. A pure function: sharing
    the cache with a client in the same process changes nothing but speed."""
    import hpack.hpack as hpack_module

    namespace = vars(hpack_module)
    original: Callable[[bytes | bytearray | memoryview | None], bytes] = namespace["decode_huffman"]
    if getattr(original, "bemsmail_memoized", False):
        return
    cached = functools.lru_cache(maxsize=4096)(original)

    def decode_huffman(data: bytes | bytearray | memoryview | None) -> bytes:
        return cached(data) if type(data) is bytes else original(data)

    decode_huffman.bemsmail_memoized = True  # type: ignore[attr-defined]
    namespace["decode_huffman"] = decode_huffman


_memoize_hpack_huffman()


@dataclass(slots=True)
class Answer:
    """What the mock answers to a request that passed its checks.

    `action`: "answer" (status/reason), "hang" (never answer the stream), "reset" (RST_STREAM INTERNAL_ERROR).
    `times`: how many more requests this answer applies to (None: until changed); a spent per-token answer falls
    back to the default answer."""

    status: int = 200
    reason: str = ""
    timestamp_ms: int | None = None  # 410 only; default: now
    retry_after: int | None = None  # seconds, sent as a Retry-After header
    latency_ms: float | None = None  # None: the server's default latency
    action: Action = "answer"
    times: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Answer:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown answer keys: {', '.join(sorted(unknown))}")
        answer = cls(**data)
        if answer.action not in ("answer", "hang", "reset"):
            raise ValueError(f"unknown action {answer.action!r}")
        if not 200 <= int(answer.status) <= 599:
            raise ValueError(f"status {answer.status!r} out of range")
        return answer

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ProviderKey:
    """A provider signing key the mock accepts: JWTs with `kid` = key_id and `iss` = team_id."""

    key_id: str
    team_id: str
    public_key: ec.EllipticCurvePublicKey


def load_provider_key(key_id: str, team_id: str, pem: bytes | str | Path) -> ProviderKey:
    """Accept the public key, or the .p8 private key itself (its public half is taken)."""
    data = Path(pem).read_bytes() if isinstance(pem, Path) else pem.encode() if isinstance(pem, str) else pem
    try:
        public = load_pem_public_key(data)
    except ValueError:
        private = load_pem_private_key(data, password=None)
        public = private.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ValueError("an APNs provider key must be an EC P-256 key")
    return ProviderKey(key_id, team_id, public)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the mock saw it, with what it answered."""

    token: str
    headers: dict[str, str]
    payload: Any  # the parsed JSON, or None if the body was not JSON
    status: int | None  # None: not answered (hang, reset)
    reason: str
    apns_id: str
    connection: int
    auth: Literal["token", "certificate"] | None
    at: float


@dataclass(slots=True)
class MockStats:
    """Counters since the last reset."""

    requests: int = 0
    by_token: collections.Counter[str] = field(default_factory=collections.Counter)
    by_status: collections.Counter[int] = field(default_factory=collections.Counter)
    distinct_apns_ids: int = 0
    duplicate_apns_ids: int = 0
    connections: int = 0
    open_connections: int = 0
    goaways: int = 0
    drops: int = 0
    resets: int = 0
    hung: int = 0
    refused_streams: int = 0
    provider_tokens: int = 0  # distinct JWT strings seen

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["by_token"] = dict(self.by_token)
        data["by_status"] = {str(k): v for k, v in sorted(self.by_status.items())}
        return data


class _PlainEncoder(Encoder):
    """HPACK without Huffman: the pure-Python coder costs more CPU (here and in the client) than it saves bytes."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


_STATUS_200 = (b":status", b"200")


class _Request:
    __slots__ = ("body", "headers")

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers
        self.body = b""


class _Connection(asyncio.Protocol):
    """One client connection: an h2 state machine and the streams in flight on it."""

    def __init__(self, server: MockApns) -> None:
        self.server = server
        self.id = 0
        self.transport: asyncio.Transport | None = None
        self.h2: H2Connection | None = None
        self.requests: dict[int, _Request] = {}
        self.open: set[int] = set()  # request streams not answered yet (receiving, delayed, hung)
        self.blocked: dict[int, bytes] = {}  # error bodies waiting for flow-control window
        self.count = 0  # requests processed on this connection
        self.last_sid = 0
        self.delayed = 0
        self.draining = False  # GOAWAY decided, waiting for delayed answers
        self.closed = False
        self.cert_topics: frozenset[bytes] = frozenset()

    # --- connection -------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        server = self.server
        self.id = server._register(self)
        peer = self.transport.get_extra_info("peercert")
        if peer:
            uids = [value for rdn in peer.get("subject", ()) for key, value in rdn if key == "userId"]
            self.cert_topics = frozenset(u.encode() for u in uids)
        h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None,
                                          validate_inbound_headers=server.validate_headers,
                                          normalize_inbound_headers=server.validate_headers))
        # The advertised limit is enforced by us with REFUSED_STREAM (a stream error a client can retry), not by
        # h2, which would kill the whole connection for a client that bursts before it has read our SETTINGS.
        h2.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: server.max_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
        })
        h2.initiate_connection()
        h2.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: _UNLIMITED,
            SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
        })
        h2.encoder = _PlainEncoder()
        self.h2 = h2
        self.transport.write(h2.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._unregister(self)

    def _flush(self) -> None:
        if self.closed or self.h2 is None or self.transport is None:
            return
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        h2 = self.h2
        if h2 is None or self.closed:
            return
        try:
            events = h2.receive_data(data)
        except ProtocolError:
            self._flush()  # h2 has queued its GOAWAY
            self._close()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                sid = event.stream_id
                if len(self.open) >= self.server.max_streams or self.draining:
                    self.server.stats.refused_streams += 1
                    self._reset(sid, ErrorCodes.REFUSED_STREAM)
                    continue
                self.requests[sid] = _Request(event.headers)
                self.open.add(sid)
            elif isinstance(event, DataReceived):
                request = self.requests.get(event.stream_id)
                if request is not None:
                    request.body += event.data
                h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                request = self.requests.pop(event.stream_id, None)
                if request is not None:
                    self._handle(event.stream_id, request)
            elif isinstance(event, StreamReset):
                sid = event.stream_id
                self.requests.pop(sid, None)
                self.blocked.pop(sid, None)
                self.open.discard(sid)
            elif isinstance(event, WindowUpdated):
                self._unblock()
            elif isinstance(event, ConnectionTerminated):
                self._close()
                return
        self._flush()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def _reset(self, sid: int, code: ErrorCodes) -> None:
        assert self.h2 is not None
        with contextlib.suppress(StreamClosedError, ProtocolError):  # already closed: nothing to reset
            self.h2.reset_stream(sid, code)
        self.open.discard(sid)

    # --- one request --------------------------------------------------------------------------------------

    def _handle(self, sid: int, request: _Request) -> None:
        server = self.server
        script = server.script
        if self.draining:
            return
        if script.drop_after is not None and self.count >= script.drop_after:
            server.stats.drops += 1
            self.closed = True
            server._unregister(self)
            assert self.transport is not None
            self.transport.abort()  # no GOAWAY, no TLS close: the connection just dies
            return
        if script.goaway_after is not None and self.count >= script.goaway_after:
            self.open.discard(sid)
            self.draining = True
            self._maybe_goaway()
            return
        self.count += 1
        self.last_sid = sid
        status, reason, apns_id, answer, auth, token = server._evaluate(request, self)
        if answer is not None and answer.action != "answer":
            if answer.action == "hang":
                server.stats.hung += 1
            else:
                server.stats.resets += 1
                self._reset(sid, ErrorCodes.INTERNAL_ERROR)
            server._record(request, token, None, answer.action, apns_id, self.id, auth)
            return
        timestamp = None
        retry_after = None
        latency = server.latency_ms
        if answer is not None:
            timestamp = answer.timestamp_ms
            retry_after = answer.retry_after
            if answer.latency_ms is not None:
                latency = answer.latency_ms
        if status == 410 and timestamp is None:
            timestamp = int(time.time() * 1000)
        server._record(request, token, status, reason, apns_id, self.id, auth)
        if latency > 0:
            self.delayed += 1
            asyncio.get_running_loop().call_later(
                latency / 1000, self._answer_later, sid, status, reason, apns_id, timestamp, retry_after
            )
        else:
            self._answer(sid, status, reason, apns_id, timestamp, retry_after)

    def _answer_later(self, sid: int, status: int, reason: str, apns_id: bytes, timestamp: int | None,
                      retry_after: int | None) -> None:
        self.delayed -= 1
        if not self.closed:
            self._answer(sid, status, reason, apns_id, timestamp, retry_after)
            self._flush()
            if self.draining:
                self._maybe_goaway()

    def _answer(self, sid: int, status: int, reason: str, apns_id: bytes, timestamp: int | None,
                retry_after: int | None) -> None:
        if sid not in self.open:
            return  # reset by the client meanwhile
        h2 = self.h2
        assert h2 is not None
        try:
            if status == 200:
                h2.send_headers(sid, [_STATUS_200, NeverIndexedHeaderTuple(b"apns-id", apns_id)], end_stream=True)
                self.open.discard(sid)
                return
            headers = [(b":status", str(status).encode()), NeverIndexedHeaderTuple(b"apns-id", apns_id),
                       (b"content-type", b"application/json")]
            if retry_after is not None:
                headers.append((b"retry-after", str(retry_after).encode()))
            body: dict[str, object] = {"reason": reason}
            if timestamp is not None:
                body["timestamp"] = timestamp
            h2.send_headers(sid, headers)
            self._send_body(sid, json.dumps(body, separators=(",", ":")).encode())
        except (StreamClosedError, ProtocolError):
            self.open.discard(sid)

    def _send_body(self, sid: int, body: bytes) -> None:
        """Send the error body as ONE DATA frame, as APNs does (aioapns json-decodes each frame on its own), once
        the peer's flow-control window has room for all of it; until then it waits for WINDOW_UPDATE."""
        h2 = self.h2
        assert h2 is not None
        if min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size) >= len(body):
            h2.send_data(sid, body, end_stream=True)
            self.blocked.pop(sid, None)
            self.open.discard(sid)
        else:
            self.blocked[sid] = body

    def _unblock(self) -> None:
        for sid, body in list(self.blocked.items()):
            try:
                self._send_body(sid, body)
            except (StreamClosedError, ProtocolError):
                self.blocked.pop(sid, None)
                self.open.discard(sid)

    def _maybe_goaway(self) -> None:
        """Send GOAWAY once the answers already promised are out: streams after `last_sid` were not processed."""
        if self.delayed or self.closed or self.h2 is None:
            return
        self.server.stats.goaways += 1
        with contextlib.suppress(ProtocolError):  # the client closed first
            self.h2.close_connection(ErrorCodes.NO_ERROR, b'{"reason":"Shutdown"}', last_stream_id=self.last_sid)
        self._flush()
        self._close()


@dataclass(slots=True)
class Script:
    """How the mock answers: a default, answers per device token, and faults per connection."""

    default: Answer = field(default_factory=Answer)
    tokens: dict[str, Answer] = field(default_factory=dict)
    goaway_after: int | None = None  # per connection: GOAWAY instead of processing request N+1
    drop_after: int | None = None  # per connection: drop the connection on request N+1

    def to_json(self) -> dict[str, Any]:
        return {
            "default": self.default.to_json(),
            "tokens": {t: a.to_json() for t, a in self.tokens.items()},
            "goaway_after": self.goaway_after,
            "drop_after": self.drop_after,
        }


class MockApns:
    """The mock server. Checks, in order: method and path (405 MethodNotAllowed, 404 BadPath), duplicate headers,
    device token (400 MissingDeviceToken / BadDeviceToken), apns-id (400 BadMessageId), authentication (bearer JWT:
    403 InvalidProviderToken / ExpiredProviderToken; else a client certificate from the mock CA; else 403
    MissingProviderToken), topic (400 MissingTopic / TopicDisallowed), apns-push-type / -priority / -expiration /
    -collapse-id (400 InvalidPushType / BadPriority / BadExpirationDate / BadCollapseId), payload (400 PayloadEmpty,
    413 PayloadTooLarge). A request that passes is answered by the script."""

    def __init__(
        self,
        cert_dir: Path | TestPki,
        *,
        topics: Sequence[str] = (),
        keys: Sequence[ProviderKey] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        control_port: int | None = 0,
        max_streams: int = 1000,
        latency_ms: float = 0.0,
        history: int = 100,
        validate_headers: bool = True,
    ) -> None:
        self.pki = cert_dir if isinstance(cert_dir, TestPki) else ensure_test_pki(Path(cert_dir))
        self.host = host
        self.topics = frozenset(t.encode() for t in topics)
        self.keys = {k.key_id: k for k in keys}
        self.max_streams = max_streams
        self.latency_ms = latency_ms
        # h2's inbound header validation is a third of the mock's CPU; a load test may turn it off.
        self.validate_headers = validate_headers
        self.script = Script()
        self.stats = MockStats()
        self._port = port
        self._control_port = control_port
        self._history: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=history)
        self._recorded = 0  # requests ever put in the history: the numbering GET /mock/received follows
        self._apns_ids: set[bytes] = set()
        self._jwt_cache: dict[bytes, tuple[str, float]] = {}
        self._connections: dict[int, _Connection] = {}
        self._watchers: list[tuple[Callable[[MockStats], bool], asyncio.Future[None]]] = []
        self._next_connection = 0
        self._server: asyncio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._bound_port = 0
        self._bound_control_port = 0

    # --- lifecycle ---------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound TLS port (valid after start)."""
        return self._bound_port

    @property
    def control_port(self) -> int:
        """The bound control-API port (0 when there is none)."""
        return self._bound_control_port

    @property
    def ca_file(self) -> Path:
        """The CA certificate a client must trust."""
        return self.pki.ca_cert

    @property
    def control_url(self) -> str:
        return f"http://{self.host}:{self.control_port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ctx = self.pki.server_context(alpn=("h2",), client_auth=True)
        self._server = await loop.create_server(lambda: _Connection(self), self.host, self._port, ssl=ctx,
                                                backlog=1024)
        self._bound_port = self._server.sockets[0].getsockname()[1]
        if self._control_port is not None:
            app = web.Application()
            app.router.add_post("/mock/script", self._h_script)
            app.router.add_get("/mock/script", self._h_get_script)
            app.router.add_get("/mock/stats", self._h_stats)
            app.router.add_get("/mock/requests", self._h_requests)
            app.router.add_get("/mock/received", received_handler(self.received))
            app.router.add_post("/mock/reset", self._h_reset)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self._control_port)
            await site.start()
            server = cast(asyncio.Server, site._server)
            self._bound_control_port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self._connections.values()):
                if conn.transport is not None:
                    conn.transport.abort()
            self._connections.clear()
            await self._server.wait_closed()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> MockApns:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _register(self, conn: _Connection) -> int:
        self._next_connection += 1
        self._connections[self._next_connection] = conn
        self.stats.connections += 1
        self.stats.open_connections += 1
        return self._next_connection

    def _unregister(self, conn: _Connection) -> None:
        if self._connections.pop(conn.id, None) is not None:
            self.stats.open_connections -= 1

    # --- scripting ---------------------------------------------------------------------------------------

    def set_default(self, answer: Answer) -> None:
        """The answer to every token without an answer of its own."""
        self.script.default = answer

    def set_token(self, token: str, answer: Answer | None) -> None:
        """The answer for one device token (None: back to the default)."""
        if answer is None:
            self.script.tokens.pop(token.lower(), None)
        else:
            self.script.tokens[token.lower()] = answer

    def set_faults(self, *, goaway_after: int | None = None, drop_after: int | None = None) -> None:
        """Per connection: send GOAWAY (unprocessed streams may be retried) or drop the connection instead of
        processing the request after the first N; None turns a fault off."""
        self.script.goaway_after = goaway_after
        self.script.drop_after = drop_after

    def apply_script(self, data: Mapping[str, Any]) -> None:
        """The control API's form: {"default": answer, "tokens": {token: answer | null}, "clear_tokens": bool,
        "goaway_after": n | null, "drop_after": n | null, "latency_ms": ms}; keys left out are unchanged."""
        unknown = set(data) - {"default", "tokens", "clear_tokens", "goaway_after", "drop_after", "latency_ms"}
        if unknown:
            raise ValueError(f"unknown script keys: {', '.join(sorted(unknown))}")
        default = Answer.from_json(data["default"]) if "default" in data else None
        tokens = {t: (Answer.from_json(a) if a is not None else None) for t, a in data.get("tokens", {}).items()}
        if default is not None:
            self.set_default(default)
        if data.get("clear_tokens"):
            self.script.tokens.clear()
        for token, answer in tokens.items():
            self.set_token(token, answer)
        if "goaway_after" in data:
            self.script.goaway_after = data["goaway_after"]
        if "drop_after" in data:
            self.script.drop_after = data["drop_after"]
        if "latency_ms" in data:
            self.latency_ms = float(data["latency_ms"])

    def reset(self, *, script: bool = True, stats: bool = True) -> None:
        if script:
            self.script = Script()
        if stats:
            self.stats = MockStats(open_connections=len(self._connections))
            self._history.clear()
            self._apns_ids.clear()

    def recent(self, limit: int | None = None) -> list[RecordedRequest]:
        """The last requests (oldest first), decoded."""
        rows = list(self._history)
        if limit is not None:
            rows = rows[-limit:] if limit > 0 else []
        return [self._decode(row) for row in rows]

    def received(self, after: int = 0, limit: int = MAX_PAGE) -> dict[str, Any]:
        """What arrived after request number `after`, in the shape a load test follows (see mocks.feed): each
        push's token, status, reason, arrival time and custom data (the payload's keys but "aps")."""
        start, rows = rows_after(self._history, self._recorded, after, limit)
        pushes = []
        for _headers, body, token, status, reason, apns_id, _conn, _auth, at in rows:
            try:
                payload = json.loads(body) if body else None
            except ValueError:
                payload = None
            data = {k: v for k, v in payload.items() if k != "aps"} if isinstance(payload, dict) else {}
            pushes.append({"token": token, "status": status, "reason": reason, "at": at, "data": data,
                           "id": apns_id.decode()})
        return {"after": start, "next": start + len(rows), "total": self._recorded, "pushes": pushes}

    @staticmethod
    def _decode(row: tuple[Any, ...]) -> RecordedRequest:
        headers_raw, body, token, status, reason, apns_id, conn, auth, at = row
        headers = {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in headers_raw}
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        return RecordedRequest(token, headers, payload, status, reason, apns_id.decode(), conn, auth, at)

    # --- the checks --------------------------------------------------------------------------------------

    def _evaluate(self, request: _Request, conn: _Connection) -> tuple[
        int, str, bytes, Answer | None, Literal["token", "certificate"] | None, str
    ]:
        """(status, reason, apns-id, scripted answer or None, auth kind, token) for one complete request."""
        raw = request.headers
        h = dict(raw)
        apns_id = h.get(b"apns-id") or str(uuid.uuid4()).encode()
        path = h.get(b":path", b"")
        token = path[len(_PATH_PREFIX):].decode("ascii", "replace") if path.startswith(_PATH_PREFIX) else ""
        auth: Literal["token", "certificate"] | None = None

        def fail(status: int, reason: str) -> tuple[int, str, bytes, None, Any, str]:
            return status, reason, apns_id, None, auth, token

        if h.get(b":method") != b"POST":
            return fail(405, "MethodNotAllowed")
        if not path.startswith(_PATH_PREFIX):
            return fail(404, "BadPath")
        if len(h) != len(raw):
            return fail(400, "DuplicateHeaders")
        if not token:
            return fail(400, "MissingDeviceToken")
        if not _HEX.fullmatch(path, len(_PATH_PREFIX)):
            return fail(400, "BadDeviceToken")
        if b"apns-id" in h and not _UUID.fullmatch(apns_id):
            return fail(400, "BadMessageId")
        bearer = h.get(b"authorization")
        if bearer is not None:
            auth = "token"
            problem = self._check_jwt(bearer)
            if problem:
                return fail(403, problem)
            allowed = self.topics
        elif conn.cert_topics:
            auth = "certificate"
            allowed = conn.cert_topics
        else:
            return fail(403, "MissingProviderToken")
        topic = h.get(b"apns-topic")
        if topic is None:
            if auth == "token" or len(allowed) != 1:
                return fail(400, "MissingTopic")
        elif topic not in allowed:
            return fail(400, "TopicDisallowed")
        push_type = h.get(b"apns-push-type")
        if push_type is not None and push_type not in PUSH_TYPES:
            return fail(400, "InvalidPushType")
        priority = h.get(b"apns-priority")
        if priority is not None and priority not in PRIORITIES:
            return fail(400, "BadPriority")
        expiration = h.get(b"apns-expiration")
        if expiration is not None and not _DIGITS.fullmatch(expiration):
            return fail(400, "BadExpirationDate")
        collapse = h.get(b"apns-collapse-id")
        if collapse is not None and len(collapse) > 64:
            return fail(400, "BadCollapseId")
        if not request.body:
            return fail(400, "PayloadEmpty")
        if len(request.body) > MAX_PAYLOAD:
            return fail(413, "PayloadTooLarge")
        answer = self._scripted(token)
        return answer.status, answer.reason, apns_id, answer, auth, token

    def _scripted(self, token: str) -> Answer:
        tokens = self.script.tokens
        if tokens:
            answer = tokens.get(token.lower())
            if answer is not None:
                if answer.times is None:
                    return answer
                if answer.times > 0:
                    answer.times -= 1
                    return answer
        default = self.script.default
        if default.times is not None:
            if default.times > 0:
                default.times -= 1
            else:
                return _OK
        return default

    def _check_jwt(self, value: bytes) -> str:
        """'' if the bearer token is good now, else the 403 reason. Verified once per exact string."""
        cached = self._jwt_cache.get(value)
        if cached is None:
            if len(self._jwt_cache) >= JWT_CACHE_SIZE:
                self._jwt_cache.clear()
            cached = self._verify_jwt(value)
            self._jwt_cache[value] = cached
            self.stats.provider_tokens += 1
        problem, issued_at = cached
        if problem:
            return problem
        if time.time() - issued_at > JWT_MAX_AGE:
            return "ExpiredProviderToken"
        return ""

    def _verify_jwt(self, value: bytes) -> tuple[str, float]:
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return "MissingProviderToken", 0.0
        try:
            header = jwt.get_unverified_header(token)
            key = self.keys.get(str(header.get("kid")))
            if header.get("alg") != "ES256" or key is None:
                return "InvalidProviderToken", 0.0
            claims = jwt.decode(token, key.public_key, algorithms=["ES256"],
                                options={"verify_iat": False, "require": ["iss", "iat"]})
        except jwt.PyJWTError:
            return "InvalidProviderToken", 0.0
        issued_at = claims.get("iat")
        if claims.get("iss") != key.team_id or not isinstance(issued_at, int | float):
            return "InvalidProviderToken", 0.0
        if issued_at > time.time() + 60:
            return "InvalidProviderToken", 0.0
        return "", float(issued_at)

    def _record(self, request: _Request, token: str, status: int | None, reason: str, apns_id: bytes,
                conn: int, auth: Literal["token", "certificate"] | None) -> None:
        stats = self.stats
        stats.requests += 1
        stats.by_token[token] += 1
        if status is not None:
            stats.by_status[status] += 1
        ids = self._apns_ids
        if apns_id in ids:
            stats.duplicate_apns_ids += 1
        else:
            ids.add(apns_id)
            stats.distinct_apns_ids += 1
        self._history.append((request.headers, request.body, token, status, reason, apns_id, conn, auth,
                              time.time()))
        self._recorded += 1
        if self._watchers:
            self._wake_watchers()

    def _wake_watchers(self) -> None:
        for watcher in list(self._watchers):
            predicate, future = watcher
            if future.done() or predicate(self.stats):
                self._watchers.remove(watcher)
                if not future.done():
                    future.set_result(None)

    async def wait_until(self, predicate: Callable[[MockStats], bool]) -> None:
        """Wait (in-process tests) until `predicate(stats)` holds after a recorded request; bound it with
        `asyncio.timeout` (pytest-timeout bounds it in tests)."""
        if predicate(self.stats):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        watcher = (predicate, future)
        self._watchers.append(watcher)
        try:
            await future
        finally:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    # --- control API ---------------------------------------------------------------------------------------

    async def _h_script(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
            if not isinstance(data, dict):
                raise ValueError("the script must be a JSON object")
            self.apply_script(data)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.script.to_json())

    async def _h_get_script(self, request: web.Request) -> web.Response:
        return web.json_response({**self.script.to_json(), "latency_ms": self.latency_ms})

    async def _h_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.to_json())

    async def _h_requests(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            return web.json_response({"error": "limit must be an integer"}, status=400)
        return web.json_response([asdict(r) for r in self.recent(limit)])

    async def _h_reset(self, request: web.Request) -> web.Response:
        data: Any = {}
        if request.can_read_body:
            try:
                data = await request.json()
            except ValueError:
                return web.json_response({"error": "body must be JSON"}, status=400)
        if not isinstance(data, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        self.reset(script=bool(data.get("script", True)), stats=bool(data.get("stats", True)))
        return web.json_response({"ok": True})


_OK = Answer()


# --- as its own process ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bemsmail mock apns", description="Run a mock APNs (HTTP/2 over TLS).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="TLS port (0: a free one)")
    parser.add_argument("--control-port", type=int, default=0, help="control API port (0: a free one)")
    parser.add_argument("--cert-dir", type=Path, required=True,
                        help="where the throwaway CA and server certificate are created (or reused)")
    parser.add_argument("--topic", action="append", default=[], help="an accepted apns-topic (repeatable)")
    parser.add_argument("--team-id", default=None, help="the team id (JWT iss) of every --key-id")
    parser.add_argument("--key-id", action="append", default=[], help="a provider key id (JWT kid; repeatable)")
    parser.add_argument("--public-key-file", "--public-key-files", action="append", default=[], type=Path,
                        help="PEM public key (or the .p8 itself) for the --key-id at the same position")
    parser.add_argument("--max-streams", type=int, default=1000, help="SETTINGS_MAX_CONCURRENT_STREAMS")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every answer")
    parser.add_argument("--history", type=int, default=100, help="requests kept for GET /mock/requests")
    parser.add_argument("--no-validate-headers", action="store_true",
                        help="skip h2's inbound header validation (about a third of the CPU per request)")
    return parser


async def _serve(args: argparse.Namespace) -> None:
    from bemsmail.daemon import install_stop_handlers

    keys = [load_provider_key(kid, args.team_id, path) for kid, path in zip(args.key_id, args.public_key_file,
                                                                              strict=True)]
    mock = MockApns(args.cert_dir, topics=args.topic, keys=keys, host=args.host, port=args.port,
                    control_port=args.control_port, max_streams=args.max_streams, latency_ms=args.latency_ms,
                    history=args.history,
                    validate_headers=not args.no_validate_headers)
    stop = asyncio.Event()
    install_stop_handlers(stop)
    async with mock:
        print(json.dumps({"event": "mock_apns_ready", "host": args.host, "port": mock.port,
                          "control_port": mock.control_port, "ca_file": str(mock.ca_file)}), flush=True)
        await stop.wait()


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # Windows
        asyncio.run(coro)
        return
    uvloop.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a mock APNs until SIGTERM/SIGINT; 2 on bad arguments or keys."""
    parser = _parser()
    args = parser.parse_args(argv)
    if len(args.key_id) != len(args.public_key_file):
        parser.error("give one --public-key-file per --key-id")
    if args.key_id and not args.team_id:
        parser.error("--key-id needs --team-id")
    try:
        for path in args.public_key_file:
            load_provider_key("check", "check", path)
    except (OSError, ValueError) as exc:
        print(f"bemsmail mock apns: bad key file: {exc}", file=sys.stderr)
        return 2
    try:
        _run(_serve(args))
    except OSError as exc:
        print(f"bemsmail mock apns: cannot start: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Answer", "MockApns", "MockStats", "ProviderKey", "RecordedRequest", "Script", "load_provider_key",
           "main"]
