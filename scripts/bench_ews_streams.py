#!/usr/bin/env python3
"""exchangelib's GetStreamingEvents (a thread per stream) against ours (aiohttp, one event loop), side by side in
one run, on the same subscriptions of the mock Exchange (its own process): the same groups of 200 are streamed by
one client, then by the other, while new mail arrives at a fixed rate over distinct mailboxes. Reports mail → event
latency, CPU seconds of this process per 1,000 events, threads and resident memory.

    .venv/bin/python scripts/bench_ews_streams.py [--groups 50] [--rate 500] [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
from bench_push import MockProcess, percentile, post_json

from bemsmail.config import EwsConfig
from bemsmail.sources.ews.exchange import INBOX, ExchangeClient
from bemsmail.sources.ews.httpauth import BasicAuth
from bemsmail.sources.ews.soap import get_streaming_events_request
from bemsmail.sources.ews.stream import stream_events

USER, PASSWORD, DOMAIN = "svc", "secret", "example.com"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Group:
    anchor: str
    cookie: str | None
    mailbox_of: dict[str, str] = field(default_factory=dict)  # subscription id → mailbox


def mailbox(n: int) -> str:
    return f"s{n:06d}@{DOMAIN}"


async def subscribe_all(ews_url: str, groups: int) -> list[Group]:
    settings = EwsConfig.model_validate({"url": ews_url, "auth": "basic", "username": USER, "password": PASSWORD,
                                         "threads": 32})
    client = ExchangeClient(settings)
    made: list[Group] = []
    try:
        for g in range(groups):
            members = [mailbox(g * 200 + i) for i in range(200)]
            anchor = members[0]
            first, cookie = await client.subscribe_streaming(anchor, [INBOX], ["NewMailEvent"], anchor=anchor,
                                                             cookie=None)
            group = Group(anchor, cookie, {first: anchor})
            ids = await asyncio.gather(*(client.subscribe_streaming(m, [INBOX], ["NewMailEvent"], anchor=anchor,
                                                                    cookie=cookie) for m in members[1:]))
            group.mailbox_of.update({sid: m for (sid, _), m in zip(ids, members[1:], strict=True)})
            made.append(group)
    finally:
        await client.close()
    return made


class Load:
    """New mail at a fixed rate, one per mailbox not used before, from a thread of its own."""

    def __init__(self, base: str, population: int) -> None:
        self.base = base
        self.population = population
        self.unused: list[int] = []
        self._random = random.Random(11)

    def run(self, rate: float, seconds: float) -> dict[str, float]:
        """Each round uses each mailbox at most once (rounds start afresh: latency is per round)."""
        self.unused = list(range(self.population))
        self._random.shuffle(self.unused)
        created: dict[str, float] = {}
        batch = 10
        start = time.perf_counter()
        for i in range(int(rate * seconds / batch)):
            delay = start + i * batch / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            chosen = [mailbox(self.unused.pop()) for _ in range(batch)]
            at = time.time()
            post_json(f"{self.base}/_mock/mail/bulk", {"mailboxes": chosen})
            created.update(dict.fromkeys(chosen, at))
        return created


def summarize(name: str, created: dict[str, float], seen: dict[str, float], cpu: float, threads: int,
              rss_before: float, rss_peak: float) -> dict[str, Any]:
    latencies = [(seen[m] - t) * 1000 for m, t in created.items() if m in seen]
    return {"client": name, "mails": len(created), "events": len(latencies), "missed": len(created) - len(latencies),
            "p50_ms": round(percentile(latencies, 0.5), 1), "p99_ms": round(percentile(latencies, 0.99), 1),
            "cpu_s_per_1000": round(cpu / max(1, len(latencies)) * 1000, 3), "threads": threads,
            "rss_growth_mib": round(rss_peak - rss_before, 1)}


def exchangelib_round(ews_url: str, groups: list[Group], load: Load, rate: float, seconds: float) -> dict[str, Any]:
    from exchangelib import BASIC, IMPERSONATION, Account, Configuration, Credentials, Version, close_connections
    from exchangelib.services import GetStreamingEvents
    from exchangelib.version import EXCHANGE_2016

    # exchangelib caches one Protocol (and its session pool) per endpoint and credentials: without this, the
    # streams would share the 32-session pool the subscribing client left behind, and the streams beyond 32 would
    # wait for a session until another stream's connection timed out.
    close_connections()
    config = Configuration(service_endpoint=ews_url, credentials=Credentials(USER, PASSWORD), auth_type=BASIC,
                           version=Version(build=EXCHANGE_2016), max_connections=len(groups) + 4)
    seen: dict[str, float] = {}
    stop = threading.Event()
    lock = threading.Lock()

    def stream(group: Group) -> None:
        account = Account(group.anchor, config=config, autodiscover=False, access_type=IMPERSONATION)
        account.affinity_cookie = group.cookie
        while not stop.is_set():
            service = GetStreamingEvents(account=account)
            for notification in service.call(subscription_ids=list(group.mailbox_of), connection_timeout=1):
                now = time.time()
                owner = group.mailbox_of.get(notification.subscription_id)
                if owner is not None and notification.events:
                    with lock:
                        seen.setdefault(owner, now)
                if stop.is_set():
                    service.stop_streaming()
                    break

    rss_before = rss_mib()
    threads = [threading.Thread(target=stream, args=(g,), daemon=True) for g in groups]
    for t in threads:
        t.start()
    time.sleep(2.0)  # every stream connected (the mock's heartbeat is 1 s)
    cpu = time.process_time()
    created = load.run(rate, seconds)
    time.sleep(2.0)
    cpu = time.process_time() - cpu
    peak = rss_mib()
    count = threading.active_count()
    stop.set()
    for t in threads:
        t.join(timeout=10)
    return summarize("exchangelib (thread per stream)", created, seen, cpu, count, rss_before, peak)


async def ours_round(ews_url: str, groups: list[Group], load: Load, rate: float, seconds: float) -> dict[str, Any]:
    seen: dict[str, float] = {}
    auth = BasicAuth(USER, PASSWORD)

    async def stream(group: Group) -> None:
        body = get_streaming_events_request(list(group.mailbox_of), 1, impersonate=group.anchor)
        headers = {"X-AnchorMailbox": group.anchor, "X-PreferServerAffinity": "true"}
        if group.cookie:
            headers |= {"X-BackEndOverrideCookie": group.cookie, "Cookie": f"X-BackEndOverrideCookie={group.cookie}"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                         cookie_jar=aiohttp.DummyCookieJar()) as session:
            while True:
                async with stream_events(session, ews_url, auth, body, headers=headers) as messages:
                    async for message in messages:
                        now = time.time()
                        for notification in message.notifications:
                            owner = group.mailbox_of.get(notification.subscription_id)
                            if owner is not None and notification.events:
                                seen.setdefault(owner, now)

    rss_before = rss_mib()
    tasks = [asyncio.create_task(stream(g)) for g in groups]
    await asyncio.sleep(2.0)
    cpu = time.process_time()
    created = await asyncio.to_thread(load.run, rate, seconds)
    await asyncio.sleep(2.0)
    cpu = time.process_time() - cpu
    peak = rss_mib()
    count = threading.active_count()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # the load thread's own CPU is in both rounds' figures alike
    return summarize("ours (aiohttp, one loop)", created, seen, cpu, count, rss_before, peak)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=50, help="streams of 200 subscriptions each")
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each client")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp:
        mock = MockProcess([sys.executable, "-m", "bemsmail.mocks.ews", "--port", "0", "--user",
                            f"{USER}:{PASSWORD}", "--domain", DOMAIN, "--backends", "20",
                            "--heartbeat-seconds", "1"], Path(tmp) / "mock-ews.log")
        try:
            base = mock.ready.strip().rsplit(" ", 1)[-1]
            ews_url = f"{base}/EWS/Exchange.asmx"
            print(f"subscribing {args.groups * 200:,} mailboxes ...", flush=True)
            groups = asyncio.run(subscribe_all(ews_url, args.groups))
            load = Load(base, args.groups * 200)
            rows = []
            for _ in range(args.rounds):
                rows.append(exchangelib_round(ews_url, groups, load, args.rate, args.seconds))
                print(rows[-1], flush=True)
                rows.append(asyncio.run(ours_round(ews_url, groups, load, args.rate, args.seconds)))
                print(rows[-1], flush=True)
        finally:
            mock.close()
    print(f"\n{args.groups} streams x 200 subscriptions, {args.rate:g} new mails/s for {args.seconds:g} s per round")
    print(f"{'client':34} {'p50 ms':>8} {'p99 ms':>8} {'missed':>7} {'CPU s/1000 ev':>14} {'threads':>8} "
          f"{'RSS +MiB':>9}")
    for r in rows:
        print(f"{r['client']:34} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['missed']:>7} {r['cpu_s_per_1000']:>14} "
              f"{r['threads']:>8} {r['rss_growth_mib']:>9}")
    print(json.dumps({"groups": args.groups, "rate": args.rate, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
