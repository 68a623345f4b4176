"""EWS notification SOAP without I/O: split the GetStreamingEvents byte stream into envelopes, parse envelopes and
push (SendNotification) bodies into small frozen types, and build the GetStreamingEvents request and push reply.

Why our own: exchangelib's streaming path reads the body one byte at a time, swallows heartbeats and fails a whole
multiplexed stream for one bad subscription id. Here every envelope is parsed once by lxml with a parser made once,
walked with ``iterchildren`` and precomputed ``{namespace}Tag`` comparisons, and each response message — heartbeat,
notifications, or an error naming its ``ErrorSubscriptionIds`` — comes back as data for the caller to act on.

Hostile or broken input: a DOCTYPE or entity declaration is refused before lxml sees the bytes (the parser also
resolves no entities and touches no network), NUL bytes are refused (they would mean UTF-16/32, which EWS never
sends and which would hide a DOCTYPE from the byte check), and an envelope larger than the splitter's bound is
refused while it is still arriving. Structure that is not EWS (wrong root, no Body, no ResponseCode) raises
`EwsProtocolError`; unknown elements are ignored; a field value that does not parse (a timestamp, a count) becomes
None, so one odd value does not cost the other events of a notification.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from xml.sax.saxutils import escape

from lxml import etree  # type: ignore[import-untyped]  # no stubs for lxml 6 are pinned

SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
M_NS = "http://schemas.microsoft.com/exchange/services/2006/messages"
T_NS = "http://schemas.microsoft.com/exchange/services/2006/types"
#: the namespace of ResponseCode/Message inside a SOAP fault's detail
E_NS = "http://schemas.microsoft.com/exchange/services/2006/errors"

MAX_SUBSCRIPTIONS_PER_STREAM = 200
DEFAULT_MAX_ENVELOPE_BYTES = 16 * 2**20

EVENT_KINDS = ("NewMailEvent", "CreatedEvent", "DeletedEvent", "ModifiedEvent", "MovedEvent", "CopiedEvent",
               "FreeBusyChangedEvent", "StatusEvent")


class EwsProtocolError(Exception):
    """Bytes that are not the EWS SOAP we expect: unparsable, refused (DOCTYPE, oversize) or of the wrong shape."""


class SoapFault(Exception):
    """A SOAP Fault body, e.g. ``ErrorServerBusy`` with the server's ``BackOffMilliseconds`` hint.

    Not a frozen dataclass (as first sketched): the interpreter and the standard library assign attributes on an
    exception in flight (``__traceback__`` in ``contextlib``, ``__notes__`` by ``add_note``), and a frozen,
    slotted dataclass answers those with TypeError, replacing the fault itself.
    """

    code: str
    message: str
    back_off_ms: int | None

    def __init__(self, code: str, message: str, back_off_ms: int | None = None) -> None:
        super().__init__(code, message, back_off_ms)
        self.code = code
        self.message = message
        self.back_off_ms = back_off_ms

    def __str__(self) -> str:
        hint = f" (back off {self.back_off_ms} ms)" if self.back_off_ms is not None else ""
        return f"SOAP fault {self.code}: {self.message}{hint}"

    def __repr__(self) -> str:
        return f"SoapFault(code={self.code!r}, message={self.message!r}, back_off_ms={self.back_off_ms!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SoapFault):
            return NotImplemented
        return (self.code, self.message, self.back_off_ms) == (other.code, other.message, other.back_off_ms)

    def __hash__(self) -> int:
        return hash((self.code, self.message, self.back_off_ms))


@dataclass(frozen=True, slots=True)
class EwsEvent:
    """One event of a notification. Item events carry `item_id`, folder events `folder_id`; Moved/Copied events
    add the old ids; a folder ModifiedEvent may carry `unread_count`; only pull and push events carry a
    `watermark` (a StatusEvent may carry nothing else)."""

    kind: str
    timestamp: datetime | None = None
    item_id: str | None = None
    folder_id: str | None = None
    parent_folder_id: str | None = None
    old_item_id: str | None = None
    old_parent_folder_id: str | None = None
    unread_count: int | None = None
    watermark: str | None = None
    old_folder_id: str | None = None  # folder Moved/Copied events


@dataclass(frozen=True, slots=True)
class EwsNotification:
    """One ``Notification``: the events of one subscription (streaming has no watermarks, pull and push do)."""

    subscription_id: str
    previous_watermark: str | None = None
    more_events: bool = False
    events: tuple[EwsEvent, ...] = ()


@dataclass(frozen=True, slots=True)
class StreamMessage:
    """One ``m:GetStreamingEventsResponseMessage``: a heartbeat (NoError, ConnectionStatus OK, no notifications),
    notifications, or an error naming the subscriptions it concerns; ``Closed`` ends the connection."""

    response_class: str
    response_code: str
    message_text: str | None = None
    back_off_ms: int | None = None
    notifications: tuple[EwsNotification, ...] = ()
    error_subscription_ids: tuple[str, ...] = ()
    connection_status: str | None = None

    @property
    def is_heartbeat(self) -> bool:
        return self.response_code == "NoError" and not self.notifications and self.connection_status == "OK"


# --- parsing --------------------------------------------------------------------------------------------------

# One parser for the process: lxml keeps a per-thread context for it, and creating parsers is not free.
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
                          huge_tree=False, remove_comments=True, remove_pis=True, collect_ids=False)


def _s(local: str) -> str:
    return f"{{{SOAP_NS}}}{local}"


def _m(local: str) -> str:
    return f"{{{M_NS}}}{local}"


def _t(local: str) -> str:
    return f"{{{T_NS}}}{local}"


_ENVELOPE, _BODY, _FAULT = _s("Envelope"), _s("Body"), _s("Fault")
_RESPONSE_MESSAGES = _m("ResponseMessages")
_GSE_RESPONSE, _GSE_MESSAGE = _m("GetStreamingEventsResponse"), _m("GetStreamingEventsResponseMessage")
_SEND_NOTIFICATION, _SN_MESSAGE = _m("SendNotification"), _m("SendNotificationResponseMessage")
_RESPONSE_CODE, _MESSAGE_TEXT, _MESSAGE_XML = _m("ResponseCode"), _m("MessageText"), _m("MessageXml")
_NOTIFICATIONS, _ERROR_IDS, _CONNECTION_STATUS = _m("Notifications"), _m("ErrorSubscriptionIds"), _m("ConnectionStatus")
# The schema puts Notification in messages and its children in types; accept the other namespace too, it costs a
# set lookup and some EWS-compatible servers are loose about it.
_NOTIFICATION = frozenset({_m("Notification"), _t("Notification")})
_SUBSCRIPTION_ID = frozenset({_t("SubscriptionId"), _m("SubscriptionId")})
_PREVIOUS_WATERMARK, _MORE_EVENTS = _t("PreviousWatermark"), _t("MoreEvents")
_EVENT_TAGS = {_t(kind): kind for kind in EVENT_KINDS}
_VALUE = frozenset({_t("Value"), _m("Value"), f"{{{E_NS}}}Value"})
_FAULT_MESSAGE_XML = frozenset({_t("MessageXml"), _m("MessageXml"), f"{{{E_NS}}}MessageXml"})
_E_RESPONSE_CODE, _E_MESSAGE = f"{{{E_NS}}}ResponseCode", f"{{{E_NS}}}Message"

# event child tag → EwsEvent field; ids are read from the Id attribute
_ID_FIELDS = {_t("ItemId"): "item_id", _t("FolderId"): "folder_id", _t("ParentFolderId"): "parent_folder_id",
              _t("OldItemId"): "old_item_id", _t("OldFolderId"): "old_folder_id",
              _t("OldParentFolderId"): "old_parent_folder_id"}
_TIMESTAMP, _WATERMARK, _UNREAD_COUNT = _t("TimeStamp"), _t("Watermark"), _t("UnreadCount")

_XML_ENCODING = re.compile(rb"""^\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
_UTF8_NAMES = frozenset({b"utf-8", b"utf8", b"us-ascii", b"ascii"})


