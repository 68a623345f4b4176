"""Mock Microsoft Graph (v1.0) and Entra ID token endpoint for Outlook mail change notifications: a real HTTPS
server for tests, demos and load tests.

What it serves (one TLS port; azure-identity refuses an http:// authority):

- ``POST /{tenant}/oauth2/v2.0/token``: the client-credentials grant azure-identity makes, with a client secret or
  a certificate's signed client assertion; the scope must be ``https://graph.microsoft.com/.default``. Access
  tokens are opaque, expire, and are required (``Authorization: Bearer``) on every Graph call.
- ``/v1.0/subscriptions``: create (the validation handshake is POSTed to ``notificationUrl`` and to
  ``lifecycleNotificationUrl`` first, as Graph does, and must be echoed within 10 s), list (paged, without
  ``clientState``), get, ``PATCH`` (renew), ``DELETE``, ``POST …/reauthorize``. Graph's rules: expiry at most
  10,070 minutes ahead and raised to 45 minutes when under it, ``clientState`` at most 128 characters, 409 for a
  second subscription on the same resource and change types, 403 over 1,000 subscriptions per mailbox, and the
  /subscriptions write limit (1,000 writes per app per tenant and 2,000 per tenant in any 20 s; 429 with
  Retry-After). Every accepted write is kept on a timeline so a benchmark can measure the busiest 20-s window.
  Expired subscriptions are removed.
- ``/v1.0/users/{id}/mailFolders/{inbox}/messages/delta`` (also ``delta()``): rounds of ``@odata.nextLink`` pages
  ending in an ``@odata.deltaLink``, ``Prefer: odata.maxpagesize``, ``$select``, ``changeType``, ``$filter`` on
  ``receivedDateTime ge|gt``, removals as ``@removed``; links can be made stale (410 SyncStateNotFound).
- ``/v1.0/users/{id}/messages/{id}`` and ``…/mailFolders/{inbox}`` with ``$select`` (``unreadItemCount``).
- Notifications: new mail is POSTed to each subscription's notificationUrl, batched in ``value[]``; a 2xx
  answers it, anything else (or no answer) is retried, and after ``retry_for_seconds`` the items are discarded
  and a ``missed`` lifecycle event is sent. Answers over 2.9 s are counted as slow, as Graph counts them.
  Lifecycle events (reauthorizationRequired, subscriptionRemoved, missed) are POSTed to lifecycleNotificationUrl.
- Faults: any operation can be scripted to answer an HTTP status with a Graph error code and Retry-After, to be
  slow, or to drop the connection, a number of times, optionally for one mailbox only.
- ``/_mock/…``: the control API (mail, users, subscriptions with their clientState, lifecycle, faults, dropped
  notifications, stats, the write timeline, reset), the same as the Python methods.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import math
import os
import re
import secrets
import ssl
import sys
import time
import uuid
from bisect import bisect_left
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote_plus

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.x509 import load_pem_x509_certificate

from bemsmail.mocks.tls import TestPki, ensure_test_pki

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_MINUTES = 10_070  # the service refuses more, though the documentation says 10,080
MIN_MINUTES = 45
MAX_CLIENT_STATE = 128
MAX_SUBSCRIPTIONS_PER_MAILBOX = 1000
WINDOW_SECONDS = 20.0
WRITES_PER_APP = 1000
WRITES_PER_TENANT = 2000
LIST_PAGE = 100
DELTA_DEFAULT_PAGE = 10
DELTA_MAX_PAGE = 1000
VALIDATION_TIMEOUT = 10.0
SLOW_SECONDS = 2.9
CHANGE_TYPES = frozenset({"created", "updated", "deleted"})
LIFECYCLE_EVENTS = frozenset({"reauthorizationRequired", "subscriptionRemoved", "missed"})
OPERATIONS = frozenset({"token", "create", "list", "get_subscription", "renew", "delete", "reauthorize", "delta",
                        "message", "folder", "messages"})
WRITE_OPERATIONS = frozenset({"create", "renew", "delete", "reauthorize"})

_RESOURCE = re.compile(r"^/?users/([^/()]+)/(?:mailfolders(?:/|\(')([^/()']+)'?\)?/)?messages/?$", re.IGNORECASE)
_FOLDER = r"mailfolders(?:/|\(')(?P<folder>[^/()']+)'?\)?"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^subscriptions/?$", re.I), "create"),
    ("GET", re.compile(r"^subscriptions/?$", re.I), "list"),
    ("GET", re.compile(r"^subscriptions/(?P<sub>[^/]+)$", re.I), "get_subscription"),
    ("PATCH", re.compile(r"^subscriptions/(?P<sub>[^/]+)$", re.I), "renew"),
    ("DELETE", re.compile(r"^subscriptions/(?P<sub>[^/]+)$", re.I), "delete"),
    ("POST", re.compile(r"^subscriptions/(?P<sub>[^/]+)/reauthorize$", re.I), "reauthorize"),
    ("GET", re.compile(rf"^users/(?P<user>[^/]+)/{_FOLDER}/messages/delta(?:\(\))?$", re.I), "delta"),
    ("GET", re.compile(rf"^users/(?P<user>[^/]+)/(?:{_FOLDER}/)?messages/(?P<msg>[^/]+)$", re.I), "message"),
    ("GET", re.compile(rf"^users/(?P<user>[^/]+)/(?:{_FOLDER}/)?messages$", re.I), "messages"),
    ("GET", re.compile(rf"^users/(?P<user>[^/]+)/{_FOLDER}$", re.I), "folder"),
]


class GraphError(Exception):
    """An answer in Graph's error shape: ``{"error": {"code", "message", "innerError"}}``."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}0000Z"


def _parse_time(value: object, name: str) -> datetime:
    if not isinstance(value, str):
        raise GraphError(400, "InvalidRequest", f"{name} must be a date-time string")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise GraphError(400, "InvalidRequest", f"{name} '{value}' is not a valid date-time") from None
    if parsed.tzinfo is None:  # Graph reads a naive time as UTC
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode().rstrip("=")


def _unb64(text: str) -> dict[str, Any]:
    try:
        value = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except ValueError:
        raise GraphError(400, "InvalidRequest", "the token in the link is not valid") from None
    if not isinstance(value, dict):
        raise GraphError(400, "InvalidRequest", "the token in the link is not valid")
    return value


# --- the model ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GraphApp:
    """A registered app: client secret or certificate (PEM), in one tenant."""

    tenant_id: str
    client_id: str
    client_secret: str | None = None
    certificate_pem: bytes | None = None


