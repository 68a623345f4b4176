#!/usr/bin/env python3
"""Push delivery benchmark (issue 3): the bare provider libraries vs our senders vs the full relay pipeline.

The clients run in this process (uvloop, as the daemon does) against mock servers that are started here as their
own processes (``python -m bemsmail.mocks.apns`` / ``bemsmail.mocks.fcm``) on free loopback ports, with throwaway
PKI, provider key and service account in a temporary directory. A full run starts one fresh process of this script
per section, so no section inherits another's heap, GC state or caches. Within a section the paths alternate round
by round (their order rotated each round), so noise on the shared 2-core machine hits every path alike.

1. ``apns``: a bare aioapns loop (stock client, the same concurrency and connection count) vs ApnsSender alone vs
   the full pipeline: a real SqlStore on a temporary SQLite file with one registration per mailbox (the
   registration cache warmed by an untimed pass), ``Relay.on_event`` for distinct mailboxes (so nothing is
   coalesced), the dispatcher lane at the app's concurrency, ApnsSender, and outcome recording (``mark_pushed``
   batches; the rows written are counted after each round). The pipeline is wired with the composition root's own
   helpers (``tenant_directory``, ``retry_policy``, ``relay_policy``, ``build_dispatcher``) exactly as
   ``Node.__init__`` does; the one difference is that its metrics observers are subclasses of ``PushMetrics`` and
   ``RelayMetrics`` that also count and take timestamps. Pushes/s = delivered final outcomes (counted by the lane
   observer) / time from the first event to the last final outcome. The events are built before the clock starts
   and handed over as fast as the lane takes them, keeping 2 per worker queued (so the event -> outcome latency
   includes that short queue); the bare loop and the sender alone are closed loops of ``--concurrency`` workers.
2. ``fcm``: firebase-admin's ``messaging.send_each_async`` (batches of 500, one batch at a time: its natural use;
   its token refresh is a blocking call on the loop, which is why the mock must be another process) vs FcmSender
   alone vs the full pipeline through FcmSender. The library's latency column is per batch.
3. ``soak``: memory under a slow provider. A second mock APNs answers every request after ``--soak-latency-ms``
   (1000 ms) and the lane runs at concurrency 1, so the provider takes ~1 push/s. An untimed pass of one event
   per mailbox warms the registration cache and fills the lane's queue (``push.queue_size``, default 10,000); then
   events for distinct mailboxes arrive at ``--soak-rate`` (500/s) for ``--soak-warmup`` (10 s) +
   ``--soak-seconds`` (60 s) while the full queue drops its oldest. This process's VmRSS is sampled every
   ``--soak-sample`` (5) seconds after the warm-up, with the queue depth, drops, the deduper's size, open coalescing
   windows, tasks and GC-tracked objects. The deduper remembers every event key for its window (1 h by default),
   so its cost per key is measured with tracemalloc and shown beside the slope; ``--soak-dedupe-window 0`` runs
   the same soak with a deduper that keeps nothing, ``--soak-dedupe-max 10000`` one whose cap the warm-up fills.

Prints a table per section, the targets with their figures, and one final JSON line with every figure, the core
count and the load average at start and end.

    .venv/bin/python scripts/bench_push.py [--only apns|fcm|soak] [--rounds 5] [--pushes 10000] [--concurrency 100]
        [--paths pipeline] (one path of a section, e.g. under py-spy) [--soak-seconds 60] [--soak-dedupe-window 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import os
import platform
import select
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402
from aioapns import APNs, NotificationRequest, PushType  # noqa: E402
from aioapns.connection import APNsTLSClientProtocol  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

from bemsmail.app import build_dispatcher, relay_policy, retry_policy, tenant_directory  # noqa: E402
from bemsmail.cluster.memory import InProcessBus  # noqa: E402
from bemsmail.config import ApnsAppConfig, Config, FcmAppConfig  # noqa: E402
from bemsmail.core.clock import SystemClock  # noqa: E402
from bemsmail.core.model import (  # noqa: E402
    Backend,
    Category,
    Environment,
    EventKind,
    MailboxEvent,
    Outcome,
    OutcomeKind,
    Platform,
    Priority,
    PushKind,
    PushMessage,
    RegistrationInput,
)
from bemsmail.core.relay import Deduper, Relay  # noqa: E402
from bemsmail.loadtest.local import cpu_seconds as process_cpu_seconds  # noqa: E402
from bemsmail.log import configure_logging  # noqa: E402
from bemsmail.metrics import Metrics, PushMetrics, RelayMetrics  # noqa: E402
from bemsmail.mocks.tls import generate_provider_key  # noqa: E402
from bemsmail.push.apns import ApnsSender  # noqa: E402
from bemsmail.push.dispatcher import Dispatcher, Lane  # noqa: E402
from bemsmail.push.fcm import FcmSender  # noqa: E402
from bemsmail.store.engine import create_engine  # noqa: E402
from bemsmail.store.schema import migrate  # noqa: E402
from bemsmail.store.sql import SqlStore  # noqa: E402
from bemsmail.store.tables import registrations as registrations_table  # noqa: E402

TOPIC = "com.example.mail"
APNS_APP = "com.example.mail"
FCM_APP = "com.example.mail.android"
PROJECT = "bemsmail-bench"
KEY_ID = "ABCDE12345"
TEAM_ID = "TEAM123456"
MOCK_START_SECONDS = 60.0
ROUND_TIMEOUT_SECONDS = 120.0
SECTION_TIMEOUT_SECONDS = 900.0
FEED_CHUNK = 100  # events handed to the relay before the producer yields to the lane's workers
HIGH_WATER_PER_WORKER = 2  # the producer waits while the lane's queue holds more than this many per worker
FCM_BATCH = 500


# --- small measuring tools ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (Linux /proc); 0 elsewhere."""
    return process_cpu_seconds(pid) or 0.0