def _local(tag: object) -> str:
    """A tag for a message: its local name (never the text, which could be anything)."""
    if not isinstance(tag, str):
        return "(non-element)"
    return tag.rpartition("}")[2][:80]


def _refuse_unsafe(data: bytes) -> None:
    # Byte checks before lxml: a DOCTYPE is the door to entity expansion and external fetches; refusing it is
    # cheaper and surer than trusting parser flags alone. The checks assume an ASCII-compatible encoding, so
    # anything else is refused too.
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise EwsProtocolError("refused XML with a DOCTYPE or entity declaration")
    if b"\x00" in data:
        raise EwsProtocolError("refused XML that is not UTF-8 (NUL bytes)")
    declared = _XML_ENCODING.match(data)
    if declared is not None and declared.group(1).lower() not in _UTF8_NAMES:
        raise EwsProtocolError("refused XML in an encoding other than UTF-8")


def _parse(data: bytes) -> Any:
    _refuse_unsafe(data)
    try:
        return etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError as exc:
        # lxml's message names the construct and position, not the document's text.
        raise EwsProtocolError(f"malformed XML: {str(exc.msg)[:200]}") from None


def _payload(data: bytes) -> Any:
    """The first element inside the envelope's Body; a Fault raises `SoapFault`."""
    root = _parse(data)
    if root.tag != _ENVELOPE:
        raise EwsProtocolError(f"expected a SOAP 1.1 Envelope, got {_local(root.tag)}")
    for body in root.iterchildren(_BODY):
        for child in body.iterchildren(tag=etree.Element):
            if child.tag == _FAULT:
                raise _fault(child)
            return child
        raise EwsProtocolError("empty SOAP Body")
    raise EwsProtocolError("SOAP Envelope without a Body")


