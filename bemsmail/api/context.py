"""Typed keys for what the API's handlers share through the aiohttp Application and Request."""

from __future__ import annotations

from aiohttp import web

from bemsmail.api.auth import Authenticator, Principal
from bemsmail.core.ports import Store
from bemsmail.core.registrations import RegistrationService
from bemsmail.metrics import Metrics

SERVICE = web.AppKey("service", RegistrationService)
STORE = web.AppKey("store", Store)
AUTH = web.AppKey("authenticator", Authenticator)
METRICS = web.AppKey("metrics", Metrics)
MAX_BODY = web.AppKey("max_body_bytes", int)
PRINCIPAL = web.RequestKey("principal", Principal)
REQUEST_ID = web.RequestKey("request_id", str)


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]
