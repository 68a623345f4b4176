"""The aiohttp application: middlewares for request ids, metrics, authentication and problem documents."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence

import structlog
from aiohttp import web

from bemsmail.api import ews_push, graph_webhook, health, openapi, registrations
from bemsmail.api.auth import Authenticator, AuthError, AuthUnavailable
from bemsmail.api.context import AUTH, MAX_BODY, METRICS, PRINCIPAL, REQUEST_ID, SERVICE, STORE
from bemsmail.api.problems import Problem, from_http_exception
from bemsmail.core.ports import Store
from bemsmail.core.registrations import RegistrationService
from bemsmail.log import EventLog
from bemsmail.metrics import Metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class InFlight:
    """Counts requests being handled, so a stopping node can wait for them before closing connections
    (aiohttp drops the rest of a body that is still arriving once it starts closing connections)."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def drained(self, grace_seconds: float) -> bool:
        try:
            async with asyncio.timeout(grace_seconds):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


IN_FLIGHT = web.AppKey("in_flight", InFlight)
log = structlog.get_logger("bemsmail.api")
#: the canonical line per request, on the cheap path (the full pipeline cost a seventh of a registration's CPU)
request_log = EventLog("bemsmail.api", "request", ("method", "route", "status", "duration_ms"))

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", openapi.PATH, ews_push.PATH, graph_webhook.PATH,
                          graph_webhook.LIFECYCLE_PATH})


def _route_label(request: web.Request) -> str:
    """The route template, never the raw path: bounded label values, and no ids or addresses in metrics."""
    route = request.match_info.route
    resource = route.resource
    return resource.canonical if resource is not None else "unmatched"


NOTIFICATION_ROUTES = frozenset({graph_webhook.PATH, graph_webhook.LIFECYCLE_PATH, ews_push.PATH})


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, one canonical log line, metrics, and problem documents for every error."""
    incoming = request.headers.get("X-Request-ID", "")
    # 32 random hex digits, as uuid4().hex gave, without building a UUID object
    request_id = incoming if _REQUEST_ID.match(incoming) else secrets.token_hex(16)
    request[REQUEST_ID] = request_id
    started = time.perf_counter()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    in_flight = request.app[IN_FLIGHT]
    in_flight.enter()
    try:
        try:
            response = await handler(request)
        except Problem as problem:
            response = problem.to_response(request_id)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = from_http_exception(exc).to_response(request_id)
        except Exception:
            log.exception("request_failed", method=request.method, route=_route_label(request))
            failure = Problem(500, "internal", "the server failed to answer; the request id is in the logs")
            response = failure.to_response(request_id)
        response.headers["X-Request-ID"] = request_id
        elapsed = time.perf_counter() - started
        route = _route_label(request)
        status = response.status
        request.app[METRICS].http_answered(route, request.method, status, elapsed)
        # Graph and Exchange post notifications thousands of times a second: their successes are debug lines
        level = logging.DEBUG if route in NOTIFICATION_ROUTES and status < 400 else logging.INFO
        request_log.emit(level, request_id, request.method, route, status, round(elapsed * 1000, 2))
        return response
    finally:
        in_flight.leave()
        structlog.contextvars.unbind_contextvars("request_id")


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS or request.match_info.route.resource is None:
        return await handler(request)
    try:
        request[PRINCIPAL] = await request.app[AUTH].authenticate(
            request.headers.get("Authorization"), request.headers.get("X-API-Key")
        )
    except AuthError as exc:
        raise Problem(401, "unauthorized", exc.detail, headers={"WWW-Authenticate": 'Bearer, ApiKey'}) from None
    except AuthUnavailable as exc:
        raise Problem(503, "auth-unavailable", exc.detail, headers={"Retry-After": "5"}) from None
    structlog.contextvars.bind_contextvars(principal=request[PRINCIPAL].name)
    try:
        return await handler(request)
    finally:
        structlog.contextvars.unbind_contextvars("principal")


def create_api(
    service: RegistrationService,
    store: Store,
    authenticator: Authenticator,
    metrics: Metrics,
    max_body_bytes: int,
    push_receivers: Sequence[ews_push.PushReceiver] = (),
    webhook: graph_webhook.WebhookSettings | None = None,
) -> web.Application:
    app = web.Application(middlewares=[observe, authenticate], client_max_size=max_body_bytes)
    app[SERVICE] = service
    app[STORE] = store
    app[AUTH] = authenticator
    app[METRICS] = metrics
    app[MAX_BODY] = max_body_bytes
    app[IN_FLIGHT] = InFlight()
    registrations.add_routes(app)
    health.add_routes(app)
    openapi.add_routes(app)
    ews_push.add_routes(app, push_receivers)
    graph_webhook.add_routes(app, webhook or graph_webhook.WebhookSettings((), max_body_bytes))
    return app
