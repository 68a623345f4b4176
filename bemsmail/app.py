"""The composition root: builds every adapter from the config, starts them in order and stops them in reverse."""

from __future__ import annotations

import asyncio
import ssl

import structlog
from aiohttp import web

from bemsmail import __version__
from bemsmail.api.app import IN_FLIGHT, create_api
from bemsmail.api.auth import Authenticator
from bemsmail.cluster.memory import InProcessBus, OwnsEverything
from bemsmail.config import Config
from bemsmail.core.clock import SystemClock
from bemsmail.core.model import Backend, Platform
from bemsmail.core.registrations import RegistrationService
from bemsmail.core.tenants import Tenant, TenantDirectory
from bemsmail.metrics import Metrics
from bemsmail.store.engine import create_engine, safe_url
from bemsmail.store.schema import migrate, schema_problem, schema_status
from bemsmail.store.sql import SqlStore

log = structlog.get_logger(__name__)


class StartupError(Exception):
    """The node cannot start; the message tells the operator what to do."""


def tenant_directory(config: Config) -> TenantDirectory:
    return TenantDirectory(Tenant(t.name, Backend(t.backend), tuple(t.domains)) for t in config.tenants)


def app_platforms(config: Config) -> dict[str, Platform]:
    apps = {a.id: Platform.IOS for a in config.apns.apps}
    apps.update({a.id: Platform.ANDROID for a in config.fcm.apps})
    return apps


class Node:
    """One bemsmail process. `start()` brings it up, `stop()` drains it within the configured grace."""

    def __init__(self, config: Config, *, migrate_schema: bool = False) -> None:
        self.config = config
        self._migrate = migrate_schema
        self.clock = SystemClock()
        self.metrics = Metrics()
        self.bus = InProcessBus()
        self.ownership = OwnsEverything()
        self._engine = create_engine(config.database)
        self.store = SqlStore(self._engine, self.clock)
        self.service = RegistrationService(self.store, self.bus, tenant_directory(config), app_platforms(config))
        self.authenticator = Authenticator(config.api.auth)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        await self._check_schema()
        await self.authenticator.start()
        api = create_api(self.service, self.store, self.authenticator, self.metrics,
                         self.config.server.max_body_bytes)
        self._runner = web.AppRunner(
            api, access_log=None, shutdown_timeout=self.config.server.shutdown_grace_seconds,
            handle_signals=False,
        )
        await self._runner.setup()
        server = self.config.server
        site = web.TCPSite(self._runner, server.host, server.port, ssl_context=self._ssl_context(),
                           reuse_address=True)
        await site.start()
        sockets = self._runner.addresses
        self.port = sockets[0][1] if sockets else server.port
        log.info("node_started", version=__version__, host=server.host, port=self.port,
                 tls=server.tls is not None, database=safe_url(self.config.database),
                 node_id=self.config.cluster.node_id)

    async def _check_schema(self) -> None:
        try:
            status = await migrate(self._engine) if self._migrate else await schema_status(self._engine)
        except Exception as exc:
            raise StartupError(
                f"cannot use the database at {safe_url(self.config.database)}: {type(exc).__name__}: {exc}"
            ) from None
        problem = schema_problem(status)
        if problem:
            raise StartupError(problem)

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.config.server.tls
        if tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(tls.cert_file, tls.key_file)
        return context

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to the grace), then close pools."""
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()
            api = self._runner.app
            if not await api[IN_FLIGHT].drained(self.config.server.shutdown_grace_seconds):
                log.warning("drain_deadline_passed", in_flight=api[IN_FLIGHT].count)
            await self._runner.cleanup()
            self._runner = None
        await self.authenticator.close()
        await self.store.close()
        log.info("node_stopped")

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        await self.start()
        try:
            if ready is not None:
                ready.set()
            await stop.wait()
        finally:
            await self.stop()