def rss_mib() -> float:
    """This process's resident set (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- the mock servers, as processes ------------------------------------------------------------------------------


class MockProcess:
    """A mock server in its own process; `ready` is the first line it prints once it listens."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self.command = command
        self._log: IO[str] = log_path.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=ROOT)
        self.ready = self._first_line()

    def _first_line(self) -> str:
        assert self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], MOCK_START_SECONDS)
        line = self.proc.stdout.readline() if readable else ""
        if not line:
            self.close()
            tail = self.log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise SystemExit(f"mock did not start ({' '.join(self.command[1:3])}):\n{tail}")
        return line

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


def print_rows(rows: Sequence[tuple[str, str, str]], value_width: int = 34) -> None:
    """A benchmark's result table: figure, measured value, target."""
    width = max(len(name) for name, _, _ in rows)
    print()
    print(f"{'':{width}}  {'measured':>{value_width}}  target")
    for name, value, target in rows:
        print(f"{name:{width}}  {value:>{value_width}}  {target}")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - our own mock on loopback
        return json.load(response)


def post_json(url: str, body: Any = None) -> Any:
    data = json.dumps(body if body is not None else {}).encode()
    request = urllib.request.Request(url, data=data, method="POST",  # noqa: S310 - loopback
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return json.load(response)


@dataclass
class ApnsMock:
    process: MockProcess
    port: int
    control_url: str
    ca_file: Path
    key_file: Path

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = get_json(f"{self.control_url}/mock/stats")
        return stats


def start_apns_mock(tmp: Path, name: str, latency_ms: float, validate_headers: bool,
                    history: int = 100) -> ApnsMock:
    key_file = generate_provider_key(tmp / "AuthKey.p8") if not (tmp / "AuthKey.p8").exists() else tmp / "AuthKey.p8"
    command = [sys.executable, "-m", "bemsmail.mocks.apns", "--cert-dir", str(tmp / "pki"), "--topic", TOPIC,
               "--key-id", KEY_ID, "--team-id", TEAM_ID, "--public-key-file", str(key_file),
               "--latency-ms", str(latency_ms), "--history", str(history),
               *([] if validate_headers else ["--no-validate-headers"])]
    process = MockProcess(command, tmp / f"{name}.log")
    ready = json.loads(process.ready)
    return ApnsMock(process, int(ready["port"]), f"http://127.0.0.1:{ready['control_port']}",
                    Path(ready["ca_file"]), key_file)


@dataclass
class FcmMockProcess:
    process: MockProcess
    url: str
    token_uri: str
    service_account: Path

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = get_json(f"{self.url}/mock/stats")
        return stats


def write_service_account(directory: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    info = {"type": "service_account", "project_id": PROJECT, "private_key_id": uuid.uuid4().hex,
            "private_key": key, "client_email": f"bench@{PROJECT}.iam.gserviceaccount.com", "client_id": "1",
            "token_uri": "https://oauth2.googleapis.com/token"}
    path = directory / "service-account.json"
    path.write_text(json.dumps(info), encoding="utf-8")
    path.chmod(0o600)
    return path


def start_fcm_mock(tmp: Path) -> FcmMockProcess:
    account = write_service_account(tmp)
    command = [sys.executable, "-m", "bemsmail.mocks.fcm", "--port", "0", "--service-account", str(account)]
    process = MockProcess(command, tmp / "mock-fcm.log")
    words = dict(part.split("=", 1) for part in process.ready.split() if "=" in part)
    return FcmMockProcess(process, words["url"], words["token_uri"], account)


# --- configuration and the pipeline ------------------------------------------------------------------------------


def apns_app(mock: ApnsMock, concurrency: int, connections: int) -> dict[str, Any]:
    return {"id": APNS_APP, "topic": TOPIC, "key_file": str(mock.key_file), "key_id": KEY_ID, "team_id": TEAM_ID,
            "endpoint": {"host": "127.0.0.1", "port": mock.port, "ca_file": str(mock.ca_file)},
            "concurrency": concurrency, "max_connections": connections, "timeout_seconds": 10}


def fcm_app(mock: FcmMockProcess, concurrency: int) -> dict[str, Any]:
    return {"id": FCM_APP, "project_id": PROJECT, "credentials_file": str(mock.service_account),
            "fcm_url": mock.url, "token_uri": mock.token_uri, "concurrency": concurrency, "timeout_seconds": 10}


def make_config(db: Path, queue_size: int, apns: dict[str, Any] | None = None,
                fcm: dict[str, Any] | None = None) -> Config:
    """A node's configuration: defaults everywhere but the database, the one app and the queue size."""
    return Config.model_validate({
        "database": {"url": f"sqlite+aiosqlite:///{db}"},
        "logging": {"level": "warning"},
        "api": {"auth": {"api_keys": [{"name": "bench", "sha256": hashlib.sha256(b"bench").hexdigest()}]}},
        "apns": {"apps": [apns] if apns else []},
        "fcm": {"apps": [fcm] if fcm else []},
        "push": {"queue_size": queue_size},
    })


@dataclass
class Probe:
    """What the observers saw: final outcomes (count, time of the last), drops, event -> outcome latencies."""

    event_at: dict[str, float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    results: Counter[str] = field(default_factory=Counter)
    finals: int = 0
    delivered: int = 0
    dropped: int = 0
    last_final: float = 0.0
    target: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    timing: bool = True

    def expect(self, target: int) -> None:
        self.event_at.clear()
        self.latencies = []
        self.outcomes.clear()
        self.results.clear()
        self.finals = self.delivered = self.dropped = 0
        self.target = target
        self.done.clear()


class ProbePushMetrics(PushMetrics):
    """The production lane observer, plus a count of final outcomes."""

    def __init__(self, metrics: Metrics, probe: Probe) -> None:
        super().__init__(metrics)
        self._probe = probe

    def final(self, lane: Lane, outcome: Outcome, attempts: int) -> None:
        super().final(lane, outcome, attempts)
        probe = self._probe
        probe.finals += 1
        probe.last_final = time.perf_counter()
        if outcome.kind is OutcomeKind.DELIVERED:
            probe.delivered += 1
        if probe.finals == probe.target:
            probe.done.set()

    def dropped(self, lane: Lane, reason: str) -> None:
        super().dropped(lane, reason)
        self._probe.dropped += 1


class ProbeRelayMetrics(RelayMetrics):
    """The production relay observer, plus event results and event -> final outcome latency."""

    def __init__(self, metrics: Metrics, probe: Probe) -> None:
        super().__init__(metrics)
        self._probe = probe

    def event(self, event: MailboxEvent, result: str) -> None:
        super().event(event, result)
        self._probe.results[result] += 1

    def outcome(self, message: PushMessage, outcome: Outcome) -> None:
        super().outcome(message, outcome)
        probe = self._probe
        probe.outcomes[outcome.kind.value] += 1
        if probe.timing:
            started = probe.event_at.pop(message.mailbox, None)
            if started is not None:
                probe.latencies.append(time.perf_counter() - started)


class Pipeline:
    """Store -> relay -> dispatcher -> sender, wired as `bemsmail.app.Node` does (no HTTP API, no mail sources)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.probe = Probe()
        self.clock = SystemClock()
        self.metrics = Metrics()
        self.bus = InProcessBus()
        self.engine = create_engine(config.database)
        self.store = SqlStore(self.engine, self.clock)
        tenants = tenant_directory(config)
        self.dispatcher = Dispatcher(self.clock, retry_policy(config), observer=ProbePushMetrics(self.metrics,
                                                                                                 self.probe))
        build_dispatcher(config, self.dispatcher)
        self.relay = Relay(self.store, self.dispatcher, self.bus, self.clock, relay_policy(config, tenants),
                           ProbeRelayMetrics(self.metrics, self.probe))
        [self.lane] = self.dispatcher.lanes.values()

    async def start(self) -> None:
        await migrate(self.engine)
        await self.lane.sender.start()
        self.dispatcher.start()
        self.relay.start()

    async def stop(self, grace: float = 1.0) -> None:
        await self.relay.stop()
        await self.dispatcher.stop(grace)
        await self.store.close()

    async def register(self, platform: Platform, app_id: str, count: int, token: Callable[[int], str]) -> list[str]:
        """One registration per mailbox, through the store's batched upsert; returns the mailboxes."""
        prefix = "ios" if platform is Platform.IOS else "android"
        mailboxes = [f"{prefix}-{i:06d}@example.com" for i in range(count)]
        for start in range(0, count, 1000):
            await asyncio.gather(*(
                self.store.upsert_registration(
                    RegistrationInput(mailbox=mailboxes[i], device_id=f"device-{i}", platform=platform,
                                      token=token(i), app_id=app_id),
                    None, Backend.EWS)
                for i in range(start, min(count, start + 1000))))
        return mailboxes

    async def marked_since(self, since: datetime) -> int:
        """Registrations whose last_push_at was written at or after `since` (outcome recording at work)."""
        async with self.engine.connect() as conn:
            query = sa.select(sa.func.count()).select_from(registrations_table).where(
                registrations_table.c.last_push_at >= since)
            return int((await conn.execute(query)).scalar_one())

    async def windows_closed(self, limit: float) -> None:
        deadline = time.monotonic() + limit
        while self.relay.open_windows and time.monotonic() < deadline:  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.05)

    async def feed(self, events: Sequence[MailboxEvent], deadline: float) -> None:
        """Hand events to the relay as a mail source would: as fast as the lane takes them, keeping its queue short
        (a few pushes per worker, so latency is the pipeline's, not a backlog's) and far below its bound."""
        probe, relay, lane = self.probe, self.relay, self.lane
        high_water = max(FEED_CHUNK, HIGH_WATER_PER_WORKER * lane.concurrency)
        for start in range(0, len(events), FEED_CHUNK):
            for event in events[start:start + FEED_CHUNK]:
                probe.event_at[event.mailbox] = time.perf_counter()
                await relay.on_event(event)
            await asyncio.sleep(0)  # cached registrations never suspend on_event: let the workers run
            while lane.depth > high_water and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.002)

    async def round(self, mailboxes: Sequence[str], tag: str, extra: Callable[[], float]) -> dict[str, Any]:
        """Events for `mailboxes` (one each), timed from the first event to the last final outcome."""
        await self.windows_closed(10)
        now = datetime.now(UTC)
        events = [MailboxEvent(m, "Inbox", f"{tag}-{i}", EventKind.NEW_MAIL, now, unread_count=1)
                  for i, m in enumerate(mailboxes)]
        probe = self.probe
        probe.expect(len(events))
        deadline = time.monotonic() + ROUND_TIMEOUT_SECONDS
        since = datetime.now(UTC)
        cpu, mock_cpu = time.process_time(), extra()
        started = time.perf_counter()
        await self.feed(events, deadline)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(probe.done.wait(), max(0.1, deadline - time.monotonic()))
        elapsed = (probe.last_final if probe.finals else time.perf_counter()) - started
        cpu, mock_cpu = time.process_time() - cpu, extra() - mock_cpu
        await self.relay.flush_records()
        marked = await self.marked_since(since)
        settle = time.monotonic() + 10  # the recorder's own flush may still be writing its last chunks
        while marked < probe.delivered and time.monotonic() < settle:
            await asyncio.sleep(0.05)
            marked = await self.marked_since(since)
        pushes = probe.finals
        return {"pushes": pushes, "delivered": probe.delivered, "seconds": elapsed, "rate": probe.delivered / elapsed,
                "failures": pushes - probe.delivered + (len(events) - pushes),
                "p50_ms": percentile(probe.latencies, 0.5) * 1000, "p99_ms": percentile(probe.latencies, 0.99) * 1000,
                "client_us_per_push": cpu / max(1, pushes) * 1e6, "mock_us_per_push": mock_cpu / max(1, pushes) * 1e6,
                "mock_cpu_pct": 100 * mock_cpu / elapsed, "marked_pushed": marked,
                "coalesced": probe.results.get("coalesced", 0), "dropped": probe.dropped}


# --- the closed-loop driver for the bare libraries and the senders alone ------------------------------------------


async def drive(send: Callable[[int], Awaitable[bool]], count: int, concurrency: int,
                mock_cpu: Callable[[], float], offset: int = 0) -> dict[str, Any]:
    """`concurrency` workers send `count` pushes between them, each as soon as its previous one was answered."""
    latencies: list[float] = []
    failures = 0
    numbers = iter(range(offset, offset + count))

    async def worker() -> None:
        nonlocal failures
        for n in numbers:
            started = time.perf_counter()
            ok = await send(n)
            latencies.append(time.perf_counter() - started)
            failures += not ok

    cpu, mock = time.process_time(), mock_cpu()
    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), ROUND_TIMEOUT_SECONDS)
    elapsed = time.perf_counter() - started
    cpu, mock = time.process_time() - cpu, mock_cpu() - mock
    return {"pushes": count, "delivered": count - failures, "seconds": elapsed, "rate": (count - failures) / elapsed,
            "failures": failures, "p50_ms": percentile(latencies, 0.5) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000, "client_us_per_push": cpu / count * 1e6,
            "mock_us_per_push": mock / count * 1e6, "mock_cpu_pct": 100 * mock / elapsed}


