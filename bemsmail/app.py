"""The composition root: builds every adapter from the config, starts them in order and stops them in reverse."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta

import structlog
from aiohttp import web

from bemsmail import __version__
from bemsmail.api import graph_webhook
from bemsmail.api.app import IN_FLIGHT, create_api
from bemsmail.api.auth import Authenticator
from bemsmail.cluster.memory import InProcessBus, OwnsEverything
from bemsmail.config import Config
from bemsmail.core.clock import SystemClock
from bemsmail.core.model import Backend, ItemDetails, MailboxEvent, Platform
from bemsmail.core.ports import MailDetails, PushSender
from bemsmail.core.registrations import RegistrationService
from bemsmail.core.relay import Relay, RelayPolicy
from bemsmail.core.rules import RulePolicy
from bemsmail.core.tenants import Tenant, TenantDirectory
from bemsmail.core.watching import Watcher
from bemsmail.metrics import Metrics, PushMetrics, RelayMetrics
from bemsmail.push.dispatcher import Dispatcher, RetryPolicy
from bemsmail.sources.ews.source import EwsSource
from bemsmail.sources.graph.source import GraphSource
from bemsmail.sources.migration import (
    REPORT_ACTION,
    EwsDisabledReport,
    MigratingSource,
    MigrationStats,
    rest_id_sink,
)
from bemsmail.store.engine import create_engine, safe_url
from bemsmail.store.schema import migrate, schema_problem, schema_status
from bemsmail.store.sql import SqlStore

log = structlog.get_logger(__name__)


class StartupError(Exception):
    """The node cannot start; the message tells the operator what to do."""


def tenant_directory(config: Config) -> TenantDirectory:
    return TenantDirectory(Tenant(t.name, Backend(t.backend), tuple(t.domains), t.rich_content)
                           for t in config.tenants)


def app_platforms(config: Config) -> dict[str, Platform]:
    apps = {a.id: Platform.IOS for a in config.apns.apps}
    apps.update({a.id: Platform.ANDROID for a in config.fcm.apps})
    return apps


def retry_policy(config: Config) -> RetryPolicy:
    push = config.push
    return RetryPolicy(
        max_attempts=push.max_attempts, deadline_seconds=push.deadline_seconds,
        backoff_initial_seconds=push.backoff_initial_seconds, backoff_max_seconds=push.backoff_max_seconds,
        quota_backoff_seconds=push.quota_backoff_seconds, circuit_failures=push.circuit_failures,
        circuit_open_seconds=push.circuit_open_seconds, config_failure_log_seconds=push.config_failure_log_seconds,
    )


def relay_policy(config: Config, tenants: TenantDirectory) -> RelayPolicy:
    relay = config.relay

    def rich_allowed(mailbox: str) -> bool:
        tenant = tenants.resolve(mailbox)
        return tenant is not None and tenant.rich_content

    return RelayPolicy(
        rules=RulePolicy(stale_after=timedelta(hours=relay.stale_after_hours),
                         delete_after=timedelta(days=relay.delete_after_days)),
        dedupe_window_seconds=relay.dedupe_window_seconds,
        dedupe_max_entries=relay.dedupe_max_entries,
        coalesce_seconds=relay.coalesce_seconds,
        rich_content=rich_allowed,
        background_apps=frozenset(
            [a.id for a in config.apns.apps if a.push_kind == "background"]
            + [a.id for a in config.fcm.apps if a.push_kind == "background"]
        ),
    )


def build_dispatcher(config: Config, dispatcher: Dispatcher) -> None:
    """One lane per configured app, each with its own sender, concurrency and queue."""
    from bemsmail.push.apns import ApnsSender
    from bemsmail.push.fcm import FcmSender

    senders: list[tuple[str, str, PushSender, int]] = []
    senders += [("apns", app.id, ApnsSender(app), app.concurrency) for app in config.apns.apps]
    senders += [("fcm", app.id, FcmSender(app), app.concurrency) for app in config.fcm.apps]
    for provider, app_id, sender, concurrency in senders:
        dispatcher.add_app(provider, app_id, sender, concurrency, config.push.queue_size)


class TenantDetails:
    """MailDetails for the relay: asks the source of the mailbox's tenant."""

    def __init__(self, tenants: TenantDirectory, sources: Mapping[str, MailDetails]) -> None:
        self._tenants = tenants
        self._sources = sources

    def _source(self, mailbox: str) -> MailDetails | None:
        tenant = self._tenants.resolve(mailbox)
        return self._sources.get(tenant.name) if tenant is not None else None

    async def item_details(self, mailbox: str, item_ids: Sequence[str]) -> Mapping[str, ItemDetails]:
        source = self._source(mailbox)
        return {} if source is None else await source.item_details(mailbox, item_ids)

    async def unread_count(self, mailbox: str) -> int | None:
        source = self._source(mailbox)
        return None if source is None else await source.unread_count(mailbox)


MailSourceImpl = EwsSource | GraphSource | MigratingSource


