"""POST /ews/notification: where Exchange delivers push-subscription SendNotification posts (EWS push mode).

Exchange cannot authenticate to us, so each subscription's callback URL carries a secret token of the source
that made it; a post without a known token is refused, and one for a subscription that is no longer ours is
answered Unsubscribe, which ends it on the Exchange side."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Protocol

from aiohttp import web

from bemsmail.api.problems import Problem

PATH = "/ews/notification"
SOAP_CONTENT_TYPE = "text/xml"


class PushReceiver(Protocol):
    @property
    def push_path_token(self) -> str: ...

    async def handle_push(self, body: bytes) -> bytes: ...


PUSH_RECEIVERS: web.AppKey[Sequence[PushReceiver]] = web.AppKey("ews_push_receivers")


async def receive(request: web.Request) -> web.Response:
    from bemsmail.sources.ews.soap import EwsProtocolError

    token = request.query.get("t", "")
    receiver = next((r for r in request.app[PUSH_RECEIVERS] if hmac.compare_digest(r.push_path_token, token)), None)
    if receiver is None:
        raise Problem(403, "unknown-subscription", "this callback URL does not belong to a subscription of ours")
    if request.content_type not in (SOAP_CONTENT_TYPE, "application/soap+xml"):
        raise Problem(415, "unsupported-media-type", "SendNotification is posted as text/xml")
    body = await request.read()
    try:
        reply = await receiver.handle_push(body)
    except EwsProtocolError as exc:
        raise Problem(400, "malformed-notification", f"not a SendNotification envelope: {exc}") from None
    return web.Response(body=reply, content_type=SOAP_CONTENT_TYPE, charset="utf-8")


def add_routes(app: web.Application, receivers: Sequence[PushReceiver]) -> None:
    app[PUSH_RECEIVERS] = receivers
    app.router.add_post(PATH, receive)
