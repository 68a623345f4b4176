"""Mock Exchange Web Services: a real HTTP server speaking EWS SOAP 1.1 as Microsoft documents it, for tests, the
end-to-end demo and load tests with 100,000 mailboxes. exchangelib talks to it unmodified.

Routes (one port, plain HTTP/1.1):

- ``POST /EWS/Exchange.asmx``: EWS SOAP. Operations: ``Subscribe`` (streaming, pull, push), ``GetStreamingEvents``,
  ``GetEvents``, ``Unsubscribe``, ``SyncFolderItems``, ``GetItem``, ``GetFolder``, ``FindFolder``, plus minimal
  ``ConvertId`` (exchangelib's version probe) and ``ResolveNames``. Any other operation gets an
  ``ErrorInvalidOperation`` response message.
- ``POST /autodiscover/autodiscover.svc``: SOAP Autodiscover ``GetUserSettings`` for one or more users.
- ``/_mock/...``: the control API, JSON in and out, the same as the Python methods:
  ``POST /_mock/mail`` {mailbox, subject?, sender?, importance?, item_class?, folder?, count?} → {"item_ids": [...]};
  ``POST /_mock/mail/bulk`` {"mailboxes": [...], subject?, ...} (one mail each) → {"created": n, "item_ids": [...]};
  ``POST /_mock/read`` {mailbox, item_id}; ``POST /_mock/folder`` {mailbox, name, parent?} → {"folder_id"};
  ``POST /_mock/fault`` {operation, code, times?, back_off_ms?, http_status?, mailbox?};
  ``POST /_mock/expire`` {subscription_ids?} → {"expired": n}; ``POST /_mock/drop-streams`` → {"dropped": n};
  ``POST /_mock/close-streams`` → {"closed": n}; ``POST /_mock/silence`` {seconds};
  ``POST /_mock/skip-push`` {subscription_id, n?}; ``POST /_mock/reset``; ``GET /_mock/stats``;
  ``GET /_mock/subscriptions?mailbox=...``; ``GET /_mock/requests?limit=N``; ``GET /_mock/health``.

Python API (``MockExchange``): ``start``/``stop``/``async with``; ``base_url``, ``ews_url``, ``autodiscover_url``;
``create_mail``, ``create_mails`` (bulk), ``mark_read``, ``update_mail``, ``delete_mail``, ``create_folder``;
``grouping``/``backend_of``/``cookie_for``; ``subscription(id)``/``subscriptions_of(mailbox)`` (``SubscriptionInfo``);
``stats`` (``MockEwsStats``, with ``recent_requests``: the last 1,000 ``RequestRecord``) and ``requests()``; the
fault hooks below. `serve_in_thread` runs a mock on its own loop for blocking callers; `main` is ``bemsmail mock ews``.

Authentication (``auth``): ``basic`` (401 with ``WWW-Authenticate: Basic realm="mock.local"``), ``ntlm`` (a real
NTLM handshake per TCP connection, verified by pyspnego's acceptor, as IIS does: once a connection has authenticated,
later requests on it need no header) or ``none``. The control API needs none.

Mailboxes: every address in one of ``domains`` exists; its state is created on first use (a mail, a subscription).
Each mailbox lives on backend ``crc32(address) % backends``, named ``BE00``, ``BE01``...: that name is its
Autodiscover ``GroupingInformation``. The acting mailbox of a request is the ``ExchangeImpersonation`` SMTP address
(PrimarySmtpAddress, SmtpAddress or PrincipalName), otherwise the mailbox named in the request
(``DistinguishedFolderId/Mailbox``, or the one an ItemId/FolderId belongs to), otherwise ``X-AnchorMailbox``.

Affinity (research §A.6): requests are routed to a backend by a valid ``X-BackEndOverrideCookie`` when
``X-PreferServerAffinity: true`` (the cookie is read from the ``X-BackEndOverrideCookie`` header as exchangelib sends
it, else from ``Cookie:`` as Microsoft documents; the header wins when both are present), else by the backend of
``X-AnchorMailbox``, else of the impersonated mailbox, else of the authenticated user (an address) or BE00. A
Subscribe creates its subscription on the routed backend; with ``X-PreferServerAffinity: true`` and no valid cookie
its response sets ``X-BackEndOverrideCookie=BE03.mock.local~<n>; path=/; HttpOnly``. GetStreamingEvents, GetEvents
and Unsubscribe for a subscription living on another backend than the routed one answer ErrorSubscriptionNotFound
(counted in ``stats.affinity_misroutes``).

Streaming (research §A.3): one chunked HTTP 200 body of complete SOAP envelopes, one per write. Pending events go
out at once, batched per connection (one ``m:Notification`` per subscription, at most 50 events each); keep-alive
envelopes (NoError, ConnectionStatus OK) follow ``heartbeat_seconds`` of quiet; after ``ConnectionTimeout`` protocol
minutes (each lasting ``minute_seconds``) a last envelope says ``ConnectionStatus Closed`` and the body ends.
Choices where the documentation is silent:

- Unknown, expired or misrouted ids get one error message ``ErrorSubscriptionNotFound`` listing them in
  ``ErrorSubscriptionIds``; a pull or push id gets ``ErrorInvalidSubscription``. When every id is bad the answer is
  that one envelope with ``ConnectionStatus Closed``; otherwise the errors go first and the good ids keep streaming
  (as the EWS Managed API expects: it drops the failed ids and carries on).
- More than 200 ids (or none) answer ``ErrorInvalidArgument`` with ConnectionStatus Closed. (Not ErrorInvalidRequest:
  exchangelib takes that for a version mismatch and retries every schema version.) A ConnectionTimeout outside
  1 to 30, a MaxChangesReturned outside 1 to 512 or a pull Timeout / StatusFrequency outside 1 to 1440 is a schema
  violation in messages.xsd: a SOAP fault ``ErrorSchemaValidation`` with HTTP 500, as Exchange answers schema errors.
- A second stream for a subscription already on a stream takes it over: the first stream gets
  ``ErrorNewEventStreamConnectionOpened`` listing that id and keeps its other ids (when none is left, that message
  carries ConnectionStatus Closed and the first stream ends).
- Open streams are counted per impersonated mailbox (else per authenticated user); beyond
  ``max_stream_connections_per_mailbox`` the answer is ``ErrorExceededConnectionCount`` (Closed).
- ``expire_subscriptions`` sends streams carrying the ids ``ErrorSubscriptionNotFound`` with ErrorSubscriptionIds
  (ConnectionStatus Closed only when no id is left on that stream).
- A streaming subscription not on any stream for ``subscription_idle_minutes`` expires; a pull subscription expires
  after its ``Timeout`` minutes without GetEvents.
- ``silence_streams`` holds every write (heartbeats, events, the final Closed) on every stream until it ends;
  events stay queued.

Events (research §A.2): a new mail fires CreatedEvent and NewMailEvent for the item and a folder ModifiedEvent with
UnreadCount; marking it read fires an item ModifiedEvent and the folder ModifiedEvent; a subscription sees only the
event types it asked for, for items in its folders and for its folders themselves (a folder event is in a subscribed
folder when the folder or its parent is subscribed). Streaming events carry no Watermark; pull and push events do
(opaque base64, monotonic per mailbox) and their notifications carry PreviousWatermark and MoreEvents. Each
subscription queues at most 10,000 undelivered events: beyond that they are dropped and the next GetEvents or stream
reports ``ErrorMissedNotificationEvents`` (the subscription stays; for push the next PreviousWatermark shows the gap).

GetEvents acknowledges every event up to the watermark it is given and returns the next (at most 50); a request that
repeats the previous request's watermark right after an answer with MoreEvents=true continues where that answer
ended (exchangelib's ``get_events()`` re-sends its first watermark while MoreEvents is true). Resubscribing pull or
push with a watermark replays item events rebuilt from the mailbox's current state (created, changed, deleted since
that watermark). A watermark of another mailbox or server is ``ErrorInvalidWatermark``.

Push (research §A.5): after a PushSubscriptionRequest the mock POSTs ``SendNotification`` to its URL (loopback hosts
only: anything else is ``ErrorInvalidPushSubscriptionUrl``): a StatusEvent at once, events as they happen, a
StatusEvent after StatusFrequency minutes without a notification. A reply ``SubscriptionStatus Unsubscribe`` ends
the subscription; a failed delivery (connect error, timeout, non-2xx, no parsable SubscriptionStatus) is retried after
30, 60, 120 ... protocol-seconds until StatusFrequency minutes are used up, then the subscription dies. One shared
aiohttp session and one scheduler task (a heap of due times) serve every push subscription.

Fault injection (``fail_next(operation, code, ...)``, also ``POST /_mock/fault``), applied after authentication to
the next ``times`` requests of that SOAP operation (``times`` ≤ 0: until ``reset()``), optionally only for requests
acting for ``mailbox``:

- ``http_status=503`` (or any status): a bare HTTP answer with that status and no SOAP;
- ``back_off_ms=N``: a SOAP Fault, HTTP 500, with ``ResponseCode`` = code and
  ``<t:MessageXml><t:Value Name="BackOffMilliseconds">N</t:Value></t:MessageXml>`` (research §A.6);
- otherwise: an error ResponseMessage with that ResponseCode, HTTP 200.

EWS switched off (``ews_disabled = True``): every EWS SOAP request (GetStreamingEvents too) is answered HTTP 403
Forbidden with no SOAP, after authentication, as Exchange Online answers when EWS is disabled for the organisation,
the app or the mailbox; Autodiscover keeps answering.

Other hooks: ``expire_subscriptions``, ``drop_streams`` (abort every stream's TCP connection), ``close_streams``
(ConnectionStatus Closed now), ``silence_streams``, ``skip_push_notifications`` (the next n push notifications advance
the watermark without being sent, so PreviousWatermark shows the gap), ``reset``.

Bodies containing a DOCTYPE are refused with a SOAP fault (no entity expansion, no network access by the parser).
Responses are rendered from string templates, never a DOM; requests are parsed with lxml.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import heapq
import hmac
import ipaddress
import itertools
import os
import re
import secrets
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import weakref
import zlib
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parseaddr
from typing import Any, Final, Literal, TypeVar
from urllib.parse import urlsplit

import aiohttp
import spnego
import spnego.exceptions
from aiohttp import web
from lxml import etree  # type: ignore[import-untyped]

SOAP_NS: Final = "http://schemas.xmlsoap.org/soap/envelope/"
MESSAGES_NS: Final = "http://schemas.microsoft.com/exchange/services/2006/messages"
TYPES_NS: Final = "http://schemas.microsoft.com/exchange/services/2006/types"
ERRORS_NS: Final = "http://schemas.microsoft.com/exchange/services/2006/errors"
AUTODISCOVER_NS: Final = "http://schemas.microsoft.com/exchange/2010/Autodiscover"
WSA_NS: Final = "http://www.w3.org/2005/08/addressing"
XSI_NS: Final = "http://www.w3.org/2001/XMLSchema-instance"

EWS_PATH: Final = "/EWS/Exchange.asmx"
AUTODISCOVER_PATH: Final = "/autodiscover/autodiscover.svc"
COOKIE_NAME: Final = "X-BackEndOverrideCookie"
SEND_NOTIFICATION_ACTION: Final = "http://schemas.microsoft.com/exchange/services/2006/messages/SendNotification"

MAX_IDS_PER_STREAM: Final = 200  # research §1: at most 200 subscription ids per GetStreamingEvents
MAX_EVENTS_PER_NOTIFICATION: Final = 50  # "the first 50 queued events" (getevents/getstreamingevents remarks)
MAX_PENDING_EVENTS: Final = 10_000  # per subscription; beyond it events are dropped and reported as missed
RECENT_REQUESTS: Final = 1_000
DEAD_SUBSCRIPTIONS_KEPT: Final = 10_000  # records of ended subscriptions kept for `subscription()`
PUSH_CONCURRENCY: Final = 64

# exchangelib requests "Exchange2016"; Exchange 2016/2019 answer a version string exchangelib knows to be bogus
# ("V2017_07_11") and so keeps the requested one, exactly as against a real server.
SERVER_VERSION: Final = (
    '<h:ServerVersionInfo MajorVersion="15" MinorVersion="1" MajorBuildNumber="2507" MinorBuildNumber="6" '
    f'Version="V2017_07_11" xmlns:h="{TYPES_NS}" xmlns="{TYPES_NS}"/>'
)
CAS_VERSION: Final = "15.01.2507.006"
EWS_SUPPORTED_SCHEMAS: Final = ("Exchange2007, Exchange2007_SP1, Exchange2010, Exchange2010_SP1, Exchange2010_SP2, "
                                "Exchange2013, Exchange2013_SP1, Exchange2015, Exchange2016")

EVENT_TYPES: Final = ("NewMailEvent", "CreatedEvent", "DeletedEvent", "ModifiedEvent", "MovedEvent", "CopiedEvent",
                      "FreeBusyChangedEvent")
_BIT: Final = {name: 1 << i for i, name in enumerate(EVENT_TYPES)}
NEW_MAIL, CREATED, DELETED, MODIFIED = (_BIT[n] for n in EVENT_TYPES[:4])

_M: Final = f"{{{MESSAGES_NS}}}"
_T: Final = f"{{{TYPES_NS}}}"
_S: Final = f"{{{SOAP_NS}}}"
_A: Final = f"{{{AUTODISCOVER_NS}}}"

STREAMING: Final = "streaming"
PULL: Final = "pull"
PUSH: Final = "push"
Kind = Literal["streaming", "pull", "push"]

# Distinguished folders every mailbox has: key, DistinguishedFolderId, DisplayName, FolderClass, parent key,
# element name. Display names are exchangelib's en_US names, so its FindFolder results get the right classes.
_WELLKNOWN: Final[tuple[tuple[int, str, str, str | None, int | None, str], ...]] = (
    (0, "root", "Root", None, None, "Folder"),
    (1, "msgfolderroot", "Top of Information Store", None, 0, "Folder"),
    (2, "inbox", "Inbox", "IPF.Note", 1, "Folder"),
    (3, "sentitems", "Sent Items", "IPF.Note", 1, "Folder"),
    (4, "deleteditems", "Deleted Items", "IPF.Note", 1, "Folder"),
    (5, "drafts", "Drafts", "IPF.Note", 1, "Folder"),
    (6, "junkemail", "Junk E-mail", "IPF.Note", 1, "Folder"),
    (7, "outbox", "Outbox", "IPF.Note", 1, "Folder"),
    (8, "calendar", "Calendar", "IPF.Appointment", 1, "CalendarFolder"),
    (9, "contacts", "Contacts", "IPF.Contact", 1, "ContactsFolder"),
)
_DISTINGUISHED: Final = {row[1]: row[0] for row in _WELLKNOWN}
INBOX: Final = 2
FIRST_CUSTOM_FOLDER: Final = 16

# Item classes and their element names; anything else of IPM.Schedule.Meeting.* is a meeting message.
_ITEM_TAGS: Final = {
    "IPM.Note": "Message",
    "IPM.Schedule.Meeting.Request": "MeetingRequest",
    "IPM.Schedule.Meeting.Resp.Pos": "MeetingResponse",
    "IPM.Schedule.Meeting.Resp.Neg": "MeetingResponse",
    "IPM.Schedule.Meeting.Resp.Tent": "MeetingResponse",
    "IPM.Schedule.Meeting.Canceled": "MeetingCancellation",
}
# The item properties this mock knows, in the order types.xsd puts them.
_ITEM_FIELDS: Final = ("item:ParentFolderId", "item:ItemClass", "item:Subject", "item:DateTimeReceived",
                       "item:Size", "item:Importance", "item:DateTimeSent", "item:DateTimeCreated",
                       "item:HasAttachments", "message:Sender", "message:From", "message:IsRead")
_DEFAULT_ITEM_FIELDS: Final = frozenset({"item:ItemClass", "item:Subject", "item:DateTimeReceived", "item:Size",
                                          "item:Importance", "item:HasAttachments", "message:From",
                                          "message:IsRead"})
_ALL_ITEM_FIELDS: Final = frozenset(_ITEM_FIELDS)

_MESSAGE_TEXT: Final = {
    "ErrorSubscriptionNotFound": "The specified subscription was not found.",
    "ErrorInvalidSubscription": "The subscription is not valid for this operation.",
    "ErrorNewEventStreamConnectionOpened": "A new event stream connection was opened for this subscription.",
    "ErrorMissedNotificationEvents": "Notification events were missed.",
    "ErrorExceededConnectionCount": "You have exceeded the available concurrent connections for your account.",
    "ErrorServerBusy": "The server cannot service this request right now. Try again later.",
    "ErrorItemNotFound": "The specified object was not found in the store.",
    "ErrorFolderNotFound": "The specified folder could not be found in the store.",
    "ErrorInvalidIdMalformed": "Id is malformed.",
    "ErrorInvalidSyncStateData": "Synchronization state data is corrupt or otherwise invalid.",
    "ErrorInvalidWatermark": "The watermark is invalid.",
    "ErrorInvalidPullSubscriptionId": "Subscription is not a pull subscription.",
    "ErrorInvalidPushSubscriptionUrl": "The push subscription URL is invalid.",
    "ErrorInvalidSubscriptionRequest": "A subscription can only cover one mailbox.",
    "ErrorNonExistentMailbox": "The SMTP address has no mailbox associated with it.",
    "ErrorInvalidArgument": "The request contains an invalid argument.",
    "ErrorInvalidOperation": "This operation is not supported by the mock Exchange server.",
    "ErrorInvalidRestriction": "The restriction is not supported by the mock Exchange server.",
    "ErrorNameResolutionNoResults": "No results were found.",
}

T = TypeVar("T")
_El = Any  # lxml elements: lxml ships no type information


def _esc(text: str) -> str:
    """Text for XML content and double-quoted attributes; characters XML 1.0 forbids become U+FFFD."""
    if _BAD_XML.search(text):
        text = _BAD_XML.sub("\ufffd", text)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


_BAD_XML: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _text(el: _El, path: str) -> str | None:
    found = el.find(path)
    if found is None or found.text is None:
        return None
    value: str = found.text.strip()
    return value


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str | None) -> bytes | None:
    if not text:
        return None
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1")


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- errors raised inside operation handlers ---------------------------------------------------------------------


class _EwsError(Exception):
    """One error ResponseMessage (HTTP 200)."""

    def __init__(self, code: str, text: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.text = text or _MESSAGE_TEXT.get(code, code)


class _SoapFault(Exception):
    """A SOAP Fault (HTTP 500)."""

    def __init__(self, code: str, text: str | None = None, back_off_ms: int | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.text = text or _MESSAGE_TEXT.get(code, code)
        self.back_off_ms = back_off_ms


def _schema_fault(text: str) -> _SoapFault:
    return _SoapFault("ErrorSchemaValidation", f"The request failed schema validation: {text}")


# --- public records ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestRecord:
    """One EWS or Autodiscover request as received (never its credentials)."""

    at: float
    operation: str
    mailbox: str | None
    impersonated: str | None
    anchor_mailbox: str | None
    prefer_server_affinity: str | None
    backend_override_cookie: str | None  # the X-BackEndOverrideCookie *header*
    cookie: str | None  # the Cookie header
    user: str | None
    backend: str | None = None  # where the request was routed (subscription operations)
    status: int = 200

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at, "operation": self.operation, "mailbox": self.mailbox, "impersonated": self.impersonated,
            "anchor_mailbox": self.anchor_mailbox, "prefer_server_affinity": self.prefer_server_affinity,
            "backend_override_cookie": self.backend_override_cookie, "cookie": self.cookie, "user": self.user,
            "backend": self.backend, "status": self.status,
        }


@dataclass(slots=True)
class MockEwsStats:
    """Counters since start or the last `reset()`; `open_streams` is always the live count."""

    requests: Counter[str] = field(default_factory=Counter)  # by SOAP operation
    open_streams: int = 0
    streams_opened: int = 0
    streams_per_subscription_max: int = 0  # most concurrent streams ever requesting one subscription id
    second_stream_opened: int = 0  # streams opened for a subscription that already had one
    stream_connections_by_impersonated: Counter[str] = field(default_factory=Counter)  # streams opened, by mailbox
    affinity_misroutes: int = 0
    subscriptions_created: Counter[str] = field(default_factory=Counter)  # by kind
    subscriptions_ended: Counter[str] = field(default_factory=Counter)  # by reason
    events_queued: int = 0
    events_dropped: int = 0
    notifications_streamed: int = 0
    push_deliveries: int = 0  # SendNotification POSTs answered OK or Unsubscribe
    push_failures: int = 0
    push_skipped: int = 0
    faults_injected: Counter[str] = field(default_factory=Counter)  # by operation
    unauthorized: int = 0
    forbidden: int = 0  # EWS requests answered 403 while `ews_disabled`
    recent_requests: deque[RequestRecord] = field(default_factory=lambda: deque(maxlen=RECENT_REQUESTS))

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests), "open_streams": self.open_streams, "streams_opened": self.streams_opened,
            "streams_per_subscription_max": self.streams_per_subscription_max,
            "second_stream_opened": self.second_stream_opened,
            "stream_connections_by_impersonated": dict(self.stream_connections_by_impersonated),
            "affinity_misroutes": self.affinity_misroutes,
            "subscriptions_created": dict(self.subscriptions_created),
            "subscriptions_ended": dict(self.subscriptions_ended),
            "events_queued": self.events_queued, "events_dropped": self.events_dropped,
            "notifications_streamed": self.notifications_streamed,
            "push_deliveries": self.push_deliveries, "push_failures": self.push_failures,
            "push_skipped": self.push_skipped, "faults_injected": dict(self.faults_injected),
            "unauthorized": self.unauthorized, "forbidden": self.forbidden,
        }


@dataclass(frozen=True, slots=True)
class SubscriptionInfo:
    """What the mock knows about one subscription (`MockExchange.subscription`)."""

    id: str
    mailbox: str
    kind: Kind
    folders: tuple[str, ...] | None  # distinguished names or FolderIds; None: SubscribeToAllFolders
    event_types: tuple[str, ...]
    backend: str
    alive: bool
    on_stream: bool
    pending_events: int
    url: str | None = None
    status_frequency: int | None = None


# --- internal state; __slots__ everywhere, since a load test holds 100,000 of each ---------------------------------


class _Item:
    __slots__ = ("content_seq", "created_seq", "deleted_seq", "folder", "importance", "is_read", "item_class",
                 "no", "read_seq", "received", "sender", "subject", "version")

    def __init__(self, no: int, folder: int, subject: str, sender: str, importance: str, item_class: str,
                 received: float, seq: int) -> None:
        self.no = no
        self.folder = folder
        self.subject = subject
        self.sender = sender
        self.importance = importance
        self.item_class = item_class
        self.received = received
        self.is_read = False
        self.created_seq = seq
        self.content_seq = seq
        self.read_seq = 0
        self.deleted_seq = 0
        self.version = 1


class _Folder:
    """A folder created through `create_folder` (distinguished folders are rows of _WELLKNOWN)."""

    __slots__ = ("key", "name", "parent", "total", "unread")

    def __init__(self, key: int, name: str, parent: int) -> None:
        self.key = key
        self.name = name
        self.parent = parent
        self.total = 0
        self.unread = 0


class _Mailbox:
    # The inbox counters are plain slots because nearly every mail of a load test lands there: a dict of counters
    # per mailbox would double the memory of 100,000 mailboxes holding one mail each.
    __slots__ = ("address", "backend", "counts", "folders", "inbox_total", "inbox_unread", "items", "no", "seq",
                 "subs")

    def __init__(self, address: str, no: int, backend: int) -> None:
        self.address = address
        self.no = no
        self.backend = backend
        self.seq = 0  # event and change sequence: watermarks and sync states are positions in it
        self.items: list[_Item] | None = None
        self.inbox_total = 0
        self.inbox_unread = 0
        self.counts: dict[int, list[int]] | None = None  # other distinguished folders: key -> [total, unread]
        self.folders: dict[int, _Folder] | None = None
        self.subs: list[_Subscription] | None = None


# An event as queued: (sequence number, element name, body without Watermark). One tuple is shared by every
# subscription that receives it; the Watermark is rendered from the sequence number when a pull or push
# notification needs it.
_Event = tuple[int, str, str]


class _Push:
    __slots__ = ("busy", "due", "fail_started", "gen", "next_delay", "skip", "status_frequency", "url")

    def __init__(self, url: str, status_frequency: int) -> None:
        self.url = url
        self.status_frequency = status_frequency
        self.gen = 0  # invalidates heap entries scheduled before the latest one
        self.due = 0.0
        self.busy = False
        self.fail_started: float | None = None
        self.next_delay = 30.0  # protocol seconds before the next retry
        self.skip = 0


class _Subscription:
    __slots__ = ("alive", "backend", "cursor", "detached_at", "dropped_upto", "folders", "kind", "last_poll",
                 "last_wm", "mailbox", "mask", "missed", "more", "no", "pending", "prev_wm", "push", "stream",
                 "timeout")

    def __init__(self, no: int, mailbox: _Mailbox, kind: Kind, folders: frozenset[int] | None, mask: int,
                 backend: int, now: float) -> None:
        self.no = no
        self.mailbox = mailbox
        self.kind = kind
        self.folders = folders
        self.mask = mask
        self.backend = backend
        self.alive = True
        self.pending: deque[_Event] | None = None
        self.stream: _Stream | None = None
        self.detached_at = now
        self.last_poll = now
        self.timeout = 0.0  # pull: seconds without GetEvents before it expires
        self.missed = False
        self.dropped_upto = 0
        self.last_wm = mailbox.seq  # pull/push: the watermark the client has
        self.cursor = 0  # pull: last sequence number returned
        self.prev_wm = -1  # pull: watermark of the previous GetEvents
        self.more = False  # pull: whether the previous GetEvents said MoreEvents
        self.push: _Push | None = None


class _Stream:
    __slots__ = ("aborted", "closing", "deadline", "dirty", "errors", "key", "last_write", "no", "resp", "subs",
                 "transport", "waiter")

    def __init__(self, no: int, key: str, resp: web.StreamResponse, transport: asyncio.Transport | None,
                 deadline: float, now: float) -> None:
        self.no = no
        self.key = key  # whose connection budget it uses
        self.resp = resp
        self.transport = transport
        self.deadline = deadline
        self.last_write = now
        self.subs: dict[int, _Subscription] = {}
        self.dirty: dict[_Subscription, None] = {}  # subscriptions with something to send, in arrival order
        self.errors: list[tuple[str, list[str]]] = []  # (ResponseCode, subscription ids) not sent yet
        self.closing = False
        self.aborted = False
        self.waiter: asyncio.Future[None] | None = None


@dataclass(slots=True)
class _Fault:
    operation: str
    code: str
    times: int
    back_off_ms: int | None
    http_status: int | None
    mailbox: str | None


class _NtlmState:
    __slots__ = ("ctx", "scheme", "user")

    def __init__(self) -> None:
        self.ctx: spnego.ContextProxy | None = None
        self.scheme = "NTLM"
        self.user: str | None = None


class _Ctx:
    """One parsed EWS request."""

    __slots__ = ("anchor", "cookie", "impersonated", "op", "op_name", "prefer", "record", "request", "set_cookie",
                 "user")

    def __init__(self, request: web.Request, op_name: str, op: _El, user: str | None) -> None:
        self.request = request
        self.op_name = op_name
        self.op = op
        self.user = user
        self.impersonated: str | None = None
        anchor = request.headers.get("X-AnchorMailbox")
        self.anchor = anchor.strip().lower() if anchor else None
        self.prefer = _is_true(request.headers.get("X-PreferServerAffinity"))
        self.cookie = request.headers.get(COOKIE_NAME) or request.cookies.get(COOKIE_NAME)
        self.record: RequestRecord | None = None
        self.set_cookie: str | None = None


# pyspnego's NTLM acceptor reads its credentials only from the file named by NTLM_USER_FILE, at construction and
# when it checks the Authenticate message; both are synchronous, so the variable is set just around them.
_NTLM_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _ntlm_user_file(path: str) -> Iterator[None]:
    with _NTLM_ENV_LOCK:
        old = os.environ.get("NTLM_USER_FILE")
        os.environ["NTLM_USER_FILE"] = path
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("NTLM_USER_FILE", None)
            else:
                os.environ["NTLM_USER_FILE"] = old


# --- response templates -------------------------------------------------------------------------------------------

_XML_DECL: Final = '<?xml version="1.0" encoding="utf-8"?>'
_ENV_HEAD: Final = (f'{_XML_DECL}<s:Envelope xmlns:s="{SOAP_NS}"><s:Header>{SERVER_VERSION}</s:Header><s:Body>')
_ENV_TAIL: Final = "</s:Body></s:Envelope>"
_GSE_HEAD: Final = (f'{_ENV_HEAD}<m:GetStreamingEventsResponse xmlns:m="{MESSAGES_NS}" xmlns:t="{TYPES_NS}">'
                    "<m:ResponseMessages>")
_GSE_TAIL: Final = f"</m:ResponseMessages></m:GetStreamingEventsResponse>{_ENV_TAIL}"
_GSE_OK: Final = '<m:GetStreamingEventsResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>'
_HEARTBEAT: Final = (f"{_GSE_HEAD}{_GSE_OK}<m:ConnectionStatus>OK</m:ConnectionStatus>"
                     f"</m:GetStreamingEventsResponseMessage>{_GSE_TAIL}").encode()
_CLOSED: Final = (f"{_GSE_HEAD}{_GSE_OK}<m:ConnectionStatus>Closed</m:ConnectionStatus>"
                  f"</m:GetStreamingEventsResponseMessage>{_GSE_TAIL}").encode()
_FOLDER_CHANGE_KEY: Final = "AQAAAA=="
_XML_CONTENT_TYPE: Final = "text/xml; charset=utf-8"


def _envelope(op: str, messages: str) -> bytes:
    return (f'{_ENV_HEAD}<m:{op}Response xmlns:m="{MESSAGES_NS}" xmlns:t="{TYPES_NS}"><m:ResponseMessages>'
            f"{messages}</m:ResponseMessages></m:{op}Response>{_ENV_TAIL}").encode()


def _ok(op: str, inner: str = "") -> str:
    return (f'<m:{op}ResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>{inner}'
            f"</m:{op}ResponseMessage>")


def _error_tail(op: str) -> str:
    """Elements exchangelib reads even from an error message of these operations."""
    if op == "SyncFolderItems":
        return "<m:SyncState/><m:IncludesLastItemInRange>true</m:IncludesLastItemInRange>"
    if op == "GetStreamingEvents":
        return "<m:ConnectionStatus>Closed</m:ConnectionStatus>"
    if op == "GetItem":
        return "<m:Items/>"
    if op == "GetFolder":
        return "<m:Folders/>"
    return ""


def _error(op: str, code: str, text: str | None = None, tail: str | None = None) -> str:
    return (f'<m:{op}ResponseMessage ResponseClass="Error"><m:MessageText>{_esc(text or _MESSAGE_TEXT.get(code, code))}'
            f"</m:MessageText><m:ResponseCode>{code}</m:ResponseCode><m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>"
            f"{_error_tail(op) if tail is None else tail}</m:{op}ResponseMessage>")


def _stream_error(code: str, ids: Iterable[str], status: str) -> str:
    listed = "".join(f"<m:SubscriptionId>{sid}</m:SubscriptionId>" for sid in ids)
    return _error("GetStreamingEvents", code, tail=f"<m:ErrorSubscriptionIds>{listed}</m:ErrorSubscriptionIds>"
                                                   f"<m:ConnectionStatus>{status}</m:ConnectionStatus>")


def _fault_body(code: str, text: str, back_off_ms: int | None) -> bytes:
    message_xml = ""
    if back_off_ms is not None:
        message_xml = (f'<t:MessageXml xmlns:t="{TYPES_NS}"><t:Value Name="BackOffMilliseconds">{int(back_off_ms)}'
                       "</t:Value></t:MessageXml>")
    return (f'{_XML_DECL}<s:Envelope xmlns:s="{SOAP_NS}"><s:Body><s:Fault>'
            f'<faultcode xmlns:a="{TYPES_NS}">a:{code}</faultcode><faultstring xml:lang="en-US">{_esc(text)}'
            f'</faultstring><detail><e:ResponseCode xmlns:e="{ERRORS_NS}">{code}</e:ResponseCode>'
            f'<e:Message xmlns:e="{ERRORS_NS}">{_esc(text)}</e:Message>{message_xml}</detail></s:Fault>'
            f"{_ENV_TAIL}").encode()


def _mailbox_xml(tag: str, sender: str) -> str:
    name, address = parseaddr(sender)
    address = address or sender
    if not name:
        name = address.split("@", 1)[0].replace(".", " ").title()
    return (f"<t:{tag}><t:Mailbox><t:Name>{_esc(name)}</t:Name><t:EmailAddress>{_esc(address)}</t:EmailAddress>"
            f"<t:RoutingType>SMTP</t:RoutingType><t:MailboxType>OneOff</t:MailboxType></t:Mailbox></t:{tag}>")


def _xml_response(body: bytes, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    response = web.Response(body=body, status=status, headers=headers)
    response.headers["Content-Type"] = _XML_CONTENT_TYPE
    return response


async def _call(fn: Callable[[], T]) -> T:
    return fn()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


# --- the server ---------------------------------------------------------------------------------------------------


class MockExchange:
    """The mock server. Use as ``async with MockExchange() as mock:`` (port 0 picks a free port) on the test's loop and
    drive blocking clients (exchangelib) from threads, or run it with `serve_in_thread`.

    The mailbox and fault methods may be called from any thread: off the server's loop they run on it and wait."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, auth: Literal["none", "basic", "ntlm"] = "basic",
                 users: Mapping[str, str] | None = None, domains: Iterable[str] = ("example.com",),
                 backends: int = 4, heartbeat_seconds: float = 20.0, minute_seconds: float = 60.0,
                 subscription_idle_minutes: float = 30.0, max_stream_connections_per_mailbox: int = 10) -> None:
        if auth not in ("none", "basic", "ntlm"):
            raise ValueError(f"unknown auth {auth!r}")
        if backends < 1 or backends > 255:
            raise ValueError("backends must be 1..255")
        self.host = host
        self._port = port
        self.auth = auth
        self.users = {name.lower(): password for name, password in (users or {"svc": "secret"}).items()}
        self._user_names = {name.lower(): name for name in (users or {"svc": "secret"})}
        self.domains = frozenset(d.lower().lstrip("@") for d in domains)
        self.backends = backends
        self.heartbeat_seconds = heartbeat_seconds
        self.minute_seconds = minute_seconds
        self.subscription_idle_minutes = subscription_idle_minutes
        self.max_stream_connections_per_mailbox = max_stream_connections_per_mailbox
        self.stats = MockEwsStats()

        # Keys for ids: ids of another mock instance are unknown here, as ids of another Exchange organisation are.
        self._secret = secrets.token_bytes(16)
        self._tag = int.from_bytes(secrets.token_bytes(4), "big")
        self._cookie_salt = secrets.token_bytes(8)

        self._mailboxes: dict[str, _Mailbox] = {}
        self._by_no: list[_Mailbox] = []
        self._subs: dict[int, _Subscription] = {}
        self._dead: OrderedDict[int, _Subscription] = OrderedDict()
        self._sub_seq = itertools.count(1)
        self._stream_seq = itertools.count(1)
        self._streams: set[_Stream] = set()
        self._open_by: Counter[str] = Counter()
        self._faults: list[_Fault] = []
        self._silence_until = 0.0
        self._folder_sets: dict[frozenset[int], frozenset[int]] = {}  # interned folder sets of subscriptions
        #: Exchange Online with EWS switched off: every EWS request is answered 403 (see the module docstring)
        self.ews_disabled = False

        self._parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False,
                                       remove_comments=True, remove_pis=True)
        self._ntlm_conns: weakref.WeakKeyDictionary[Any, _NtlmState] = weakref.WeakKeyDictionary()
        self._ntlm_dir: str | None = None
        self._ntlm_file: str | None = None

        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._session: aiohttp.ClientSession | None = None
        self._push_heap: list[tuple[float, int, int, _Subscription]] = []
        self._push_tick = itertools.count()
        self._push_wake: asyncio.Event | None = None
        self._push_sem: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- lifecycle ----------------------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_post(EWS_PATH, self._ews)
        app.router.add_post(AUTODISCOVER_PATH, self._autodiscover)
        # exchangelib sends an unauthenticated GET/HEAD to Autodiscover URLs when it follows redirects
        app.router.add_get(AUTODISCOVER_PATH, self._autodiscover_probe)
        app.router.add_post("/_mock/mail", self._http_mail)
        app.router.add_post("/_mock/mail/bulk", self._http_mail_bulk)
        app.router.add_post("/_mock/read", self._http_read)
        app.router.add_post("/_mock/folder", self._http_folder)
        app.router.add_post("/_mock/fault", self._http_fault)
        app.router.add_post("/_mock/expire", self._http_expire)
        app.router.add_post("/_mock/drop-streams", self._http_drop)
        app.router.add_post("/_mock/close-streams", self._http_close)
        app.router.add_post("/_mock/silence", self._http_silence)
        app.router.add_post("/_mock/skip-push", self._http_skip_push)
        app.router.add_post("/_mock/reset", self._http_reset)
        app.router.add_get("/_mock/stats", self._http_stats)
        app.router.add_get("/_mock/subscriptions", self._http_subscriptions)
        app.router.add_get("/_mock/requests", self._http_requests)
        app.router.add_get("/_mock/health", self._http_health)
        return app

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if self.auth == "ntlm":
            self._write_ntlm_file()
        # handler_cancellation: a client that goes away ends its stream handler at once (and frees its budget)
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0, handle_signals=False,
                                     handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port, backlog=2048)
        await site.start()
        self._port = int(self._runner.addresses[0][1])
        # The push client: loopback only, one pool for every subscription, no proxies from the environment.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=PUSH_CONCURRENCY),
                                              trust_env=False)
        self._push_wake = asyncio.Event()
        self._push_sem = asyncio.Semaphore(PUSH_CONCURRENCY)
        self._spawn(self._push_scheduler())
        self._spawn(self._sweeper())

    async def stop(self) -> None:
        for stream in list(self._streams):
            stream.aborted = True
            if stream.transport is not None:
                stream.transport.abort()
            self._wake(stream)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._ntlm_dir is not None:
            shutil.rmtree(self._ntlm_dir, ignore_errors=True)
            self._ntlm_dir = self._ntlm_file = None
        self._loop = None
        self._loop_thread = None

    async def __aenter__(self) -> MockExchange:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def ews_url(self) -> str:
        return self.base_url + EWS_PATH

    @property
    def autodiscover_url(self) -> str:
        return self.base_url + AUTODISCOVER_PATH

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _on_loop(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the server's loop: state changes wake streams and the push scheduler, which are loop-bound."""
        loop = self._loop
        if loop is None or self._loop_thread == threading.get_ident() or not loop.is_running():
            return fn()
        return asyncio.run_coroutine_threadsafe(_call(fn), loop).result(timeout=60)

    def _write_ntlm_file(self) -> None:
        self._ntlm_dir = tempfile.mkdtemp(prefix="ews-mock-ntlm-")
        path = os.path.join(self._ntlm_dir, "users")
        lines = []
        for name, password in self.users.items():
            original = self._user_names.get(name, name)
            domain, _, user = original.rpartition("\\")
            lines.append(f"{domain}:{user}:{password}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write("\n".join(lines) + "\n")
        self._ntlm_file = path

    # --- mailboxes and ids --------------------------------------------------------------------------------------------

    def backend_of(self, mailbox: str) -> int:
        """The index of the backend a mailbox lives on: a stable hash of the address."""
        return zlib.crc32(mailbox.strip().lower().encode()) % self.backends

    def backend_name(self, backend: int) -> str:
        return f"BE{backend:02d}"

    def grouping(self, mailbox: str) -> str:
        """The GroupingInformation Autodiscover gives for `mailbox`: the name of its backend."""
        return self.backend_name(self.backend_of(mailbox))

    def cookie_for(self, backend: int) -> str:
        """The X-BackEndOverrideCookie value this mock hands out for a backend."""
        n = int.from_bytes(hashlib.blake2b(bytes([backend]), key=self._cookie_salt, digest_size=4).digest(), "big")
        return f"{self.backend_name(backend)}.mock.local~{n}"

    def _cookie_backend(self, value: str | None) -> int | None:
        if not value:
            return None
        match = re.fullmatch(r"BE(\d{2,3})\.mock\.local~\d+", value.strip())
        if match is None:
            return None
        backend = int(match.group(1))
        if backend >= self.backends or not hmac.compare_digest(self.cookie_for(backend), value.strip()):
            return None
        return backend

    def serves(self, address: str) -> bool:
        _, _, domain = address.strip().lower().rpartition("@")
        return bool(domain) and domain in self.domains

    def _mailbox(self, address: str | None) -> _Mailbox | None:
        if not address:
            return None
        key = address.strip().lower()
        mb = self._mailboxes.get(key)
        if mb is None:
            if not self.serves(key):
                return None
            mb = _Mailbox(key, len(self._by_no), self.backend_of(key))
            self._mailboxes[key] = mb
            self._by_no.append(mb)
        return mb

    def _need_mailbox(self, address: str) -> _Mailbox:
        mb = self._mailbox(address)
        if mb is None:
            raise KeyError(f"{address!r} is not in a domain this mock serves ({', '.join(sorted(self.domains))})")
        return mb

    def _mac(self, raw: bytes, size: int) -> bytes:
        return hashlib.blake2b(raw, key=self._secret, digest_size=size).digest()

    def _obj_id(self, kind: int, mb_no: int, num: int) -> str:
        raw = struct.pack(">BIII", kind, self._tag, mb_no, num)
        return _b64(raw + self._mac(raw, 11))

    def _parse_obj_id(self, kind: int, text: str | None) -> tuple[_Mailbox, int] | None:
        raw = _unb64(text)
        if raw is None or len(raw) != 24 or raw[0] != kind:
            return None
        if not hmac.compare_digest(raw[13:], self._mac(raw[:13], 11)):
            return None
        _, tag, mb_no, num = struct.unpack(">BIII", raw[:13])
        if tag != self._tag or mb_no >= len(self._by_no):
            return None
        return self._by_no[mb_no], num

    def _item_id(self, mb: _Mailbox, item: _Item) -> str:
        return self._obj_id(0x49, mb.no, item.no)

    @staticmethod
    def _change_key(kind: int, version: int) -> str:
        return _b64(struct.pack(">BBI", kind, 0, version & 0xFFFFFFFF))

    def _folder_id(self, mb: _Mailbox, key: int) -> str:
        return self._obj_id(0x46, mb.no, key)

    def _watermark(self, mb: _Mailbox, seq: int) -> str:
        raw = struct.pack(">BIIQ", 0x57, self._tag, mb.no, seq)
        return _b64(raw + self._mac(raw, 7))

    def _parse_watermark(self, mb: _Mailbox, text: str | None) -> int | None:
        raw = _unb64(text)
        if raw is None or len(raw) != 24 or raw[0] != 0x57 or not hmac.compare_digest(raw[17:], self._mac(raw[:17], 7)):
            return None
        _, tag, mb_no, seq = struct.unpack(">BIIQ", raw[:17])
        if tag != self._tag or mb_no != mb.no or seq > mb.seq:
            return None
        seq_: int = seq
        return seq_

    def _sync_state(self, mb: _Mailbox, key: int, seq: int) -> str:
        raw = struct.pack(">BIIHQ", 0x59, self._tag, mb.no, key, seq)
        return _b64(raw + self._mac(raw, 5))

    def _parse_sync_state(self, text: str) -> tuple[int, int, int] | None:
        raw = _unb64(text)
        if raw is None or len(raw) != 24 or raw[0] != 0x59 or not hmac.compare_digest(raw[19:], self._mac(raw[:19], 5)):
            return None
        _, tag, mb_no, key, seq = struct.unpack(">BIIHQ", raw[:19])
        if tag != self._tag:
            return None
        return mb_no, key, seq

    def _sub_id(self, sub: _Subscription) -> str:
        # 50 bytes, 68 base64 characters, like Exchange's; rebuilt when needed rather than stored per subscription
        head = struct.pack(">BIBI", 0x53, self._tag, sub.backend, sub.no)
        return _b64(head + self._mac(head, 40))

    def _parse_sub_id(self, text: str | None) -> int | None:
        raw = _unb64(text)
        if raw is None or len(raw) != 50 or raw[0] != 0x53:
            return None
        if not hmac.compare_digest(raw[10:], self._mac(raw[:10], 40)):
            return None
        _, tag, _, no = struct.unpack(">BIBI", raw[:10])
        if tag != self._tag:
            return None
        no_: int = no
        return no_

    # --- folders ------------------------------------------------------------------------------------------------------

    def _folder_row(self, mb: _Mailbox, key: int) -> tuple[str, str | None, int | None, str, str | None] | None:
        """(display name, folder class, parent key, element name, distinguished id) or None."""
        if key < len(_WELLKNOWN):
            row = _WELLKNOWN[key]
            return row[2], row[3], row[4], row[5], row[1]
        folder = (mb.folders or {}).get(key)
        if folder is None:
            return None
        return folder.name, "IPF.Note", folder.parent, "Folder", None

    def _counts(self, mb: _Mailbox, key: int) -> tuple[int, int]:
        if key == INBOX:
            return mb.inbox_total, mb.inbox_unread
        if key >= FIRST_CUSTOM_FOLDER:
            folder = (mb.folders or {}).get(key)
            return (folder.total, folder.unread) if folder else (0, 0)
        pair = (mb.counts or {}).get(key)
        return (pair[0], pair[1]) if pair else (0, 0)

    def _add_counts(self, mb: _Mailbox, key: int, total: int, unread: int) -> None:
        if key == INBOX:
            mb.inbox_total += total
            mb.inbox_unread += unread
        elif key >= FIRST_CUSTOM_FOLDER:
            folder = (mb.folders or {})[key]
            folder.total += total
            folder.unread += unread
        else:
            if mb.counts is None:
                mb.counts = {}
            pair = mb.counts.setdefault(key, [0, 0])
            pair[0] += total
            pair[1] += unread

    def _children(self, mb: _Mailbox, key: int) -> list[int]:
        kids = [row[0] for row in _WELLKNOWN if row[4] == key]
        kids.extend(f.key for f in (mb.folders or {}).values() if f.parent == key)
        return kids

    def _parent(self, mb: _Mailbox, key: int) -> int | None:
        row = self._folder_row(mb, key)
        return None if row is None else row[2]

    def _resolve_folder_name(self, mb: _Mailbox, folder: str) -> int:
        """A distinguished name ("inbox") or a FolderId of `mb`."""
        key = _DISTINGUISHED.get(folder.lower())
        if key is not None:
            return key
        parsed = self._parse_obj_id(0x46, folder)
        if parsed is None or parsed[0] is not mb or self._folder_row(mb, parsed[1]) is None:
            raise KeyError(f"unknown folder {folder!r} in {mb.address}")
        return parsed[1]

    def _folder_ref(self, mb: _Mailbox, key: int) -> str:
        return f'Id="{self._folder_id(mb, key)}" ChangeKey="{_FOLDER_CHANGE_KEY}"'

    # --- events -------------------------------------------------------------------------------------------------------

    def _now_iso(self) -> str:
        return _iso(time.time())

    def _item_event_body(self, mb: _Mailbox, item: _Item, stamp: str) -> str:
        return (f"<t:TimeStamp>{stamp}</t:TimeStamp><t:ItemId Id=\"{self._item_id(mb, item)}\" "
                f"ChangeKey=\"{self._change_key(0x09, item.version)}\"/><t:ParentFolderId "
                f"{self._folder_ref(mb, item.folder)}/>")

    def _folder_event_body(self, mb: _Mailbox, key: int, stamp: str, with_unread: bool) -> str:
        parent = self._parent(mb, key)
        parts = [f"<t:TimeStamp>{stamp}</t:TimeStamp><t:FolderId {self._folder_ref(mb, key)}/>"]
        if parent is not None:
            parts.append(f"<t:ParentFolderId {self._folder_ref(mb, parent)}/>")
        if with_unread:
            parts.append(f"<t:UnreadCount>{self._counts(mb, key)[1]}</t:UnreadCount>")
        return "".join(parts)

    def _emit(self, mb: _Mailbox, events: list[tuple[int, str, str, int, bool]]) -> None:
        """Queue events (bit, element, body, folder key, is a folder event) for the mailbox's subscriptions. Every
        event takes the next sequence number of the mailbox, delivered or not."""
        subs = mb.subs
        if not subs:
            mb.seq += len(events)
            return
        now = time.monotonic()
        parents: dict[int, int | None] = {}
        touched: dict[_Subscription, None] = {}
        for bit, tag, body, key, is_folder in events:
            mb.seq += 1
            event: _Event = (mb.seq, tag, body)
            for sub in subs:
                if not sub.mask & bit or not self._alive(sub, now):
                    continue
                folders = sub.folders
                if folders is not None and key not in folders:
                    if not is_folder:
                        continue
                    if key not in parents:
                        parents[key] = self._parent(mb, key)
                    if parents[key] not in folders:
                        continue
                self._enqueue(sub, event)
                touched[sub] = None
        for sub in touched:
            self._notify(sub)

    def _enqueue(self, sub: _Subscription, event: _Event) -> None:
        queue = sub.pending
        if queue is None:
            queue = sub.pending = deque()
        if len(queue) >= MAX_PENDING_EVENTS:
            sub.missed = True
            sub.dropped_upto = event[0]
            self.stats.events_dropped += 1
            return
        queue.append(event)
        self.stats.events_queued += 1

    def _notify(self, sub: _Subscription) -> None:
        stream = sub.stream
        if stream is not None:
            stream.dirty[sub] = None
            self._wake(stream)
        elif sub.push is not None and not sub.push.busy and sub.push.fail_started is None:
            self._schedule_push(sub, 0.0)

    @staticmethod
    def _wake(stream: _Stream) -> None:
        waiter = stream.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _expiry(self, sub: _Subscription, now: float) -> str | None:
        """Why `sub` has run out of idle time by `now` (None: it has not). No side effects: safe from any thread."""
        if sub.kind == STREAMING and sub.stream is None:
            if now - sub.detached_at > self.subscription_idle_minutes * self.minute_seconds:
                return "idle"
        elif sub.kind == PULL and now - sub.last_poll > sub.timeout:
            return "timeout"
        return None

    def _alive(self, sub: _Subscription, now: float) -> bool:
        """Whether `sub` lives, ending it now if its idle time ran out (checked lazily; the sweeper frees memory)."""
        if not sub.alive:
            return False
        reason = self._expiry(sub, now)
        if reason is not None:
            self._end(sub, reason)
            return False
        return True

    def _end(self, sub: _Subscription, reason: str) -> None:
        if not sub.alive:
            return
        sub.alive = False
        sub.pending = None
        self._subs.pop(sub.no, None)
        self._dead[sub.no] = sub
        while len(self._dead) > DEAD_SUBSCRIPTIONS_KEPT:
            self._dead.popitem(last=False)
        self.stats.subscriptions_ended[reason] += 1
        stream = sub.stream
        if stream is not None:
            stream.subs.pop(sub.no, None)
            stream.dirty.pop(sub, None)
            sub.stream = None
        if sub.push is not None:
            sub.push.gen += 1
        mb = sub.mailbox
        if mb.subs is not None:
            mb.subs = [s for s in mb.subs if s is not sub] or None

    # --- the Python API: mailboxes ------------------------------------------------------------------------------------

    def create_mail(self, mailbox: str, *, subject: str = "Hello", sender: str = "alice@example.org",
                    importance: str = "Normal", item_class: str = "IPM.Note", folder: str = "inbox",
                    received_at: datetime | None = None) -> str:
        """Deliver a mail; fires CreatedEvent + NewMailEvent for it and a ModifiedEvent (UnreadCount) for its folder.
        Returns its ItemId."""
        return self._on_loop(lambda: self._create_mail(mailbox, subject, sender, importance, item_class, folder,
                                                       received_at))

    def _create_mail(self, mailbox: str, subject: str, sender: str, importance: str, item_class: str, folder: str,
                     received_at: datetime | None) -> str:
        mb = self._need_mailbox(mailbox)
        key = self._resolve_folder_name(mb, folder)
        if received_at is None:
            received = time.time()
        else:
            received = (received_at if received_at.tzinfo else received_at.replace(tzinfo=UTC)).timestamp()
        items = mb.items
        if items is None:
            items = mb.items = []
        item = _Item(len(items) + 1, key, subject, sender, importance, item_class, received, mb.seq + 1)
        items.append(item)
        self._add_counts(mb, key, 1, 1)
        if mb.subs:
            stamp = self._now_iso()
            body = self._item_event_body(mb, item, stamp)
            self._emit(mb, [(CREATED, "CreatedEvent", body, key, False),
                            (NEW_MAIL, "NewMailEvent", body, key, False),
                            (MODIFIED, "ModifiedEvent", self._folder_event_body(mb, key, stamp, True), key, True)])
        else:
            mb.seq += 3  # the same sequence numbers the events would have taken
        return self._item_id(mb, item)

    def create_mails(self, mailboxes: Iterable[str], **fields: Any) -> list[str]:
        """One mail in each mailbox (for load tests); returns their item ids, in order."""
        names = list(mailboxes)

        def run() -> list[str]:
            return [self._create_mail(name, fields.get("subject", "Hello"), fields.get("sender", "alice@example.org"),
                                      fields.get("importance", "Normal"), fields.get("item_class", "IPM.Note"),
                                      fields.get("folder", "inbox"), None)
                    for name in names]

        return self._on_loop(run)

    def _find_item(self, mailbox: str, item_id: str) -> tuple[_Mailbox, _Item]:
        mb = self._need_mailbox(mailbox)
        parsed = self._parse_obj_id(0x49, item_id)
        if parsed is None or parsed[0] is not mb or not mb.items or not 0 < parsed[1] <= len(mb.items):
            raise KeyError(f"no item {item_id!r} in {mailbox}")
        item = mb.items[parsed[1] - 1]
        if item.deleted_seq:
            raise KeyError(f"item {item_id!r} was deleted")
        return mb, item

    def mark_read(self, mailbox: str, item_id: str, *, is_read: bool = True) -> None:
        """Set the read flag; fires an item ModifiedEvent and the folder's ModifiedEvent (UnreadCount)."""

        def run() -> None:
            mb, item = self._find_item(mailbox, item_id)
            if item.is_read == is_read:
                return
            item.is_read = is_read
            item.version += 1
            self._add_counts(mb, item.folder, 0, -1 if is_read else 1)
            item.read_seq = mb.seq + 1
            stamp = self._now_iso()
            self._emit(mb, [(MODIFIED, "ModifiedEvent", self._item_event_body(mb, item, stamp), item.folder, False),
                            (MODIFIED, "ModifiedEvent", self._folder_event_body(mb, item.folder, stamp, True),
                             item.folder, True)])

        self._on_loop(run)

    def update_mail(self, mailbox: str, item_id: str, *, subject: str | None = None,
                    importance: str | None = None) -> None:
        """Change an item's content (SyncFolderItems reports an Update); fires an item ModifiedEvent."""

        def run() -> None:
            mb, item = self._find_item(mailbox, item_id)
            if subject is not None:
                item.subject = subject
            if importance is not None:
                item.importance = importance
            item.version += 1
            item.content_seq = mb.seq + 1
            self._emit(mb, [(MODIFIED, "ModifiedEvent", self._item_event_body(mb, item, self._now_iso()),
                             item.folder, False)])

        self._on_loop(run)

    def delete_mail(self, mailbox: str, item_id: str) -> None:
        """Delete an item for good; fires DeletedEvent and the folder's ModifiedEvent."""

        def run() -> None:
            mb, item = self._find_item(mailbox, item_id)
            self._add_counts(mb, item.folder, -1, 0 if item.is_read else -1)
            item.deleted_seq = mb.seq + 1
            stamp = self._now_iso()
            self._emit(mb, [(DELETED, "DeletedEvent", self._item_event_body(mb, item, stamp), item.folder, False),
                            (MODIFIED, "ModifiedEvent", self._folder_event_body(mb, item.folder, stamp, True),
                             item.folder, True)])

        self._on_loop(run)

    def create_folder(self, mailbox: str, name: str, parent: str = "inbox") -> str:
        """A mail folder under `parent` (a distinguished name or FolderId); fires CreatedEvent for it and the parent's
        ModifiedEvent. Returns its FolderId."""

        def run() -> str:
            mb = self._need_mailbox(mailbox)
            parent_key = self._resolve_folder_name(mb, parent)
            if mb.folders is None:
                mb.folders = {}
            key = FIRST_CUSTOM_FOLDER + len(mb.folders)
            mb.folders[key] = _Folder(key, name, parent_key)
            stamp = self._now_iso()
            self._emit(mb, [(CREATED, "CreatedEvent", self._folder_event_body(mb, key, stamp, False), key, True),
                            (MODIFIED, "ModifiedEvent", self._folder_event_body(mb, parent_key, stamp, True),
                             parent_key, True)])
            return self._folder_id(mb, key)

        return self._on_loop(run)

    def mailbox_count(self) -> int:
        """How many mailboxes have state (a mail, a folder or a subscription)."""
        return len(self._by_no)

    # --- the Python API: faults and streams ---------------------------------------------------------------------------

    def fail_next(self, operation: str, code: str, *, times: int = 1, back_off_ms: int | None = None,
                  http_status: int | None = None, mailbox: str | None = None) -> None:
        """Answer the next `times` requests of `operation` with `code` (see the module docstring for the shapes)."""
        rule = _Fault(operation, code, times, back_off_ms, http_status, mailbox.lower() if mailbox else None)
        self._on_loop(lambda: self._faults.append(rule))

    def expire_subscriptions(self, subscription_ids: Iterable[str] | None = None) -> int:
        """End these subscriptions (None: every one). Streams carrying them get ErrorSubscriptionNotFound listing them
        in ErrorSubscriptionIds and keep their other ids. Returns how many were ended."""
        wanted = None if subscription_ids is None else list(subscription_ids)

        def run() -> int:
            if wanted is None:
                subs = list(self._subs.values())
            else:
                subs = [s for s in (self._subs.get(self._parse_sub_id(i) or -1) for i in wanted) if s is not None]
            by_stream: dict[_Stream, list[str]] = {}
            for sub in subs:
                if sub.stream is not None:
                    by_stream.setdefault(sub.stream, []).append(self._sub_id(sub))
                self._end(sub, "expired")
            for stream, ids in by_stream.items():
                stream.errors.append(("ErrorSubscriptionNotFound", ids))
                self._wake(stream)
            return len(subs)

        return self._on_loop(run)

    def drop_streams(self) -> int:
        """Abort every open GetStreamingEvents TCP connection at once (no Closed). Returns how many."""

        def run() -> int:
            streams = list(self._streams)
            for stream in streams:
                stream.aborted = True
                if stream.transport is not None:
                    stream.transport.abort()
                self._wake(stream)
            return len(streams)

        return self._on_loop(run)

    def close_streams(self) -> int:
        """End every open stream cleanly with ConnectionStatus Closed (even while silenced). Returns how many."""

        def run() -> int:
            streams = [s for s in self._streams if not s.aborted]
            for stream in streams:
                stream.closing = True
                self._wake(stream)
            return len(streams)

        return self._on_loop(run)

    def silence_streams(self, seconds: float) -> None:
        """Send nothing at all (no heartbeats, events or Closed) on any stream for `seconds` real seconds."""

        def run() -> None:
            self._silence_until = time.monotonic() + seconds
            for stream in self._streams:
                self._wake(stream)

        self._on_loop(run)

    def skip_push_notifications(self, subscription_id: str, n: int = 1) -> None:
        """The next `n` push notifications carrying events of this subscription are not sent; its watermark still
        advances, so the next delivered notification's PreviousWatermark differs from the last one the client saw."""

        def run() -> None:
            sub = self._subs.get(self._parse_sub_id(subscription_id) or -1)
            if sub is None or sub.push is None:
                raise KeyError(f"no push subscription {subscription_id!r}")
            sub.push.skip += n

        self._on_loop(run)

    def reset(self) -> None:
        """Forget faults, statistics, recorded requests and silence (not mailboxes or subscriptions)."""

        def run() -> None:
            self._faults = []
            self._silence_until = 0.0
            self.stats = MockEwsStats(open_streams=len(self._streams))

        self._on_loop(run)

    def requests(self, limit: int | None = None) -> list[RequestRecord]:
        """The last recorded requests, oldest first."""
        recent = list(self.stats.recent_requests)
        return recent[-limit:] if limit else recent

    def _info(self, sub: _Subscription) -> SubscriptionInfo:
        mb = sub.mailbox
        folders = None
        if sub.folders is not None:
            folders = tuple(sorted(_WELLKNOWN[k][1] if k < len(_WELLKNOWN) else self._folder_id(mb, k)
                                   for k in sub.folders))
        return SubscriptionInfo(
            id=self._sub_id(sub), mailbox=mb.address, kind=sub.kind, folders=folders,
            event_types=tuple(name for name in EVENT_TYPES if sub.mask & _BIT[name]),
            backend=self.backend_name(sub.backend),
            alive=sub.alive and self._expiry(sub, time.monotonic()) is None,
            on_stream=sub.stream is not None, pending_events=len(sub.pending or ()),
            url=sub.push.url if sub.push else None,
            status_frequency=sub.push.status_frequency if sub.push else None)

    def subscription(self, subscription_id: str) -> SubscriptionInfo:
        """The record of a live or recently ended subscription; KeyError if unknown."""
        no = self._parse_sub_id(subscription_id)
        sub = None if no is None else (self._subs.get(no) or self._dead.get(no))
        if sub is None:
            raise KeyError(subscription_id)
        return self._info(sub)

    def subscriptions_of(self, mailbox: str) -> list[SubscriptionInfo]:
        """The live subscriptions of a mailbox, oldest first."""
        mb = self._mailboxes.get(mailbox.strip().lower())
        if mb is None or not mb.subs:
            return []
        now = time.monotonic()
        return [self._info(s) for s in list(mb.subs) if s.alive and self._expiry(s, now) is None]

    # --- HTTP: authentication -----------------------------------------------------------------------------------------

    def _unauthorized(self, challenge: str) -> web.Response:
        self.stats.unauthorized += 1
        return web.Response(status=401, text="401 - Unauthorized: Access is denied due to invalid credentials.",
                            headers={"WWW-Authenticate": challenge})

    def _authenticate(self, request: web.Request) -> str | web.Response:
        """The authenticated user name, or the 401 to answer."""
        if self.auth == "none":
            return ""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if self.auth == "basic":
            if scheme.lower() == "basic":
                raw = _unb64(token)
                if raw is not None:
                    user, _, password = raw.decode("utf-8", "replace").partition(":")
                    expected = self.users.get(user.lower())
                    if expected is not None and hmac.compare_digest(expected.encode(), password.encode()):
                        return user
            return self._unauthorized('Basic realm="mock.local"')
        return self._authenticate_ntlm(request, scheme, token.strip())

    def _authenticate_ntlm(self, request: web.Request, scheme: str, token: str) -> str | web.Response:
        # NTLM authenticates the TCP connection, not the request (as IIS does): state lives per transport.
        transport = request.transport
        state = self._ntlm_conns.get(transport) if transport is not None else None
        raw = _unb64(token) if scheme.lower() in ("ntlm", "negotiate") else None
        if raw is not None and len(raw) >= 12 and raw[:8] == b"NTLMSSP\x00" and transport is not None:
            message_type = int.from_bytes(raw[8:12], "little")
            assert self._ntlm_file is not None
            if message_type == 1:
                state = _NtlmState()
                state.scheme = "Negotiate" if scheme.lower() == "negotiate" else "NTLM"
                try:
                    with _ntlm_user_file(self._ntlm_file):
                        state.ctx = spnego.server(protocol="ntlm")
                        challenge = state.ctx.step(raw)
                except spnego.exceptions.SpnegoError:
                    return self._unauthorized("NTLM")
                self._ntlm_conns[transport] = state
                challenge_header = f"{state.scheme} {_b64(challenge or b'')}"
                return web.Response(status=401, headers={"WWW-Authenticate": challenge_header})
            if message_type == 3 and state is not None and state.ctx is not None:
                ctx, state.ctx = state.ctx, None
                try:
                    with _ntlm_user_file(self._ntlm_file):
                        ctx.step(raw)
                except spnego.exceptions.SpnegoError:
                    return self._unauthorized("NTLM")
                if ctx.complete:
                    state.user = ctx.client_principal or ""
                    return state.user
            return self._unauthorized("NTLM")
        if state is not None and state.user is not None:
            return state.user
        return self._unauthorized("NTLM")

    # --- HTTP: the EWS endpoint ---------------------------------------------------------------------------------------

    def _parse(self, body: bytes) -> _El:
        # A DOCTYPE is how XXE and entity-expansion attacks start; EWS has no use for one.
        if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
            raise _SoapFault("ErrorSchemaValidation", "DTD is prohibited in this XML document.")
        try:
            root = etree.fromstring(body, self._parser)
        except etree.XMLSyntaxError as exc:
            raise _SoapFault("ErrorSchemaValidation", f"The request is not well-formed XML: {exc}") from None
        if root.getroottree().docinfo.doctype:
            raise _SoapFault("ErrorSchemaValidation", "DTD is prohibited in this XML document.")
        return root

    def _parse_ews(self, request: web.Request, body: bytes, user: str) -> _Ctx:
        """The request's operation element and SOAP header facts. Only the operation element is kept (in the
        context): a stream lives for up to 30 minutes and must not hold more of its request than it needs."""
        root = self._parse(body)
        soap_body = root.find(_S + "Body")
        if root.tag != _S + "Envelope" or soap_body is None or len(soap_body) == 0:
            raise _SoapFault("ErrorSchemaValidation", "The request is not a SOAP 1.1 envelope.")
        op = soap_body[0]
        if not isinstance(op.tag, str) or not op.tag.startswith(_M):
            raise _SoapFault("ErrorSchemaValidation", f"Unexpected body element {op.tag!r}.")
        ctx = _Ctx(request, op.tag[len(_M):], op, user or None)
        sid = root.find(f"{_S}Header/{_T}ExchangeImpersonation/{_T}ConnectingSID")
        if sid is not None:
            for tag in ("PrimarySmtpAddress", "SmtpAddress", "PrincipalName"):
                value = _text(sid, _T + tag)
                if value:
                    ctx.impersonated = value.lower()
                    break
        return ctx

    async def _ews(self, request: web.Request) -> web.StreamResponse:
        user = self._authenticate(request)
        if isinstance(user, web.Response):
            await request.read()  # NTLM: the connection stays open for the next leg, so consume this body
            return user
        if self.ews_disabled:
            await request.read()
            self.stats.forbidden += 1
            return web.Response(status=403, text="403 - Forbidden: Access is denied.")
        try:
            ctx = self._parse_ews(request, await request.read(), user)
        except _SoapFault as fault:
            return _xml_response(_fault_body(fault.code, fault.text, fault.back_off_ms), 500)
        op_name = ctx.op_name
        record = RequestRecord(
            at=time.time(), operation=op_name, mailbox=self._mailbox_hint(ctx), impersonated=ctx.impersonated,
            anchor_mailbox=request.headers.get("X-AnchorMailbox"),
            prefer_server_affinity=request.headers.get("X-PreferServerAffinity"),
            backend_override_cookie=request.headers.get(COOKIE_NAME), cookie=request.headers.get("Cookie"),
            user=user or None)
        ctx.record = record
        stats = self.stats
        stats.requests[op_name] += 1
        stats.recent_requests.append(record)
        response = self._injected_fault(ctx, record.mailbox)
        if response is None:
            try:
                if ctx.impersonated is not None and self._mailbox(ctx.impersonated) is None:
                    raise _SoapFault("ErrorNonExistentMailbox",
                                     f"The impersonation principal name {ctx.impersonated} is invalid.")
                if op_name == "GetStreamingEvents":
                    streamed = await self._get_streaming_events(ctx)
                    record.status = streamed.status
                    return streamed
                handler = self._handlers.get(op_name)
                messages = _error(op_name, "ErrorInvalidOperation") if handler is None else handler(self, ctx)
                headers = None
                if ctx.set_cookie is not None:
                    headers = {"Set-Cookie": f"{COOKIE_NAME}={ctx.set_cookie}; path=/; HttpOnly"}
                response = _xml_response(_envelope(op_name, messages), headers=headers)
            except _SoapFault as fault:
                response = _xml_response(_fault_body(fault.code, fault.text, fault.back_off_ms), 500)
            except _EwsError as error:
                response = _xml_response(_envelope(op_name, _error(op_name, error.code, error.text)))
        record.status = response.status
        return response

    def _mailbox_hint(self, ctx: _Ctx) -> str | None:
        """The mailbox a request is for, as far as can be told without executing it (for records and faults)."""
        if ctx.impersonated:
            return ctx.impersonated
        named = ctx.op.find(f".//{_T}Mailbox/{_T}EmailAddress")
        if named is not None and named.text:
            text: str = named.text.strip().lower()
            return text
        return ctx.anchor

    def _injected_fault(self, ctx: _Ctx, mailbox: str | None) -> web.Response | None:
        for i, rule in enumerate(self._faults):
            if rule.operation != ctx.op_name or (rule.mailbox is not None and rule.mailbox != mailbox):
                continue
            if rule.times > 0:
                rule.times -= 1
                if rule.times == 0:
                    del self._faults[i]
            self.stats.faults_injected[ctx.op_name] += 1
            if rule.http_status is not None:
                return web.Response(status=rule.http_status, text=f"{rule.http_status} injected by the mock")
            text = _MESSAGE_TEXT.get(rule.code, rule.code)
            if rule.back_off_ms is not None:
                return _xml_response(_fault_body(rule.code, text, rule.back_off_ms), 500)
            return _xml_response(_envelope(ctx.op_name, _error(ctx.op_name, rule.code, text)))
        return None

    # --- routing ------------------------------------------------------------------------------------------------------

    def _route(self, ctx: _Ctx, fallback: _Mailbox | None = None) -> int:
        """The backend a subscription request lands on (see the module docstring)."""
        if ctx.prefer:
            backend = self._cookie_backend(ctx.cookie)
            if backend is not None:
                return backend
        for address in (ctx.anchor, ctx.impersonated):
            if address:
                return self.backend_of(address)
        if fallback is not None:
            return fallback.backend
        if ctx.user and "@" in ctx.user:
            return self.backend_of(ctx.user)
        return 0

    def _acting(self, ctx: _Ctx) -> _Mailbox:
        for address in (ctx.impersonated, ctx.anchor, ctx.user):
            mb = self._mailbox(address)
            if mb is not None:
                return mb
        raise _EwsError("ErrorNonExistentMailbox", "The request names no mailbox (no impersonation, no anchor).")

    def _folder_of(self, ctx: _Ctx, el: _El) -> tuple[_Mailbox, int]:
        """(mailbox, folder key) of a DistinguishedFolderId or FolderId element."""
        if el.tag == _T + "DistinguishedFolderId":
            address = _text(el, f"{_T}Mailbox/{_T}EmailAddress")
            if address:
                mb = self._mailbox(address)
                if mb is None:
                    raise _EwsError("ErrorNonExistentMailbox", f"No mailbox for {address}.")
            else:
                mb = self._acting(ctx)
            key = _DISTINGUISHED.get((el.get("Id") or "").lower())
            if key is None:
                raise _EwsError("ErrorFolderNotFound")
            return mb, key
        if el.tag == _T + "FolderId":
            parsed = self._parse_obj_id(0x46, el.get("Id"))
            if parsed is None:
                raise _EwsError("ErrorInvalidIdMalformed")
            if self._folder_row(parsed[0], parsed[1]) is None:
                raise _EwsError("ErrorFolderNotFound")
            return parsed
        raise _schema_fault(f"unexpected folder id element {el.tag!r}")

    def _lookup(self, sid: str | None) -> _Subscription | None:
        no = self._parse_sub_id(sid)
        if no is None:
            return None
        sub = self._subs.get(no)
        if sub is None or not self._alive(sub, time.monotonic()):
            return None
        return sub

    def _routed_sub(self, ctx: _Ctx, sid: str | None, backend: int) -> _Subscription | None:
        sub = self._lookup(sid)
        if sub is not None and sub.backend != backend:
            self.stats.affinity_misroutes += 1
            return None
        return sub

    # --- Subscribe, GetEvents, Unsubscribe ----------------------------------------------------------------------------

    def _op_subscribe(self, ctx: _Ctx) -> str:
        request = None
        kind: Kind = STREAMING
        for child in ctx.op:
            if child.tag == _M + "StreamingSubscriptionRequest":
                request, kind = child, STREAMING
            elif child.tag == _M + "PullSubscriptionRequest":
                request, kind = child, PULL
            elif child.tag == _M + "PushSubscriptionRequest":
                request, kind = child, PUSH
        if request is None:
            raise _schema_fault("Subscribe needs a Pull-, Push- or StreamingSubscriptionRequest")
        mailboxes: set[_Mailbox] = set()
        keys: set[int] = set()
        folder_ids = request.find(_T + "FolderIds")
        all_folders = _is_true(request.get("SubscribeToAllFolders"))
        if folder_ids is not None:
            for el in folder_ids:
                mb, key = self._folder_of(ctx, el)
                mailboxes.add(mb)
                keys.add(key)
        if len(mailboxes) > 1:
            raise _EwsError("ErrorInvalidSubscriptionRequest")
        mb = mailboxes.pop() if mailboxes else self._acting(ctx)
        if not keys and not all_folders:
            raise _schema_fault("FolderIds or SubscribeToAllFolders is required")
        mask = 0
        for el in request.iterfind(f"{_T}EventTypes/{_T}EventType"):
            bit = _BIT.get((el.text or "").strip())
            if bit is None:
                raise _schema_fault(f"unknown EventType {el.text!r}")
            mask |= bit
        if not mask:
            raise _schema_fault("EventTypes needs at least one EventType")
        watermark = _text(request, _M + "Watermark") or _text(request, _T + "Watermark")
        since: int | None = None
        if watermark is not None:
            if kind == STREAMING:
                raise _schema_fault("a StreamingSubscriptionRequest has no Watermark")
            since = self._parse_watermark(mb, watermark)
            if since is None:
                raise _EwsError("ErrorInvalidWatermark")
        now = time.monotonic()
        timeout = 0.0
        push: _Push | None = None
        if kind == PULL:
            minutes = self._int_in(_text(request, _T + "Timeout"), 1, 1440, "Timeout")
            timeout = minutes * self.minute_seconds
        elif kind == PUSH:
            frequency = self._int_in(_text(request, _T + "StatusFrequency"), 1, 1440, "StatusFrequency")
            url = _text(request, _T + "URL") or ""
            parts = urlsplit(url)
            if not 0 < len(url) < 2083 or parts.scheme not in ("http", "https") or not _is_loopback(parts.hostname):
                raise _EwsError("ErrorInvalidPushSubscriptionUrl",
                                "The push URL must be http(s) on a loopback host: the mock never calls out.")
            push = _Push(url, frequency)
        backend = self._route(ctx, mb)
        if ctx.prefer and self._cookie_backend(ctx.cookie) is None:
            ctx.set_cookie = self.cookie_for(backend)
        if ctx.record is not None:
            ctx.record.backend = self.backend_name(backend)
        folders = None if all_folders else self._folder_sets.setdefault(frozenset(keys), frozenset(keys))
        sub = _Subscription(next(self._sub_seq), mb, kind, folders, mask, backend, now)
        sub.timeout = timeout
        sub.push = push
        self._subs[sub.no] = sub
        if mb.subs is None:
            mb.subs = []
        mb.subs.append(sub)
        self.stats.subscriptions_created[kind] += 1
        inner = f"<m:SubscriptionId>{self._sub_id(sub)}</m:SubscriptionId>"
        if kind != STREAMING:
            if since is not None:
                sub.last_wm = since
                self._replay(sub, since)
            inner += f"<m:Watermark>{self._watermark(mb, sub.last_wm)}</m:Watermark>"
        if push is not None:
            self._schedule_push(sub, 0.0)  # the initial StatusEvent
        return _ok("Subscribe", inner)

    @staticmethod
    def _int_in(text: str | None, low: int, high: int, name: str) -> int:
        try:
            value = int(text or "")
        except ValueError:
            raise _schema_fault(f"{name} must be an integer from {low} to {high}") from None
        if not low <= value <= high:
            raise _schema_fault(f"{name} must be an integer from {low} to {high}")
        return value

    def _replay(self, sub: _Subscription, since: int) -> None:
        """Queue item events rebuilt from the mailbox's state for everything changed after `since`."""
        mb = sub.mailbox
        stamp = self._now_iso()
        events: list[_Event] = []
        for item in mb.items or ():
            if sub.folders is not None and item.folder not in sub.folders:
                continue
            body = self._item_event_body(mb, item, stamp)
            if item.deleted_seq:
                if item.deleted_seq > since >= item.created_seq and sub.mask & DELETED:
                    events.append((item.deleted_seq, "DeletedEvent", body))
                continue
            if item.created_seq > since:
                if sub.mask & CREATED:
                    events.append((item.created_seq, "CreatedEvent", body))
                if sub.mask & NEW_MAIL:
                    events.append((item.created_seq + 1, "NewMailEvent", body))
            elif max(item.content_seq, item.read_seq) > since and sub.mask & MODIFIED:
                events.append((max(item.content_seq, item.read_seq), "ModifiedEvent", body))
        for event in sorted(events):
            self._enqueue(sub, event)

    def _op_get_events(self, ctx: _Ctx) -> str:
        op = "GetEvents"
        sid = _text(ctx.op, _M + "SubscriptionId")
        backend = self._route(ctx)
        if ctx.record is not None:
            ctx.record.backend = self.backend_name(backend)
        sub = self._routed_sub(ctx, sid, backend)
        if sub is None:
            raise _EwsError("ErrorSubscriptionNotFound")
        if sub.kind != PULL:
            raise _EwsError("ErrorInvalidPullSubscriptionId")
        mb = sub.mailbox
        given = self._parse_watermark(mb, _text(ctx.op, _M + "Watermark"))
        if given is None:
            raise _EwsError("ErrorInvalidWatermark")
        sub.last_poll = time.monotonic()
        if sub.missed:
            sub.missed = False
            raise _EwsError("ErrorMissedNotificationEvents")
        start = sub.cursor if (given == sub.prev_wm and sub.more) else given
        queue = sub.pending
        while queue and queue[0][0] <= start:
            queue.popleft()
        batch = list(itertools.islice(queue, MAX_EVENTS_PER_NOTIFICATION)) if queue else []
        more = queue is not None and len(queue) > len(batch)
        sub.prev_wm, sub.more = given, more
        parts = [f"<m:Notification><t:SubscriptionId>{sid}</t:SubscriptionId><t:PreviousWatermark>"
                 f"{self._watermark(mb, start)}</t:PreviousWatermark><t:MoreEvents>{'true' if more else 'false'}"
                 "</t:MoreEvents>"]
        if batch:
            sub.cursor = batch[-1][0]
            parts.extend(self._events_with_watermarks(mb, batch))
        else:
            sub.cursor = max(start, mb.seq)
            parts.append(f"<t:StatusEvent><t:Watermark>{self._watermark(mb, sub.cursor)}</t:Watermark></t:StatusEvent>")
        parts.append("</m:Notification>")
        return _ok(op, "".join(parts))

    def _events_with_watermarks(self, mb: _Mailbox, events: Iterable[_Event]) -> Iterator[str]:
        for seq, tag, body in events:
            yield f"<t:{tag}><t:Watermark>{self._watermark(mb, seq)}</t:Watermark>{body}</t:{tag}>"

    def _op_unsubscribe(self, ctx: _Ctx) -> str:
        backend = self._route(ctx)
        if ctx.record is not None:
            ctx.record.backend = self.backend_name(backend)
        sub = self._routed_sub(ctx, _text(ctx.op, _M + "SubscriptionId"), backend)
        if sub is None:
            raise _EwsError("ErrorSubscriptionNotFound")
        if sub.kind == PUSH:
            raise _EwsError("ErrorInvalidPullSubscriptionId")
        stream = sub.stream
        self._end(sub, "unsubscribed")
        if stream is not None and not stream.subs:
            stream.closing = True
            self._wake(stream)
        return _ok("Unsubscribe")

    # --- GetStreamingEvents -------------------------------------------------------------------------------------------

    async def _get_streaming_events(self, ctx: _Ctx) -> web.StreamResponse:
        op = ctx.op
        ids = [el.text.strip() for el in op.iterfind(f"{_M}SubscriptionIds/{_T}SubscriptionId") if el.text]
        minutes = self._int_in(_text(op, _M + "ConnectionTimeout"), 1, 30, "ConnectionTimeout")
        ctx.op = op = None  # the parsed request is not needed for the life of the stream
        if not ids or len(ids) > MAX_IDS_PER_STREAM:
            return _xml_response(_envelope("GetStreamingEvents", _error(
                "GetStreamingEvents", "ErrorInvalidArgument",
                f"GetStreamingEvents takes 1 to {MAX_IDS_PER_STREAM} subscription ids, not {len(ids)}.")))
        key = ctx.impersonated or ctx.user or ""
        if self._open_by[key] >= self.max_stream_connections_per_mailbox:
            return _xml_response(_envelope("GetStreamingEvents", _error("GetStreamingEvents",
                                                                        "ErrorExceededConnectionCount")))
        backend = self._route(ctx)
        if ctx.record is not None:
            ctx.record.backend = self.backend_name(backend)
        good: dict[int, _Subscription] = {}
        bad: dict[str, list[str]] = {}
        for sid in ids:
            sub = self._routed_sub(ctx, sid, backend)
            if sub is None:
                bad.setdefault("ErrorSubscriptionNotFound", []).append(sid)
            elif sub.kind != STREAMING:
                bad.setdefault("ErrorInvalidSubscription", []).append(sid)
            else:
                good[sub.no] = sub
        if not good:
            return _xml_response(_envelope("GetStreamingEvents", "".join(
                _stream_error(code, bad_ids, "Closed") for code, bad_ids in bad.items())))

        loop = asyncio.get_running_loop()
        resp = web.StreamResponse(status=200, headers={"Content-Type": _XML_CONTENT_TYPE})
        resp.enable_chunked_encoding()
        await resp.prepare(ctx.request)
        now = loop.time()
        transport = ctx.request.transport
        stream = _Stream(next(self._stream_seq), key, resp, transport if isinstance(transport, asyncio.Transport)
                         else None, now + minutes * self.minute_seconds, now)
        self._streams.add(stream)
        self._open_by[key] += 1
        stats = self.stats
        stats.open_streams = len(self._streams)
        stats.streams_opened += 1
        stats.stream_connections_by_impersonated[key] += 1
        stream.errors.extend(bad.items())
        for sub in good.values():
            self._attach(sub, stream)
        try:
            await self._stream_loop(stream, loop)
        except (ConnectionError, RuntimeError):
            stream.aborted = True  # the client went away, or drop_streams() cut the connection
        finally:
            self._detach_all(stream)
        if not stream.aborted:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await resp.write_eof()
        return resp

    def _attach(self, sub: _Subscription, stream: _Stream) -> None:
        old = sub.stream
        concurrent = 1
        if old is not None and old is not stream:
            concurrent = 2
            old.subs.pop(sub.no, None)
            old.dirty.pop(sub, None)
            old.errors.append(("ErrorNewEventStreamConnectionOpened", [self._sub_id(sub)]))
            self._wake(old)
            self.stats.second_stream_opened += 1
        self.stats.streams_per_subscription_max = max(self.stats.streams_per_subscription_max, concurrent)
        sub.stream = stream
        stream.subs[sub.no] = sub
        if sub.pending or sub.missed:
            stream.dirty[sub] = None

    def _detach_all(self, stream: _Stream) -> None:
        now = time.monotonic()
        for sub in stream.subs.values():
            if sub.stream is stream:
                sub.stream = None
                sub.detached_at = now
        stream.subs.clear()
        stream.dirty.clear()
        self._streams.discard(stream)
        self._open_by[stream.key] -= 1
        if self._open_by[stream.key] <= 0:
            del self._open_by[stream.key]
        self.stats.open_streams = len(self._streams)

    async def _stream_loop(self, stream: _Stream, loop: asyncio.AbstractEventLoop) -> None:
        while not stream.aborted:
            now = loop.time()
            silence = self._silence_until - time.monotonic()
            if silence > 0 and not stream.closing:
                await self._stream_wait(stream, loop, silence)
                continue
            if stream.errors:
                final = not stream.subs
                await self._stream_write(stream, loop, self._render_stream_errors(stream, final))
                if final:
                    return
                continue
            if stream.closing or now >= stream.deadline:
                await self._stream_write(stream, loop, _CLOSED)
                return
            if stream.dirty:
                await self._stream_write(stream, loop, self._render_notifications(stream))
                continue
            if now - stream.last_write >= self.heartbeat_seconds:
                await self._stream_write(stream, loop, _HEARTBEAT)
                continue
            await self._stream_wait(stream, loop,
                                    min(stream.deadline, stream.last_write + self.heartbeat_seconds) - now)

    @staticmethod
    async def _stream_wait(stream: _Stream, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        # A bare future and timer instead of Event + wait_for: cheaper at thousands of wake-ups a second.
        waiter: asyncio.Future[None] = loop.create_future()
        stream.waiter = waiter
        timer = loop.call_later(max(0.0, delay), _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            stream.waiter = None

    @staticmethod
    async def _stream_write(stream: _Stream, loop: asyncio.AbstractEventLoop, data: bytes) -> None:
        await stream.resp.write(data)
        stream.last_write = loop.time()

    def _render_stream_errors(self, stream: _Stream, final: bool) -> bytes:
        errors, stream.errors = stream.errors, []
        messages = [_stream_error(code, ids, "Closed" if final and i == len(errors) - 1 else "OK")
                    for i, (code, ids) in enumerate(errors)]
        return f"{_GSE_HEAD}{''.join(messages)}{_GSE_TAIL}".encode()

    def _render_notifications(self, stream: _Stream) -> bytes:
        """One envelope: a notification per subscription with events (at most 50 each, the rest stays dirty), then
        an ErrorMissedNotificationEvents message for subscriptions that dropped events."""
        notes: list[str] = []
        missed: list[str] = []
        still: dict[_Subscription, None] = {}
        for sub in stream.dirty:
            sid = self._sub_id(sub)
            if sub.missed:
                sub.missed = False
                missed.append(sid)
            queue = sub.pending
            if not queue:
                continue
            notes.append(f"<m:Notification><t:SubscriptionId>{sid}</t:SubscriptionId>")
            for _ in range(min(MAX_EVENTS_PER_NOTIFICATION, len(queue))):
                _, tag, body = queue.popleft()
                notes.append(f"<t:{tag}>{body}</t:{tag}>")
            notes.append("</m:Notification>")
            self.stats.notifications_streamed += 1
            if queue:
                still[sub] = None
        stream.dirty = still
        messages = []
        if notes:
            messages.append(f"{_GSE_OK}<m:Notifications>{''.join(notes)}</m:Notifications>"
                            "<m:ConnectionStatus>OK</m:ConnectionStatus></m:GetStreamingEventsResponseMessage>")
        if missed:
            messages.append(_stream_error("ErrorMissedNotificationEvents", missed, "OK"))
        if not messages:
            return _HEARTBEAT
        return f"{_GSE_HEAD}{''.join(messages)}{_GSE_TAIL}".encode()

    # --- items and folders --------------------------------------------------------------------------------------------

    @staticmethod
    def _shape(shape: _El) -> frozenset[str]:
        """The item properties an ItemShape asks for (only those this mock knows)."""
        if shape is None:
            return _DEFAULT_ITEM_FIELDS
        base = _text(shape, _T + "BaseShape") or "IdOnly"
        fields: set[str] = set()
        if base == "AllProperties":
            return _ALL_ITEM_FIELDS
        if base == "Default":
            fields.update(_DEFAULT_ITEM_FIELDS)
        for el in shape.iterfind(f"{_T}AdditionalProperties/{_T}FieldURI"):
            uri = el.get("FieldURI")
            if uri in _ALL_ITEM_FIELDS:
                fields.add(uri)
        return frozenset(fields)

    def _render_item(self, mb: _Mailbox, item: _Item, fields: frozenset[str]) -> str:
        tag = _ITEM_TAGS.get(item.item_class)
        if tag is None:
            tag = "MeetingMessage" if item.item_class.startswith("IPM.Schedule.Meeting.") else "Message"
        received = _iso(item.received)
        parts = [f'<t:{tag}><t:ItemId Id="{self._item_id(mb, item)}" '
                 f'ChangeKey="{self._change_key(0x09, item.version)}"/>']
        if "item:ParentFolderId" in fields:
            parts.append(f"<t:ParentFolderId {self._folder_ref(mb, item.folder)}/>")
        if "item:ItemClass" in fields:
            parts.append(f"<t:ItemClass>{_esc(item.item_class)}</t:ItemClass>")
        if "item:Subject" in fields:
            parts.append(f"<t:Subject>{_esc(item.subject)}</t:Subject>")
        if "item:DateTimeReceived" in fields:
            parts.append(f"<t:DateTimeReceived>{received}</t:DateTimeReceived>")
        if "item:Size" in fields:
            parts.append(f"<t:Size>{1024 + len(item.subject.encode())}</t:Size>")
        if "item:Importance" in fields:
            parts.append(f"<t:Importance>{_esc(item.importance)}</t:Importance>")
        if "item:DateTimeSent" in fields:
            parts.append(f"<t:DateTimeSent>{received}</t:DateTimeSent>")
        if "item:DateTimeCreated" in fields:
            parts.append(f"<t:DateTimeCreated>{received}</t:DateTimeCreated>")
        if "item:HasAttachments" in fields:
            parts.append("<t:HasAttachments>false</t:HasAttachments>")
        if "message:Sender" in fields:
            parts.append(_mailbox_xml("Sender", item.sender))
        if "message:From" in fields:
            parts.append(_mailbox_xml("From", item.sender))
        if "message:IsRead" in fields:
            parts.append(f"<t:IsRead>{'true' if item.is_read else 'false'}</t:IsRead>")
        parts.append(f"</t:{tag}>")
        return "".join(parts)

    def _item_of(self, item_id: str | None) -> tuple[_Mailbox, _Item] | None:
        parsed = self._parse_obj_id(0x49, item_id)
        if parsed is None:
            return None
        mb, no = parsed
        if not mb.items or not 0 < no <= len(mb.items):
            return None
        return mb, mb.items[no - 1]

    def _op_get_item(self, ctx: _Ctx) -> str:
        fields = self._shape(ctx.op.find(_M + "ItemShape"))
        messages = []
        ids = ctx.op.find(_M + "ItemIds")
        for el in ids if ids is not None else ():
            if el.tag != _T + "ItemId":
                messages.append(_error("GetItem", "ErrorInvalidIdMalformed"))
                continue
            found = self._item_of(el.get("Id"))
            if found is None:
                code = "ErrorItemNotFound" if _unb64(el.get("Id")) else "ErrorInvalidIdMalformed"
                messages.append(_error("GetItem", code))
                continue
            mb, item = found
            if item.deleted_seq:
                messages.append(_error("GetItem", "ErrorItemNotFound"))
                continue
            messages.append(_ok("GetItem", f"<m:Items>{self._render_item(mb, item, fields)}</m:Items>"))
        return "".join(messages)

    def _render_folder(self, mb: _Mailbox, key: int, full: bool) -> str:
        row = self._folder_row(mb, key)
        assert row is not None
        name, folder_class, parent, tag, distinguished = row
        parts = [f"<t:{tag}><t:FolderId {self._folder_ref(mb, key)}/>"]
        if full:
            if parent is not None:
                parts.append(f"<t:ParentFolderId {self._folder_ref(mb, parent)}/>")
            if folder_class:
                parts.append(f"<t:FolderClass>{folder_class}</t:FolderClass>")
            total, unread = self._counts(mb, key)
            parts.append(f"<t:DisplayName>{_esc(name)}</t:DisplayName><t:TotalCount>{total}</t:TotalCount>"
                         f"<t:ChildFolderCount>{len(self._children(mb, key))}</t:ChildFolderCount>")
            if distinguished:
                parts.append(f"<t:DistinguishedFolderId>{distinguished}</t:DistinguishedFolderId>")
            if tag == "Folder":
                parts.append(f"<t:UnreadCount>{unread}</t:UnreadCount>")
        parts.append(f"</t:{tag}>")
        return "".join(parts)

    @staticmethod
    def _folder_shape_full(shape: _El) -> bool:
        if shape is None:
            return True
        base = _text(shape, _T + "BaseShape") or "IdOnly"
        return base != "IdOnly" or shape.find(_T + "AdditionalProperties") is not None

    def _op_get_folder(self, ctx: _Ctx) -> str:
        full = self._folder_shape_full(ctx.op.find(_M + "FolderShape"))
        messages = []
        ids = ctx.op.find(_M + "FolderIds")
        for el in ids if ids is not None else ():
            try:
                mb, key = self._folder_of(ctx, el)
            except _EwsError as error:
                messages.append(_error("GetFolder", error.code, error.text))
                continue
            messages.append(_ok("GetFolder", f"<m:Folders>{self._render_folder(mb, key, full)}</m:Folders>"))
        return "".join(messages)

    def _op_find_folder(self, ctx: _Ctx) -> str:
        op = ctx.op
        deep = (op.get("Traversal") or "Shallow") == "Deep"
        full = self._folder_shape_full(op.find(_M + "FolderShape"))
        view = op.find(_M + "IndexedPageFolderView")
        offset, limit = 0, 1000
        if view is not None:
            offset = int(view.get("Offset") or 0)
            limit = int(view.get("MaxEntriesReturned") or 1000)
        name_filter = self._display_name_filter(op.find(_M + "Restriction"))
        messages = []
        parents = op.find(_M + "ParentFolderIds")
        for el in parents if parents is not None else ():
            try:
                mb, key = self._folder_of(ctx, el)
            except _EwsError as error:
                messages.append(_error("FindFolder", error.code, error.text))
                continue
            found: list[int] = []
            todo = self._children(mb, key)
            while todo:
                child = todo.pop(0)
                found.append(child)
                if deep:
                    todo[0:0] = self._children(mb, child)
            if name_filter is not None:
                found = [k for k in found if (self._folder_row(mb, k) or ("",))[0].lower() == name_filter]
            page = found[offset:offset + limit]
            last = offset + len(page) >= len(found)
            folders = "".join(self._render_folder(mb, k, full) for k in page)
            messages.append(_ok("FindFolder", f'<m:RootFolder IndexedPagingOffset="{offset + len(page)}" '
                                              f'TotalItemsInView="{len(found)}" IncludesLastItemInRange='
                                              f'"{"true" if last else "false"}"><t:Folders>{folders}</t:Folders>'
                                              "</m:RootFolder>"))
        return "".join(messages)

    @staticmethod
    def _display_name_filter(restriction: _El) -> str | None:
        """FindFolder restrictions: only DisplayName equality (what `folder // "name"` sends)."""
        if restriction is None:
            return None
        equal = restriction.find(_T + "IsEqualTo")
        if (len(restriction) != 1 or equal is None or equal.find(_T + "FieldURI") is None
                or equal.find(_T + "FieldURI").get("FieldURI") != "folder:DisplayName"):
            raise _EwsError("ErrorInvalidRestriction")
        constant = equal.find(f"{_T}FieldURIOrConstant/{_T}Constant")
        return (constant.get("Value") or "").lower() if constant is not None else ""

    def _op_sync_folder_items(self, ctx: _Ctx) -> str:
        op = ctx.op
        fields = self._shape(op.find(_M + "ItemShape"))
        holder = op.find(_M + "SyncFolderId")
        if holder is None or len(holder) != 1:
            raise _schema_fault("SyncFolderId needs one folder id")
        mb, key = self._folder_of(ctx, holder[0])
        since = 0
        state = _text(op, _M + "SyncState")
        if state:
            parsed = self._parse_sync_state(state)
            if parsed is None or parsed[0] != mb.no or parsed[1] != key or parsed[2] > mb.seq:
                raise _EwsError("ErrorInvalidSyncStateData")
            since = parsed[2]
        limit = self._int_in(_text(op, _M + "MaxChangesReturned"), 1, 512, "MaxChangesReturned")
        ignore = {el.get("Id") for el in op.iterfind(f"{_M}Ignore/{_T}ItemId")}
        changes: list[tuple[int, str, _Item]] = []
        for item in mb.items or ():
            if item.folder != key:
                continue
            if item.deleted_seq:
                if item.created_seq <= since < item.deleted_seq:
                    changes.append((item.deleted_seq, "Delete", item))
            elif item.created_seq > since:
                changes.append((max(item.content_seq, item.read_seq), "Create", item))
            elif item.content_seq > since:
                changes.append((max(item.content_seq, item.read_seq), "Update", item))
            elif item.read_seq > since:
                changes.append((item.read_seq, "ReadFlagChange", item))
        changes.sort(key=lambda change: change[0])
        page = changes[:limit]
        last = len(changes) <= limit
        parts = []
        for _, change, item in page:
            if ignore and self._item_id(mb, item) in ignore:
                continue
            if change == "Delete":
                parts.append(f'<t:Delete><t:ItemId Id="{self._item_id(mb, item)}" '
                             f'ChangeKey="{self._change_key(0x09, item.version)}"/></t:Delete>')
            elif change == "ReadFlagChange":
                parts.append(f'<t:ReadFlagChange><t:ItemId Id="{self._item_id(mb, item)}" '
                             f'ChangeKey="{self._change_key(0x09, item.version)}"/><t:IsRead>'
                             f"{'true' if item.is_read else 'false'}</t:IsRead></t:ReadFlagChange>")
            else:
                parts.append(f"<t:{change}>{self._render_item(mb, item, fields)}</t:{change}>")
        new_state = self._sync_state(mb, key, mb.seq if last else page[-1][0])
        return _ok("SyncFolderItems", f"<m:SyncState>{new_state}</m:SyncState><m:IncludesLastItemInRange>"
                                      f"{'true' if last else 'false'}</m:IncludesLastItemInRange>"
                                      f"<m:Changes>{''.join(parts)}</m:Changes>")

    def _op_convert_id(self, ctx: _Ctx) -> str:
        # exchangelib probes the server version with a ConvertId of a dummy id: answering it is all that is needed.
        ids = ctx.op.find(_M + "SourceIds")
        count = len(ids) if ids is not None else 1
        return "".join(_error("ConvertId", "ErrorInvalidIdMalformed") for _ in range(max(1, count)))

    def _op_resolve_names(self, ctx: _Ctx) -> str:
        return _error("ResolveNames", "ErrorNameResolutionNoResults")

    _handlers: Final[dict[str, Callable[[MockExchange, _Ctx], str]]] = {
        "Subscribe": _op_subscribe,
        "GetEvents": _op_get_events,
        "Unsubscribe": _op_unsubscribe,
        "SyncFolderItems": _op_sync_folder_items,
        "GetItem": _op_get_item,
        "GetFolder": _op_get_folder,
        "FindFolder": _op_find_folder,
        "ConvertId": _op_convert_id,
        "ResolveNames": _op_resolve_names,
    }

    # --- push ---------------------------------------------------------------------------------------------------------

    def _schedule_push(self, sub: _Subscription, delay: float) -> None:
        push = sub.push
        if push is None or not sub.alive or push.busy or self._push_wake is None:
            return
        due = time.monotonic() + delay
        if push.due and push.due <= due:
            return  # a run is already due sooner
        push.gen += 1  # older heap entries of this subscription become stale
        push.due = due
        heapq.heappush(self._push_heap, (due, next(self._push_tick), push.gen, sub))
        self._push_wake.set()

    async def _push_scheduler(self) -> None:
        """The one task that decides when each push subscription is called: a heap of (due time, subscription)."""
        assert self._push_wake is not None and self._push_sem is not None
        heap = self._push_heap
        while True:
            now = time.monotonic()
            while heap and heap[0][0] <= now:
                _, _, gen, sub = heapq.heappop(heap)
                push = sub.push
                if push is None or not sub.alive or gen != push.gen or push.busy:
                    continue
                push.busy = True
                push.due = 0.0
                await self._push_sem.acquire()
                self._spawn(self._deliver(sub, push))
            self._push_wake.clear()
            timeout = heap[0][0] - time.monotonic() if heap else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._push_wake.wait(), timeout)

    async def _deliver(self, sub: _Subscription, push: _Push) -> None:
        """One SendNotification POST (a short task; the subscription itself has none)."""
        assert self._push_sem is not None
        delay: float | None = None
        try:
            delay = await self._deliver_once(sub, push)
        finally:
            push.busy = False
            self._push_sem.release()
            if delay is not None:
                self._schedule_push(sub, delay)

    async def _deliver_once(self, sub: _Subscription, push: _Push) -> float | None:
        """Deliver what is due; returns the delay before the next run (None: the subscription ended)."""
        mb = sub.mailbox
        queue = sub.pending
        batch = list(itertools.islice(queue, MAX_EVENTS_PER_NOTIFICATION)) if queue else []
        more = queue is not None and len(queue) > len(batch)
        previous = sub.last_wm
        if sub.dropped_upto > previous and (not batch or sub.dropped_upto < batch[0][0]):
            previous = sub.dropped_upto  # events were dropped before this batch: PreviousWatermark shows the gap
        quiet = push.status_frequency * self.minute_seconds
        if batch and push.skip > 0:
            push.skip -= 1
            self.stats.push_skipped += 1
            self._pushed(sub, len(batch))
            return 0.0 if sub.pending else quiet
        events = ("".join(self._events_with_watermarks(mb, batch)) if batch else
                  f"<t:StatusEvent><t:Watermark>{self._watermark(mb, previous)}</t:Watermark></t:StatusEvent>")
        body = (f'{_XML_DECL}<soap:Envelope xmlns:soap="{SOAP_NS}"><soap:Header><t:RequestServerVersion '
                f'xmlns:t="{TYPES_NS}" Version="Exchange2016"/></soap:Header><soap:Body>'
                f'<m:SendNotification xmlns:m="{MESSAGES_NS}" xmlns:t="{TYPES_NS}"><m:ResponseMessages>'
                '<m:SendNotificationResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>'
                f"<m:Notification><t:SubscriptionId>{self._sub_id(sub)}</t:SubscriptionId><t:PreviousWatermark>"
                f"{self._watermark(mb, previous)}</t:PreviousWatermark><t:MoreEvents>{'true' if more else 'false'}"
                f"</t:MoreEvents>{events}</m:Notification></m:SendNotificationResponseMessage></m:ResponseMessages>"
                f"</m:SendNotification></soap:Body></soap:Envelope>").encode()
        status = await self._post_notification(push.url, body)
        if not sub.alive:
            return None
        if status is None:
            # Exchange retries after 30 s, then doubles, until StatusFrequency minutes are used up (statusfrequency.md)
            self.stats.push_failures += 1
            now = time.monotonic()
            if push.fail_started is None:
                push.fail_started = now
                push.next_delay = 30.0
            delay = push.next_delay * self.minute_seconds / 60.0
            if (now - push.fail_started) + delay > quiet:
                self._end(sub, "push-failed")
                return None
            push.next_delay *= 2
            return delay
        self.stats.push_deliveries += 1
        push.fail_started = None
        if batch:
            self._pushed(sub, len(batch))
        sub.last_wm = max(sub.last_wm, previous)
        if status == "Unsubscribe":
            self._end(sub, "push-unsubscribed")
            return None
        return 0.0 if sub.pending else quiet

    def _pushed(self, sub: _Subscription, count: int) -> None:
        queue = sub.pending
        last = 0
        for _ in range(min(count, len(queue or ()))):
            assert queue is not None
            last = queue.popleft()[0]
        sub.last_wm = max(sub.last_wm, last)

    async def _post_notification(self, url: str, body: bytes) -> str | None:
        """The SubscriptionStatus the client answered, or None for a failed delivery."""
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=min(30.0, max(2.0, 100 * self.minute_seconds / 60.0)))
        headers = {"Content-Type": _XML_CONTENT_TYPE, "Accept": "text/xml", "SOAPAction": SEND_NOTIFICATION_ACTION}
        try:
            async with self._session.post(url, data=body, headers=headers, timeout=timeout,
                                          allow_redirects=False) as response:
                reply = await response.read()
                if not 200 <= response.status < 300:
                    return None
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None
        try:
            root = self._parse(reply)
        except _SoapFault:
            return None
        status = root.find(f".//{_M}SubscriptionStatus")
        value = (status.text or "").strip() if status is not None else ""
        return value if value in ("OK", "Unsubscribe") else None

    async def _sweeper(self) -> None:
        """Frees subscriptions whose idle time ran out (they are also expired lazily when touched)."""
        interval = max(1.0, self.minute_seconds / 2)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for sub in list(self._subs.values()):
                self._alive(sub, now)

    # --- Autodiscover -------------------------------------------------------------------------------------------------

    async def _autodiscover_probe(self, request: web.Request) -> web.StreamResponse:
        user = self._authenticate(request)
        if isinstance(user, web.Response):
            return user
        return web.Response(status=200, text="")

    def _user_settings(self, address: str, wanted: list[str]) -> str:
        mb_backend = self.backend_of(address)
        local = address.split("@", 1)[0]
        values = {
            "UserDisplayName": local.replace(".", " ").title(),
            "UserDN": f"/o=Mock/ou=Exchange Administrative Group (FYDIBOHF23SPDLT)/cn=Recipients/cn={local}",
            "AutoDiscoverSMTPAddress": address,
            "ExternalEwsUrl": self.ews_url,
            "InternalEwsUrl": self.ews_url,
            "GroupingInformation": self.backend_name(mb_backend),
            "CasVersion": CAS_VERSION,
            "ExternalEwsVersion": CAS_VERSION,
            "EwsSupportedSchemas": EWS_SUPPORTED_SCHEMAS,
            "InternalMailboxServer": f"{self.backend_name(mb_backend).lower()}.mock.local",
            "MailboxDN": f"/o=Mock/ou=Exchange Administrative Group (FYDIBOHF23SPDLT)/cn=Configuration/cn=Servers/"
                         f"cn={self.backend_name(mb_backend)}/cn=Microsoft Private MDB",
        }
        # Only settings this mock has are answered: exchangelib raises KeyError on a setting name it does not know,
        # so neither unknown names nor errors for them are echoed back.
        return "".join(f'<UserSetting i:type="StringSetting"><Name>{name}</Name><Value>{_esc(values[name])}</Value>'
                       "</UserSetting>" for name in wanted if name in values)

    async def _autodiscover(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        user = self._authenticate(request)
        if isinstance(user, web.Response):
            return user
        try:
            root = self._parse(body)
        except _SoapFault as fault:
            return _xml_response(_fault_body(fault.code, fault.text, None), 500)
        op = root.find(f"{_S}Body/{_A}GetUserSettingsRequestMessage")
        self.stats.requests["GetUserSettings"] += 1
        mailboxes = [] if op is None else [
            (el.text or "").strip() for el in op.iterfind(f"{_A}Request/{_A}Users/{_A}User/{_A}Mailbox")]
        wanted = [] if op is None else [
            (el.text or "").strip() for el in op.iterfind(f"{_A}Request/{_A}RequestedSettings/{_A}Setting")]
        record = RequestRecord(at=time.time(), operation="GetUserSettings", mailbox=mailboxes[0] if mailboxes else None,
                               impersonated=None, anchor_mailbox=request.headers.get("X-AnchorMailbox"),
                               prefer_server_affinity=request.headers.get("X-PreferServerAffinity"),
                               backend_override_cookie=request.headers.get(COOKIE_NAME),
                               cookie=request.headers.get("Cookie"), user=user or None)
        self.stats.recent_requests.append(record)
        response_code, response_message = "NoError", ""
        rule = self._autodiscover_fault(record.mailbox)
        if isinstance(rule, web.Response):
            record.status = rule.status
            return rule
        if rule is not None:
            response_code, response_message = rule, rule
        if op is None:
            response_code, response_message = "InvalidRequest", "The request is not a GetUserSettingsRequestMessage."
        users = []
        if response_code == "NoError":
            for address in mailboxes:
                if self.serves(address):
                    users.append("<UserResponse><ErrorCode>NoError</ErrorCode><ErrorMessage>No error.</ErrorMessage>"
                                 '<RedirectTarget i:nil="true"/><UserSettingErrors/><UserSettings>'
                                 f"{self._user_settings(address.lower(), wanted)}</UserSettings></UserResponse>")
                else:
                    users.append(f"<UserResponse><ErrorCode>InvalidUser</ErrorCode><ErrorMessage>Invalid user: "
                                 f"'{_esc(address)}'</ErrorMessage>"
                                 '<RedirectTarget i:nil="true"/><UserSettingErrors/><UserSettings/></UserResponse>')
        text = (f'{_XML_DECL}<s:Envelope xmlns:s="{SOAP_NS}" xmlns:a="{WSA_NS}"><s:Header>'
                '<a:Action s:mustUnderstand="1">http://schemas.microsoft.com/exchange/2010/Autodiscover/Autodiscover/'
                f'GetUserSettingsResponse</a:Action><h:ServerVersionInfo xmlns:h="{AUTODISCOVER_NS}" '
                f'xmlns:i="{XSI_NS}"><h:MajorVersion>15</h:MajorVersion><h:MinorVersion>1</h:MinorVersion>'
                "<h:MajorBuildNumber>2507</h:MajorBuildNumber><h:MinorBuildNumber>6</h:MinorBuildNumber>"
                "<h:Version>Exchange2016</h:Version></h:ServerVersionInfo></s:Header><s:Body>"
                f'<GetUserSettingsResponseMessage xmlns="{AUTODISCOVER_NS}"><Response xmlns:i="{XSI_NS}">'
                f"<ErrorCode>{response_code}</ErrorCode><ErrorMessage>{_esc(response_message)}</ErrorMessage>"
                f"<UserResponses>{''.join(users)}</UserResponses></Response></GetUserSettingsResponseMessage>"
                f"{_ENV_TAIL}")
        return _xml_response(text.encode())

    def _autodiscover_fault(self, mailbox: str | None) -> web.Response | str | None:
        """Faults for "GetUserSettings": a bare status, or the code as the Response's ErrorCode (e.g. ServerBusy)."""
        for i, rule in enumerate(self._faults):
            if rule.operation != "GetUserSettings" or rule.mailbox not in (None, (mailbox or "").lower()):
                continue
            if rule.times > 0:
                rule.times -= 1
                if rule.times == 0:
                    del self._faults[i]
            self.stats.faults_injected["GetUserSettings"] += 1
            if rule.http_status is not None:
                return web.Response(status=rule.http_status, text=f"{rule.http_status} injected by the mock")
            return rule.code
        return None

    # --- the control API ----------------------------------------------------------------------------------------------

    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        data = await request.json()
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return data

    @staticmethod
    def _bad(exc: Exception) -> web.Response:
        return web.json_response({"error": str(exc)}, status=400)

    async def _http_mail(self, request: web.Request) -> web.StreamResponse:
        try:
            data = await self._json(request)
            fields = {k: str(data[k]) for k in ("subject", "sender", "importance", "item_class", "folder") if k in data}
            count = int(data.get("count", 1))
            mailbox = str(data["mailbox"])
            ids = self._on_loop(lambda: [self._create_mail(
                mailbox, fields.get("subject", "Hello"), fields.get("sender", "alice@example.org"),
                fields.get("importance", "Normal"), fields.get("item_class", "IPM.Note"), fields.get("folder", "inbox"),
                None) for _ in range(count)])
        except (ValueError, KeyError, TypeError) as exc:
            return self._bad(exc)
        return web.json_response({"item_ids": ids})

    async def _http_mail_bulk(self, request: web.Request) -> web.StreamResponse:
        try:
            data = await self._json(request)
            mailboxes = data["mailboxes"]
            if not isinstance(mailboxes, list):
                raise ValueError("mailboxes must be a list")
            fields = {k: str(data[k]) for k in ("subject", "sender", "importance", "item_class", "folder") if k in data}
            item_ids = self.create_mails([str(m) for m in mailboxes], **fields)
        except (ValueError, KeyError, TypeError) as exc:
            return self._bad(exc)
        return web.json_response({"created": len(item_ids), "item_ids": item_ids})

    async def _http_read(self, request: web.Request) -> web.StreamResponse:
        try:
            data = await self._json(request)
            self.mark_read(str(data["mailbox"]), str(data["item_id"]), is_read=bool(data.get("is_read", True)))
        except (ValueError, KeyError, TypeError) as exc:
            return self._bad(exc)
        return web.json_response({"ok": True})

    async def _http_folder(self, request: web.Request) -> web.StreamResponse:
        try:
            data = await self._json(request)
            folder_id = self.create_folder(str(data["mailbox"]), str(data["name"]), str(data.get("parent", "inbox")))
        except (ValueError, KeyError, TypeError) as exc:
            return self._bad(exc)
        return web.json_response({"folder_id": folder_id})

    async def _http_fault(self, request: web.Request) -> web.StreamResponse:
        try:
            data = await self._json(request)
            back_off = data.get("back_off_ms")
            status = data.get("http_status")
            self.fail_next(str(data["operation"]), str(data.get("code", "ErrorServerBusy")),
                           times=int(data.get("times", 1)),
                           back_off_ms=None if back_off is None else int(back_off),
                           http_status=None if status is None else int(status),
                           mailbox=None if data.get("mailbox") is None else str(data["mailbox"]))
        except (ValueError, KeyError, TypeError) as exc:
            return self._bad(exc)
        return web.json_response({"ok": True})

    async def _http_expire(self, request: web.Request) -> web.StreamResponse:
        try:
            data = await self._json(request)
            ids = data.get("subscription_ids")
            if ids is not None and not isinstance(ids, list):
                raise ValueError("subscription_ids must be a list")
            expired = self.expire_subscriptions(None if ids is None else [str(i) for i in ids])
        except (ValueError, TypeError) as exc:
            return self._bad(exc)
        return web.json_response({"expired": expired})

    async def _http_drop(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"dropped": self.drop_streams()})

    async def _http_close(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"closed": self.close_streams()})

    async def _http_silence(self, request: web.Request) -> web.StreamResponse:
        try:
            data = await self._json(request)
            self.silence_streams(float(data["seconds"]))
        except (ValueError, KeyError, TypeError) as exc:
            return self._bad(exc)
        return web.json_response({"ok": True})

    async def _http_skip_push(self, request: web.Request) -> web.StreamResponse:
        try:
            data = await self._json(request)
            self.skip_push_notifications(str(data["subscription_id"]), int(data.get("n", 1)))
        except (ValueError, KeyError, TypeError) as exc:
            return self._bad(exc)
        return web.json_response({"ok": True})

    async def _http_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return web.json_response({"ok": True})

    async def _http_stats(self, request: web.Request) -> web.StreamResponse:
        data = self.stats.to_json()
        data["mailboxes"] = len(self._by_no)
        data["subscriptions"] = len(self._subs)
        return web.json_response(data)

    async def _http_subscriptions(self, request: web.Request) -> web.StreamResponse:
        mailbox = request.query.get("mailbox", "")
        return web.json_response([
            {"id": s.id, "mailbox": s.mailbox, "kind": s.kind, "folders": s.folders, "event_types": s.event_types,
             "backend": s.backend, "alive": s.alive, "on_stream": s.on_stream, "pending_events": s.pending_events,
             "url": s.url} for s in self.subscriptions_of(mailbox)])

    async def _http_requests(self, request: web.Request) -> web.StreamResponse:
        limit = request.query.get("limit")
        return web.json_response([r.to_json() for r in self.requests(int(limit) if limit and limit.isdigit()
                                                                    else None)])

    async def _http_health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True})