def build_sources(config: Config, store: SqlStore, clock: SystemClock,
                  sink: Callable[[MailboxEvent], Awaitable[None]]) -> dict[str, MailSourceImpl]:
    """One mail source per tenant: for its backend, or a MigratingSource over both while its mailboxes move
    from EWS to Graph (docs/migration.md)."""
    sources: dict[str, MailSourceImpl] = {}
    for t in config.tenants:
        if (t.migrating or t.migrates_on_ews_disabled) and t.ews and t.graph:
            ews = EwsSource(t.ews, store, clock, rest_id_sink(sink))
            graph = GraphSource(t.graph, store, clock, sink, name=t.name, queue_limit=config.webhook.queue_limit)
            sources[t.name] = MigratingSource(t.name, ews, graph, store, clock, t.migration, move_all=t.migrating)
        elif t.backend == "ews" and t.ews:
            source = EwsSource(t.ews, store, clock, sink)
            source.call_failed = EwsDisabledReport(t.name, MigrationStats(), action=REPORT_ACTION)
            sources[t.name] = source
        elif t.backend == "graph" and t.graph:
            sources[t.name] = GraphSource(t.graph, store, clock, sink, name=t.name,
                                          queue_limit=config.webhook.queue_limit)
    return sources


def inner_sources(sources: Mapping[str, MailSourceImpl]) -> Iterator[tuple[str, EwsSource | GraphSource]]:
    """Every protocol source by tenant name, also those a MigratingSource wraps (metrics, webhook, push)."""
    for name, source in sources.items():
        if isinstance(source, MigratingSource):
            yield name, source.ews
            yield name, source.graph
        else:
            yield name, source


def migration_stats(sources: Mapping[str, MailSourceImpl]) -> dict[str, MigrationStats]:
    """Each tenant's migration figures: migrating tenants', and EWS tenants' 403 counts."""
    found: dict[str, MigrationStats] = {}
    for name, source in sources.items():
        if isinstance(source, MigratingSource):
            found[name] = source.stats
        elif isinstance(source, EwsSource) and isinstance(source.call_failed, EwsDisabledReport):
            found[name] = source.call_failed.stats
    return found


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
        tenants = tenant_directory(config)
        self.service = RegistrationService(self.store, self.bus, tenants, app_platforms(config))
        self.dispatcher = Dispatcher(self.clock, retry_policy(config), observer=PushMetrics(self.metrics))
        build_dispatcher(config, self.dispatcher)
        self.metrics.watch_dispatcher(self.dispatcher, self._credential_expiry)
        self.sources = build_sources(config, self.store, self.clock, self._on_event)
        self.relay = Relay(self.store, self.dispatcher, self.bus, self.clock, relay_policy(config, tenants),
                           RelayMetrics(self.metrics), details=TenantDetails(tenants, self.sources))
        self.metrics.watch_sources({n: s for n, s in inner_sources(self.sources) if isinstance(s, EwsSource)})
        self.metrics.watch_graph({n: s for n, s in inner_sources(self.sources) if isinstance(s, GraphSource)})
        self.metrics.watch_migrations(migration_stats(self.sources))
        self.watcher = Watcher(self.store, self.bus, self.clock, self.ownership, tenants, self.sources)
        self._watching = False
        self._pushing = False
        self.authenticator = Authenticator(config.api.auth)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def _on_event(self, event: MailboxEvent) -> None:
        await self.relay.on_event(event)

    def _credential_expiry(self) -> Iterator[tuple[str, str, datetime | None]]:
        for lane in self.dispatcher.lanes.values():
            yield lane.provider, lane.app_id, lane.sender.credential_expiry()

    async def start(self) -> None:
        """Pushing first, then the sources (each loads what it knows), then the HTTP server (Graph validates
        /notificationClient while subscriptions are made), then watching every mailbox."""
        await self._check_schema()
        await self.authenticator.start()
        await self.start_pushing()
        for source in self.sources.values():
            await source.start()
        self._watching = True
        api = self.build_api()
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
        await self.watcher.start()

    def build_api(self) -> web.Application:
        """The HTTP application: registration API, health, metrics, EWS push callback and Graph webhook."""
        hook = self.config.webhook
        webhook = graph_webhook.WebhookSettings(
            [s for _, s in inner_sources(self.sources) if isinstance(s, GraphSource)], hook.max_body_bytes,
            hook.allowed_networks, hook.trusted_proxies)
        return create_api(self.service, self.store, self.authenticator, self.metrics,
                          self.config.server.max_body_bytes,
                          push_receivers=[s for _, s in inner_sources(self.sources)
                                          if isinstance(s, EwsSource) and s.settings.mode == "push"],
                          webhook=webhook)

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

    async def start_pushing(self) -> None:
        """Senders, dispatcher lanes and the relay: everything between a mailbox event and a push."""
        await asyncio.gather(*(lane.sender.start() for lane in self.dispatcher.lanes.values()))
        self.dispatcher.start()
        self.relay.start()
        self._pushing = True

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to the grace), flush the relay, let queued pushes go
        out (within the grace), then close senders and pools."""
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()
            api = self._runner.app
            if not await api[IN_FLIGHT].drained(self.config.server.shutdown_grace_seconds):
                log.warning("drain_deadline_passed", in_flight=api[IN_FLIGHT].count)
            await self._runner.cleanup()
            self._runner = None
        if self._watching:
            await self.watcher.stop()
            await asyncio.gather(*(source.stop() for source in self.sources.values()))
            self._watching = False
        if self._pushing:
            await self.relay.stop()
            await self.dispatcher.stop(self.config.server.shutdown_grace_seconds)
            self._pushing = False
        else:
            await asyncio.gather(*(lane.sender.close() for lane in self.dispatcher.lanes.values()))
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