@dataclass(slots=True)
class Message:
    id: str
    seq: int
    subject: str
    sender: str
    importance: str
    received_at: datetime
    is_read: bool = False
    meeting: bool = False

    def json(self, select: Sequence[str] | None) -> dict[str, Any]:
        full: dict[str, Any] = {
            "subject": self.subject, "importance": self.importance,
            "from": {"emailAddress": {"name": self.sender.split("@")[0], "address": self.sender}},
            "sender": {"emailAddress": {"name": self.sender.split("@")[0], "address": self.sender}},
            "receivedDateTime": self.received_at.strftime("%Y-%m-%dT%H:%M:%SZ"), "isRead": self.is_read,
            "bodyPreview": f"{self.subject} …", "hasAttachments": False,
        }
        if self.meeting:
            full["meetingMessageType"] = "meetingRequest"
        wanted = {s.lower() for s in select} if select else None
        body = {"@odata.type": "#microsoft.graph.eventMessage" if self.meeting else "#microsoft.graph.message",
                "@odata.etag": f'W/"CQAAABYAAA{self.seq:08d}"', "id": self.id}
        body.update({k: v for k, v in full.items() if wanted is None or k.lower() in wanted})
        return body


@dataclass(slots=True)
class User:
    id: str
    upn: str
    inbox_id: str
    messages: dict[str, Message] = field(default_factory=dict)
    #: (seq, message id, seq the message was created at) of each removal, in order
    removals: list[tuple[int, str, int]] = field(default_factory=list)
    seq: int = 0
    #: bumped to make every delta link of this mailbox stale
    epoch: int = 0
    subscriptions: set[str] = field(default_factory=set)


@dataclass(slots=True)
class Subscription:
    id: str
    app: GraphApp
    user_id: str
    resource: str
    change_types: frozenset[str]
    notification_url: str
    lifecycle_url: str | None
    client_state: str | None
    expires_at: datetime
    created_at: datetime
    tls_version: str
    #: a reauthorizationRequired was sent and not yet answered by a renew or reauthorize
    reauthorize_by: float | None = None

    def json(self, with_secret: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id, "resource": self.resource, "applicationId": self.app.client_id,
            "changeType": ",".join(sorted(self.change_types)), "notificationUrl": self.notification_url,
            "lifecycleNotificationUrl": self.lifecycle_url, "expirationDateTime": _iso(self.expires_at),
            "creatorId": str(uuid.UUID(int=0)), "includeResourceData": False,
            "latestSupportedTlsVersion": self.tls_version, "encryptionCertificate": None,
            "encryptionCertificateId": None, "notificationUrlAppId": None,
            "clientState": self.client_state if with_secret else None,
        }
        return body


@dataclass(frozen=True, slots=True)
class Fault:
    """A scripted answer for one operation (see OPERATIONS): an HTTP status with Graph's error code, Retry-After,
    extra latency, or ``drop`` (close the connection unanswered); ``times`` answers (None: every one), for one
    mailbox only when ``mailbox`` is given."""

    operation: str
    status: int = 503
    code: str = "ServiceUnavailable"
    message: str = "The service is temporarily unavailable."
    retry_after: float | None = None
    latency_ms: float = 0.0
    drop: bool = False
    times: int | None = 1
    mailbox: str | None = None


@dataclass(slots=True)
class MockGraphStats:
    tokens_issued: int = 0
    token_refused: int = 0
    calls: int = 0
    unauthorized: int = 0
    creates: int = 0
    renewals: int = 0
    deletes: int = 0
    reauthorizations: int = 0
    lists: int = 0
    deltas: int = 0
    messages_read: int = 0
    folders_read: int = 0
    conflicts: int = 0
    throttled: int = 0
    faults: int = 0
    validations: int = 0
    validations_failed: int = 0
    expired: int = 0
    mails: int = 0
    #: notification items POSTed and answered 2xx; posts carrying them; failed attempts (items)
    notifications_delivered: int = 0
    notification_posts: int = 0
    notification_failures: int = 0
    notifications_discarded: int = 0
    notifications_dropped: int = 0  # by a drop_notifications script: never sent
    notifications_paused: int = 0  # lost while a subscription waited for reauthorization
    slow_items: int = 0
    lifecycle_delivered: int = 0
    largest_batch: int = 0


# --- notification delivery ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    item: dict[str, Any]
    subscription_id: str
    first_at: float
    due: float
    attempts: int = 0


