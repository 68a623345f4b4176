"""Migration from EWS to Graph against the mock Exchange, the mock Graph and the mock APNs together: moves at the
configured rate, no gap and no duplicate across a move, a moved mailbox stays on Graph after a restart, EWS
answering 403 reported (and answered by a move when configured), and the migration keys validated."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from bemsmail.app import Node
from bemsmail.config import Config, ConfigError, load_config
from bemsmail.core.model import Backend, EventKind, MailboxEvent
from bemsmail.core.relay import Deduper
from bemsmail.devconfig import graph_section
from bemsmail.mocks.apns import MockApns
from bemsmail.mocks.ews import MockExchange
from bemsmail.mocks.graph import Fault, GraphApp, MockGraph
from bemsmail.mocks.tls import ensure_test_pki
from bemsmail.sources.ews.source import EwsSource
from bemsmail.sources.migration import MigratingSource, ews_id, rest_id, rest_id_sink
from tests.graph_support import CLIENT_ID, TENANT_ID, register, started
from tests.support import dev_config_with_apns_key, free_port, until

ALICE = "alice@example.com"
USERS = [f"user{i}@example.com" for i in range(5)]


@dataclass
class World:
    """Both mocks and APNs, and configs for one tenant "example" (example.com) with both an [ews] and a [graph]
    section; `config(backend, **migration)` picks where it stands."""

    path: Path
    ews: MockExchange
    graph: MockGraph
    apns: MockApns
    port: int
    graph_secret: str
    ews_password: str
    tenant_text: str

    def config(self, backend: str, env: Mapping[str, str] | None = None, **migration: Any) -> Config:
        endpoint = {"host": "127.0.0.1", "port": self.apns.port, "ca_file": str(self.apns.ca_file)}
        return load_config(self.config_file(backend, **migration), {
            "BEMSMAIL_SERVER__PORT": str(self.port),  # every node of a world: the notification URL names it
            "BEMSMAIL_APNS__APPS__0__ENDPOINT": json.dumps(endpoint),
            "BEMSMAIL_RELAY__COALESCE_SECONDS": "0",
            "BEMSMAIL_SERVER__SHUTDOWN_GRACE_SECONDS": "1",
            **(env or {}),
        })

    def config_file(self, backend: str, **migration: Any) -> Path:
        migration_text = "".join(f"{k} = {json.dumps(v)}\n" for k, v in migration.items())
        text = self.tenant_text.replace("@BACKEND@", backend) + (
            f"\n[tenants.migration]\n{migration_text}" if migration_text else "")
        base = self.path.read_text()
        start = base.index("[[tenants]]")
        end = base.index("\n[[apns.apps]]")
        config_file = self.path.with_name(f"{backend}-{secrets.token_hex(4)}.toml")
        config_file.write_text(base[:start] + text + base[end:])
        return config_file

    def pushes(self) -> list[Any]:
        return [r for r in self.apns.recent() if r.status == 200]

    def secrets(self) -> list[str]:
        states = [str(s["clientState"]) for s in self.graph.subscription_list()]
        return [self.graph_secret, self.ews_password, *states]


@contextlib.asynccontextmanager
async def world(tmp_path: Path) -> AsyncIterator[World]:
    path = tmp_path / "bemsmail.toml"
    topic, keys = dev_config_with_apns_key(path)
    password = (tmp_path / "secrets" / "ews-password").read_text().strip()
    pki = ensure_test_pki(tmp_path / "pki")
    port = free_port()
    graph_secret = secrets.token_urlsafe(24)
    secret_file = tmp_path / "secrets" / "graph-client-secret"
    secret_file.write_text(graph_secret + "\n")
    async with MockExchange(auth="basic", users={"svc-bemsmail@example.com": password},
                            heartbeat_seconds=0.5) as ews, \
            MockGraph(pki, [], retry_seconds=0.2) as graph, \
            MockApns(pki, topics=[topic], keys=keys, control_port=None) as apns:
        graph.apps[CLIENT_ID] = GraphApp(TENANT_ID, CLIENT_ID, graph_secret)
        tenant = f'''[[tenants]]
name = "example"
domains = ["example.com"]
backend = "@BACKEND@"

[tenants.ews]
url = "{ews.ews_url}"
auth = "basic"
username = "svc-bemsmail@example.com"
password_file = "{tmp_path / 'secrets' / 'ews-password'}"

{graph_section(secret_file=secret_file, notification_url=f"http://127.0.0.1:{port}", authority=graph.url,
               graph_url=graph.graph_url, ca_file=graph.ca_file)}'''
        yield World(path, ews, graph, apns, port, graph_secret, password, tenant)


def migrating(node: Node) -> MigratingSource:
    [source] = node.sources.values()
    assert isinstance(source, MigratingSource)
    return source


async def on_ews(w: World, mailboxes: list[str]) -> None:
    """Register the mailboxes while the tenant is on EWS (so they are recorded there) and let EWS watch them."""
    node = await started(w.config("ews"))
    try:
        [source] = node.sources.values()
        assert isinstance(source, EwsSource)
        for i, mailbox in enumerate(mailboxes):
            await register(node, mailbox=mailbox, device=f"phone-{i}", token=f"{i:02x}" * 32)
        await until(lambda: source.subscribed() == len(mailboxes), "EWS watching them")
    finally:
        await node.stop()


async def recorded(node: Node, mailbox: str) -> Backend | None:
    return await node.store.mailbox_backend(mailbox)


async def test_mailboxes_move_in_batches_no_larger_than_configured(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await on_ews(w, USERS)
        # the EWS node's subscriptions outlive it (Exchange expires them unstreamed): not this node's to end
        before = {s.id for m in USERS for s in w.ews.subscriptions_of(m)}
        node = await started(w.config("graph", users_per_batch=2, every_minutes=0.02))
        try:
            source = migrating(node)
            await until(lambda: source.stats.moved == 5, "every mailbox moved", within=60)
            period = 0.02 * 60
            starts = sorted(source.stats.move_starts)
            assert len(starts) == 5
            # the source's own bookkeeping: no window of every_minutes ever saw more than 2 moves start
            for first in starts:
                assert sum(1 for s in starts if first <= s < first + period) <= 2
            assert starts[-1] - starts[0] >= 2 * period  # so 5 moves needed at least three windows
            assert source.stats.pending == 0 and source.stats.moving == 0
            for mailbox in USERS:
                assert source.backend_of(mailbox) is Backend.GRAPH and source.graph.live(mailbox)
                assert await recorded(node, mailbox) is Backend.GRAPH
                await until(lambda m=mailbox: not any(s.alive for s in w.ews.subscriptions_of(m)  # type: ignore[misc]
                                                      if s.id not in before), "EWS unsubscribed")
            assert source.ews.subscribed() == 0 and source.graph.subscribed() == 5
            assert not await node.store.all_folder_states(Backend.EWS)  # EWS forgot them
            scrape = node.metrics.render().decode()
            assert 'bemsmail_migration_moved_total{tenant="example"} 5.0' in scrape
            assert 'bemsmail_migration_pending{tenant="example"} 0.0' in scrape
            assert 'bemsmail_graph_subscriptions{tenant="example"} 5.0' in scrape  # inner sources still observed
            assert 'bemsmail_ews_subscriptions{tenant="example"} 0.0' in scrape
        finally:
            await node.stop()


async def test_no_gap_and_no_duplicate_across_a_move(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await on_ews(w, [ALICE])
        before = {s.id for s in w.ews.subscriptions_of(ALICE)}  # the EWS node's, left to expire unstreamed
        # Graph refuses creates for now: the move stays in its overlap, EWS still watching
        w.graph.add_fault(Fault("create", status=429, code="TooManyRequests", retry_after=0.3, times=None))
        with capture_logs() as logs:
            node = await started(w.config("graph"))
            try:
                source = migrating(node)
                await until(lambda: source.stats.moving == 1 and source.graph.stats.create_failures >= 1,
                            "the move started, Graph not live yet")
                await until(lambda: source.ews.subscribed() == 1 and source.ews.stats.catch_ups >= 1,
                            "EWS watching meanwhile")
                item = w.ews.create_mail(ALICE, subject="before the move")
                await until(lambda: len(w.pushes()) == 1, "the EWS mail pushed")
                # Graph reporting the same item (its id in Graph's alphabet) in the overlap is the same item
                await node._on_event(MailboxEvent(ALICE, "Inbox", rest_id(item), EventKind.NEW_MAIL,
                                                  datetime.now(UTC)))
                scrape = node.metrics.render().decode()
                assert 'bemsmail_relay_events_total{kind="new_mail",result="duplicate"} 1.0' in scrape
                w.graph.clear_faults()
                await until(lambda: source.stats.moved == 1, "the move done")
                assert source.ews.subscribed() == 0
                w.graph.add_mail(ALICE, subject="after the move")
                await until(lambda: len(w.pushes()) == 2, "the Graph mail pushed")
                w.ews.create_mail(ALICE, subject="EWS no longer watched")
                await until(lambda: not any(s.alive for s in w.ews.subscriptions_of(ALICE) if s.id not in before),
                            "EWS unsubscribed")
                assert len(w.pushes()) == 2  # once each: EWS before, Graph after, the overlap's double once
            finally:
                await node.stop()
        events = [e["event"] for e in logs]
        assert events.count("migration_move_started") == 1 and events.count("migration_moved") == 1
        text = repr(logs)
        for secret in w.secrets():
            assert secret not in text


async def test_a_moved_mailbox_is_watched_only_by_graph_after_a_restart(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        mailboxes = [ALICE, "bob@example.com"]
        await on_ews(w, mailboxes)
        node = await started(w.config("graph"))
        try:
            await until(lambda: migrating(node).stats.moved == 2, "both moved")
        finally:
            await node.stop()
        ews_subscribes = sum(w.ews.stats.subscriptions_created.values())

        node = await started(w.config("graph"))
        try:
            source = migrating(node)
            await until(lambda: all(source.graph.live(m) for m in mailboxes), "Graph watching both again")
            assert node.watcher.watched.keys() == set(mailboxes)
            assert source.ews.subscribed() == 0 and source.stats.pending == 0 and source.stats.moving == 0
            assert source.stats.moved == 0 and not source.stats.move_starts  # nothing moved twice
            assert sum(w.ews.stats.subscriptions_created.values()) == ews_subscribes  # no EWS subscribe at all
            w.graph.add_mail(ALICE)
            await until(lambda: len(w.pushes()) == 1, "the push through Graph")
        finally:
            await node.stop()


async def test_ews_disabled_is_reported_once_with_what_to_do(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        w.ews.ews_disabled = True
        with capture_logs() as logs:
            node = await started(w.config("ews", on_ews_disabled="report"))
            try:
                [source] = node.sources.values()
                assert isinstance(source, EwsSource)
                await register(node, mailbox=ALICE, device="a", token="aa" * 32)
                await register(node, mailbox="bob@example.com", device="b", token="bb" * 32)
                await until(lambda: source.stats.subscribe_failures >= 3, "EWS refused both, and again")
                scrape = node.metrics.render().decode()
                assert 'bemsmail_ews_disabled_total{tenant="example"} ' in scrape
                assert 'bemsmail_ews_disabled_total{tenant="example"} 0.0' not in scrape
                assert await recorded(node, ALICE) is Backend.EWS  # not moved
                assert not w.graph.subscription_list()
                assert w.ews.stats.forbidden >= 3
            finally:
                await node.stop()
        [line] = [e for e in logs if e["event"] == "ews_disabled"]  # once per tenant, however many refusals
        assert line["log_level"] == "error" and line["tenant"] == "example"
        assert "403" in line["message"] and "Exchange Online" in line["message"]
        assert 'on_ews_disabled = "migrate"' in line["action"] and "[tenants.graph]" in line["action"]
        # (the ews_disabled line fires only for the code ErrorEwsDisabled; other lines of the EWS source are not
        # asserted on: structlog caches loggers on first use, so an earlier test may have bound them already)
        text = repr(logs)
        for secret in w.secrets():
            assert secret not in text


async def test_ews_disabled_with_migrate_moves_the_mailbox_to_graph(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        w.ews.ews_disabled = True
        with capture_logs() as logs:
            node = await started(w.config("ews", on_ews_disabled="migrate", users_per_batch=1, every_minutes=1440))
            try:
                source = migrating(node)
                assert not source.move_all
                await register(node, mailbox=ALICE)
                await until(lambda: source.stats.moved == 1, "moved to Graph on the 403")
                assert source.backend_of(ALICE) is Backend.GRAPH and source.graph.live(ALICE)
                assert await recorded(node, ALICE) is Backend.GRAPH
                assert not source.stats.move_starts  # not rate-bounded: the window was never spent
                w.graph.add_mail(ALICE, subject="through Graph")
                await until(lambda: len(w.pushes()) == 1, "the push")
                scrape = node.metrics.render().decode()
                assert 'bemsmail_migration_moved_total{tenant="example"} 1.0' in scrape
                assert ALICE not in scrape
            finally:
                await node.stop()
        [line] = [e for e in logs if e["event"] == "ews_disabled"]
        assert line["log_level"] == "error" and "Graph" in line["action"]
        [moved] = [e for e in logs if e["event"] == "migration_moved"]
        assert moved["mailbox"] == ALICE and moved["reason"] == "ews_disabled"
        text = repr(logs)
        for secret in w.secrets():
            assert secret not in text


async def test_check_config_connect_says_ews_is_disabled(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        w.ews.ews_disabled = True
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bemsmail", "check-config", "--config", str(w.config_file("ews")), "--connect",
            "--mailbox", ALICE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out = (await process.communicate())[0].decode()
        assert process.returncode != 0
        assert ("tenant example: EWS disabled for this tenant in Exchange Online (HTTP 403): configure "
                '[tenants.graph] and backend = "graph", or on_ews_disabled = "migrate"') in out, out
        for secret in w.secrets():
            assert secret not in out


async def test_ews_ids_reach_the_relay_in_graphs_form() -> None:
    seen: list[MailboxEvent] = []

    async def sink(event: MailboxEvent) -> None:
        seen.append(event)

    ews_form = "AAMkADk+YmU1/ZTAtNGE0+LTk2Mj/AAA="
    graph_form = "AAMkADk_YmU1-ZTAtNGE0_LTk2Mj-AAA="
    assert rest_id(ews_form) == graph_form and ews_id(graph_form) == ews_form
    now = datetime.now(UTC)
    await rest_id_sink(sink)(MailboxEvent(ALICE, "Inbox", ews_form, EventKind.NEW_MAIL, now))
    from_graph = MailboxEvent(ALICE, "Inbox", graph_form, EventKind.NEW_MAIL, now)
    [from_ews] = seen
    assert from_ews.item_id == graph_form and from_ews.dedupe_key == from_graph.dedupe_key

    class Clock:
        def now(self) -> datetime:
            return now

        def monotonic(self) -> float:
            return 0.0

        async def sleep(self, seconds: float) -> None:
            return None

    dedupe = Deduper(Clock(), 3600, 1000)
    assert dedupe.first_time(from_ews.dedupe_key) and not dedupe.first_time(from_graph.dedupe_key)


def _problems(tmp_path: Path, tenant: str) -> list[str]:
    path = tmp_path / "c.toml"
    path.write_text('[[api.auth.api_keys]]\nname = "fe"\nsha256 = "' + "a" * 64 + '"\n' + tenant)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    return info.value.problems


EWS_TENANT = '''[[tenants]]
name = "t"
domains = ["example.com"]
backend = "ews"
[tenants.ews]
url = "https://mail.example.com/EWS/Exchange.asmx"
auth = "basic"
username = "svc"
password = "pw"
'''


def test_migration_keys_are_validated(tmp_path: Path) -> None:
    assert _problems(tmp_path, EWS_TENANT + '[tenants.migration]\non_ews_disabled = "migrate"\n') == [
        "tenants[0]: migration.on_ews_disabled = 'migrate' needs a [graph] section for this tenant"]
    lines = _problems(tmp_path, EWS_TENANT + '[tenants.migration]\nusers_per_batch = 0\nevery_minutes = 0.001\n'
                                             'on_ews_disabled = "move"\nbatch = 3\n')
    assert lines == [
        "tenants[0].migration.users_per_batch: Input should be greater than or equal to 1",
        "tenants[0].migration.every_minutes: Input should be greater than or equal to 0.01",
        "tenants[0].migration.on_ews_disabled: Input should be 'report' or 'migrate'",
        "tenants[0].migration.batch: Extra inputs are not permitted",
    ]
    path = tmp_path / "ok.toml"
    path.write_text('[[api.auth.api_keys]]\nname = "fe"\nsha256 = "' + "a" * 64 + '"\n' + EWS_TENANT)
    tenant = load_config(path, {}).tenants[0]
    assert (tenant.migration.users_per_batch, tenant.migration.every_minutes) == (50, 5.0)
    assert tenant.migration.on_ews_disabled == "report" and not tenant.migrating