def push_message(n: int, platform: Platform, app_id: str, token: str, expires: datetime) -> PushMessage:
    """What the relay would hand the sender for one new mail (content-free alert, badge, sound)."""
    mailbox = f"bench-{n}@example.com"
    return PushMessage(
        registration_id=f"r{n}", mailbox=mailbox, platform=platform, app_id=app_id,
        environment=Environment.PRODUCTION, token=token, notification_id=str(uuid.uuid4()), kind=PushKind.ALERT,
        category=Category.NEW_MAIL, collapse_id=f"m-{n:032x}", priority=Priority.ALERT, expires_at=expires,
        badge=1, sound="default", data={"account": mailbox, "folder": "Inbox", "count": "1"},
    )


def apns_token(n: int) -> str:
    return f"{n:064x}"


def fcm_token(n: int) -> str:
    return f"bench-{n:06d}:APA91b" + "y" * 120


def selected(paths: dict[str, Any], wanted: str | None) -> list[str]:
    """The section's paths, or those named in --paths (a comma list; for profiling one path)."""
    if not wanted:
        return list(paths)
    names = [name.strip() for name in wanted.split(",")]
    return [p for p in paths if p in names] or list(paths)


def rotated(items: Sequence[str], by: int) -> list[str]:
    by %= len(items)
    return [*items[by:], *items[:by]]