class _Deliverer:
    """The items waiting for one URL, POSTed in batches by a few workers; failures retried, then discarded."""

    def __init__(self, mock: MockGraph, url: str, lifecycle: bool) -> None:
        self.mock, self.url, self.lifecycle = mock, url, lifecycle
        self.ready: deque[_Pending] = deque()
        self.retrying: list[_Pending] = []
        self.wake = asyncio.Event()
        self.in_flight = 0
        self.tasks = [asyncio.create_task(self._work()) for _ in range(mock.delivery_concurrency)]

    def add(self, pending: _Pending) -> None:
        self.ready.append(pending)
        self.wake.set()

    @property
    def idle(self) -> bool:
        return not self.ready and not self.retrying and self.in_flight == 0

    def _take(self) -> list[_Pending]:
        now = time.monotonic()
        if self.retrying:
            due = [p for p in self.retrying if p.due <= now]
            if due:
                self.retrying = [p for p in self.retrying if p.due > now]
                self.ready.extendleft(reversed(due))
        batch: list[_Pending] = []
        while self.ready and len(batch) < self.mock.max_batch:
            batch.append(self.ready.popleft())
        return batch

    async def _work(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                self.wake.clear()
                timeout = None
                if self.retrying:
                    timeout = max(0.01, min(p.due for p in self.retrying) - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout)
                continue
            self.in_flight += 1
            try:
                if self.mock.batch_wait_ms and len(batch) < self.mock.max_batch:
                    await asyncio.sleep(self.mock.batch_wait_ms / 1000)
                    while self.ready and len(batch) < self.mock.max_batch:
                        batch.append(self.ready.popleft())
                await self._post(batch)
            finally:
                self.in_flight -= 1
                self.mock._delivered.set()

    async def _post(self, batch: list[_Pending]) -> None:
        mock, stats = self.mock, self.mock.stats
        body = json.dumps({"value": [p.item for p in batch]}).encode()
        started = time.monotonic()
        ok = False
        try:
            async with mock._http().post(self.url, data=body, headers={"Content-Type": "application/json"},
                                         timeout=aiohttp.ClientTimeout(total=mock.notification_timeout)) as answer:
                await answer.read()
                ok = 200 <= answer.status < 300
        except (aiohttp.ClientError, OSError, TimeoutError):
            ok = False
        elapsed = time.monotonic() - started
        stats.notification_posts += 1
        stats.largest_batch = max(stats.largest_batch, len(batch))
        if elapsed > SLOW_SECONDS:
            stats.slow_items += len(batch)
        mock.answer_ms.append(elapsed * 1000)
        if ok:
            if self.lifecycle:
                stats.lifecycle_delivered += len(batch)
            else:
                stats.notifications_delivered += len(batch)
                now = time.monotonic()
                for pending in batch:
                    mock.delivered_items.append((pending.item, now))
            return
        stats.notification_failures += len(batch)
        now = time.monotonic()
        gave_up: list[_Pending] = []
        for pending in batch:
            pending.attempts += 1
            if now - pending.first_at >= mock.retry_for_seconds:
                gave_up.append(pending)
            else:
                pending.due = now + min(mock.retry_seconds * 2 ** (pending.attempts - 1), mock.retry_max_seconds)
                self.retrying.append(pending)
        if gave_up:
            stats.notifications_discarded += len(gave_up)
            if not self.lifecycle:
                for subscription_id in {p.subscription_id for p in gave_up}:
                    mock.send_lifecycle(subscription_id, "missed")


# --- the server -----------------------------------------------------------------------------------------------


class MockGraph:
    """The mock's state and its aiohttp application; `await start()` / `stop()`, or `async with`."""

    def __init__(
        self, cert_dir: Path | TestPki, apps: Iterable[GraphApp], *, host: str = "127.0.0.1", port: int = 0,
        auto_users: bool = True, notify_ca_file: Path | None = None, require_https: bool = False,
        token_seconds: int = 3599, writes_per_app: int = WRITES_PER_APP, writes_per_tenant: int = WRITES_PER_TENANT,
        max_batch: int = 100, batch_wait_ms: float = 0.0, delivery_concurrency: int = 4,
        notification_timeout: float = 30.0, retry_seconds: float = 10.0, retry_max_seconds: float = 600.0,
        retry_for_seconds: float = 4 * 3600.0, reauthorize_grace_seconds: float = 3600.0,
    ) -> None:
        self.pki = cert_dir if isinstance(cert_dir, TestPki) else ensure_test_pki(cert_dir)
        self.apps = {a.client_id: a for a in apps}
        self.host, self._port = host, port
        self.auto_users = auto_users
        self.notify_ca_file = notify_ca_file
        self.require_https = require_https
        self.token_seconds = token_seconds
        self.writes_per_app, self.writes_per_tenant = writes_per_app, writes_per_tenant
        self.max_batch, self.batch_wait_ms = max_batch, batch_wait_ms
        self.delivery_concurrency = delivery_concurrency
        self.notification_timeout = notification_timeout
        self.retry_seconds, self.retry_max_seconds = retry_seconds, retry_max_seconds
        self.retry_for_seconds = retry_for_seconds
        self.reauthorize_grace_seconds = reauthorize_grace_seconds
        self.stats = MockGraphStats()
        self.users: dict[str, User] = {}
        self._by_upn: dict[str, str] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self.tokens: dict[str, tuple[GraphApp, float]] = {}
        self.faults: list[Fault] = []
        #: accepted /subscriptions writes (monotonic seconds), per (tenant, app)
        self.write_times: list[float] = []
        self._windows: dict[str, deque[float]] = defaultdict(deque)
        self._drop: dict[str, int] = defaultdict(int)
        self._deliverers: dict[str, _Deliverer] = {}
        self._delivered = asyncio.Event()
        self.answer_ms: deque[float] = deque(maxlen=100_000)
        #: (notification item, monotonic time it was answered 2xx), for latency measurements
        self.delivered_items: deque[tuple[dict[str, Any], float]] = deque(maxlen=1_000_000)
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._bound_port = 0
        self._ids = itertools.count(1)

    # --- lifecycle -------------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._bound_port

    @property
    def url(self) -> str:
        """The authority (token endpoint host) and the root of everything this mock serves."""
        return f"https://{self.host}:{self.port}"

    @property
    def graph_url(self) -> str:
        return f"{self.url}/v1.0"

    @property
    def ca_file(self) -> Path:
        return self.pki.ca_cert

    async def start(self) -> None:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._h_token)
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self._h_openid)
        app.router.add_route("*", "/v1.0/{tail:.*}", self._h_graph)
        self._control_routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port,
                           ssl_context=self.pki.server_context(alpn=("http/1.1",), client_auth=False), backlog=1024)
        await site.start()
        self._bound_port = cast(asyncio.Server, site._server).sockets[0].getsockname()[1]
        self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        tasks = [t for d in self._deliverers.values() for t in d.tasks]
        if self._sweeper:
            tasks.append(self._sweeper)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._deliverers.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> MockGraph:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            context = ssl.create_default_context(cafile=str(self.notify_ca_file) if self.notify_ca_file else None)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=256))
        return self._session

    async def _sweep(self) -> None:
        """Graph removes a subscription when it expires; reauthorization left unanswered pauses delivery."""
        while True:
            await asyncio.sleep(1.0)
            now = _now()
            for sub in [s for s in self.subscriptions.values() if s.expires_at <= now]:
                self._remove_subscription(sub)
                self.stats.expired += 1

    # --- users and mail --------------------------------------------------------------------------------------

    def add_user(self, mailbox: str) -> User:
        key = mailbox.strip().lower()
        if key in self._by_upn:
            return self.users[self._by_upn[key]]
        user = User(str(uuid.uuid4()), key, "AAMkAG" + secrets.token_urlsafe(24) + "AQAAAA==")
        self.users[user.id] = user
        self._by_upn[key] = user.id
        return user

    def user(self, ident: str, create: bool | None = None) -> User:
        key = ident.strip().lower()
        found = self.users.get(key) or self.users.get(self._by_upn.get(key, ""))
        if found is not None:
            return found
        if (self.auto_users if create is None else create) and "@" in key:
            return self.add_user(key)
        raise GraphError(404, "ErrorInvalidUser", f"The requested user '{ident}' is invalid.")

    def add_mail(self, mailbox: str, *, subject: str = "Hello", sender: str = "sender@example.org",
                 importance: str = "normal", meeting: bool = False, received_at: datetime | None = None,
                 is_read: bool = False) -> str:
        """New mail in `mailbox`'s Inbox; its subscribers are notified. Returns the message id."""
        user = self.user(mailbox, create=True)
        user.seq += 1
        message_id = "AAMkAG" + base64.urlsafe_b64encode(uuid.uuid4().bytes + next(self._ids).to_bytes(8, "big")
                                                          ).decode().rstrip("=") + "AAA="
        message = Message(message_id, user.seq, subject, sender, importance, received_at or _now(), is_read,
                          meeting)
        user.messages[message_id] = message
        self.stats.mails += 1
        self._notify(user, message)
        return message_id

    def delete_mail(self, mailbox: str, message_id: str) -> None:
        user = self.user(mailbox, create=False)
        message = user.messages.pop(message_id)
        user.seq += 1
        user.removals.append((user.seq, message_id, message.seq))

    def mark_read(self, mailbox: str, message_id: str, read: bool = True) -> None:
        self.user(mailbox, create=False).messages[message_id].is_read = read

    def expire_delta_links(self, mailbox: str) -> None:
        """Every delta link of this mailbox answers 410 SyncStateNotFound from now on."""
        self.user(mailbox, create=False).epoch += 1

    def delta_link(self, mailbox: str) -> str:
        """A delta link as a finished round would give now (for seeding a store without running rounds)."""
        user = self.user(mailbox, create=True)
        state = {"u": user.id, "e": user.epoch, "lo": user.seq, "hw": user.seq, "after": user.seq, "sel": None,
                 "ct": "created", "since": None, "op": "ge"}
        return f"{self.graph_url}/users/{user.id}/mailFolders('{user.inbox_id}')/messages/delta()" \
            f"?$deltatoken={_b64(state)}"

    def add_subscription(self, client_id: str, mailbox: str, notification_url: str, client_state: str,
                         expires_at: datetime, lifecycle_url: str | None = None) -> Subscription:
        """A subscription as if made long ago: no handshake, no write counted (for seeding large tests)."""
        user = self.user(mailbox, create=True)
        sub = Subscription(str(uuid.uuid4()), self.apps[client_id], user.id,
                           f"users/{user.upn}/mailFolders('inbox')/messages", frozenset({"created"}),
                           notification_url, lifecycle_url, client_state, expires_at, _now(), "v1_2")
        self.subscriptions[sub.id] = sub
        user.subscriptions.add(sub.id)
        return sub

    # --- notifications ---------------------------------------------------------------------------------------

    def drop_notifications(self, mailbox: str, count: int) -> None:
        """The next `count` notifications for this mailbox are never sent (as if lost)."""
        self._drop[self.user(mailbox, create=True).id] += count

    def _notify(self, user: User, message: Message) -> None:
        for sub_id in sorted(user.subscriptions):
            sub = self.subscriptions[sub_id]
            if "created" not in sub.change_types:
                continue
            if self._drop[user.id] > 0:
                self._drop[user.id] -= 1
                self.stats.notifications_dropped += 1
                continue
            if sub.reauthorize_by is not None and time.monotonic() > sub.reauthorize_by:
                self.stats.notifications_paused += 1
                continue
            item = {
                "id": secrets.token_urlsafe(12), "subscriptionId": sub.id,
                "subscriptionExpirationDateTime": _iso(sub.expires_at), "clientState": sub.client_state,
                "changeType": "created", "tenantId": sub.app.tenant_id,
                "resource": f"Users/{user.id}/Messages/{message.id}",
                "resourceData": {"@odata.type": "#Microsoft.Graph.Message",
                                 "@odata.id": f"Users/{user.id}/Messages/{message.id}",
                                 "@odata.etag": f'W/"CQAAABYAAA{message.seq:08d}"', "id": message.id},
            }
            self._deliver(sub.notification_url, sub.id, item, lifecycle=False)

    def _deliver(self, url: str, subscription_id: str, item: dict[str, Any], lifecycle: bool) -> None:
        deliverer = self._deliverers.get(url)
        if deliverer is None:
            deliverer = self._deliverers[url] = _Deliverer(self, url, lifecycle)
        now = time.monotonic()
        deliverer.add(_Pending(item, subscription_id, now, now))

    def send_lifecycle(self, subscription_id: str, event: str) -> None:
        """POST a lifecycle event for the subscription to its lifecycleNotificationUrl. subscriptionRemoved also
        removes it (Graph sends it when it has removed one); reauthorizationRequired pauses delivery after
        `reauthorize_grace_seconds` unless the subscription is renewed or reauthorized."""
        if event not in LIFECYCLE_EVENTS:
            raise GraphError(400, "InvalidRequest", f"unknown lifecycle event {event!r}")
        sub = self.subscriptions.get(subscription_id)
        if sub is None:
            raise GraphError(404, "ResourceNotFound", f"no subscription {subscription_id}")
        if event == "subscriptionRemoved":
            self._remove_subscription(sub)
        elif event == "reauthorizationRequired":
            sub.reauthorize_by = time.monotonic() + self.reauthorize_grace_seconds
        if sub.lifecycle_url is None:
            return
        item = {"subscriptionId": sub.id, "subscriptionExpirationDateTime": _iso(sub.expires_at),
                "tenantId": sub.app.tenant_id, "clientState": sub.client_state, "lifecycleEvent": event}
        self._deliver(sub.lifecycle_url, sub.id, item, lifecycle=True)

    async def drained(self, within: float = 30.0) -> None:
        """Wait until nothing is queued, in flight or waiting for a retry (raises TimeoutError)."""
        async with asyncio.timeout(within):
            while not all(d.idle for d in self._deliverers.values()):
                self._delivered.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._delivered.wait(), 0.05)

    # --- faults and throttling -------------------------------------------------------------------------------

    def add_fault(self, fault: Fault) -> None:
        if fault.operation not in OPERATIONS:
            raise ValueError(f"unknown operation {fault.operation!r}; one of {sorted(OPERATIONS)}")
        self.faults.append(fault)

    def clear_faults(self) -> None:
        self.faults.clear()

    def _fault(self, operation: str, mailbox: str | None) -> Fault | None:
        for index, fault in enumerate(self.faults):
            if fault.operation != operation:
                continue
            if fault.mailbox is not None and (mailbox is None or fault.mailbox.lower() != mailbox.lower()):
                continue
            if fault.times is not None:
                if fault.times <= 1:
                    del self.faults[index]
                else:
                    self.faults[index] = Fault(**{**asdict(fault), "times": fault.times - 1})
            self.stats.faults += 1
            return fault
        return None

    def _spend_write(self, app: GraphApp) -> None:
        now = time.monotonic()
        keys = ((f"app:{app.tenant_id}:{app.client_id}", self.writes_per_app),
                (f"tenant:{app.tenant_id}", self.writes_per_tenant))
        for key, limit in keys:
            window = self._windows[key]
            while window and window[0] <= now - WINDOW_SECONDS:
                window.popleft()
            if len(window) >= limit:
                self.stats.throttled += 1
                wait = math.ceil(window[0] + WINDOW_SECONDS - now) or 1
                raise GraphError(429, "TooManyRequests",
                                 "Too many requests to the subscriptions endpoint. Please retry after a while.",
                                 retry_after=wait)
        for key, _limit in keys:
            self._windows[key].append(now)
        self.write_times.append(now)

    def max_writes_in_window(self, seconds: float = WINDOW_SECONDS) -> int:
        """The most accepted /subscriptions writes in any `seconds`-long window so far."""
        times, best = self.write_times, 0
        for end, moment in enumerate(times):
            best = max(best, end - bisect_left(times, moment - seconds + 1e-9) + 1)
        return best

    # --- HTTP: identity --------------------------------------------------------------------------------------

    async def _h_openid(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        base = f"{self.url}/{tenant}"
        return web.json_response({"token_endpoint": f"{base}/oauth2/v2.0/token", "issuer": f"{base}/v2.0",
                                  "authorization_endpoint": f"{base}/oauth2/v2.0/authorize"})

    async def _h_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        tenant = request.match_info["tenant"]

        def refuse(status: int, error: str, description: str) -> web.Response:
            self.stats.token_refused += 1
            return web.json_response({"error": error, "error_description": description, "error_codes": [0],
                                      "timestamp": _now().isoformat()}, status=status)

        fault = self._fault("token", None)
        if fault is not None:
            if fault.latency_ms:
                await asyncio.sleep(fault.latency_ms / 1000)
            if fault.status >= 400:
                return refuse(fault.status, fault.code, fault.message)
        if form.get("grant_type") != "client_credentials":
            return refuse(400, "unsupported_grant_type", "AADSTS70003: The app requested an unsupported grant type")
        client_id = str(form.get("client_id", ""))
        app = self.apps.get(client_id)
        if app is None or app.tenant_id != tenant:
            return refuse(400, "unauthorized_client", f"AADSTS700016: Application with identifier "
                          f"'{client_id[:64]}' was not found in the directory '{tenant[:64]}'.")
        if str(form.get("scope", "")) != GRAPH_SCOPE:
            return refuse(400, "invalid_resource", "AADSTS500011: The resource principal was not found in the "
                          "tenant; the scope must be https://graph.microsoft.com/.default")
        if not self._client_authentic(app, form, str(request.url.with_query(None))):
            return refuse(401, "invalid_client", "AADSTS7000215: Invalid client secret or assertion provided.")
        token = "mock-graph." + secrets.token_urlsafe(32)
        self.tokens[token] = (app, time.monotonic() + self.token_seconds)
        self.stats.tokens_issued += 1
        return web.json_response({"token_type": "Bearer", "expires_in": self.token_seconds,
                                  "ext_expires_in": self.token_seconds, "access_token": token})

    @staticmethod
    def _client_authentic(app: GraphApp, form: Mapping[str, Any], audience: str) -> bool:
        secret, assertion = form.get("client_secret"), form.get("client_assertion")
        if app.client_secret is not None and isinstance(secret, str):
            return secrets.compare_digest(secret.encode(), app.client_secret.encode())
        if app.certificate_pem is not None and isinstance(assertion, str):
            if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
                return False
            key = load_pem_x509_certificate(app.certificate_pem).public_key()
            try:
                claims = jwt.decode(assertion, cast(RSAPublicKey, key), algorithms=["RS256", "PS256"],
                                    audience=audience)
            except jwt.InvalidTokenError:
                return False
            return bool(claims.get("iss") == claims.get("sub") == app.client_id)
        return False

    # --- HTTP: Graph -----------------------------------------------------------------------------------------

    async def _h_graph(self, request: web.Request) -> web.StreamResponse:
        self.stats.calls += 1
        try:
            app = self._caller(request)
            tail = request.match_info["tail"]
            for method, pattern, operation in _ROUTES:
                if request.method == method and (match := pattern.match(tail)):
                    params = match.groupdict()
                    fault = self._fault(operation, await self._mailbox_hint(request, operation, params))
                    if fault is not None:
                        if fault.latency_ms:
                            await asyncio.sleep(fault.latency_ms / 1000)
                        if fault.drop:
                            if request.transport is not None:
                                request.transport.abort()
                            raise web.HTTPServiceUnavailable
                        if fault.status >= 400:
                            raise GraphError(fault.status, fault.code, fault.message, fault.retry_after)
                    if operation in WRITE_OPERATIONS:
                        self._spend_write(app)
                    handler = getattr(self, f"_op_{operation}")
                    answer: web.StreamResponse = await handler(request, app, **params)
                    return answer
            raise GraphError(400, "BadRequest", f"Resource not found for the segment '{tail.split('/')[0]}'.")
        except GraphError as exc:
            return self._error(exc)

    async def _mailbox_hint(self, request: web.Request, operation: str, params: Mapping[str, str]) -> str | None:
        if operation == "create":
            with contextlib.suppress(ValueError):
                body = await request.json()
                match = _RESOURCE.match(str(body.get("resource", ""))) if isinstance(body, dict) else None
                return match.group(1).lower() if match else None
            return None
        if "user" in params:
            with contextlib.suppress(GraphError):
                return self.user(params["user"], create=False).upn
            return params["user"]
        if "sub" in params and (sub := self.subscriptions.get(params["sub"])) is not None:
            return self.users[sub.user_id].upn
        return None

    @staticmethod
    def _error(exc: GraphError) -> web.Response:
        headers = {"Retry-After": str(math.ceil(exc.retry_after))} if exc.retry_after is not None else None
        body = {"error": {"code": exc.code, "message": exc.message, "innerError": {
            "date": _now().strftime("%Y-%m-%dT%H:%M:%S"), "request-id": str(uuid.uuid4()),
            "client-request-id": str(uuid.uuid4())}}}
        return web.json_response(body, status=exc.status, headers=headers)

    def _caller(self, request: web.Request) -> GraphApp:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            self.stats.unauthorized += 1
            raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")
        found = self.tokens.get(header[7:])
        if found is None or found[1] < time.monotonic():
            self.stats.unauthorized += 1
            raise GraphError(401, "InvalidAuthenticationToken",
                             "Lifetime validation failed, the token is expired." if found else
                             "IDX14100: JWT is not well formed.")
        return found[0]

    @staticmethod
    async def _json_body(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise GraphError(400, "BadRequest", "Unable to read JSON request payload.") from None
        if not isinstance(body, dict):
            raise GraphError(400, "BadRequest", "The request payload must be a JSON object.")
        return body

    def _expiry(self, value: object) -> datetime:
        wanted = _parse_time(value, "expirationDateTime")
        now = _now()
        if wanted <= now:
            raise GraphError(400, "ExtensionError", "Subscription expiration can only be in the future.")
        if wanted > now + timedelta(minutes=MAX_MINUTES):
            raise GraphError(400, "ExtensionError",
                             f"Subscription expiration can only be {MAX_MINUTES} minutes in the future.")
        return max(wanted, now + timedelta(minutes=MIN_MINUTES))

    def _check_url(self, url: object, name: str) -> str:
        if not isinstance(url, str) or not url:
            raise GraphError(400, "InvalidRequest", f"{name} is required")
        if url.startswith("http://") and self.require_https:
            raise GraphError(400, "InvalidRequest", f"{name} scheme='http' is not supported.")
        if not url.startswith(("http://", "https://")):
            raise GraphError(400, "InvalidRequest", f"{name} must be an absolute https URL")
        return url

    async def _validate_endpoint(self, url: str) -> None:
        token = f"Validation: Testing client application reachability for subscription Request-Id: {uuid.uuid4()}"
        target = f"{url}{'&' if '?' in url else '?'}validationToken={quote_plus(token).replace('%3A', '%3a')}"
        self.stats.validations += 1
        failure = None
        try:
            async with self._http().post(target, data=b"", headers={"Content-Type": "text/plain; charset=utf-8"},
                                         timeout=aiohttp.ClientTimeout(total=VALIDATION_TIMEOUT)) as answer:
                text = await answer.text()
                if answer.status != 200:
                    failure = f"Response status code does not indicate success: {answer.status}."
                elif text != token:
                    failure = "Validation token in the response does not match the one sent."
        except TimeoutError:
            failure = "Validation request timed out after 10 s."
        except (aiohttp.ClientError, OSError) as exc:
            failure = f"Could not connect: {type(exc).__name__}."
        if failure is not None:
            self.stats.validations_failed += 1
            raise GraphError(400, "ValidationError", "Subscription validation request failed. Notification "
                             f"endpoint must respond with 200 OK to validation request. {failure}")

    async def _op_create(self, request: web.Request, app: GraphApp) -> web.Response:
        body = await self._json_body(request)
        change = {c.strip() for c in str(body.get("changeType", "")).split(",") if c.strip()}
        if not change or not change <= CHANGE_TYPES:
            raise GraphError(400, "InvalidRequest", "changeType must be created, updated and/or deleted")
        resource = body.get("resource")
        match = _RESOURCE.match(resource) if isinstance(resource, str) else None
        if match is None:
            raise GraphError(400, "InvalidRequest", f"Unsupported resource '{resource}' for Outlook messages.")
        folder = match.group(2)
        if folder is not None and folder.lower() != "inbox":
            raise GraphError(404, "ErrorItemNotFound", "The specified folder could not be found in the store.")
        user = self.user(match.group(1))
        client_state = body.get("clientState")
        if client_state is not None and (not isinstance(client_state, str) or len(client_state) > MAX_CLIENT_STATE):
            raise GraphError(400, "InvalidRequest", f"clientState must be a string of at most {MAX_CLIENT_STATE} "
                             "characters")
        notification_url = self._check_url(body.get("notificationUrl"), "notificationUrl")
        lifecycle = body.get("lifecycleNotificationUrl")
        lifecycle_url = self._check_url(lifecycle, "lifecycleNotificationUrl") if lifecycle is not None else None
        expires = self._expiry(body.get("expirationDateTime"))
        normalized = f"users/{user.id}/{'mailfolders/inbox/' if folder else ''}messages"
        for other_id in user.subscriptions:
            other = self.subscriptions[other_id]
            if other.app is app and other.change_types == change and \
                    _normal(other.resource, self) == normalized:
                self.stats.conflicts += 1
                raise GraphError(409, "ExtensionError", f"Subscription Id {other.id} already exists for the "
                                 "requested combination")
        if len(user.subscriptions) >= MAX_SUBSCRIPTIONS_PER_MAILBOX:
            raise GraphError(403, "ExtensionError", "Operation: Create; Exception: [Status Code: Forbidden; "
                             f"Reason: Number of subscriptions on the mailbox exceeds {MAX_SUBSCRIPTIONS_PER_MAILBOX}]")
        await self._validate_endpoint(notification_url)
        if lifecycle_url is not None:
            await self._validate_endpoint(lifecycle_url)
        sub = Subscription(str(uuid.uuid4()), app, user.id, str(resource), frozenset(change), notification_url,
                           lifecycle_url, client_state, expires, _now(),
                           str(body.get("latestSupportedTlsVersion") or "v1_2"))
        self.subscriptions[sub.id] = sub
        user.subscriptions.add(sub.id)
        self.stats.creates += 1
        return web.json_response({"@odata.context": f"{self.graph_url}/$metadata#subscriptions/$entity",
                                  **sub.json(with_secret=True)}, status=201)

    def _own(self, app: GraphApp, subscription_id: str) -> Subscription:
        sub = self.subscriptions.get(subscription_id)
        if sub is None or sub.app is not app:
            raise GraphError(404, "ResourceNotFound", f"The object was not found. Subscription '{subscription_id}'")
        return sub

    async def _op_list(self, request: web.Request, app: GraphApp) -> web.Response:
        self.stats.lists += 1
        mine = [s for s in self.subscriptions.values() if s.app is app]
        start = int(request.query.get("$skiptoken", "0") or 0)
        page = mine[start:start + LIST_PAGE]
        body: dict[str, Any] = {"@odata.context": f"{self.graph_url}/$metadata#subscriptions",
                                "value": [s.json(with_secret=False) for s in page]}
        if start + LIST_PAGE < len(mine):
            body["@odata.nextLink"] = f"{self.graph_url}/subscriptions?$skiptoken={start + LIST_PAGE}"
        return web.json_response(body)

    async def _op_get_subscription(self, request: web.Request, app: GraphApp, sub: str) -> web.Response:
        return web.json_response(self._own(app, sub).json(with_secret=False))

    async def _op_renew(self, request: web.Request, app: GraphApp, sub: str) -> web.Response:
        found = self._own(app, sub)
        body = await self._json_body(request)
        found.expires_at = self._expiry(body.get("expirationDateTime"))
        found.reauthorize_by = None  # renewing also reauthorizes
        self.stats.renewals += 1
        return web.json_response(found.json(with_secret=False))

    async def _op_delete(self, request: web.Request, app: GraphApp, sub: str) -> web.Response:
        self._remove_subscription(self._own(app, sub))
        self.stats.deletes += 1
        return web.Response(status=204)

    async def _op_reauthorize(self, request: web.Request, app: GraphApp, sub: str) -> web.Response:
        self._own(app, sub).reauthorize_by = None
        self.stats.reauthorizations += 1
        return web.Response(status=200)

    def _remove_subscription(self, sub: Subscription) -> None:
        self.subscriptions.pop(sub.id, None)
        user = self.users.get(sub.user_id)
        if user is not None:
            user.subscriptions.discard(sub.id)

    @staticmethod
    def _select(request: web.Request) -> list[str] | None:
        text = request.query.get("$select")
        return [s.strip() for s in text.split(",") if s.strip()] if text else None

    def _inbox(self, user_ident: str, folder: str | None) -> User:
        user = self.user(user_ident)
        if folder is not None and folder.lower() not in ("inbox", user.inbox_id.lower()):
            raise GraphError(404, "ErrorItemNotFound", "The specified folder could not be found in the store.")
        return user

    async def _op_message(self, request: web.Request, app: GraphApp, user: str, msg: str,
                          folder: str | None = None) -> web.Response:
        found = self._inbox(user, folder).messages.get(msg)
        if found is None:
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        self.stats.messages_read += 1
        return web.json_response(found.json(self._select(request)))

    async def _op_messages(self, request: web.Request, app: GraphApp, user: str,
                           folder: str | None = None) -> web.Response:
        found = self._inbox(user, folder)
        top = min(int(request.query.get("$top", "10")), 1000)
        newest = sorted(found.messages.values(), key=lambda m: m.received_at, reverse=True)[:top]
        return web.json_response({"value": [m.json(self._select(request)) for m in newest]})

    async def _op_folder(self, request: web.Request, app: GraphApp, user: str, folder: str) -> web.Response:
        found = self._inbox(user, folder)
        self.stats.folders_read += 1
        full = {"id": found.inbox_id, "displayName": "Inbox", "parentFolderId": "AAMkAGroot",
                "childFolderCount": 0, "unreadItemCount": sum(not m.is_read for m in found.messages.values()),
                "totalItemCount": len(found.messages), "isHidden": False}
        wanted = {s.lower() for s in self._select(request) or full}
        return web.json_response({k: v for k, v in full.items() if k == "id" or k.lower() in wanted})

    async def _op_delta(self, request: web.Request, app: GraphApp, user: str, folder: str) -> web.Response:
        found = self._inbox(user, folder)
        self.stats.deltas += 1
        query = request.query
        link_token = query.get("$deltatoken") or query.get("$skiptoken")
        if link_token is not None:
            state = _unb64(link_token)
            if state.get("u") != found.id or state.get("e") != found.epoch:
                raise GraphError(410, "SyncStateNotFound", "The sync state generation is not valid; start over.")
            if "$deltatoken" in query:  # a new round from the last one's end
                state = {**state, "lo": state["hw"], "hw": found.seq, "after": state["hw"]}
        else:
            state = {"u": found.id, "e": found.epoch, "lo": 0, "hw": found.seq, "after": 0,
                     "sel": self._select(request), "ct": query.get("changeType"), "since": None, "op": "ge"}
            filter_text = query.get("$filter")
            if filter_text:
                match = re.fullmatch(r"\s*receivedDateTime\s+(ge|gt)\s+(\S+)\s*", filter_text, re.I)
                if match is None:
                    raise GraphError(400, "ErrorInvalidUrlQueryFilter",
                                     "The query filter contains one or more invalid nodes.")
                state["op"], state["since"] = match.group(1).lower(), _iso(_parse_time(match.group(2), "$filter"))
        page_size = DELTA_DEFAULT_PAGE
        prefer = re.search(r"odata\.maxpagesize=(\d+)", request.headers.get("Prefer", ""))
        if prefer:
            page_size = max(1, min(int(prefer.group(1)), DELTA_MAX_PAGE))
        changes = self._changes(found, state)
        page = changes[:page_size]
        if page:
            state["after"] = page[-1][0]
        base = f"{self.graph_url}/users/{found.id}/mailFolders('{found.inbox_id}')/messages/delta()"
        body: dict[str, Any] = {"@odata.context": f"{self.graph_url}/$metadata#Collection(message)",
                                "value": [entry for _seq, entry in page]}
        if len(changes) > page_size:
            body["@odata.nextLink"] = f"{base}?$skiptoken={_b64(state)}"
        else:
            body["@odata.deltaLink"] = f"{base}?$deltatoken={_b64(state)}"
        headers = {"Preference-Applied": f"odata.maxpagesize={page_size}"} if prefer else None
        return web.json_response(body, headers=headers)

    @staticmethod
    def _changes(user: User, state: Mapping[str, Any]) -> list[tuple[int, dict[str, Any]]]:
        lo, hw, after = int(state["lo"]), int(state["hw"]), int(state["after"])
        kinds = {c.strip().lower() for c in str(state.get("ct") or "created,updated,deleted").split(",")}
        since = datetime.fromisoformat(state["since"].replace("Z", "+00:00")) if state.get("since") else None
        strict = state.get("op") == "gt"
        out: list[tuple[int, dict[str, Any]]] = []
        if "created" in kinds:
            for message in user.messages.values():
                if not after < message.seq <= hw or message.seq <= lo:
                    continue
                if since is not None and (message.received_at < since or (strict and message.received_at == since)):
                    continue
                out.append((message.seq, message.json(state.get("sel"))))
        if "deleted" in kinds and lo > 0:
            for seq, message_id, created_seq in user.removals:
                if after < seq <= hw and seq > lo and created_seq <= lo:
                    out.append((seq, {"@odata.type": "#microsoft.graph.message", "id": message_id,
                                      "@removed": {"reason": "deleted"}}))
        out.sort(key=lambda pair: pair[0])
        return out

    # --- control API -----------------------------------------------------------------------------------------

    def subscription_list(self) -> list[dict[str, Any]]:
        """Every subscription with its clientState and mailbox: for load generators that post notifications."""
        return [{**s.json(with_secret=True), "mailbox": self.users[s.user_id].upn}
                for s in self.subscriptions.values()]

    def reset(self) -> None:
        self.users.clear()
        self._by_upn.clear()
        self.subscriptions.clear()
        self.faults.clear()
        self.write_times.clear()
        self._windows.clear()
        self._drop.clear()
        self.answer_ms.clear()
        self.delivered_items.clear()
        self.stats = MockGraphStats()

    def stats_json(self) -> dict[str, Any]:
        answers = sorted(self.answer_ms)

        def pct(p: float) -> float | None:
            return round(answers[min(len(answers) - 1, int(p * len(answers)))], 2) if answers else None

        return {**asdict(self.stats), "subscriptions": len(self.subscriptions), "users": len(self.users),
                "max_writes_in_20s": self.max_writes_in_window(), "answer_ms_p50": pct(0.5),
                "answer_ms_p99": pct(0.99)}

    def _control_routes(self, app: web.Application) -> None:
        routes = [("POST", "/_mock/users", self._c_users), ("POST", "/_mock/mail", self._c_mail),
                  ("GET", "/_mock/subscriptions", self._c_subscriptions),
                  ("POST", "/_mock/lifecycle", self._c_lifecycle), ("POST", "/_mock/faults", self._c_faults),
                  ("DELETE", "/_mock/faults", self._c_clear_faults), ("POST", "/_mock/drop", self._c_drop),
                  ("POST", "/_mock/expire-delta", self._c_expire_delta), ("GET", "/_mock/stats", self._c_stats),
                  ("POST", "/_mock/reset", self._c_reset)]
        for method, path, handler in routes:
            app.router.add_route(method, path, self._control(handler))

    def _control(self, handler: Any) -> Any:
        async def wrapped(request: web.Request) -> web.Response:
            try:
                body = await request.json() if request.can_read_body else {}
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
                result = handler(body)
            except (ValueError, TypeError, KeyError) as exc:
                return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=400)
            except GraphError as exc:
                return self._error(exc)
            return web.json_response(result)
        return wrapped

    def _c_users(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"ids": [self.add_user(str(m)).id for m in body["mailboxes"]]}

    def _c_mail(self, body: dict[str, Any]) -> dict[str, Any]:
        received = _parse_time(body["received_at"], "received_at") if body.get("received_at") else None
        mailboxes = body.get("mailboxes") or [body["mailbox"]]
        ids = [self.add_mail(str(m), subject=str(body.get("subject", "Hello")),
                             sender=str(body.get("sender", "sender@example.org")),
                             importance=str(body.get("importance", "normal")), meeting=bool(body.get("meeting")),
                             received_at=received)
               for m in mailboxes for _ in range(int(body.get("count", 1)))]
        return {"ids": ids}

    def _c_subscriptions(self, _body: dict[str, Any]) -> dict[str, Any]:
        return {"value": self.subscription_list()}

    def _c_lifecycle(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = [body["subscription_id"]] if body.get("subscription_id") else \
            sorted(self.user(str(body["mailbox"]), create=False).subscriptions)
        for sub_id in ids:
            self.send_lifecycle(sub_id, str(body["event"]))
        return {"sent": len(ids)}

    def _c_faults(self, body: dict[str, Any]) -> dict[str, Any]:
        self.add_fault(Fault(**body))
        return {"faults": len(self.faults)}

    def _c_clear_faults(self, _body: dict[str, Any]) -> dict[str, Any]:
        self.clear_faults()
        return {"faults": 0}

    def _c_drop(self, body: dict[str, Any]) -> dict[str, Any]:
        self.drop_notifications(str(body["mailbox"]), int(body["count"]))
        return {"ok": True}

    def _c_expire_delta(self, body: dict[str, Any]) -> dict[str, Any]:
        self.expire_delta_links(str(body["mailbox"]))
        return {"ok": True}

    def _c_stats(self, _body: dict[str, Any]) -> dict[str, Any]:
        return self.stats_json()

    def _c_reset(self, _body: dict[str, Any]) -> dict[str, Any]:
        self.reset()
        return {"ok": True}


def _normal(resource: str, mock: MockGraph) -> str:
    match = _RESOURCE.match(resource)
    if match is None:
        return resource.lower()
    try:
        user_id = mock.user(match.group(1), create=False).id
    except GraphError:
        user_id = match.group(1).lower()
    return f"users/{user_id}/{'mailfolders/inbox/' if match.group(2) else ''}messages"


# --- as its own process ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`bemsmail mock graph`: serve until SIGTERM/SIGINT; prints one JSON line (url, ca_file) once it listens."""
    parser = argparse.ArgumentParser(prog="bemsmail mock graph",
                                     description="Mock Microsoft Graph + Entra token endpoint (HTTPS).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="TLS port (0: a free one)")
    parser.add_argument("--cert-dir", type=Path, required=True, help="where the throwaway CA and certificate live")
    parser.add_argument("--tenant-id", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret-env", default="BEMSMAIL_MOCK_GRAPH_SECRET",
                        help="environment variable holding the app's client secret (not an argument: ps shows those)")
    parser.add_argument("--notify-ca-file", type=Path, help="CA to trust when posting to https notification URLs")
    parser.add_argument("--writes-per-20s", type=int, default=WRITES_PER_APP, help="per app per tenant")
    parser.add_argument("--max-batch", type=int, default=100, help="notifications per POST at most")
    parser.add_argument("--delivery-concurrency", type=int, default=4, help="POSTs in flight per URL")
    args = parser.parse_args(argv)
    secret = os.environ.get(args.client_secret_env)
    if not secret:
        print(f"bemsmail mock graph: set {args.client_secret_env} to the app's client secret", file=sys.stderr)
        return 2

    async def serve() -> None:
        from bemsmail.daemon import install_stop_handlers

        mock = MockGraph(args.cert_dir, [GraphApp(args.tenant_id, args.client_id, secret)], host=args.host,
                         port=args.port, notify_ca_file=args.notify_ca_file, writes_per_app=args.writes_per_20s,
                         writes_per_tenant=max(args.writes_per_20s, WRITES_PER_TENANT), max_batch=args.max_batch,
                         delivery_concurrency=args.delivery_concurrency)
        stop = asyncio.Event()
        install_stop_handlers(stop)
        async with mock:
            print(json.dumps({"event": "mock_graph_ready", "url": mock.url, "graph_url": mock.graph_url,
                              "ca_file": str(mock.ca_file)}), flush=True)
            await stop.wait()

    try:
        asyncio.run(serve())
    except OSError as exc:
        print(f"bemsmail mock graph: cannot start: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Fault", "GraphApp", "GraphError", "Message", "MockGraph", "MockGraphStats", "Subscription", "User",
           "main"]
