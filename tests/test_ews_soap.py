"""EWS notification SOAP: the documented streaming, push and fault shapes parse to the right data; the envelope
splitter finds exactly the envelopes under any chunking; hostile XML is refused; the request and reply we build
are what exchangelib builds."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from exchangelib import Identity
from exchangelib.properties import Notification
from exchangelib.services import GetStreamingEvents, SendNotification
from exchangelib.services.common import EWSService
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree  # type: ignore[import-untyped]

from bemsmail.sources.ews.soap import (
    E_NS,
    M_NS,
    SOAP_NS,
    T_NS,
    EnvelopeSplitter,
    EwsEvent,
    EwsNotification,
    EwsProtocolError,
    SoapFault,
    StreamMessage,
    get_streaming_events_request,
    parse_error_response,
    parse_send_notification,
    parse_streaming_envelope,
    send_notification_reply,
)

NS = f'xmlns:m="{M_NS}" xmlns:t="{T_NS}"'
SUB = "JgBibjFwcHJkMDJtYjAxNi5uYW1wcmQwMi5wcm9kLm91dGxvb2suY29tEAAAAHWxqWX0Ag="
ITEM = "AAMkADBlZDE4NDA0LWE4ZTEtNGI3Ni1hMWI0LWQ3NzMzMmM2OGM1YQBGAAAAAAA="
FOLDER = "AQMkADBlZDE4NDA0LWE4ZTEtNGI3Ni1hMWI0LWQ3NzMzMmM2OGM1YQAuAAADAAA="


def envelope(body: str, prefix: str = "soap11", header: str = "") -> bytes:
    """An envelope as Exchange writes them on a stream: prefix `soap11`, a ServerVersionInfo header."""
    p = f"{prefix}:" if prefix else ""
    xmlns = f'xmlns:{prefix}="{SOAP_NS}"' if prefix else f'xmlns="{SOAP_NS}"'
    header = header or (f'<ServerVersionInfo xmlns="{T_NS}" MajorVersion="15" MinorVersion="2" '
                        'MajorBuildNumber="1544" MinorBuildNumber="4" Version="V2017_07_11"/>')
    return (f"<{p}Envelope {xmlns}><{p}Header>{header}</{p}Header>"
            f"<{p}Body>{body}</{p}Body></{p}Envelope>").encode()


def streaming(*messages: str) -> bytes:
    return envelope(f"<m:GetStreamingEventsResponse {NS}><m:ResponseMessages>{''.join(messages)}"
                    "</m:ResponseMessages></m:GetStreamingEventsResponse>")


HEARTBEAT = ('<m:GetStreamingEventsResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>'
             "<m:ConnectionStatus>OK</m:ConnectionStatus></m:GetStreamingEventsResponseMessage>")
NEW_MAIL = f"""<m:GetStreamingEventsResponseMessage ResponseClass="Success">
   <m:ResponseCode>NoError</m:ResponseCode>
   <m:Notifications>
    <m:Notification>
     <t:SubscriptionId>{SUB}</t:SubscriptionId>
     <t:CreatedEvent><t:TimeStamp>2013-09-16T04:31:29Z</t:TimeStamp>
       <t:ItemId Id="{ITEM}" ChangeKey="CQAAAA=="/>
       <t:ParentFolderId Id="{FOLDER}" ChangeKey="AQAAAA=="/></t:CreatedEvent>
     <t:NewMailEvent><t:TimeStamp>2013-09-16T04:31:29Z</t:TimeStamp>
       <t:ItemId Id="{ITEM}" ChangeKey="CQAAAA=="/>
       <t:ParentFolderId Id="{FOLDER}" ChangeKey="AQAAAA=="/></t:NewMailEvent>
     <t:ModifiedEvent><t:TimeStamp>2013-09-16T04:31:30.1234567Z</t:TimeStamp>
       <t:FolderId Id="{FOLDER}" ChangeKey="AQAAAA=="/>
       <t:ParentFolderId Id="AQMkroot"/><t:UnreadCount>1</t:UnreadCount></t:ModifiedEvent>
    </m:Notification>
   </m:Notifications>
  </m:GetStreamingEventsResponseMessage>"""
ERROR_CLOSED = ('<m:GetStreamingEventsResponseMessage ResponseClass="Error">'
                "<m:MessageText>The subscription is no longer valid.</m:MessageText>"
                "<m:ResponseCode>ErrorInvalidSubscription</m:ResponseCode>"
                "<m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>"
                "<m:ErrorSubscriptionIds><m:SubscriptionId>bad-1</m:SubscriptionId>"
                "<m:SubscriptionId>bad-2</m:SubscriptionId></m:ErrorSubscriptionIds>"
                "<m:ConnectionStatus>Closed</m:ConnectionStatus></m:GetStreamingEventsResponseMessage>")
PUSH = f"""<?xml version="1.0" encoding="utf-8"?>
<soap:Envelope xmlns:soap="{SOAP_NS}">
 <soap:Header><t:RequestServerVersion xmlns:t="{T_NS}" Version="Exchange2010_SP2"/></soap:Header>
 <soap:Body>
  <m:SendNotification {NS}>
   <m:ResponseMessages>
    <m:SendNotificationResponseMessage ResponseClass="Success">
     <m:ResponseCode>NoError</m:ResponseCode>
     <m:Notification>
      <t:SubscriptionId>hKJETtoAdi9PPW0tZDQ4MThmMDoVYB</t:SubscriptionId>
      <t:PreviousWatermark>ygwAAAAAAAA=</t:PreviousWatermark>
      <t:MoreEvents>false</t:MoreEvents>
      <t:NewMailEvent><t:Watermark>ywwAAAAAAAA=</t:Watermark><t:TimeStamp>2024-05-01T10:00:00Z</t:TimeStamp>
        <t:ItemId Id="{ITEM}" ChangeKey="CQAAAA=="/>
        <t:ParentFolderId Id="{FOLDER}" ChangeKey="AQAAAA=="/></t:NewMailEvent>
     </m:Notification>
    </m:SendNotificationResponseMessage>
    <m:SendNotificationResponseMessage ResponseClass="Success">
     <m:ResponseCode>NoError</m:ResponseCode>
     <m:Notification>
      <t:SubscriptionId>second</t:SubscriptionId>
      <t:PreviousWatermark>zAwAAAAAAAA=</t:PreviousWatermark>
      <t:MoreEvents>true</t:MoreEvents>
      <t:StatusEvent><t:Watermark>zQwAAAAAAAA=</t:Watermark></t:StatusEvent>
     </m:Notification>
    </m:SendNotificationResponseMessage>
   </m:ResponseMessages>
  </m:SendNotification>
 </soap:Body>
