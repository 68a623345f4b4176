"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from bemsmail.api.context import METRICS, STORE
from bemsmail.api.schemas import Health
from bemsmail.store.schema import schema_problem

READY_TIMEOUT_SECONDS = 3.0
log = structlog.get_logger(__name__)


async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers. Says nothing about dependencies, so a DB outage does not restart us."""
    return web.json_response(Health(status="ok").model_dump())


async def readyz(request: web.Request) -> web.Response:
    """Ready: the database answers and its schema is the one this build expects."""
    store = request.app[STORE]
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS):
            await store.ping()
            checks["database"] = "ok"
            problem = schema_problem(await store.schema_status())
            checks["schema"] = problem or "ok"
    except TimeoutError:
        checks["database"] = f"no answer within {READY_TIMEOUT_SECONDS:g} s"
    except Exception as exc:  # any driver error means "not ready", and is logged for the operator
        log.warning("readiness_check_failed", error=type(exc).__name__)
        checks["database"] = f"unreachable ({type(exc).__name__})"
    ready = all(v == "ok" for v in checks.values()) and "schema" in checks
    body = Health(status="ok" if ready else "unavailable", checks=checks)
    return web.json_response(body.model_dump(), status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    return web.Response(body=m.render(), headers={"Content-Type": m.content_type})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    app.router.add_get("/metrics", metrics, allow_head=False)
