"""Helpers for driving the mock Exchange server: exchangelib accounts, raw SOAP requests and a reader of the
streaming body's successive envelopes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiohttp
from exchangelib import BASIC, IMPERSONATION, Account, Configuration, Credentials, FailFast, Version
from exchangelib.version import EXCHANGE_2016
from lxml import etree  # type: ignore[import-untyped]

from bemsmail.mocks.ews import MESSAGES_NS, SOAP_NS, TYPES_NS, MockExchange

M = f"{{{MESSAGES_NS}}}"
T = f"{{{TYPES_NS}}}"
S = f"{{{SOAP_NS}}}"


def account(mock: MockExchange, address: str, *, user: str = "svc", password: str = "secret",  # noqa: S107
            auth_type: str = BASIC, max_connections: int = 4, endpoint_suffix: str = "") -> Account:
    """An exchangelib Account impersonating `address` on the mock (no Autodiscover, no version guessing).
    exchangelib shares one Protocol per (endpoint, credentials): `endpoint_suffix` gives an Account its own."""
    config = Configuration(service_endpoint=mock.ews_url + endpoint_suffix, credentials=Credentials(user, password),
                           auth_type=auth_type, version=Version(build=EXCHANGE_2016),
                           max_connections=max_connections, retry_policy=FailFast())
    return Account(address, config=config, autodiscover=False, access_type=IMPERSONATION)


def envelope(body: str, *, impersonate: str | None = None) -> bytes:
    header = ('<t:RequestServerVersion Version="Exchange2016"/>'
              + (f"<t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>{impersonate}"
                 "</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation>" if impersonate else ""))
    return (f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP_NS}" xmlns:m="{MESSAGES_NS}" '
            f'xmlns:t="{TYPES_NS}"><s:Header>{header}</s:Header><s:Body>{body}</s:Body></s:Envelope>').encode()


def subscribe_body(kind: str = "Streaming", folder: str = "inbox", events: Iterable[str] = ("NewMailEvent",),
                   extra: str = "") -> str:
    types = "".join(f"<t:EventType>{e}</t:EventType>" for e in events)
    return (f"<m:Subscribe><m:{kind}SubscriptionRequest><t:FolderIds><t:DistinguishedFolderId Id=\"{folder}\"/>"
            f"</t:FolderIds><t:EventTypes>{types}</t:EventTypes>{extra}</m:{kind}SubscriptionRequest></m:Subscribe>")


def streaming_body(ids: Iterable[str], minutes: int = 1) -> str:
    listed = "".join(f"<t:SubscriptionId>{i}</t:SubscriptionId>" for i in ids)
    return (f"<m:GetStreamingEvents><m:SubscriptionIds>{listed}</m:SubscriptionIds>"
            f"<m:ConnectionTimeout>{minutes}</m:ConnectionTimeout></m:GetStreamingEvents>")


def affinity_headers(anchor: str, cookie: str | None = None, *, as_cookie: bool = True) -> dict[str, str]:
    headers = {"X-AnchorMailbox": anchor, "X-PreferServerAffinity": "true"}
    if cookie:
        headers["Cookie" if as_cookie else "X-BackEndOverrideCookie"] = (
            f"X-BackEndOverrideCookie={cookie}" if as_cookie else cookie)
    return headers


class Soap:
    """Raw SOAP over one aiohttp session (basic auth svc/secret); each answer parsed with lxml."""

    def __init__(self, mock: MockExchange, session: aiohttp.ClientSession) -> None:
        self.mock = mock
        self.session = session
        self.auth_header = {"Authorization": aiohttp.encode_basic_auth("svc", "secret")}

    async def post(self, body: str, *, impersonate: str | None = None,
                   headers: Mapping[str, str] | None = None) -> tuple[int, Any, Mapping[str, str]]:
        all_headers = {"Content-Type": "text/xml; charset=utf-8", **self.auth_header, **(headers or {})}
        if impersonate and "X-AnchorMailbox" not in all_headers:
            all_headers["X-AnchorMailbox"] = impersonate
        async with self.session.post(self.mock.ews_url, data=envelope(body, impersonate=impersonate),
                                     headers=all_headers) as response:
            raw = await response.read()
            return response.status, etree.fromstring(raw), response.headers

    async def subscribe(self, mailbox: str, *, headers: Mapping[str, str] | None = None, **kwargs: Any) -> str:
        status, root, _ = await self.post(subscribe_body(**kwargs), impersonate=mailbox, headers=headers)
        assert status == 200
        sid = root.findtext(f".//{M}SubscriptionId")
        assert sid, etree.tostring(root)
        return str(sid)

    async def open_stream(self, ids: Iterable[str], *, impersonate: str, minutes: int = 1,
                          headers: Mapping[str, str] | None = None) -> StreamReader:
        all_headers = {"Content-Type": "text/xml; charset=utf-8", "X-AnchorMailbox": impersonate, **self.auth_header,
                       **(headers or {})}
        response = await self.session.post(self.mock.ews_url, data=envelope(streaming_body(ids, minutes),
                                                                            impersonate=impersonate),
                                           headers=all_headers)
        return StreamReader(response)


class StreamReader:
    """Reads a GetStreamingEvents body envelope by envelope."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.buffer = b""

    async def next(self, within: float = 10.0) -> Any | None:
        """The next envelope (parsed), or None at the end of the body."""
        end = b"</s:Envelope>"
        async with asyncio.timeout(within):
            while end not in self.buffer:
                chunk = await self.response.content.readany()
                if not chunk:
                    return None
                self.buffer += chunk
        doc, self.buffer = self.buffer.split(end, 1)
        return etree.fromstring(doc + end)

    async def next_matching(self, predicate: Callable[[Any], bool], within: float = 10.0) -> Any:
        """Skip heartbeats (and anything else not matching) until an envelope matches."""
        async with asyncio.timeout(within):
            while True:
                doc = await self.next(within)
                assert doc is not None, "the stream ended"
                if predicate(doc):
                    return doc

    async def drain(self) -> int:
        """Read to the end of the body; returns how many envelopes came."""
        count = 0
        while await self.next() is not None:
            count += 1
        return count

    def close(self) -> None:
        self.response.close()


def messages(doc: Any) -> list[Any]:
    return list(doc.iter(f"{M}GetStreamingEventsResponseMessage"))


def codes(doc: Any) -> list[str]:
    return [str(m.findtext(f"{M}ResponseCode")) for m in messages(doc)]


def error_ids(doc: Any) -> list[str]:
    return [str(e.text) for e in doc.iter(f"{M}ErrorSubscriptionIds") for e in e]


def connection_status(doc: Any) -> list[str]:
    return [str(m.findtext(f"{M}ConnectionStatus")) for m in messages(doc)]


def has_notifications(doc: Any) -> bool:
    return doc.find(f".//{M}Notification") is not None


def is_heartbeat(doc: Any) -> bool:
    return codes(doc) == ["NoError"] and connection_status(doc) == ["OK"] and not has_notifications(doc)


def addresses_on_distinct_backends(mock: MockExchange, domain: str = "example.com") -> tuple[str, str]:
    """Two mailboxes living on different backends."""
    first = f"anchor@{domain}"
    for i in range(1000):
        other = f"member{i}@{domain}"
        if mock.backend_of(other) != mock.backend_of(first):
            return first, other
    raise AssertionError("no two backends found")
