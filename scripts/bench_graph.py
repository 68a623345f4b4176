#!/usr/bin/env python3
"""Exchange Online through Graph, measured. Three parts, each against the mock Graph; prints a table and a final
JSON line. Loopback only; everything it starts it stops.

1. webhook: one daemon process (mock Graph and mock APNs each in their own process) with N subscribed mailboxes.
   A load generator process posts valid change notifications (real subscription ids and clientStates) to
   /notificationClient at a fixed concurrency, one item per post and in batches as Graph sends them; accepted
   notifications per second and the answer's p50/p99. Side by side, in the same run, the same load against a bare
   aiohttp handler that only answers 202: the ceiling of this machine and client.
2. latency: mail created in the mock Graph at a fixed rate over distinct mailboxes → notification → daemon →
   push at the mock APNs (timestamps on this machine's clock): p50/p99/max, lost and duplicated.
3. renewals: 100,000 subscriptions managed by one GraphSource (in-process, against an in-process mock Graph and a
   SQLite store seeded as after a mass onboarding: every subscription made at the same moment). The renewal
   schedule the source sets (busiest 20-s window over the subscriptions' whole lifetime), and a forced bunching:
   the clock jumps so that every renewal of the first hour falls due at once; the mock's own timeline of
   accepted /subscriptions writes gives the busiest 20-s window, against the limit.

    .venv/bin/python scripts/bench_graph.py [--mailboxes 5000] [--subscriptions 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ews import mailbox, token, wait_for
from bench_push import ROOT, cpu_seconds, percentile, post_json, print_rows, start_apns_mock

from bemsmail.devconfig import MOCK_GRAPH_CLIENT_ID, MOCK_GRAPH_TENANT_ID, use_mock_graph, write_dev_config
from bemsmail.devservices import free_port

TENANT_ID = MOCK_GRAPH_TENANT_ID
CLIENT_ID = MOCK_GRAPH_CLIENT_ID
METRIC = re.compile(r'^(bemsmail_graph_[a-z_]+)\{[^}]*\} ([0-9.e+-]+)$', re.M)


class Https:
    """JSON over HTTPS to the mock Graph's control API, trusting its throwaway CA."""

    def __init__(self, base: str, ca_file: str) -> None:
        self.base = base
        self.context = ssl.create_default_context(cafile=ca_file)

    def call(self, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method="POST" if data else "GET",  # noqa: S310
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60, context=self.context) as response:  # noqa: S310
            return json.load(response)


def daemon_metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    found: dict[str, float] = {}
    for name, value in METRIC.findall(text):
        found[name] = found.get(name, 0.0) + float(value)
    return found


async def populate(config_path: Path, count: int) -> None:
    """N mailboxes with one iPhone each, straight into the store."""
    from bench_ews import populate as populate_ews

    await populate_ews(config_path, count)
    import sqlalchemy as sa

    from bemsmail.config import load_config
    from bemsmail.store.engine import create_engine
    from bemsmail.store.tables import mailboxes

    engine = create_engine(load_config(config_path, {}).database)
    async with engine.begin() as conn:
        await conn.execute(sa.update(mailboxes).values(backend="graph"))
    await engine.dispose()


# --- load generator (its own process) ----------------------------------------------------------------------


async def _load(url: str, subs: list[dict[str, str]], batch: int, concurrency: int, seconds: float,
                forged: bool = False, rate: float = 0.0) -> dict[str, Any]:
    """Closed loop (each connection posts again when answered), or paced at `rate` items/s in total, with the
    latency counted from each post's scheduled time so that queueing in the server is charged to it."""
    import aiohttp

    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    items = 0
    deadline = time.perf_counter() + seconds
    rng = random.Random(1)

    interval = batch * concurrency / rate if rate else 0.0

    async def worker(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal items
        sent = 0
        first = time.perf_counter() + index * interval / concurrency
        while time.perf_counter() < deadline:
            scheduled = time.perf_counter()
            if interval:
                scheduled = first + sent * interval
                sent += 1
                if scheduled >= deadline:
                    break
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            value = []
            for _ in range(batch):
                sub = subs[rng.randrange(len(subs))]
                item_id = "AAMkAG" + secrets.token_urlsafe(24)
                value.append({"subscriptionId": sub["id"],
                              "clientState": "forged" if forged else sub["clientState"],
                              "changeType": "created", "tenantId": TENANT_ID,
                              "resource": f"Users/{uuid.uuid4()}/Messages/{item_id}",
                              "subscriptionExpirationDateTime": sub["expirationDateTime"],
                              "resourceData": {"@odata.type": "#Microsoft.Graph.Message", "id": item_id}})
            body = json.dumps({"value": value}).encode()
            started = scheduled if interval else time.perf_counter()
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as answer:
                await answer.read()
            latencies.append((time.perf_counter() - started) * 1000)
            statuses[answer.status] += 1
            if answer.status == 202:
                items += batch

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session, i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"batch": batch, "concurrency": concurrency, "offered_per_s": rate or None, "posts": len(latencies),
            "accepted_items": items,
            "items_per_s": round(items / elapsed), "posts_per_s": round(len(latencies) / elapsed),
            "p50_ms": round(percentile(latencies, 0.5), 2), "p99_ms": round(percentile(latencies, 0.99), 2),
            "max_ms": round(max(latencies), 1), "statuses": {str(k): v for k, v in statuses.items()}}


