"""/notificationClient and /notificationClient/lifecycle: where Microsoft Graph posts change and lifecycle
notifications for our subscriptions.

The validation handshake (`?validationToken=`) is answered before anything else, with the decoded token as
text/plain. A notification post is checked (source address, content type, size, JSON shape), handed to the Graph
sources without waiting for any push, and answered 202 at once: Graph counts answers over 2.9 s as slow and stops
delivering to endpoints that are often slow. Items with a wrong clientState are dropped and counted, never pushed;
unknown subscription ids are ignored. If the sources cannot queue more, the answer is 503 and Graph redelivers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any, Protocol

import structlog
from aiohttp import web

from bemsmail.api.problems import Problem

log = structlog.get_logger(__name__)

PATH = "/notificationClient"
LIFECYCLE_PATH = "/notificationClient/lifecycle"


class AcceptCounts(Protocol):
    accepted: int
    refused: int


class GraphReceiver(Protocol):
    def accept(self, items: Any) -> tuple[AcceptCounts, list[dict[str, Any]]]: ...

    def accept_lifecycle(self, items: Any) -> tuple[AcceptCounts, list[dict[str, Any]]]: ...

    def park(self, items: Sequence[dict[str, Any]]) -> bool: ...

    def ignore(self, count: int) -> None: ...


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    receivers: Sequence[GraphReceiver]
    max_body_bytes: int
    allowed_networks: Sequence[IPv4Network | IPv6Network] = ()
    trusted_proxies: Sequence[IPv4Network | IPv6Network] = ()


WEBHOOK: web.AppKey[WebhookSettings] = web.AppKey("graph_webhook")


def _without_port(hop: str) -> str:
    """Some proxies (Azure Application Gateway) forward `IP:port` or `[IPv6]:port`: the address alone."""
    if hop.startswith("["):
        return hop[1:].split("]", 1)[0]
    if hop.count(":") == 1:
        return hop.split(":", 1)[0]
    return hop


def client_address(request: web.Request, trusted: Sequence[IPv4Network | IPv6Network]) -> str | None:
    """The poster's address: the peer, or through trusted proxies the last X-Forwarded-For hop not one of them."""
    peer = request.remote
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    candidate = peer
    for hop in [peer, *reversed(hops)]:
        candidate = _without_port(hop or "")
        try:
            address = ip_address(candidate)
        except ValueError:
            return None
        if not any(address in net for net in trusted):
            return candidate
    return candidate


def _check_source(request: web.Request, settings: WebhookSettings) -> None:
    if not settings.allowed_networks:
        return
    address = client_address(request, settings.trusted_proxies)
    try:
        allowed = address is not None and any(ip_address(address) in net for net in settings.allowed_networks)
    except ValueError:
        allowed = False
    if not allowed:
        raise Problem(403, "source-not-allowed", "notifications are accepted only from the configured networks")


async def _items(request: web.Request, settings: WebhookSettings) -> list[Any]:
    if request.content_type != "application/json":
        raise Problem(415, "unsupported-media-type", "Graph posts notifications as application/json",
                      headers={"Accept-Post": "application/json"})
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise Problem(413, "body-too-large", f"the body is {request.content_length} bytes; the limit is {limit}")
    chunks, size = [], 0
    while chunk := await request.content.read(256 * 1024):
        size += len(chunk)
        if size > limit:
            raise Problem(413, "body-too-large", f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        document = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise Problem(400, "malformed-json", "the body is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("value"), list):
        raise Problem(400, "malformed-notification", "expected an object with a 'value' array of notifications")
    items: list[Any] = document["value"]
    return items


def _validation(request: web.Request) -> web.Response | None:
    token = request.query.get("validationToken")
    if token is None:
        return None
    # Echo exactly the decoded token, as plain text: never HTML, never re-encoded.
    return web.Response(text=token, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def _receive(request: web.Request, lifecycle: bool) -> web.StreamResponse:
    settings = request.app[WEBHOOK]
    _check_source(request, settings)
    answer = _validation(request)
    if answer is not None:
        return answer
    items = await _items(request, settings)
    refused = 0
    for receiver in settings.receivers:
        if not items:
            break
        counts, items = receiver.accept_lifecycle(items) if lifecycle else receiver.accept(items)
        refused += counts.refused
    # not ours, or perhaps of a subscription whose create answer has not reached us yet
    kept = [receiver.park(items) for receiver in settings.receivers] if items and not lifecycle else []
    if items and not any(kept):
        log.debug("graph_notification_unknown", count=len(items), lifecycle=lifecycle)
        if settings.receivers:
            settings.receivers[0].ignore(len(items))
    if refused:
        # Graph redelivers on 5xx; items already queued are dropped as duplicates then
        raise Problem(503, "busy", "notifications are arriving faster than they can be handed on",
                      headers={"Retry-After": "5"})
    return web.Response(status=202)


async def receive_notifications(request: web.Request) -> web.StreamResponse:
    return await _receive(request, lifecycle=False)


async def receive_lifecycle(request: web.Request) -> web.StreamResponse:
    return await _receive(request, lifecycle=True)


def add_routes(app: web.Application, settings: WebhookSettings) -> None:
    app[WEBHOOK] = settings
    app.router.add_post(PATH, receive_notifications)
    app.router.add_post(LIFECYCLE_PATH, receive_lifecycle)
