#!/usr/bin/env python3
"""EWS at scale, one daemon process against the mock Exchange and the mock APNs (each in its own process):

1. cold start: N mailboxes with one device each are in the store; time until every mailbox is subscribed, every
   group streams, and every first catch-up is done; the daemon's resident memory;
2. latency: new mail created in the mock at a fixed rate over distinct mailboxes → push received by the mock APNs
   (both timestamps on this machine's clock), p50/p99/max, and any mail without a push;
3. mass drop: the mock aborts every stream at once while mail keeps arriving; time until every group streams
   again, until every missed mail is pushed, and whether any mail was lost or pushed twice.

Prints a table and a final JSON line. Loopback only; everything it starts it stops.

    .venv/bin/python scripts/bench_ews.py [--mailboxes 100000] [--rate 1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_push import (
    ROOT,
    MockProcess,
    cpu_seconds,
    get_json,
    percentile,
    post_json,
    print_rows,
)

from bemsmail.devconfig import write_dev_config
from bemsmail.devservices import free_port

EWS_USER = "svc-bemsmail@example.com"
DOMAIN = "example.com"
METRIC = re.compile(r'^(bemsmail_ews_[a-z_]+)\{([^}]*)\} ([0-9.e+-]+)$', re.M)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def mailbox(n: int) -> str:
    return f"user{n:06d}@{DOMAIN}"


def token(n: int) -> str:
    return f"{n:064x}"


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    port: int

    def metrics(self) -> dict[str, float]:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        found: dict[str, float] = {}
        for name, labels, value in METRIC.findall(text):
            key = name + ("{" + labels + "}" if "state=" in labels else "")
            found[key] = found.get(key, 0.0) + float(value)
        return found

    def streaming(self) -> float:
        return self.metrics().get('bemsmail_ews_groups{state="streaming",tenant="example"}', 0.0)


async def populate(config_path: Path, count: int) -> None:
    """N mailboxes with one iPhone each, written straight into the store (the API path is issue 2's benchmark)."""
    import sqlalchemy as sa

    from bemsmail.config import load_config
    from bemsmail.core.model import DeviceSettings, token_fingerprint
    from bemsmail.store.engine import create_engine
    from bemsmail.store.schema import migrate
    from bemsmail.store.tables import mailboxes, registrations

    config = load_config(config_path, {})
    engine = create_engine(config.database)
    await migrate(engine)
    now = datetime.now(UTC)
    settings = DeviceSettings().model_dump(mode="json")
    async with engine.begin() as conn:
        for start in range(0, count, 5000):
            chunk = range(start, min(count, start + 5000))
            await conn.execute(sa.insert(mailboxes), [
                {"address": mailbox(n), "tenant": "example", "backend": "ews", "state": "active",
                 "created_at": now, "updated_at": now} for n in chunk])
            await conn.execute(sa.insert(registrations), [
                {"id": uuid.uuid4().hex, "mailbox": mailbox(n), "device_id": "iphone", "platform": "ios",
                 "token": token(n), "token_hash": token_fingerprint(token(n)), "app_id": "com.example.mail",
                 "environment": "production", "locale": None, "timezone": None, "settings": settings,
                 "created_at": now, "updated_at": now, "last_seen_at": now, "last_push_at": None} for n in chunk])
    await engine.dispose()


def wait_for(condition: Callable[[], bool], limit: float, what: str, poll: float = 0.5,
             detail: Callable[[], object] | None = None) -> float:
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > limit:
            raise SystemExit(f"gave up after {limit:.0f} s waiting for {what}" + (f": {detail()}" if detail else ""))
        time.sleep(poll)
    return time.perf_counter() - started


class Mails:
    """Creates mail in the mock at a fixed rate, each in a mailbox not used before in this run."""

    def __init__(self, ews_url: str, population: int, seed: int = 7) -> None:
        self._url = ews_url
        self._unused = list(range(population))
        random.Random(seed).shuffle(self._unused)
        self.created: dict[int, float] = {}

    def burst(self, count: int) -> list[int]:
        chosen = [self._unused.pop() for _ in range(count)]
        at = time.time()
        post_json(f"{self._url}/_mock/mail/bulk", {"mailboxes": [mailbox(n) for n in chosen],
                                                   "subject": "benchmark"})
        for n in chosen:
            self.created[n] = at
        return chosen

    def paced(self, rate: float, seconds: float, batch: int = 10) -> list[int]:
        chosen: list[int] = []
        interval = batch / rate
        start = time.perf_counter()
        for i in range(int(rate * seconds / batch)):
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            chosen += self.burst(batch)
        return chosen


def apns_arrivals(control_url: str, limit: int) -> dict[str, list[float]]:
    arrivals: dict[str, list[float]] = {}
    for record in get_json(f"{control_url}/mock/requests?limit={limit}"):
        if record["status"] == 200:
            arrivals.setdefault(record["token"], []).append(record["at"])
    return arrivals


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from bench_push import start_apns_mock

    config_path = tmp / "bemsmail.toml"
    write_dev_config(config_path)
    password = (tmp / "secrets" / "ews-password").read_text().strip()
    ews = MockProcess([sys.executable, "-m", "bemsmail.mocks.ews", "--port", "0", "--user", f"{EWS_USER}:{password}",
                       "--domain", DOMAIN, "--backends", str(args.backends)], tmp / "mock-ews.log")
    ews_base = ews.ready.strip().rsplit(" ", 1)[-1]
    history = args.mailboxes + 10
    apns = start_apns_mock(tmp, "mock-apns", 0.0, validate_headers=False, history=history)
    try:
        env = dict(os.environ)
        env.update({
            "BEMSMAIL_TENANTS__0__EWS__URL": f"{ews_base}/EWS/Exchange.asmx",
            "BEMSMAIL_TENANTS__0__EWS__THREADS": str(args.threads),
            "BEMSMAIL_APNS__APPS__0__ENDPOINT": json.dumps({"host": "127.0.0.1", "port": apns.port,
                                                            "ca_file": str(apns.ca_file)}),
            "BEMSMAIL_APNS__APPS__0__KEY_FILE": str(apns.key_file),
            "BEMSMAIL_APNS__APPS__0__KEY_ID": "ABCDE12345",
            "BEMSMAIL_APNS__APPS__0__TEAM_ID": "TEAM123456",
            "BEMSMAIL_LOGGING__LEVEL": args.log_level,
        })
        port = free_port()
        env["BEMSMAIL_SERVER__PORT"] = str(port)
        print(f"populating {args.mailboxes:,} mailboxes ...", flush=True)
        os.environ.update({k: v for k, v in env.items() if k.startswith("BEMSMAIL_")})
        asyncio.run(populate(config_path, args.mailboxes))
        log = (tmp / "daemon.log").open("wb")
        print("starting the daemon ...", flush=True)
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "bemsmail", "serve", "--config", str(config_path)],
                                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        daemon = Daemon(proc, port)
        results: dict[str, Any] = {"mailboxes": args.mailboxes, "rate": args.rate, "threads": args.threads}
        try:
            wait_for(lambda: _up(daemon), 120, "the daemon's /metrics")
            groups = -(-args.mailboxes // 200)
            peak = [0.0]

            def sampled(check: Callable[[], bool]) -> Callable[[], bool]:
                def inner() -> bool:
                    peak[0] = max(peak[0], rss_mib(proc.pid))
                    return check()
                return inner

            wait_for(sampled(lambda: daemon.metrics().get("bemsmail_ews_subscriptions", 0) >= args.mailboxes),
                     args.limit, "every subscription")
            t_subscribed = time.perf_counter() - started
            wait_for(sampled(lambda: daemon.streaming() >= groups), args.limit, "every group streaming")
            t_streaming = time.perf_counter() - started
            wait_for(sampled(lambda: daemon.metrics().get("bemsmail_ews_catch_ups_total", 0) >= args.mailboxes),
                     args.limit, "every first catch-up", detail=daemon.metrics)
            t_caught_up = time.perf_counter() - started
            results["cold_start"] = {"subscribed_s": round(t_subscribed, 1), "streaming_s": round(t_streaming, 1),
                                     "caught_up_s": round(t_caught_up, 1), "groups": groups,
                                     "rss_mib": round(rss_mib(proc.pid), 1), "rss_peak_mib": round(peak[0], 1),
                                     "daemon_cpu_s": round(cpu_seconds(proc.pid), 1)}
            print(f"cold start: {results['cold_start']}", flush=True)

            # --- latency at a fixed rate -----------------------------------------------------------------------
            mails = Mails(ews_base, args.mailboxes)
            post_json(f"{apns.control_url}/mock/reset")
            cpu_before = cpu_seconds(proc.pid)
            chosen = mails.paced(args.rate, args.seconds)
            wait_for(lambda: len(apns_arrivals(apns.control_url, history)) >= len(chosen), 60,
                     "every push of the latency run", poll=1.0)
            arrivals = apns_arrivals(apns.control_url, history)
            latencies = sorted((arrivals[token(n)][0] - mails.created[n]) * 1000 for n in chosen
                               if token(n) in arrivals)
            results["latency"] = {
                "mails": len(chosen), "pushed": len(latencies), "lost": len(chosen) - len(latencies),
                "duplicates": sum(len(arrivals.get(token(n), [])) > 1 for n in chosen),
                "p50_ms": round(percentile(latencies, 0.5), 1), "p99_ms": round(percentile(latencies, 0.99), 1),
                "max_ms": round(latencies[-1], 1) if latencies else None,
                "daemon_cpu_per_mail_ms": round((cpu_seconds(proc.pid) - cpu_before) / max(1, len(chosen)) * 1000,
                                                3),
                "rss_mib": round(rss_mib(proc.pid), 1)}
            print(f"latency: {results['latency']}", flush=True)

            # --- every stream dropped at once ------------------------------------------------------------------
            post_json(f"{apns.control_url}/mock/reset")
            catch_ups_before = daemon.metrics().get("bemsmail_ews_catch_ups_total", 0)
            dropped_at = time.perf_counter()
            dropped = post_json(f"{ews_base}/_mock/drop-streams")["dropped"]
            during = mails.paced(args.rate, args.drop_seconds)  # mail keeps arriving while streams are down
            wait_for(lambda: daemon.streaming() >= groups
                     and get_json(f"{ews_base}/_mock/stats")["open_streams"] >= groups,
                     args.limit, "every group streaming again", poll=0.2)
            t_restream = time.perf_counter() - dropped_at
            wait_for(lambda: len(apns_arrivals(apns.control_url, history)) >= len(during), args.limit,
                     "every mail from the outage pushed", poll=1.0)
            t_delivered = time.perf_counter() - dropped_at
            wait_for(lambda: daemon.metrics().get("bemsmail_ews_catch_ups_total", 0)
                     >= catch_ups_before + args.mailboxes, args.limit, "every catch-up after the drop", poll=1.0)
            t_recaught = time.perf_counter() - dropped_at
            time.sleep(2.0)  # let any duplicate arrive before counting (not a timing assertion)
            arrivals = apns_arrivals(apns.control_url, history)
            counts = Counter(len(arrivals.get(token(n), [])) for n in during)
            results["drop"] = {"streams_dropped": dropped, "mails_during": len(during),
                               "all_streaming_s": round(t_restream, 1), "all_pushed_s": round(t_delivered, 1),
                               "all_caught_up_s": round(t_recaught, 1), "lost": counts.get(0, 0),
                               "duplicated": sum(v for k, v in counts.items() if k > 1),
                               "rss_mib": round(rss_mib(proc.pid), 1)}
            print(f"drop: {results['drop']}", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        return results
    finally:
        ews.close()
        apns.process.close()


def _up(daemon: Daemon) -> bool:
    if daemon.proc.poll() is not None:
        raise SystemExit(f"the daemon exited with {daemon.proc.returncode}")
    try:
        daemon.metrics()
    except OSError:
        return False
    return True


def print_table(r: dict[str, Any]) -> None:
    c, lat, drop = r["cold_start"], r["latency"], r["drop"]
    rows = [
        ("mailboxes watched", f"{r['mailboxes']:,} in {c['groups']:,} groups", "100,000"),
        ("resident memory after cold start", f"{c['rss_mib']:,} MiB (peak {c['rss_peak_mib']:,})", "< 2 GiB"),
        ("cold start: all subscribed", f"{c['subscribed_s']} s", ""),
        ("cold start: all groups streaming", f"{c['streaming_s']} s", ""),
        ("cold start: all first syncs done", f"{c['caught_up_s']} s", ""),
        (f"mail → push at {r['rate']:,}/s: p50 / p99 / max",
         f"{lat['p50_ms']} / {lat['p99_ms']} / {lat['max_ms']} ms", "p99 < 100 ms"),
        ("  lost / duplicated", f"{lat['lost']} / {lat['duplicates']} of {lat['mails']:,}", "0 / 0"),
        ("  daemon CPU per mail", f"{lat['daemon_cpu_per_mail_ms']} ms", ""),
        ("drop all streams: all streaming again", f"{drop['all_streaming_s']} s", ""),
        ("  mail during the outage pushed", f"{drop['all_pushed_s']} s", ""),
        ("  every mailbox caught up", f"{drop['all_caught_up_s']} s", ""),
        ("  lost / duplicated", f"{drop['lost']} / {drop['duplicated']} of {drop['mails_during']:,}", "0 / 0"),
    ]
    print_rows(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mailboxes", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="new mails per second in the latency run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the latency run")
    parser.add_argument("--drop-seconds", type=float, default=2.0, help="mail created right after the drop")
    parser.add_argument("--backends", type=int, default=20, help="mailbox servers in the mock")
    parser.add_argument("--threads", type=int, default=32, help="the tenant's exchangelib threads")
    parser.add_argument("--limit", type=float, default=1800.0, help="give up on any phase after this many seconds")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ews-") as tmp:
        results = run(args, Path(tmp))
    print_table(results)
    results["targets_met"] = (results["cold_start"]["rss_mib"] < 2048 and results["latency"]["p99_ms"] < 100
                              and results["latency"]["lost"] == 0 and results["drop"]["lost"] == 0
                              and results["drop"]["duplicated"] == 0)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