def _text(element: Any) -> str | None:
    text = element.text
    if text is None:
        return None
    text = text.strip()
    return text or None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _timestamp(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    # xs:dateTime without a zone is local to nobody; EWS sends UTC ("Z"), so read a bare value as UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _back_off(message_xml: Any) -> int | None:
    for value in message_xml.iterchildren():
        if value.tag in _VALUE and value.get("Name") == "BackOffMilliseconds":
            return _int(_text(value))
    return None


def _fault(fault: Any) -> SoapFault:
    code = message = None
    back_off = None
    for child in fault.iterchildren():
        tag = child.tag
        # SOAP 1.1 fault children are unqualified.
        if tag == "faultcode":
            code = (_text(child) or "").rpartition(":")[2] or None
        elif tag == "faultstring":
            message = message or _text(child)
        elif tag == "detail":
            for item in child.iterchildren():
                if item.tag == _E_RESPONSE_CODE:
                    code = _text(item) or code
                elif item.tag == _E_MESSAGE:
                    message = _text(item) or message
                elif item.tag in _FAULT_MESSAGE_XML:
                    back_off = _back_off(item)
    return SoapFault(code or "UnknownFault", message or "", back_off)


def _event(kind: str, element: Any) -> EwsEvent:
    fields: dict[str, Any] = {}
    for child in element.iterchildren():
        tag = child.tag
        id_field = _ID_FIELDS.get(tag)
        if id_field is not None:
            fields[id_field] = child.get("Id")
        elif tag == _TIMESTAMP:
            fields["timestamp"] = _timestamp(_text(child))
        elif tag == _WATERMARK:
            fields["watermark"] = _text(child)
        elif tag == _UNREAD_COUNT:
            fields["unread_count"] = _int(_text(child))
    return EwsEvent(kind, **fields)


def _notification(element: Any) -> EwsNotification:
    subscription_id = previous = None
    more = False
    events: list[EwsEvent] = []
    for child in element.iterchildren():
        tag = child.tag
        kind = _EVENT_TAGS.get(tag)
        if kind is not None:
            events.append(_event(kind, child))
        elif tag in _SUBSCRIPTION_ID:
            subscription_id = _text(child)
        elif tag == _PREVIOUS_WATERMARK:
            previous = _text(child)
        elif tag == _MORE_EVENTS:
            more = (_text(child) or "").lower() in ("true", "1")
    if subscription_id is None:
        raise EwsProtocolError("Notification without a SubscriptionId")
    return EwsNotification(subscription_id, previous, more, tuple(events))


def _response_message(element: Any) -> StreamMessage:
    code = text = status = None
    back_off = None
    notifications: list[EwsNotification] = []
    error_ids: list[str] = []
    for child in element.iterchildren():
        tag = child.tag
        if tag == _RESPONSE_CODE:
            code = _text(child)
        elif tag == _NOTIFICATIONS:
            notifications.extend(_notification(n) for n in child.iterchildren() if n.tag in _NOTIFICATION)
        elif tag == _CONNECTION_STATUS:
            status = _text(child)
        elif tag == _MESSAGE_TEXT:
            text = _text(child)
        elif tag == _MESSAGE_XML:
            back_off = _back_off(child)
        elif tag == _ERROR_IDS:
            error_ids.extend(i for i in (_text(s) for s in child.iterchildren() if s.tag in _SUBSCRIPTION_ID) if i)
    if code is None:
        raise EwsProtocolError(f"{_local(element.tag)} without a ResponseCode")
    return StreamMessage(element.get("ResponseClass") or "", code, text, back_off, tuple(notifications),
                         tuple(error_ids), status)


def _messages(payload: Any, message_tag: str | None, parse: Callable[[Any], Any]) -> list[Any]:
    for container in payload.iterchildren(_RESPONSE_MESSAGES):
        return [parse(message) for message in container.iterchildren(tag=etree.Element)
                if message_tag is None or message.tag == message_tag]
    raise EwsProtocolError(f"{_local(payload.tag)} without ResponseMessages")


def parse_streaming_envelope(data: bytes) -> list[StreamMessage]:
    """Every response message of one GetStreamingEvents envelope; a Fault body raises `SoapFault`."""
    payload = _payload(data)
    if payload.tag != _GSE_RESPONSE:
        raise EwsProtocolError(f"expected GetStreamingEventsResponse, got {_local(payload.tag)}")
    return _messages(payload, _GSE_MESSAGE, _response_message)


def parse_send_notification(data: bytes) -> list[EwsNotification]:
    """The notifications of a push (what Exchange POSTs to the callback URL); a Fault body raises `SoapFault`."""
    payload = _payload(data)
    if payload.tag != _SEND_NOTIFICATION:
        raise EwsProtocolError(f"expected SendNotification, got {_local(payload.tag)}")

    def notifications(message: Any) -> list[EwsNotification]:
        return [_notification(n) for n in message.iterchildren() if n.tag in _NOTIFICATION]

    return [n for batch in _messages(payload, _SN_MESSAGE, notifications) for n in batch]


def parse_error_response(data: bytes) -> StreamMessage | None:
    """The first unsuccessful response message of a non-streaming EWS body (e.g. an HTTP 500 answer), else the
    first message; a Fault raises `SoapFault`; None when the body is not EWS SOAP at all (an HTML error page)."""
    try:
        payload = _payload(data)
        messages: list[StreamMessage] = _messages(payload, None, _response_message)
    except EwsProtocolError:
        return None
    for message in messages:
        if message.response_class != "Success":
            return message
    return messages[0] if messages else None


# --- the splitter ---------------------------------------------------------------------------------------------

_TEXT, _TAG, _COMMENT, _CDATA, _PI = range(5)
_LT, _SLASH, _QMARK, _BANG, _GT = b"<", ord("/"), ord("?"), ord("!"), ord(">")
_TAG_STOP = re.compile(rb"[\"'>]")
_TAG_NAME = re.compile(rb"<([^\s/>]+)")
# Allowed between envelopes: XML whitespace, and a UTF-8 byte order mark.
_GAP_BYTES = b" \t\r\n\xef\xbb\xbf"


class EnvelopeSplitter:
    """Cuts a GetStreamingEvents body — complete SOAP envelopes back to back, chunk boundaries anywhere — into
    envelopes, the bytes from ``<prefix:Envelope`` to its matching end tag.

    Inside an envelope the end is first looked for with ``bytes.find`` (see `_fast_scan`): Exchange's envelopes
    hold no comments, CDATA or nested envelopes, so that is the whole cost of splitting them. Otherwise a small
    resumable tokenizer takes over: it tracks element depth through start, end and empty-element tags (quotes in
    attribute values respected) and skips comments, CDATA sections and processing instructions (so an
    ``</s:Envelope>`` inside CDATA ends nothing). Nothing is rescanned on later feeds — each byte is looked at by
    the fast path at most once and by the tokenizer at most once — so feeding is O(n) whatever the chunking.
    Between envelopes it
    accepts whitespace, XML declarations and comments; a DOCTYPE, stray text or a root other than Envelope raise
    `EwsProtocolError`, as does an envelope over `max_envelope_bytes` — while it is still arriving.
    """

    __slots__ = ("_body", "_buf", "_close", "_depth", "_fast", "_max", "_open", "_pos", "_quote", "_scan", "_start",
                 "_state", "_tag")

    def __init__(self, max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES) -> None:
        if max_envelope_bytes < 1:
            raise ValueError("max_envelope_bytes must be positive")
        self._max = max_envelope_bytes
        self._buf = bytearray()
        self._pos = 0  # the next byte to look at
        self._start = 0  # where the envelope in progress began (depth > 0), or the construct pending between them
        self._tag = 0  # where the tag being scanned began
        self._depth = 0
        self._state = _TEXT
        self._quote = 0  # inside a tag: the quote byte of an open attribute value, or 0
        # The fast path through an envelope's content (see _fast_scan)
        self._fast = False
        self._open = self._close = b""  # b"<s:Envelope", b"</s:Envelope" for the envelope in progress
        self._body = 0  # just after the envelope's start tag
        self._scan = 0  # how far the fast path has looked

    @property
    def pending_bytes(self) -> int:
        """Bytes held for an envelope (or construct) not yet complete."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add bytes; return the envelopes they complete, in order."""
        buf = self._buf
        buf += data
        out: list[bytes] = []
        n = len(buf)
        pos = self._pos
        state = self._state
        while pos < n:
            if self._fast:
                pos, envelope = self._fast_scan(buf, n)
                if envelope is not None:
                    out.append(envelope)
                continue
            if state == _TEXT:
                lt = buf.find(_LT, pos)
                end = n if lt < 0 else lt
                if self._depth == 0 and end > pos and buf[pos:end].strip(_GAP_BYTES):
                    raise EwsProtocolError("unexpected text between SOAP envelopes")
                if lt < 0 or lt + 1 >= n:
                    pos = end  # wait: no markup yet, or the byte after '<' has not arrived
                    break
                pos = lt
                nxt = buf[lt + 1]
                if nxt == _QMARK:
                    state, pos = _PI, lt + 2
                elif nxt == _BANG:
                    head = bytes(buf[lt:lt + 9])
                    if head.startswith(b"<!--"):
                        state, pos = _COMMENT, lt + 4
                    elif head == b"<![CDATA[":
                        if self._depth == 0:
                            raise EwsProtocolError("CDATA outside any SOAP envelope")
                        state, pos = _CDATA, lt + 9
                    elif len(head) < 9 and (b"<!--".startswith(head) or b"<![CDATA[".startswith(head)):
                        break  # wait for enough bytes to tell which it is
                    else:
                        raise EwsProtocolError("refused a DOCTYPE or other declaration in the stream")
                else:
                    state, pos, self._tag = _TAG, lt + 1, lt
                if self._depth == 0:
                    self._start = lt
            elif state == _TAG:
                if self._quote:
                    q = buf.find(self._quote, pos)
                    if q < 0:
                        pos = n
                        break
                    self._quote, pos = 0, q + 1
                    continue
                stop = _TAG_STOP.search(buf, pos)
                if stop is None:
                    pos = n
                    break
                at = stop.start()
                if buf[at] != _GT:
                    self._quote, pos = buf[at], at + 1
                    continue
                pos, state = at + 1, _TEXT
                envelope = self._tag_closed(buf, at)
                if envelope is not None:
                    out.append(envelope)
            else:
                terminator = b"-->" if state == _COMMENT else b"]]>" if state == _CDATA else b"?>"
                found = buf.find(terminator, pos)
                if found < 0:
                    pos = max(pos, n - len(terminator) + 1)  # the terminator may straddle the next chunk
                    break
                if state == _PI and self._depth == 0:
                    self._check_declaration(bytes(buf[self._start:found]))
                pos, state = found + len(terminator), _TEXT
        self._state = state
        # Drop what is done with: everything before the envelope in progress, or before the construct pending
        # between envelopes (CPython deletes the head of a bytearray without moving the rest).
        keep = self._start if self._depth > 0 or state != _TEXT else pos
        if keep:
            del buf[:keep]
            pos -= keep
            self._start -= keep
            self._tag -= keep
            self._body -= keep
            self._scan -= keep
        self._pos = pos
        if len(buf) > self._max:
            raise EwsProtocolError(f"SOAP envelope over {self._max} bytes")
        return out

    def _tag_closed(self, buf: bytearray, gt: int) -> bytes | None:
        """Account for the tag from self._tag to `gt`; return the envelope it completes, if it does."""
        lt = self._tag
        closing = buf[lt + 1] == _SLASH
        empty = not closing and buf[gt - 1] == _SLASH
        if self._depth == 0:
            if closing:
                raise EwsProtocolError("end tag outside any SOAP envelope")
            name = _TAG_NAME.match(buf, lt)
            if name is None or name.group(1).rpartition(b":")[2] != b"Envelope":
                shown = name.group(1)[:40].decode("ascii", "replace") if name else "?"
                raise EwsProtocolError(f"expected a SOAP Envelope, got <{shown}>")
            if empty:
                raise EwsProtocolError("empty SOAP Envelope element")
            self._depth = 1
            self._fast, self._open, self._close = True, b"<" + name.group(1), b"</" + name.group(1)
            self._body = self._scan = gt + 1
        elif closing:
            self._depth -= 1
            if self._depth == 0:
                if gt + 1 - self._start > self._max:
                    raise EwsProtocolError(f"SOAP envelope over {self._max} bytes")
                return bytes(buf[self._start:gt + 1])
        elif not empty:
            self._depth += 1
        return None

    def _fast_scan(self, buf: bytearray, n: int) -> tuple[int, bytes | None]:
        """Find the envelope's end at C speed; returns (where the tokenizer goes on, the envelope if complete).

        Without comments, CDATA sections or processing instructions in the content, and without another element
        of the envelope's own name, the first ``</prefix:Envelope>`` is the end: '<' starts markup everywhere
        else in well-formed XML (it is not allowed in attribute values). Anything that might break that rule
        sends the tokenizer through the content from its start instead — once, so still linear. Patterns
        split across feeds are caught by starting each search a few bytes back.
        """
        opening, closing, body, scan = self._open, self._close, self._body, self._scan
        end = buf.find(closing, max(body, scan - len(closing) + 1), n)
        limit = n if end < 0 else end  # never look into the next envelope
        if (buf.find(b"<!", max(body, scan - 1), limit) >= 0 or buf.find(b"<?", max(body, scan - 1), limit) >= 0
                or buf.find(opening, max(body, scan - len(opening) + 1), limit) >= 0):
            self._fast = False
            return body, None
        if end < 0:
            self._scan = n
            return n, None
        gt = buf.find(b">", end + len(closing), n)
        if gt < 0:
            self._scan = end + len(closing) - 1  # keep the candidate in view for the next feed
            return n, None
        self._fast = False
        if buf[end + len(closing):gt].strip(b" \t\r\n"):
            return self._body, None  # </s:EnvelopeX> or the like: let the tokenizer judge
        if gt + 1 - self._start > self._max:
            raise EwsProtocolError(f"SOAP envelope over {self._max} bytes")
        self._depth = 0
        return gt + 1, bytes(buf[self._start:gt + 1])

    @staticmethod
    def _check_declaration(pi: bytes) -> None:
        # Envelopes are handed on without their declaration and parsed as UTF-8: refuse a stream saying otherwise.
        declared = _XML_ENCODING.match(pi)
        if declared is not None and declared.group(1).lower() not in _UTF8_NAMES:
            raise EwsProtocolError("refused a stream in an encoding other than UTF-8")


# --- building -------------------------------------------------------------------------------------------------

_XML_DECLARATION = '<?xml version="1.0" encoding="utf-8"?>\n'
_NOT_XML_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_ATTR_ESCAPES = {'"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"}


def _xml_text(value: str, what: str) -> str:
    if _NOT_XML_CHARS.search(value):
        raise ValueError(f"{what} contains characters XML cannot carry")
    return escape(value)


def _xml_attr(value: str, what: str) -> str:
    if _NOT_XML_CHARS.search(value):
        raise ValueError(f"{what} contains characters XML cannot carry")
    return escape(value, _ATTR_ESCAPES)


def get_streaming_events_request(subscription_ids: Sequence[str], connection_timeout_minutes: int, *,
                                 impersonate: str | None, server_version: str = "Exchange2016") -> bytes:
    """The SOAP request of one GetStreamingEvents connection: 1-200 subscription ids, held open for 1-30 minutes;
    with `impersonate`, the ExchangeImpersonation header (app-only tokens require it; budgets are charged to it)."""
    if isinstance(subscription_ids, str):
        raise TypeError("subscription_ids must be a sequence of ids, not one string")
    ids = list(subscription_ids)
    if not 1 <= len(ids) <= MAX_SUBSCRIPTIONS_PER_STREAM:
        raise ValueError(f"a stream carries 1 to {MAX_SUBSCRIPTIONS_PER_STREAM} subscription ids, not {len(ids)}")
    if any(not isinstance(i, str) or not i.strip() for i in ids):
        raise ValueError("subscription ids must be non-empty strings")
    if (isinstance(connection_timeout_minutes, bool) or not isinstance(connection_timeout_minutes, int)
            or not 1 <= connection_timeout_minutes <= 30):
        raise ValueError("connection_timeout_minutes must be an integer from 1 to 30")
    if not server_version:
        raise ValueError("server_version must not be empty")
    header = [f'<t:RequestServerVersion Version="{_xml_attr(server_version, "server_version")}"/>']
    if impersonate is not None:
        if not impersonate.strip():
            raise ValueError("impersonate must be an SMTP address")
        header.append("<t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>"
                      f"{_xml_text(impersonate, 'impersonate')}"
                      "</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation>")
    subscriptions = "".join(f"<t:SubscriptionId>{_xml_text(i, 'a subscription id')}</t:SubscriptionId>" for i in ids)
    return (
        f'{_XML_DECLARATION}<s:Envelope xmlns:s="{SOAP_NS}" xmlns:m="{M_NS}" xmlns:t="{T_NS}">'
        f'<s:Header>{"".join(header)}</s:Header>'
        f"<s:Body><m:GetStreamingEvents><m:SubscriptionIds>{subscriptions}</m:SubscriptionIds>"
        f"<m:ConnectionTimeout>{connection_timeout_minutes}</m:ConnectionTimeout></m:GetStreamingEvents></s:Body>"
        "</s:Envelope>"
    ).encode()


def send_notification_reply(status: Literal["OK", "Unsubscribe"]) -> bytes:
    """The answer to a push: ``OK`` keeps the subscription, ``Unsubscribe`` ends it (the only way to end a push
    subscription: Unsubscribe does not work on push ids)."""
    if status not in ("OK", "Unsubscribe"):
        raise ValueError("status must be 'OK' or 'Unsubscribe'")
    return (
        f'{_XML_DECLARATION}<s:Envelope xmlns:s="{SOAP_NS}" xmlns:m="{M_NS}"><s:Body>'
        f"<m:SendNotificationResult><m:SubscriptionStatus>{status}</m:SubscriptionStatus></m:SendNotificationResult>"
        "</s:Body></s:Envelope>"
    ).encode()