def load_process(url: str, subs_file: Path, batch: int, concurrency: int, seconds: float,
                 forged: bool = False, rate: float = 0.0) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--load", url, "--subs-file", str(subs_file), "--batch",
                           str(batch), "--concurrency", str(concurrency), "--load-seconds", str(seconds),
                           "--load-rate", str(rate), *(["--forged"] if forged else [])],
                          capture_output=True, text=True, timeout=seconds + 120, cwd=ROOT, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def _bare(port: int) -> None:
    from aiohttp import web

    async def accept(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/notificationClient", accept)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


# --- parts 1 and 2: the daemon ------------------------------------------------------------------------------


def run_daemon_parts(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    config_path = tmp / "bemsmail.toml"
    write_dev_config(config_path)
    secret = secrets.token_urlsafe(24)
    apns = start_apns_mock(tmp, "mock-apns", 0.0, validate_headers=False, history=args.mailboxes * 40)
    env = dict(os.environ, BEMSMAIL_MOCK_GRAPH_SECRET=secret)
    graph_proc = subprocess.Popen([sys.executable, "-m", "bemsmail.mocks.graph", "--cert-dir", str(tmp / "pki"),
                                   "--tenant-id", TENANT_ID, "--client-id", CLIENT_ID, "--writes-per-20s", "2000",
                                   "--delivery-concurrency", "8"], stdout=subprocess.PIPE,
                                  stderr=(tmp / "mock-graph.log").open("w"), text=True, env=env, cwd=ROOT)
    assert graph_proc.stdout is not None
    ready = json.loads(graph_proc.stdout.readline())
    control = Https(ready["url"], ready["ca_file"])
    port = free_port()
    use_mock_graph(config_path, secret=secret, notification_url=f"http://127.0.0.1:{port}", authority=ready["url"],
                   graph_url=ready["graph_url"], ca_file=ready["ca_file"], extra="writes_per_20s = 2000\n")
    denv = dict(os.environ)
    denv.update({
        "BEMSMAIL_SERVER__PORT": str(port),
        "BEMSMAIL_APNS__APPS__0__ENDPOINT": json.dumps({"host": "127.0.0.1", "port": apns.port,
                                                        "ca_file": str(apns.ca_file)}),
        "BEMSMAIL_APNS__APPS__0__KEY_FILE": str(apns.key_file),
        "BEMSMAIL_APNS__APPS__0__KEY_ID": "ABCDE12345",
        "BEMSMAIL_APNS__APPS__0__TEAM_ID": "TEAM123456",
        "BEMSMAIL_LOGGING__LEVEL": args.log_level,
        "BEMSMAIL_RELAY__COALESCE_SECONDS": "0",
    })
    os.environ.update({k: v for k, v in denv.items() if k.startswith("BEMSMAIL_")})
    print(f"populating {args.mailboxes:,} mailboxes ...", flush=True)
    asyncio.run(populate(config_path, args.mailboxes))
    log = (tmp / "daemon.log").open("wb")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bemsmail", "serve", "--config", str(config_path)], env=denv,
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    bare_port = free_port()
    bare = subprocess.Popen([sys.executable, __file__, "--bare", str(bare_port)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    results: dict[str, Any] = {"mailboxes": args.mailboxes}
    try:
        def metric(name: str) -> float:
            if proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {proc.returncode}")
            try:
                return daemon_metrics(port).get(name, 0.0)
            except OSError:
                return 0.0

        wait_for(lambda: metric("bemsmail_graph_subscriptions") >= args.mailboxes, args.limit,
                 "every subscription")
        subscribed_s = time.perf_counter() - started
        wait_for(lambda: metric("bemsmail_graph_catch_ups_total") >= args.mailboxes, args.limit,
                 "every baseline delta round")
        results["start"] = {"subscribed_s": round(subscribed_s, 1),
                            "baselines_s": round(time.perf_counter() - started, 1),
                            "mock_max_writes_in_20s": control.call("/_mock/stats")["max_writes_in_20s"]}
        print(f"start: {results['start']}", flush=True)

        # --- part 2 first, while the relay is idle: mail → push ------------------------------------------------
        post_json(f"{apns.control_url}/mock/reset")
        order = list(range(args.mailboxes))
        random.Random(7).shuffle(order)
        chosen = order[: int(args.rate * args.seconds)]
        created: dict[int, float] = {}
        batch = 10
        begin = time.perf_counter()
        for i in range(0, len(chosen), batch):
            delay = begin + i / args.rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            group = chosen[i:i + batch]
            at = time.time()
            control.call("/_mock/mail", {"mailboxes": [mailbox(n) for n in group], "subject": "benchmark"})
            for n in group:
                created[n] = at

        def arrivals() -> dict[str, list[float]]:
            found: dict[str, list[float]] = {}
            with urllib.request.urlopen(f"{apns.control_url}/mock/requests?limit={len(chosen) * 2}",  # noqa: S310
                                        timeout=30) as r:
                for record in json.load(r):
                    if record["status"] == 200:
                        found.setdefault(record["token"], []).append(record["at"])
            return found

        wait_for(lambda: len(arrivals()) >= len(chosen), 120, "every push of the latency run", poll=1.0)
        time.sleep(2.0)  # let any duplicate arrive before counting (not a timing assertion)
        got = arrivals()
        latencies = sorted((got[token(n)][0] - created[n]) * 1000 for n in chosen if token(n) in got)
        stats = control.call("/_mock/stats")
        results["latency"] = {"rate": args.rate, "mails": len(chosen), "pushed": len(latencies),
                              "lost": len(chosen) - len(latencies),
                              "duplicates": sum(len(got.get(token(n), [])) > 1 for n in chosen),
                              "p50_ms": round(percentile(latencies, 0.5), 1),
                              "p99_ms": round(percentile(latencies, 0.99), 1), "max_ms": round(latencies[-1], 1),
                              "graph_answer_p99_ms": stats["answer_ms_p99"], "slow_items": stats["slow_items"]}
        print(f"latency: {results['latency']}", flush=True)

        # --- part 1: the webhook under load ---------------------------------------------------------------------
        subs = [s for s in control.call("/_mock/subscriptions")["value"]]
        subs_file = tmp / "subs.json"
        subs_file.write_text(json.dumps([{k: s[k] for k in ("id", "clientState", "expirationDateTime")}
                                         for s in subs]))
        assert bare.stdout is not None and bare.stdout.readline().strip() == "ready"
        rows = []
        ours = f"http://127.0.0.1:{port}/notificationClient"
        bare_url = f"http://127.0.0.1:{bare_port}/notificationClient"
        runs = [("bare aiohttp 202", bare_url, size, False, 0.0) for size in (1, 20)]
        runs += [("bemsmail, forged (no push)", ours, 1, True, 0.0)]
        runs += [("bemsmail paced", ours, size, False, args.offered) for size in (1, 10)]
        runs += [("bemsmail", ours, size, False, 0.0) for size in (1, 20)]  # saturation last: it leaves a backlog
        for target, url, size, forged, rate in runs:
            cpu_before = cpu_seconds(proc.pid)
            row = load_process(url, subs_file, size, args.concurrency, args.load_seconds, forged, rate)
            row["target"] = target
            if url == ours:
                row["daemon_cpu_per_item_us"] = round((cpu_seconds(proc.pid) - cpu_before)
                                                      / max(1, row["accepted_items"]) * 1e6, 1)
                # the pushes the load caused drain before the next run
                want = metric("bemsmail_graph_notifications_total")
                wait_for(lambda: metric("bemsmail_graph_events_pending") == 0, 600, "the relay to drain")
                row["notifications_counted"] = int(want)
            rows.append(row)
            print(f"webhook: {row}", flush=True)
        results["webhook"] = rows
    finally:
        for child in (proc, bare, graph_proc):
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
        log.close()
        apns.process.close()
    return results


# --- part 3: renewals of 100,000 subscriptions ---------------------------------------------------------------


async def run_renewals(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from bemsmail.config import DatabaseConfig, GraphConfig
    from bemsmail.core.clock import SystemClock
    from bemsmail.core.model import Backend, FolderState, MailboxEvent
    from bemsmail.mocks.graph import GraphApp, MockGraph
    from bemsmail.mocks.tls import ensure_test_pki
    from bemsmail.sources.graph.source import GraphSource, digest
    from bemsmail.store.engine import create_engine
    from bemsmail.store.schema import migrate
    from bemsmail.store.sql import SqlStore

    count = args.subscriptions
    pki = ensure_test_pki(tmp / "pki-renewals")
    secret = secrets.token_urlsafe(24)
    engine = create_engine(DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp / 'renewals.db'}"))
    await migrate(engine)
    clock = SystemClock()
    store = SqlStore(engine, clock)
    results: dict[str, Any] = {"subscriptions": count}
    async with MockGraph(pki, [GraphApp(TENANT_ID, CLIENT_ID, secret)]) as mock:
        secret_file = tmp / "renewals-secret"
        secret_file.write_text(secret)
        settings = GraphConfig.model_validate({
            "tenant_id": TENANT_ID, "client_id": CLIENT_ID, "client_secret": secret,
            "notification_url": "http://127.0.0.1:9", "authority": mock.url, "graph_url": mock.graph_url,
            "ca_file": str(pki.ca_cert)})
        print(f"seeding {count:,} subscriptions made at one moment ...", flush=True)
        made_at = datetime.now(UTC)
        expires = made_at + timedelta(minutes=settings.subscription_minutes)
        states = []
        for n in range(count):
            client_state = secrets.token_urlsafe(32)
            sub = mock.add_subscription(CLIENT_ID, mailbox(n), settings.webhook_url, client_state, expires,
                                        settings.lifecycle_url)
            states.append(FolderState(mailbox(n), "Inbox", sync_state=mock.delta_link(mailbox(n)), remote_id=sub.id,
                                      client_state=digest(client_state), expires_at=expires))
        import sqlalchemy as sa

        from bemsmail.store.tables import mailboxes

        async with engine.begin() as conn:
            for start in range(0, count, 5000):
                await conn.execute(sa.insert(mailboxes), [
                    {"address": mailbox(n), "tenant": "example", "backend": "graph", "state": "active",
                     "created_at": made_at, "updated_at": made_at} for n in range(start, min(count, start + 5000))])
        for start in range(0, count, 5000):
            await store.save_folder_states(Backend.GRAPH, states[start:start + 5000])

        async def sink(_event: MailboxEvent) -> None:
            return None

        offset = [0.0]
        real = clock.monotonic
        clock.monotonic = lambda: real() + offset[0]  # type: ignore[method-assign]
        source = GraphSource(settings, store, clock, sink, name="bench")
        cpu_before = time.process_time()
        began = time.perf_counter()
        await source.start()
        for n in range(count):
            await source.watch(mailbox(n), frozenset({"Inbox"}))
        await source.reconciled.wait()
        results["start_and_reconcile_s"] = round(time.perf_counter() - began, 1)
        results["list_pages"] = mock.stats.lists
        # the catch-up rounds a restart makes (one per mailbox, from the stored delta links)
        while source.stats.catch_ups < count:  # noqa: ASYNC110 - the source has no event for this
            await asyncio.sleep(0.5)
        results["catch_ups_s"] = round(time.perf_counter() - began, 1)
        results["process_cpu_s"] = round(time.process_time() - cpu_before, 1)

        due = source.renewals_due(within_seconds=settings.subscription_minutes * 60)
        windows = Counter(int(d // 20) for d in due)
        results["schedule"] = {
            "renewals_scheduled": len(due), "first_h": round(due[0] / 3600, 1), "last_h": round(due[-1] / 3600, 1),
            "busiest_20s_window": max(windows.values()), "mean_per_window": round(len(due) / max(1, len(
                range(int(due[0] // 20), int(due[-1] // 20) + 1))), 1),
            "limit": settings.writes_per_20s, "graph_limit": 1000}
        print(f"schedule: {results['schedule']}", flush=True)

        # forced bunching: every renewal of the first `--bunch-hours` falls due at once
        horizon = due[0] + args.bunch_hours * 3600
        bunched = sum(1 for d in due if d <= horizon)
        writes_before = len(mock.write_times)
        offset[0] = horizon
        began = time.perf_counter()
        while source.stats.renewals < bunched:
            await asyncio.sleep(0.5)
            if time.perf_counter() - began > args.limit:
                raise SystemExit("gave up waiting for the bunched renewals")
        took = time.perf_counter() - began
        times = mock.write_times[writes_before:]
        busiest = 0
        j = 0
        for i, moment in enumerate(times):
            while times[j] < moment - 20:
                j += 1
            busiest = max(busiest, i - j + 1)
        results["bunched"] = {"renewals": bunched, "took_s": round(took, 1), "busiest_20s_window": busiest,
                              "throttled_by_graph": mock.stats.throttled, "limit": settings.writes_per_20s,
                              "rate_per_s": round(bunched / took, 1)}
        print(f"bunched: {results['bunched']}", flush=True)
        clock.monotonic = real  # type: ignore[method-assign]
        await source.stop()
    await engine.dispose()
    return results


def print_table(r: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str]] = []
    if "daemon" in r:
        d = r["daemon"]
        rows.append(("subscribed mailboxes (start → all subscribed)",
                     f"{d['mailboxes']:,} in {d['start']['subscribed_s']} s", ""))
        for w in d["webhook"]:
            mode = f"offered {w['offered_per_s']:,.0f}/s" if w.get("offered_per_s") else f"{w['concurrency']} conns"
            rows.append((f"webhook {w['target']}, {w['batch']}/post, {mode}: items/s",
                         f"{w['items_per_s']:,}", "≥ 5,000/s" if w["target"].startswith("bemsmail") else ""))
            rows.append(("  answer p50 / p99 / max", f"{w['p50_ms']} / {w['p99_ms']} / {w['max_ms']} ms",
                         "p99 < 100 ms" if w["target"].startswith("bemsmail") else ""))
        lat = d["latency"]
        rows.append((f"mail → push at {lat['rate']:g}/s: p50 / p99 / max",
                     f"{lat['p50_ms']} / {lat['p99_ms']} / {lat['max_ms']} ms", ""))
        rows.append(("  lost / duplicated", f"{lat['lost']} / {lat['duplicates']} of {lat['mails']:,}", "0 / 0"))
    if "renewals" in r:
        s, b = r["renewals"]["schedule"], r["renewals"]["bunched"]
        rows.append(("subscriptions managed", f"{r['renewals']['subscriptions']:,}", "100,000"))
        rows.append(("  restart: stored subscriptions reconciled", f"{r['renewals']['start_and_reconcile_s']} s", ""))
        rows.append(("  schedule: busiest 20-s window", f"{s['busiest_20s_window']} renewals (mean "
                     f"{s['mean_per_window']})", f"≤ {s['limit']} (Graph: 1,000)"))
        rows.append((f"  bunched: {b['renewals']:,} due at once, busiest 20 s", f"{b['busiest_20s_window']} writes",
                     f"≤ {b['limit']}"))
        rows.append(("  bunched: throttled by Graph", f"{b['throttled_by_graph']}", "0"))
    print_rows(rows, value_width=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mailboxes", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=500.0, help="new mails per second in the latency run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the latency run")
    parser.add_argument("--concurrency", type=int, default=32, help="connections of the webhook load")
    parser.add_argument("--load-seconds", type=float, default=10.0)
    parser.add_argument("--subscriptions", type=int, default=100_000)
    parser.add_argument("--bunch-hours", type=float, default=1.0)
    parser.add_argument("--parts", default="daemon,renewals")
    parser.add_argument("--limit", type=float, default=1800.0)
    parser.add_argument("--log-level", default="warning")
    # internal: the load generator and the bare server run as their own processes
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--subs-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--bare", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--forged", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load-rate", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--offered", type=float, default=5000.0, help="items/s of the paced webhook runs")
    args = parser.parse_args()
    if args.load:
        subs = json.loads(args.subs_file.read_text())
        print(json.dumps(asyncio.run(_load(args.load, subs, args.batch, args.concurrency, args.load_seconds,
                                            args.forged, args.load_rate))))
        return 0
    if args.bare:
        asyncio.run(_bare(args.bare))
        return 0
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-graph-") as tmp:
        if "daemon" in args.parts:
            results["daemon"] = run_daemon_parts(args, Path(tmp))
        if "renewals" in args.parts:
            results["renewals"] = asyncio.run(run_renewals(args, Path(tmp)))
    print_table(results)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
