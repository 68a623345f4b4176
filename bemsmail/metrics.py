"""Prometheus metrics: one registry per running node that every adapter registers its instruments in."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from bemsmail.core.model import MailboxEvent, Outcome, OutcomeKind, PushMessage, Registration
from bemsmail.core.relay import RelayObserver
from bemsmail.core.rules import Verdict
from bemsmail.push.dispatcher import Dispatcher, Lane, LaneObserver

if TYPE_CHECKING:
    from bemsmail.sources.ews.source import EwsSource
    from bemsmail.sources.graph.source import GraphSource
    from bemsmail.sources.migration import MigrationStats

log = structlog.get_logger(__name__)

# `*_created` timestamps double the series count and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: labelled children kept per Metrics for the HTTP series (the method label is the client's: bound the cache)
_MAX_HTTP_CHILDREN = 512

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The node's instruments. Labels never carry tokens, addresses or other per-user values."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "bemsmail_http_requests_total",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "bemsmail_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registration_changes = Counter(
            "bemsmail_registration_changes_total",
            "Registrations created, updated, deleted or moved (token seen under a new device or mailbox).",
            ["change"],
            registry=self.registry,
        )
        # labels() costs more than the increment it leads to; the API answers thousands of requests a second
        self._http_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._change_children: dict[str, Counter] = {}

        self.pushes = Counter(
            "bemsmail_pushes_total",
            "Notifications finished, by provider, app and final outcome (gave_up: retries or deadline ran out).",
            ["provider", "app", "outcome"], registry=self.registry,
        )
        self.push_attempts = Counter(
            "bemsmail_push_attempts_total",
            "Sends to a provider (each retry counts), by provider, app and what the provider said.",
            ["provider", "app", "outcome"], registry=self.registry,
        )
        self.push_latency = Histogram(
            "bemsmail_push_send_duration_seconds",
            "Time for one send to a provider to be answered (or time out).",
            ["provider", "app"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.push_dropped = Counter(
            "bemsmail_push_dropped_total",
            "Notifications dropped before sending, by reason (queue_full: the app's queue overflowed).",
            ["provider", "app", "reason"], registry=self.registry,
        )
        self.relay_events = Counter(
            "bemsmail_relay_events_total",
            "Mailbox events seen by the relay, by kind and what became of them.",
            ["kind", "result"], registry=self.registry,
        )
        self.relay_verdicts = Counter(
            "bemsmail_relay_verdicts_total",
            "Per-device rule decisions, by action and reason.",
            ["action", "reason"], registry=self.registry,
        )
        self.registrations_deleted = Counter(
            "bemsmail_registrations_deleted_total",
            "Registrations deleted by bemsmail itself: dead tokens (by provider reason) and expired ones.",
            ["reason"], registry=self.registry,
        )
        self.store_errors = Counter(
            "bemsmail_relay_store_errors_total",
            "Bookkeeping writes of the relay that failed (and were retried or dropped).",
            ["operation"], registry=self.registry,
        )

    def http_answered(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration (the labelled children are cached)."""
        key = (route, method, status)
        children = self._http_children.get(key)
        if children is None:
            children = (self.http_requests.labels(route, method, str(status)), self.http_latency.labels(route, method))
            if len(self._http_children) < _MAX_HTTP_CHILDREN:
                self._http_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def registration_changed(self, change: str, count: int = 1) -> None:
        """`change`: created, updated, deleted or moved."""
        child = self._change_children.get(change)
        if child is None:
            child = self._change_children[change] = self.registration_changes.labels(change)
        child.inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def watch_dispatcher(self, dispatcher: Dispatcher,
                         credential_expiry: Callable[[], Iterable[tuple[str, str, datetime | None]]]) -> None:
        """Queue depth, in-flight sends, circuit state and credential expiry, read at scrape time (nothing on
        the hot path)."""
        self.registry.register(_DispatcherCollector(dispatcher, credential_expiry))

    def watch_sources(self, sources: Mapping[str, EwsSource]) -> None:
        self.registry.register(_SourceCollector(sources))

    def watch_graph(self, sources: Mapping[str, GraphSource]) -> None:
        self.registry.register(_GraphCollector(sources))

    def watch_migrations(self, migrations: Mapping[str, MigrationStats]) -> None:
        """Tenants moving from EWS to Graph, and EWS tenants' 403 answers (EWS disabled in Exchange Online)."""
        self.registry.register(_MigrationCollector(migrations))