# --- section 1: APNs ---------------------------------------------------------------------------------------------


async def apns_section(args: argparse.Namespace, tmp: Path, mock: ApnsMock) -> dict[str, Any]:
    config = make_config(tmp / "apns.db", args.queue_size, apns=apns_app(mock, args.concurrency, args.connections))
    app_config: ApnsAppConfig = config.apns.apps[0]
    expires = datetime.now(UTC) + timedelta(hours=1)

    # (a) stock aioapns, as its README uses it; the protocol subclass only points it at the mock.
    class Local(APNsTLSClientProtocol):
        APNS_SERVER = "127.0.0.1"
        APNS_PORT = mock.port

    async def quiet(*_: Any) -> None:
        return None

    bare = APNs(key=mock.key_file.read_text(), key_id=KEY_ID, team_id=TEAM_ID, topic=TOPIC,
                max_connections=args.connections, ssl_context=ssl.create_default_context(cafile=str(mock.ca_file)),
                err_func=quiet)
    bare.pool.protocol_class = Local
    bare_payload = {"aps": {"alert": {"title-loc-key": "NEW_MAIL_TITLE", "loc-key": "NEW_MAIL"}, "badge": 1,
                            "sound": "default", "category": "NEW_MAIL"}, "folder": "Inbox", "count": "1"}

    async def send_bare(n: int) -> bool:
        request = NotificationRequest(apns_token(n), bare_payload, priority=10, push_type=PushType.ALERT,
                                      collapse_key=f"m-{n:032x}", time_to_live=3600)
        result = await asyncio.wait_for(bare.send_notification(request), 30)
        return bool(result.is_successful)

    # (b) our sender alone
    sender = ApnsSender(app_config)
    await sender.start()

    async def send_ours(n: int) -> bool:
        outcome = await sender.send(push_message(n, Platform.IOS, APNS_APP, apns_token(n), expires))
        return outcome.kind is OutcomeKind.DELIVERED

    # (c) the full pipeline
    pipeline = Pipeline(config)
    await pipeline.start()
    setup = time.perf_counter()
    mailboxes = await pipeline.register(Platform.IOS, APNS_APP, args.registrations, apns_token)
    register_seconds = time.perf_counter() - setup
    used = mailboxes[: args.pushes]

    rows: list[dict[str, Any]] = []
    try:
        warm = min(1000, args.pushes)
        await drive(send_bare, warm, args.concurrency, mock.process.cpu)  # connections, JWT, code paths
        await drive(send_ours, warm, args.concurrency, mock.process.cpu)
        await pipeline.round(mailboxes, "warm", mock.process.cpu)  # every mailbox once: registration cache warm
        paths: dict[str, Callable[[int], Awaitable[dict[str, Any]]]] = {
            "bare aioapns": lambda r: drive(send_bare, args.pushes, args.concurrency, mock.process.cpu),
            "ApnsSender": lambda r: drive(send_ours, args.pushes, args.concurrency, mock.process.cpu),
            "pipeline": lambda r: pipeline.round(used, f"round{r}", mock.process.cpu),
        }
        rows = await run_rounds(paths, args)
    finally:
        bare.pool.close()
        await sender.close()
        await pipeline.stop()
    stats = mock.stats()
    return summarize("apns", rows, ["bare aioapns", "ApnsSender", "pipeline"], extra={
        "registrations": args.registrations, "register_seconds": round(register_seconds, 2),
        "pushes_per_round": args.pushes, "concurrency": args.concurrency, "connections": args.connections,
        "mock_requests": stats.get("requests"), "mock_connections": stats.get("connections"),
        "mock_validates_headers": not args.mock_no_validate_headers})


# --- section 2: FCM ----------------------------------------------------------------------------------------------