</soap:Envelope>""".encode()
SERVER_BUSY = f"""<?xml version="1.0" encoding="utf-8"?>
<s:Envelope xmlns:s="{SOAP_NS}"><s:Body><s:Fault>
 <faultcode xmlns:a="{T_NS}">a:ErrorServerBusy</faultcode>
 <faultstring xml:lang="en-US">The server cannot service this request right now. Try again later.</faultstring>
 <detail>
  <e:ResponseCode xmlns:e="{E_NS}">ErrorServerBusy</e:ResponseCode>
  <e:Message xmlns:e="{E_NS}">The server cannot service this request right now. Try again later.</e:Message>
  <t:MessageXml xmlns:t="{T_NS}"><t:Value Name="BackOffMilliseconds">297749</t:Value></t:MessageXml>
 </detail>
</s:Fault></s:Body></s:Envelope>""".encode()


# --- parsing the documented shapes ---------------------------------------------------------------------------


def test_streaming_new_mail_created_and_modified_with_unread_count() -> None:
    [message] = parse_streaming_envelope(streaming(NEW_MAIL))
    assert (message.response_class, message.response_code, message.connection_status) == ("Success", "NoError", None)
    assert not message.is_heartbeat
    [notification] = message.notifications
    assert notification == EwsNotification(SUB, None, False, notification.events)
    created, new_mail, modified = notification.events
    at = datetime(2013, 9, 16, 4, 31, 29, tzinfo=UTC)
    assert created == EwsEvent("CreatedEvent", at, ITEM, None, FOLDER)
    assert new_mail == EwsEvent("NewMailEvent", at, ITEM, None, FOLDER)
    assert modified == EwsEvent("ModifiedEvent", datetime(2013, 9, 16, 4, 31, 30, 123456, tzinfo=UTC), None, FOLDER,
                                "AQMkroot", unread_count=1)
    assert modified.timestamp is not None and modified.timestamp.tzinfo is UTC


def test_streaming_parse_agrees_with_exchangelib() -> None:
    root = etree.fromstring(streaming(NEW_MAIL))
    theirs = [Notification.from_xml(elem=e, account=None) for e in root.iter(f"{{{M_NS}}}Notification")]
    [ours] = parse_streaming_envelope(streaming(NEW_MAIL))[0].notifications
    [their] = theirs
    assert their.subscription_id == ours.subscription_id
    for mine, event in zip(ours.events, their.events, strict=True):
        assert type(event).__name__ == mine.kind
        if event.timestamp is not None:  # exchangelib reads no 7-digit (.NET) fraction: it gives None there
            assert mine.timestamp is not None
            assert (event.timestamp.year, event.timestamp.second) == (mine.timestamp.year, mine.timestamp.second)
        assert (event.item_id.id if event.item_id else None) == mine.item_id
        assert (event.folder_id.id if event.folder_id else None) == mine.folder_id
        assert event.parent_folder_id.id == mine.parent_folder_id
        assert getattr(event, "unread_count", None) == mine.unread_count


def test_heartbeat() -> None:
    [message] = parse_streaming_envelope(streaming(HEARTBEAT))
    assert message == StreamMessage("Success", "NoError", connection_status="OK")
    assert message.is_heartbeat


def test_error_message_names_its_subscriptions_and_closes() -> None:
    messages = parse_streaming_envelope(streaming(HEARTBEAT, ERROR_CLOSED))
    assert len(messages) == 2
    error = messages[1]
    assert error.response_class == "Error"
    assert error.response_code == "ErrorInvalidSubscription"
    assert error.message_text == "The subscription is no longer valid."
    assert error.error_subscription_ids == ("bad-1", "bad-2")
    assert error.connection_status == "Closed"
    assert error.notifications == ()


def test_in_message_back_off_and_empty_message_text() -> None:
    body = ('<m:GetStreamingEventsResponseMessage ResponseClass="Error"><m:MessageText/>'
            "<m:ResponseCode>ErrorServerBusy</m:ResponseCode><m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>"
            '<m:MessageXml><t:Value Name="Other">x</t:Value><t:Value Name="BackOffMilliseconds">30000</t:Value>'
            "</m:MessageXml><m:ConnectionStatus>Closed</m:ConnectionStatus></m:GetStreamingEventsResponseMessage>")
    [message] = parse_streaming_envelope(streaming(body))
    assert (message.response_code, message.message_text, message.back_off_ms) == ("ErrorServerBusy", None, 30000)


def test_moved_copied_deleted_free_busy_and_unknown_elements() -> None:
    events = """<m:GetStreamingEventsResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>
      <m:SomethingNew>ignored</m:SomethingNew><m:Notifications><m:Notification><t:SubscriptionId>s</t:SubscriptionId>
      <t:MovedEvent><t:TimeStamp>2024-01-02T03:04:05+02:00</t:TimeStamp><t:ItemId Id="new"/><t:ParentFolderId Id="to"/>
        <t:OldItemId Id="old"/><t:OldParentFolderId Id="from"/><t:Future>x</t:Future></t:MovedEvent>
      <t:CopiedEvent><t:TimeStamp>not a time</t:TimeStamp><t:FolderId Id="f2"/><t:ParentFolderId Id="p"/>
        <t:OldFolderId Id="f1"/><t:OldParentFolderId Id="p0"/></t:CopiedEvent>
      <t:DeletedEvent><t:TimeStamp>2024-01-02T03:04:05</t:TimeStamp><t:ItemId Id="gone"/>
        <t:ParentFolderId Id="p"/></t:DeletedEvent>
      <t:FreeBusyChangedEvent><t:TimeStamp>2024-01-02T03:04:05Z</t:TimeStamp><t:ItemId Id="cal"/>
        <t:ParentFolderId Id="calendar"/></t:FreeBusyChangedEvent>
      <t:UnknownEvent><t:ItemId Id="x"/></t:UnknownEvent>
      <t:ModifiedEvent><t:FolderId Id="f"/><t:UnreadCount>many</t:UnreadCount></t:ModifiedEvent>
      </m:Notification></m:Notifications></m:GetStreamingEventsResponseMessage>"""
    [message] = parse_streaming_envelope(streaming(events))
    moved, copied, deleted, free_busy, modified = message.notifications[0].events
    assert moved == EwsEvent("MovedEvent", datetime(2024, 1, 2, 1, 4, 5, tzinfo=UTC), "new", None, "to", "old", "from")
    assert copied == EwsEvent("CopiedEvent", None, None, "f2", "p", None, "p0", old_folder_id="f1")
    assert deleted.timestamp == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)  # no zone: read as UTC
    assert (deleted.kind, deleted.item_id) == ("DeletedEvent", "gone")
    assert (free_busy.kind, free_busy.item_id) == ("FreeBusyChangedEvent", "cal")
    assert free_busy.parent_folder_id == "calendar"
    assert (modified.folder_id, modified.unread_count) == ("f", None)  # an odd value costs only itself


def test_send_notification_with_watermarks_more_events_and_status_event() -> None:
    first, second = parse_send_notification(PUSH)
    assert first.subscription_id == "hKJETtoAdi9PPW0tZDQ4MThmMDoVYB"
    assert (first.previous_watermark, first.more_events) == ("ygwAAAAAAAA=", False)
    [new_mail] = first.events
    assert new_mail == EwsEvent("NewMailEvent", datetime(2024, 5, 1, 10, tzinfo=UTC), ITEM, None, FOLDER,
                                watermark="ywwAAAAAAAA=")
    assert (second.previous_watermark, second.more_events) == ("zAwAAAAAAAA=", True)
    assert second.events == (EwsEvent("StatusEvent", watermark="zQwAAAAAAAA="),)


def test_server_busy_fault_carries_back_off() -> None:
    with pytest.raises(SoapFault) as caught:
        parse_streaming_envelope(SERVER_BUSY)
    fault = caught.value
    assert (fault.code, fault.back_off_ms) == ("ErrorServerBusy", 297749)
    assert fault.message == "The server cannot service this request right now. Try again later."
    assert "297749" in str(fault) and "ErrorServerBusy" in repr(fault)
    with pytest.raises(SoapFault):
        parse_send_notification(SERVER_BUSY)
    with pytest.raises(SoapFault):
        parse_error_response(SERVER_BUSY)


def test_soap_fault_survives_being_raised_through_context_managers_and_notes() -> None:
    # The reason it is not a frozen dataclass: these assign attributes on the exception in flight.
    import contextlib

    @contextlib.contextmanager
    def nothing() -> Any:
        yield

    with pytest.raises(SoapFault) as caught, nothing():
        raise SoapFault("ErrorServerBusy", "busy", 5)
    caught.value.add_note("seen")
    assert caught.value == SoapFault("ErrorServerBusy", "busy", 5)


def test_plain_fault_without_detail() -> None:
    body = envelope("<soap11:Fault><faultcode>soap11:Client</faultcode><faultstring>Bad request</faultstring>"
                    "</soap11:Fault>")
    with pytest.raises(SoapFault) as caught:
        parse_streaming_envelope(body)
    assert (caught.value.code, caught.value.message, caught.value.back_off_ms) == ("Client", "Bad request", None)


def test_parse_error_response() -> None:
    body = envelope(f'<m:GetItemResponse {NS}><m:ResponseMessages><m:GetItemResponseMessage ResponseClass="Success">'
                    '<m:ResponseCode>NoError</m:ResponseCode></m:GetItemResponseMessage>'
                    '<m:GetItemResponseMessage ResponseClass="Error"><m:MessageText>no</m:MessageText>'
                    "<m:ResponseCode>ErrorAccessDenied</m:ResponseCode></m:GetItemResponseMessage>"
                    "</m:ResponseMessages></m:GetItemResponse>")
    message = parse_error_response(body)
    assert message is not None and (message.response_code, message.message_text) == ("ErrorAccessDenied", "no")
    assert parse_error_response(b"<html><body>Service Unavailable</body></html>") is None
    assert parse_error_response(b"") is None


@pytest.mark.parametrize("data", [
    b"not xml",
    b"<a><b></a>",
    envelope("", prefix="s").replace(SOAP_NS.encode(), b"urn:other"),
    b'<s:Envelope xmlns:s="' + SOAP_NS.encode() + b'"/>',
    envelope("<m:GetItemResponse xmlns:m='" + M_NS + "'/>"),
    streaming('<m:GetStreamingEventsResponseMessage ResponseClass="Success"/>'),
    streaming('<m:GetStreamingEventsResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>'
              "<m:Notifications><m:Notification><t:NewMailEvent/></m:Notification></m:Notifications>"
              "</m:GetStreamingEventsResponseMessage>"),
])
def test_unexpected_xml_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(EwsProtocolError):
        parse_streaming_envelope(data)


@pytest.mark.parametrize("data", [
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>'
    b'<s:Envelope xmlns:s="' + SOAP_NS.encode() + b'"><s:Body>&lol2;</s:Body></s:Envelope>',
    b'<!DOCTYPE x SYSTEM "http://127.0.0.1:1/evil.dtd"><x/>',
    b'<x><!ENTITY e "v"></x>',
    "<?xml version='1.0' encoding='utf-16'?><x/>".encode("utf-16"),
    b"<?xml version='1.0' encoding='UTF-7'?><x/>",
])
def test_doctype_entities_and_other_encodings_are_refused(data: bytes) -> None:
    with pytest.raises(EwsProtocolError, match="refused"):
        parse_streaming_envelope(data)
    with pytest.raises(EwsProtocolError, match="refused"):
        parse_send_notification(data)


# --- the splitter --------------------------------------------------------------------------------------------


def test_splitter_on_exchange_style_stream() -> None:
    one, two, three = streaming(HEARTBEAT), streaming(NEW_MAIL), streaming(ERROR_CLOSED)
    stream = b'<?xml version="1.0" encoding="utf-8"?>' + one + b"\r\n" + two + b'<?xml version="1.0"?>\n' + three
    splitter = EnvelopeSplitter()
    assert splitter.feed(stream) == [one, two, three]
    assert splitter.pending_bytes == 0
    for size in (1, 2, 7, 64):
        splitter = EnvelopeSplitter()
        got = [e for i in range(0, len(stream), size) for e in splitter.feed(stream[i:i + size])]
        assert got == [one, two, three]


def test_splitter_is_not_fooled_by_cdata_comments_quotes_or_nested_envelopes() -> None:
    tricky = (b'<s:Envelope xmlns:s="' + SOAP_NS.encode() + b'"><s:Body a="x>y/>&#60;/s:Envelope>" b=\'/>\'>'
              b"<!-- </s:Envelope> --><x><![CDATA[</s:Envelope> <y>]]></x><e/><s:Envelope>inner</s:Envelope>"
              b"<?pi </s:Envelope>?></s:Body></s:Envelope>")
    etree.fromstring(tricky)  # well-formed, as a server could send it
    splitter = EnvelopeSplitter()
    assert [e for b in (tricky[i:i + 1] for i in range(len(tricky))) for e in splitter.feed(b)] == [tricky]


@pytest.mark.parametrize(("stream", "match"), [
    (b"<html><body>Bad gateway</body></html>", "expected a SOAP Envelope"),
    (b"garbage <s:Envelope>", "unexpected text"),
    (b'<!DOCTYPE s:Envelope [<!ENTITY x "y">]><s:Envelope/>', "refused"),
    (b"</s:Envelope>", "end tag"),
    (b"<s:Envelope/>", "empty"),
    (b"<![CDATA[x]]>", "CDATA"),
    (b"<?xml version='1.0' encoding='iso-2022-jp'?>", "refused"),
])
def test_splitter_refuses_what_is_not_an_envelope_stream(stream: bytes, match: str) -> None:
    with pytest.raises(EwsProtocolError, match=match):
        EnvelopeSplitter().feed(stream)


def test_splitter_refuses_oversize_envelopes_while_they_arrive() -> None:
    splitter = EnvelopeSplitter(max_envelope_bytes=1000)
    splitter.feed(b'<s:Envelope xmlns:s="' + SOAP_NS.encode() + b'"><s:Body>')
    fed = 0
    with pytest.raises(EwsProtocolError, match="over 1000 bytes"):  # noqa: PT012 - which feed trips it is the point
        for _ in range(100):
            splitter.feed(b"x" * 50)  # never completes: refused at the bound, not buffered forever
            fed += 1
    assert fed < 20
    exact = envelope("x" * 10, prefix="s")
    assert EnvelopeSplitter(max_envelope_bytes=len(exact)).feed(exact + exact) == [exact, exact]
    with pytest.raises(EwsProtocolError, match="over"):
        EnvelopeSplitter(max_envelope_bytes=len(exact) - 1).feed(exact)


def test_splitter_keeps_nothing_between_envelopes() -> None:
    splitter = EnvelopeSplitter(max_envelope_bytes=4096)
    for _ in range(1000):  # hours of heartbeats, declarations and whitespace: no growth
        assert splitter.feed(b'<?xml version="1.0" encoding="utf-8"?>\r\n' + streaming(HEARTBEAT) + b"  ")
    assert splitter.pending_bytes == 0


def test_splitter_is_linear_on_byte_sized_chunks() -> None:
    # A 256 KiB envelope (one long attribute, one long text) fed a byte at a time: a rescanning splitter would
    # do ~3e10 byte comparisons here and never finish within the test timeout.
    big = envelope('<x a="' + "v" * 131072 + '">' + "t" * 131072 + "</x>", prefix="s")
    splitter = EnvelopeSplitter()
    out = [e for i in range(len(big)) for e in splitter.feed(big[i:i + 1])]
    assert out == [big]


_PREFIXES = ["s", "soap", "soap11", "SOAP-ENV", ""]
_PIECES = [
    "<t:A/>", '<t:B x="1" y=\'>\'>text &amp; more</t:B>', "<!-- a comment with </Envelope> -->",
    "<t:C><![CDATA[ </soap:Envelope> <<< ]]></t:C>", '<t:D attr="/>"/>', "<?pi data?>", "\n  ",
    '<t:E Id="AAMkAD/+=="><t:F/></t:E>', "<t:G>&lt;/s:Envelope&gt;</t:G>",
]
_GAPS = ["", "\n", "\r\n  ", '<?xml version="1.0" encoding="utf-8"?>', "<!-- keep-alive -->",
         "<?xml version='1.0'?>\n"]


@st.composite
def _stream_of_envelopes(draw: st.DrawFn) -> tuple[list[bytes], bytes, list[int]]:
    envelopes = []
    stream = b""
    for _ in range(draw(st.integers(1, 6))):
        prefix = draw(st.sampled_from(_PREFIXES))
        inner = "".join(draw(st.lists(st.sampled_from(_PIECES), max_size=8)))
        nested = draw(st.booleans())
        if nested:  # an element of the same name inside: depth, not name matching, ends the envelope
            p = f"{prefix}:" if prefix else ""
            inner += f"<{p}Envelope><{p}Envelope/></{p}Envelope>"
        p = f"{prefix}:" if prefix else ""
        xmlns = f'xmlns:{prefix}="{SOAP_NS}"' if prefix else f'xmlns="{SOAP_NS}"'
        one = f'<{p}Envelope {xmlns} xmlns:t="{T_NS}"><{p}Body>{inner}</{p}Body></{p}Envelope>'.encode()
        envelopes.append(one)
        stream += draw(st.sampled_from(_GAPS)).encode() + one
    stream += draw(st.sampled_from(_GAPS)).encode()
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=40)))
    return envelopes, stream, cuts


@settings(max_examples=300, deadline=None)
@given(_stream_of_envelopes())
def test_splitter_yields_exactly_the_envelopes_under_any_chunking(case: tuple[list[bytes], bytes, list[int]]) -> None:
    envelopes, stream, cuts = case
    splitter = EnvelopeSplitter()
    out: list[bytes] = []
    last = 0
    for cut in [*cuts, len(stream)]:
        out += splitter.feed(stream[last:cut])
        last = cut
    assert out == envelopes
    assert splitter.pending_bytes == 0
    for one in out:
        etree.fromstring(one)


# --- building ------------------------------------------------------------------------------------------------


def _shape(element: Any) -> tuple[Any, ...]:
    return (element.tag, dict(element.attrib), (element.text or "").strip(), [_shape(c) for c in element])


def test_request_matches_what_exchangelib_would_send() -> None:
    ids = [SUB, "second/id+=="]
    ours = get_streaming_events_request(ids, 30, impersonate="anchor@example.com")
    service = SimpleNamespace(SERVICE_NAME="GetStreamingEvents", NS_MAP=EWSService.NS_MAP, _timezone=None,
                              _account_to_impersonate=Identity(primary_smtp_address="anchor@example.com"))
    theirs = EWSService.wrap(service, GetStreamingEvents.get_payload(service, ids, 30), "Exchange2016")
    assert _shape(etree.fromstring(ours)) == _shape(etree.fromstring(theirs))
    assert ours.startswith(b'<?xml version="1.0" encoding="utf-8"?>')


def test_request_without_impersonation_and_with_escaping() -> None:
    data = get_streaming_events_request(["a<b&c>\"'"], 1, impersonate=None, server_version="Exchange2013_SP1")
    root = etree.fromstring(data)
    header = root.find(f"{{{SOAP_NS}}}Header")
    assert [c.tag for c in header] == [f"{{{T_NS}}}RequestServerVersion"]
    assert header[0].get("Version") == "Exchange2013_SP1"
    ids = root.findall(f".//{{{M_NS}}}SubscriptionIds/{{{T_NS}}}SubscriptionId")
    assert [i.text for i in ids] == ["a<b&c>\"'"]
    assert root.findtext(f".//{{{M_NS}}}ConnectionTimeout") == "1"
    tricky = get_streaming_events_request(["x"], 5, impersonate="o'brien&co@example.com", server_version='E"x')
    parsed = etree.fromstring(tricky)
    assert parsed.findtext(f".//{{{T_NS}}}PrimarySmtpAddress") == "o'brien&co@example.com"
    assert parsed.find(f".//{{{T_NS}}}RequestServerVersion").get("Version") == 'E"x'


@pytest.mark.parametrize(("ids", "minutes"), [
    ([], 30), ([f"id{i}" for i in range(201)], 30), (["a"], 0), (["a"], 31), (["a"], True), (["a"], 1.5),
    ([""], 30), (["  "], 30), (["bad\x01id"], 30),
])
def test_request_bounds(ids: list[str], minutes: Any) -> None:
    with pytest.raises(ValueError):
        get_streaming_events_request(ids, minutes, impersonate=None)


def test_request_limits_are_inclusive_and_a_string_is_not_a_list() -> None:
    data = get_streaming_events_request([f"id{i}" for i in range(200)], 30, impersonate=None)
    assert len(etree.fromstring(data).findall(f".//{{{T_NS}}}SubscriptionId")) == 200
    with pytest.raises(TypeError):
        get_streaming_events_request("one-id", 30, impersonate=None)


@pytest.mark.parametrize("status", ["OK", "Unsubscribe"])
def test_reply_shape_matches_exchangelib(status: str) -> None:
    ours = send_notification_reply(status)  # type: ignore[arg-type]
    service = SendNotification(protocol=None)
    theirs = service.ok_payload() if status == "OK" else service.unsubscribe_payload()
    assert _shape(etree.fromstring(ours)) == _shape(etree.fromstring(theirs))
    assert etree.fromstring(ours).findtext(f".//{{{M_NS}}}SubscriptionStatus") == status
    with pytest.raises(ValueError):
        send_notification_reply("Maybe")  # type: ignore[arg-type]