class _MigrationCollector(Collector):
    """Migrations, read at scrape time: mailboxes waiting and moving, moves done, EWS answering 403."""

    def __init__(self, migrations: Mapping[str, MigrationStats]) -> None:
        self._migrations = migrations

    def collect(self) -> Iterable[Metric]:
        tenant = ["tenant"]
        pending = GaugeMetricFamily("bemsmail_migration_pending",
                                    "Mailboxes still on EWS waiting for their move to Graph to start.", labels=tenant)
        moving = GaugeMetricFamily("bemsmail_migration_moving",
                                   "Moves started, waiting for Graph to be live (EWS still watches).", labels=tenant)
        moved = CounterMetricFamily("bemsmail_migration_moved", "Mailboxes moved from EWS to Graph.", labels=tenant)
        stalled = CounterMetricFamily("bemsmail_migration_stalled",
                                      "Moves undone because Graph did not become live in time (queued again).",
                                      labels=tenant)
        disabled = CounterMetricFamily("bemsmail_ews_disabled",
                                       "EWS answers of 403 Forbidden: EWS is disabled in Exchange Online.",
                                       labels=tenant)
        for name, stats in self._migrations.items():
            pending.add_metric([name], stats.pending)
            moving.add_metric([name], stats.moving)
            moved.add_metric([name], stats.moved)
            stalled.add_metric([name], stats.stalled)
            disabled.add_metric([name], stats.ews_disabled)
        return [pending, moving, moved, stalled, disabled]


class _GraphCollector(Collector):
    """Graph sources, read at scrape time: subscriptions, the write budget, notifications, lifecycle, catch-ups."""

    def __init__(self, sources: Mapping[str, GraphSource]) -> None:
        self._sources = sources

    def collect(self) -> Iterable[Metric]:
        tenant = ["tenant"]
        gauges = {
            name: GaugeMetricFamily(f"bemsmail_graph_{name}", text, labels=tenant)
            for name, text in (
                ("subscriptions", "Watched mailboxes with a live Graph subscription."),
                ("pending_writes", "Subscription writes (create, renew, delete) waiting for the write budget."),
                ("budget_used", "Subscription writes spent in the current 20-second window."),
                ("events_pending", "Notifications accepted and not yet handed to the relay."),
            )
        }
        counters = {
            name: CounterMetricFamily(f"bemsmail_graph_{name}", text, labels=tenant)
            for name, text in (
                ("creates", "Subscriptions created."),
                ("create_failures", "Subscription creates that failed (retried with back-off)."),
                ("renewals", "Subscriptions renewed."),
                ("renew_failures", "Renewals that failed or found the subscription gone."),
                ("deletes", "Subscriptions deleted (unwatched mailboxes and orphans)."),
                ("throttled", "Subscription writes answered 429."),
                ("refused_mailboxes", "Creates refused with 403/404 (mailbox or permission)."),
                ("notifications", "Change notifications accepted."),
                ("forged", "Notifications with a wrong clientState (dropped)."),
                ("unknown", "Notifications for subscriptions that are not ours (ignored)."),
                ("malformed", "Notification items that could not be read."),
                ("duplicates", "Notifications for items already handed on (redeliveries)."),
                ("catch_ups", "Delta rounds completed."),
                ("catch_up_failures", "Delta rounds that failed (retried)."),
                ("caught_up_items", "Mail found by delta rounds and handed on (missed by notifications)."),
                ("orphans_deleted", "Subscriptions Graph had that no watched mailbox owned."),
            )
        }
        lifecycle = CounterMetricFamily("bemsmail_graph_lifecycle", "Lifecycle notifications, by event.",
                                        labels=["tenant", "event"])
        for name, source in self._sources.items():
            gauges["subscriptions"].add_metric([name], source.subscribed())
            gauges["pending_writes"].add_metric([name], source.pending_writes())
            gauges["budget_used"].add_metric([name], source.budget.used())
            gauges["events_pending"].add_metric([name], source.events_pending())
            for counter_name, family in counters.items():
                family.add_metric([name], getattr(source.stats, counter_name))
            for event, count in source.stats.lifecycle.items():
                if event in ("reauthorizationRequired", "subscriptionRemoved", "missed"):
                    lifecycle.add_metric([name, event], count)
        return [*gauges.values(), *counters.values(), lifecycle]


class _SourceCollector(Collector):
    """EWS sources, read at scrape time: subscriptions, groups streaming, reconnects, catch-ups, stream errors."""

    def __init__(self, sources: Mapping[str, EwsSource]) -> None:
        self._sources = sources

    def collect(self) -> Iterable[Metric]:
        tenant = ["tenant"]
        subscribed = GaugeMetricFamily("bemsmail_ews_subscriptions", "Mailboxes with a live EWS subscription.",
                                       labels=tenant)
        groups = GaugeMetricFamily("bemsmail_ews_groups", "Streaming groups, by whether their stream is open.",
                                   labels=["tenant", "state"])
        counters = {
            name: CounterMetricFamily(f"bemsmail_ews_{name}", text, labels=tenant)
            for name, text in (
                ("subscribe_failures", "Subscribe calls that failed (each is retried with back-off)."),
                ("connections", "GetStreamingEvents connections opened."),
                ("stream_failures", "Streams that dropped, went silent past the watchdog or were refused."),
                ("stream_events", "Mail events read from streams and push notifications."),
                ("catch_ups", "Mailboxes caught up with SyncFolderItems."),
                ("caught_up_items", "Mail found by catch-up and handed on (missed by the stream)."),
                ("events_dropped", "Events not queued because the relay was behind (found again by catch-up)."),
                ("push_gaps", "Push notifications missed (PreviousWatermark), replayed from the last watermark."),
                ("push_silent", "Push subscriptions silent past twice StatusFrequency and replaced."),
            )
        }
        errors = CounterMetricFamily("bemsmail_ews_stream_errors", "Error codes in stream responses.",
                                     labels=["tenant", "code"])
        for name, source in self._sources.items():
            subscribed.add_metric([name], source.subscribed())
            streaming = source.streaming_groups()
            groups.add_metric([name, "streaming"], streaming)
            groups.add_metric([name, "down"], sum(1 for g in source.groups if g.members) - streaming)
            for counter_name, family in counters.items():
                family.add_metric([name], getattr(source.stats, counter_name))
            for code, count in source.stats.stream_errors.items():
                errors.add_metric([name, code], count)
        return [subscribed, groups, *counters.values(), errors]