async def fcm_section(args: argparse.Namespace, tmp: Path, mock: FcmMockProcess) -> dict[str, Any]:
    import firebase_admin
    from firebase_admin import credentials, messaging

    config = make_config(tmp / "fcm.db", args.queue_size, fcm=fcm_app(mock, args.fcm_concurrency))
    app_config: FcmAppConfig = config.fcm.apps[0]
    expires = datetime.now(UTC) + timedelta(hours=1)

    # (a) firebase-admin as documented: an App, send_each_async with up to 500 messages.
    info = {**json.loads(mock.service_account.read_text(encoding="utf-8")), "token_uri": mock.token_uri}
    app = firebase_admin.initialize_app(credentials.Certificate(info), {"projectId": PROJECT, "httpTimeout": 30},
                                        name=f"bench-{uuid.uuid4().hex}")
    # google-auth's Regional Access Boundary lookup goes to iamcredentials.googleapis.com (no network here).
    google_credential = app.credential.get_credential()
    google_credential._maybe_start_regional_access_boundary_refresh = lambda *a: None
    service = messaging._get_messaging_service(app)
    service._fcm_url = f"{mock.url}/v1/projects/{PROJECT}/messages:send"  # the one way to point it elsewhere

    def library_message(n: int) -> Any:
        notification = messaging.AndroidNotification(title_loc_key="NEW_MAIL", body_loc_key="NEW_MAIL",
                                                     tag=f"m-{n:032x}", notification_count=1, sound="default",
                                                     channel_id="NEW_MAIL")
        message = messaging.Message(
            data={"account": f"bench-{n}@example.com", "folder": "Inbox", "count": "1"},
            android=messaging.AndroidConfig(collapse_key=f"m-{n:032x}", priority="high", ttl=3600,
                                            notification=notification))
        message.token = fcm_token(n)  # set afterwards: the constructor warns that `token` is deprecated
        return message

    async def library_round(batches: int) -> dict[str, Any]:
        messages = [[library_message(b * FCM_BATCH + k) for k in range(FCM_BATCH)] for b in range(batches)]
        latencies: list[float] = []
        delivered = failures = 0
        cpu, mock_cpu = time.process_time(), mock.process.cpu()
        started = time.perf_counter()
        for batch in messages:
            t0 = time.perf_counter()
            try:
                result = await asyncio.wait_for(messaging.send_each_async(batch, app=app), ROUND_TIMEOUT_SECONDS)
            except Exception:  # a token failure fails the whole batch
                failures += len(batch)
            else:
                delivered += result.success_count
                failures += result.failure_count
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
        cpu, mock_cpu = time.process_time() - cpu, mock.process.cpu() - mock_cpu
        count = batches * FCM_BATCH
        return {"pushes": count, "delivered": delivered, "seconds": elapsed, "rate": delivered / elapsed,
                "failures": failures, "p50_ms": percentile(latencies, 0.5) * 1000,
                "p99_ms": percentile(latencies, 0.99) * 1000, "client_us_per_push": cpu / count * 1e6,
                "mock_us_per_push": mock_cpu / count * 1e6, "mock_cpu_pct": 100 * mock_cpu / elapsed}

    # (b) our sender alone
    sender = FcmSender(app_config)
    await sender.start()

    async def send_ours(n: int) -> bool:
        outcome = await sender.send(push_message(n, Platform.ANDROID, FCM_APP, fcm_token(n), expires))
        return outcome.kind is OutcomeKind.DELIVERED

    # (c) the full pipeline
    pipeline = Pipeline(config)
    await pipeline.start()
    setup = time.perf_counter()
    mailboxes = await pipeline.register(Platform.ANDROID, FCM_APP, args.registrations, fcm_token)
    register_seconds = time.perf_counter() - setup
    used = mailboxes[: args.fcm_pushes]

    rows: list[dict[str, Any]] = []
    try:
        await library_round(1)  # the first (blocking) token refresh, httpx's connections
        await drive(send_ours, min(1000, args.fcm_pushes), args.fcm_concurrency, mock.process.cpu)
        await pipeline.round(mailboxes, "warm", mock.process.cpu)
        paths: dict[str, Callable[[int], Awaitable[dict[str, Any]]]] = {
            "send_each_async": lambda r: library_round(args.fcm_batches),
            "FcmSender": lambda r: drive(send_ours, args.fcm_pushes, args.fcm_concurrency, mock.process.cpu),
            "pipeline": lambda r: pipeline.round(used, f"round{r}", mock.process.cpu),
        }
        rows = await run_rounds(paths, args)
    finally:
        await sender.close()
        await pipeline.stop()
        await service._async_client.aclose()
        await asyncio.to_thread(firebase_admin.delete_app, app)  # delete_app on the loop would raise
    stats = mock.stats()
    return summarize("fcm", rows, ["send_each_async", "FcmSender", "pipeline"], extra={
        "registrations": args.registrations, "register_seconds": round(register_seconds, 2),
        "pushes_per_round": args.fcm_pushes, "library_pushes_per_round": args.fcm_batches * FCM_BATCH,
        "concurrency": args.fcm_concurrency, "mock_sends": stats.get("sends"),
        "mock_tokens_issued": stats.get("tokens_issued")})