@contextlib.contextmanager
def serve_in_thread(mock: MockExchange) -> Iterator[MockExchange]:
    """Run `mock` on its own event loop in a daemon thread, for callers that block (exchangelib in the test's
    thread). Its Python methods may then be called from the caller's thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="ews-mock", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(mock.start(), loop).result(timeout=30)
        yield mock
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(mock.stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


# --- as its own process -----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`bemsmail mock ews`: serve until SIGTERM/SIGINT; prints ``listening on http://HOST:PORT`` once it listens."""
    parser = argparse.ArgumentParser(prog="bemsmail mock ews", description="Mock Exchange Web Services (EWS SOAP).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081,
                        help="0: a free port (default 8081, as `bemsmail init` expects)")
    parser.add_argument("--auth", choices=("basic", "ntlm", "none"), default="basic")
    parser.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD",
                        help="an account that may log in (repeatable; default svc:secret)")
    parser.add_argument("--domain", action="append", default=[], metavar="DOMAIN",
                        help="every address in this domain is a mailbox (repeatable; default example.com)")
    parser.add_argument("--backends", type=int, default=4, help="mailbox servers (affinity groups)")
    parser.add_argument("--heartbeat-seconds", type=float, default=20.0)
    parser.add_argument("--minute-seconds", type=float, default=60.0, help="how long one protocol minute lasts")
    args = parser.parse_args(argv)
    users: dict[str, str] = {}
    for entry in args.user:
        name, sep, password = entry.partition(":")
        if not sep or not name:
            parser.error(f"--user wants NAME:PASSWORD, not {entry!r}")
        users[name] = password
    mock = MockExchange(args.host, args.port, auth=args.auth, users=users or None,
                        domains=args.domain or ("example.com",), backends=args.backends,
                        heartbeat_seconds=args.heartbeat_seconds, minute_seconds=args.minute_seconds)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except NotImplementedError:  # Windows
                signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
        await mock.start()
        print(f"listening on {mock.base_url}", flush=True)
        try:
            await stop.wait()
        finally:
            await mock.stop()

    try:
        import uvloop
    except ImportError:  # Windows
        asyncio.run(serve())
    else:
        uvloop.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