class _DispatcherCollector(Collector):
    def __init__(self, dispatcher: Dispatcher,
                 credential_expiry: Callable[[], Iterable[tuple[str, str, datetime | None]]]) -> None:
        self._dispatcher = dispatcher
        self._expiry = credential_expiry

    def collect(self) -> Iterable[Metric]:
        labels = ["provider", "app"]
        depth = GaugeMetricFamily("bemsmail_push_queue_depth",
                                  "Notifications waiting in an app's queue (incl. those waiting to retry).",
                                  labels=labels)
        in_flight = GaugeMetricFamily("bemsmail_push_in_flight", "Sends awaiting the provider's answer.", labels=labels)
        circuit = GaugeMetricFamily("bemsmail_push_circuit_state",
                                    "An app's circuit breaker: 0 closed, 1 half-open (one trial), 2 open.",
                                    labels=labels)
        for lane in self._dispatcher.lanes.values():
            key = [lane.provider, lane.app_id]
            depth.add_metric(key, lane.depth)
            in_flight.add_metric(key, lane.in_flight)
            circuit.add_metric(key, int(lane.state))
        expiry = GaugeMetricFamily("bemsmail_push_credential_expiry_timestamp_seconds",
                                   "When an app's APNs certificate or FCM credential expires (Unix time); "
                                   "absent for credentials that do not expire (.p8 keys).", labels=labels)
        for provider, app, when in self._expiry():
            if when is not None:
                expiry.add_metric([provider, app], when.timestamp())
        return [depth, in_flight, circuit, expiry]


def _final_label(outcome: Outcome) -> str:
    return "gave_up" if outcome.kind is OutcomeKind.RETRY else outcome.kind.value


class PushMetrics(LaneObserver):
    """The dispatcher's reports as Prometheus series; labelled children are cached per lane."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._latency: dict[str, Histogram] = {}
        self._attempts: dict[tuple[str, OutcomeKind], Counter] = {}
        self._finals: dict[tuple[str, str], Counter] = {}

    def sent(self, lane: Lane, outcome: Outcome, seconds: float) -> None:
        key = (lane.app_id, outcome.kind)
        counter = self._attempts.get(key)
        if counter is None:
            counter = self._attempts[key] = self._m.push_attempts.labels(lane.provider, lane.app_id,
                                                                         outcome.kind.value)
        counter.inc()
        child = self._latency.get(lane.app_id)
        if child is None:
            child = self._latency[lane.app_id] = self._m.push_latency.labels(lane.provider, lane.app_id)
        child.observe(seconds)

    def final(self, lane: Lane, outcome: Outcome, attempts: int) -> None:
        label = _final_label(outcome)
        counter = self._finals.get((lane.app_id, label))
        if counter is None:
            counter = self._finals[(lane.app_id, label)] = self._m.pushes.labels(lane.provider, lane.app_id, label)
        counter.inc()

    def dropped(self, lane: Lane, reason: str) -> None:
        self._m.push_dropped.labels(lane.provider, lane.app_id, reason).inc()


class RelayMetrics(RelayObserver):
    """The relay's reports as Prometheus series and log lines (never a token or an address)."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._events: dict[tuple[str, str], Counter] = {}
        self._verdicts: dict[tuple[str, str], Counter] = {}

    def event(self, event: MailboxEvent, result: str) -> None:
        key = (event.kind.value, result)
        counter = self._events.get(key)
        if counter is None:
            counter = self._events[key] = self._m.relay_events.labels(*key)
        counter.inc()

    def verdict(self, verdict: Verdict) -> None:
        key = (verdict.action.value, verdict.reason)
        counter = self._verdicts.get(key)
        if counter is None:
            counter = self._verdicts[key] = self._m.relay_verdicts.labels(*key)
        counter.inc()

    def outcome(self, message: PushMessage, outcome: Outcome) -> None:
        if outcome.kind is OutcomeKind.REJECTED:
            log.warning("push_rejected", app=message.app_id, registration=message.registration_id,
                        reason=outcome.reason)

    def token_deleted(self, registration: Registration, reason: str) -> None:
        label = "expired" if reason == "expired" else "invalid_token"
        self._m.registrations_deleted.labels(label).inc()
        log.info("registration_deleted", registration=registration.id, app=registration.app_id, reason=reason)

    def store_failed(self, operation: str, error: Exception) -> None:
        self._m.store_errors.labels(operation).inc()
        log.warning("relay_store_failed", operation=operation, error=type(error).__name__)