async def run_rounds(paths: dict[str, Callable[[int], Awaitable[dict[str, Any]]]],
                     args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every selected path once per round, the order rotating each round, so machine noise hits all of them."""
    rows: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for name in rotated(selected(paths, args.paths), r):
            gc.collect()
            result = await paths[name](r)
            rows.append({"round": r + 1, "path": name, **result, "load_1m": load_average()[0]})
    return rows


def summarize(section: str, rows: list[dict[str, Any]], paths: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    """Medians per path, and the pipeline's ratio to each other path paired within each round."""
    by_path = {p: rs for p in paths if (rs := [r for r in rows if r["path"] == p])}
    medians = {p: {"rate": median([r["rate"] for r in rs]), "best": max((r["rate"] for r in rs), default=0.0),
                   "p50_ms": median([r["p50_ms"] for r in rs]), "p99_ms": median([r["p99_ms"] for r in rs]),
                   "client_us_per_push": median([r["client_us_per_push"] for r in rs]),
                   "mock_cpu_pct": median([r["mock_cpu_pct"] for r in rs])}
               for p, rs in by_path.items()}
    ratios: dict[str, float] = {}
    for other in paths[:-1]:
        if other not in by_path or "pipeline" not in by_path:
            continue
        paired = [p["rate"] / o["rate"] for p, o in zip(by_path["pipeline"], by_path[other], strict=True)
                  if o["rate"]]
        ratios[f"pipeline/{other}"] = median(paired)
    return {"section": section, **extra, "rows": rows, "median": medians, "ratios": ratios}


def print_throughput(title: str, summary: dict[str, Any]) -> None:
    print(f"\n## {title}")
    print(f"{'round':>5} {'path':<16} {'pushes/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'failed':>6} "
          f"{'client CPU/push':>15} {'mock CPU':>8} {'load':>5}")
    for r in summary["rows"]:
        print(f"{r['round']:>5} {r['path']:<16} {r['rate']:>9.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['failures']:>6} {r['client_us_per_push']:>12.0f} us {r['mock_cpu_pct']:>7.0f}% {r['load_1m']:>5.2f}")
    print(f"{'':>5} {'median':<16}")
    for path, m in summary["median"].items():
        print(f"{'':>5} {path:<16} {m['rate']:>9.0f} {m['p50_ms']:>8.1f} {m['p99_ms']:>8.1f} {'':>6} "
              f"{m['client_us_per_push']:>12.0f} us {m['mock_cpu_pct']:>7.0f}%   (best {m['best']:.0f}/s)")
    pipeline_rows = [r for r in summary["rows"] if r["path"] == "pipeline"]
    checks = ", ".join(f"round {r['round']}: {r['marked_pushed']} marked, {r['coalesced']} coalesced, "
                       f"{r['dropped']} dropped" for r in pipeline_rows)
    print("pipeline bookkeeping (last_push_at rows written in the round): " + checks)
    print("ratios (median of per-round pairs): " +
          ", ".join(f"{k} = {v:.2f}" for k, v in summary["ratios"].items()))


# --- section 3: memory under a slow provider ---------------------------------------------------------------------


def dedupe_bytes_per_entry(sample: int = 20_000) -> float:
    """What one remembered event key costs the relay's deduper (tracemalloc, keys shaped like the soak's)."""
    gc.collect()
    tracemalloc.start()
    try:
        deduper = Deduper(SystemClock(), 3600.0, 1_000_000)
        before = tracemalloc.get_traced_memory()[0]
        for n in range(sample):
            event = MailboxEvent(f"ios-{n % 10_000:06d}@example.com", "Inbox", f"soak-{n}", EventKind.NEW_MAIL,
                                 datetime.now(UTC), unread_count=1)
            deduper.first_time(event.dedupe_key)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / sample


async def soak_section(args: argparse.Namespace, tmp: Path, mock: ApnsMock) -> dict[str, Any]:
    config = make_config(tmp / "soak.db", args.queue_size, apns=apns_app(mock, 1, 1))
    if args.soak_dedupe_max is not None:
        config = config.model_copy(update={"relay": config.relay.model_copy(
            update={"dedupe_max_entries": args.soak_dedupe_max})})
    if args.soak_dedupe_window is not None:
        config = config.model_copy(update={"relay": config.relay.model_copy(
            update={"dedupe_window_seconds": args.soak_dedupe_window})})
    per_entry = dedupe_bytes_per_entry()
    pipeline = Pipeline(config)
    pipeline.probe.timing = False
    await pipeline.start()
    mailboxes = await pipeline.register(Platform.IOS, APNS_APP, args.soak_mailboxes, apns_token)
    relay, lane, probe = pipeline.relay, pipeline.lane, pipeline.probe
    probe.expect(-1)
    # One untimed event per mailbox first: warms the registration cache (as in the throughput sections) and
    # fills the lane's queue, so every sample below is of the steady state "provider slow, queue full".
    warm_at = datetime.now(UTC)
    for n, mailbox in enumerate(mailboxes):
        await relay.on_event(MailboxEvent(mailbox, "Inbox", f"warm-{n}", EventKind.NEW_MAIL, warm_at,
                                          unread_count=1))
        if n % FEED_CHUNK == 0:
            await asyncio.sleep(0)
    warm_depth = lane.depth
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + args.soak_warmup + args.soak_seconds
    sent = 0
    samples: list[dict[str, Any]] = []
    now = datetime.now(UTC)

    async def produce() -> None:
        nonlocal sent
        while (t := loop.time()) < end:
            due = int((t - start) * args.soak_rate)
            while sent < due:
                mailbox = mailboxes[sent % len(mailboxes)]
                await relay.on_event(MailboxEvent(mailbox, "Inbox", f"soak-{sent}", EventKind.NEW_MAIL, now,
                                                  unread_count=sent % 50))
                sent += 1
            await asyncio.sleep(0.01)

    def sample(t: float) -> None:
        samples.append({"t": round(t, 1), "rss_mib": round(rss_mib(), 2), "queue_depth": lane.depth,
                        "in_flight": lane.in_flight, "events": sent, "delivered": probe.delivered,
                        "dropped": probe.dropped, "dedupe_entries": relay.dedupe_entries,
                        "open_windows": relay.open_windows, "tasks": len(asyncio.all_tasks()),
                        "gc_objects": len(gc.get_objects())})

    async def sampler() -> None:
        n = 0
        while (due := start + args.soak_warmup + n * args.soak_sample) <= end + 0.01:
            await asyncio.sleep(max(0.0, due - loop.time()))
            sample(loop.time() - start)
            n += 1

    load_before = load_average()
    try:
        await asyncio.wait_for(asyncio.gather(produce(), sampler()), args.soak_warmup + args.soak_seconds + 60)
    finally:
        await pipeline.stop(grace=0.5)
    rss = [(s["t"], s["rss_mib"]) for s in samples]
    provider_rate = None  # pushes/s the slow provider took between the first and the last sample
    if len(samples) > 1:
        first, last = samples[0], samples[-1]
        provider_rate = round((last["delivered"] - first["delivered"]) / (last["t"] - first["t"]), 2)
    full_samples = [s for s in samples if s["queue_depth"] >= args.queue_size]
    full = [(s["t"], s["rss_mib"]) for s in full_samples]
    slope_all = slope_per_minute(rss)
    slope_full: float | None = None
    dedupe_slope: float | None = None
    residual: float | None = None
    if len(full_samples) >= 3:  # a slope needs a few points once the queue stopped growing
        slope_full = slope_per_minute(full)
        dedupe = [(s["t"], s["dedupe_entries"] * per_entry / 2**20) for s in full_samples]
        dedupe_slope = slope_per_minute(dedupe)
        residual = slope_full - dedupe_slope
    return {"section": "soak", "dedupe_window_seconds": config.relay.dedupe_window_seconds,
            "seconds": args.soak_seconds, "warmup": args.soak_warmup, "rate": args.soak_rate,
            "mock_latency_ms": args.soak_latency_ms, "lane_concurrency": 1, "queue_size": args.queue_size,
            "mailboxes": args.soak_mailboxes, "queue_after_warm_pass": warm_depth, "events": sent,
            "delivered": probe.delivered, "dropped": probe.dropped,
            "samples": samples, "rss_first_mib": rss[0][1] if rss else None,
            "rss_last_mib": rss[-1][1] if rss else None,
            "rss_max_mib": max(v for _, v in rss) if rss else None, "slope_mib_per_min": round(slope_all, 3),
            "slope_full_queue_mib_per_min": rounded(slope_full), "full_queue_samples": len(full),
            "rss_full_first_mib": full[0][1] if full else None, "rss_full_last_mib": full[-1][1] if full else None,
            "dedupe_bytes_per_entry": round(per_entry, 1), "dedupe_mib_per_min": rounded(dedupe_slope),
            "residual_full_queue_mib_per_min": rounded(residual),
            "load_before": load_before, "provider_rate": provider_rate}


def print_soak(summary: dict[str, Any]) -> None:
    print(f"\n## Memory under a slow provider: mock APNs answers after {summary['mock_latency_ms']:g} ms, lane "
          f"concurrency 1, {summary['rate']:g} events/s over {summary['mailboxes']} mailboxes, queue_size "
          f"{summary['queue_size']}, dedupe window {summary['dedupe_window_seconds']:g} s; {summary['warmup']:g} s "
          f"warm-up + {summary['seconds']:g} s")
    print(f"{'t s':>6} {'RSS MiB':>8} {'queue':>6} {'events':>7} {'delivered':>9} {'dropped':>8} "
          f"{'dedupe':>7} {'windows':>7} {'tasks':>6} {'gc objs':>8}")
    for s in summary["samples"]:
        print(f"{s['t']:>6.1f} {s['rss_mib']:>8.1f} {s['queue_depth']:>6} {s['events']:>7} {s['delivered']:>9} "
              f"{s['dropped']:>8} {s['dedupe_entries']:>7} {s['open_windows']:>7} {s['tasks']:>6} "
              f"{s['gc_objects']:>8}")
    print(f"RSS first {summary['rss_first_mib']:.1f} MiB, last {summary['rss_last_mib']:.1f}, max "
          f"{summary['rss_max_mib']:.1f}; slope {summary['slope_mib_per_min']:+.2f} MiB/min over all samples; queue "
          f"after the warm pass: {summary['queue_after_warm_pass']}")
    if summary["slope_full_queue_mib_per_min"] is None:
        print(f"the queue was full in only {summary['full_queue_samples']} sample(s): no steady-state slope "
              f"(run longer, or raise --soak-rate)")
    else:
        print(f"once the queue was full ({summary['full_queue_samples']} samples, t >= "
              f"{summary['samples'][-summary['full_queue_samples']]['t']:g} s): RSS {summary['rss_full_first_mib']:.1f}"
              f" -> {summary['rss_full_last_mib']:.1f} MiB, slope {summary['slope_full_queue_mib_per_min']:+.2f} "
              f"MiB/min; the deduper (every event key kept for its 1 h window, "
              f"{summary['dedupe_bytes_per_entry']:.0f} B/entry) accounts for {summary['dedupe_mib_per_min']:+.2f} "
              f"MiB/min, leaving {summary['residual_full_queue_mib_per_min']:+.2f} MiB/min")
    print(f"provider took {summary['provider_rate']} pushes/s; {summary['events']} events, "
          f"{summary['delivered']} delivered, {summary['dropped']} dropped (queue full: oldest first)")


# --- main ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def mock_for(factory: Callable[[], Any]) -> Iterator[Any]:
    mock = factory()
    try:
        yield mock
    finally:
        mock.process.close()


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """Each target of issue 3 with the figure it is judged on."""
    out: dict[str, Any] = {}
    apns = results.get("apns", {})
    if "pipeline/bare aioapns" in apns.get("ratios", {}):
        ratio = apns["ratios"]["pipeline/bare aioapns"]
        out["apns_pipeline_vs_bare_ge_0.90"] = {"value": round(ratio, 3), "met": ratio >= 0.90}
    if "pipeline" in apns.get("median", {}):
        rate = apns["median"]["pipeline"]["rate"]
        out["apns_pipeline_ge_2500_per_s"] = {"value": round(rate), "met": rate >= 2500}
    fcm = results.get("fcm", {})
    if "pipeline" in fcm.get("median", {}):
        rate = fcm["median"]["pipeline"]["rate"]
        bare = fcm["median"].get("send_each_async", {}).get("rate")
        out["fcm_pipeline_ge_2000_per_s"] = {"value": round(rate), "met": rate >= 2000,
                                             "bare_send_each_async": round(bare) if bare else None}
    if "soak" in results:
        soak = results["soak"]
        slope = soak["slope_full_queue_mib_per_min"]
        out["soak_rss_flat_lt_1_mib_per_min"] = {
            "value": slope, "unit": "MiB/min of RSS once the queue was full",
            "beyond_the_deduper": soak["residual_full_queue_mib_per_min"],
            "dedupe_window_seconds": soak["dedupe_window_seconds"],
            "met": slope is not None and abs(slope) < 1.0}
    return out


def run_section(section: str, args: argparse.Namespace,
                loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> dict[str, Any]:
    """One section in this process, against its own mock process; prints its table."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-push-"))
    results: dict[str, Any] = {}
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            if section == "apns":
                validate = not args.mock_no_validate_headers
                with mock_for(lambda: start_apns_mock(tmp, "mock-apns", 0.0, validate)) as mock:
                    results["apns"] = runner.run(apns_section(args, tmp, mock))
                print_throughput(f"APNs: {args.pushes} pushes per path per round, concurrency {args.concurrency}, "
                                 f"{args.connections} connections, {args.rounds} rounds", results["apns"])
            elif section == "fcm":
                with mock_for(lambda: start_fcm_mock(tmp)) as mock:
                    results["fcm"] = runner.run(fcm_section(args, tmp, mock))
                print_throughput(f"FCM: {args.fcm_pushes} pushes per round (send_each_async: {args.fcm_batches} x "
                                 f"{FCM_BATCH}), concurrency {args.fcm_concurrency}, {args.rounds} rounds",
                                 results["fcm"])
            else:
                with mock_for(lambda: start_apns_mock(tmp, "mock-apns-slow", args.soak_latency_ms,
                                                      not args.mock_no_validate_headers)) as mock:
                    results["soak"] = runner.run(soak_section(args, tmp, mock))
                print_soak(results["soak"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def run_isolated(sections: Sequence[str]) -> dict[str, Any]:
    """Each section in a fresh process of this script (same flags), so no section inherits another's heap, GC
    state or warm caches — the soak's RSS above all. Their tables print as they finish."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-push-results-") as directory:
        for section in sections:
            out = Path(directory) / f"{section}.json"
            command = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--only", section,
                       "--results-file", str(out)]
            code = subprocess.run(command, check=False, timeout=SECTION_TIMEOUT_SECONDS).returncode
            if code != 0 or not out.exists():
                raise SystemExit(f"section {section} failed (exit {code})")
            results[section] = json.loads(out.read_text(encoding="utf-8"))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", choices=["apns", "fcm", "soak"], help="run one section")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per section (paths alternate in each)")
    parser.add_argument("--pushes", type=int, default=10_000, help="APNs pushes per path per round")
    parser.add_argument("--registrations", type=int, default=10_000, help="registrations (one per mailbox)")
    parser.add_argument("--concurrency", type=int, default=100, help="APNs lane / bare loop concurrency")
    parser.add_argument("--connections", type=int, default=2, help="APNs HTTP/2 connections (max_connections)")
    parser.add_argument("--queue-size", type=int, default=10_000, help="push.queue_size")
    parser.add_argument("--fcm-pushes", type=int, default=10_000, help="FCM pushes per path per round")
    parser.add_argument("--fcm-batches", type=int, default=2, help="send_each_async batches (of 500) per round")
    parser.add_argument("--fcm-concurrency", type=int, default=100, help="FCM lane / sender concurrency")
    parser.add_argument("--soak-seconds", type=float, default=60.0)
    parser.add_argument("--soak-warmup", type=float, default=10.0)
    parser.add_argument("--soak-rate", type=float, default=500.0, help="events per second during the soak")
    parser.add_argument("--soak-sample", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--soak-latency-ms", type=float, default=1000.0, help="the slow mock's answer delay")
    parser.add_argument("--soak-dedupe-window", type=float, default=None,
                        help="relay.dedupe_window_seconds for the soak (default: the config's, 3600; 0 keeps no keys)")
    parser.add_argument("--soak-dedupe-max", type=int, default=None,
                        help="relay.dedupe_max_entries for the soak (default: the config's, 250,000); a cap the "
                             "warm-up fills shows the steady state once every bounded structure is full")
    parser.add_argument("--soak-mailboxes", type=int, default=10_000, help="mailboxes the soak's events cycle over")
    parser.add_argument("--paths", help="run only these paths of a section, e.g. 'pipeline' (for profiling)")
    parser.add_argument("--results-file", type=Path, help=argparse.SUPPRESS)  # run_isolated's children write here
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio instead of uvloop")
    parser.add_argument("--mock-no-validate-headers", action="store_true",
                        help="run the mock APNs without h2's inbound header validation (less mock CPU)")
    args = parser.parse_args()
    sections = [args.only] if args.only else ["apns", "fcm", "soak"]
    if ("apns" in sections and args.pushes > args.registrations) or (
            "fcm" in sections and args.fcm_pushes > args.registrations):
        parser.error("--pushes and --fcm-pushes must not exceed --registrations (one event per mailbox per round)")
    configure_logging("warning", "console", sys.stderr)

    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if not args.no_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            args.no_uvloop = True
    started_at, load_start = time.monotonic(), load_average()
    if len(sections) > 1:
        results = run_isolated(sections)
    else:
        results = run_section(sections[0], args, loop_factory)
        if args.results_file is not None:  # a child of run_isolated: the parent prints the summary
            args.results_file.write_text(json.dumps(results[sections[0]]), encoding="utf-8")
            return 0
    load_end = load_average()
    verdicts = targets(results)
    print(f"\n{os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{'asyncio' if args.no_uvloop else 'uvloop'}; load average at start {load_start}, at end {load_end}; "
          f"{time.monotonic() - started_at:.0f} s")
    for name, verdict in verdicts.items():
        print(f"target {name}: {verdict['value']} -> {'met' if verdict['met'] else 'MISSED'}")
    print(json.dumps({"bench": "push", "cores": os.cpu_count(), "python": platform.python_version(),
                      "loop": "asyncio" if args.no_uvloop else "uvloop", "load_start": load_start,
                      "load_end": load_end, "seconds": round(time.monotonic() - started_at, 1),
                      "args": {k: v for k, v in vars(args).items()}, "targets": verdicts, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
