#!/usr/bin/env python3
"""Benchmark: registration upserts per second and latency, 100 concurrent clients on loopback, SQLite vs MariaDB.

Starts `bemsmail serve` as its own process (as in production) on each database, drives it with concurrent HTTP
clients from this process, and prints a table and one JSON line. MariaDB is a throwaway server started here
(Debian mariadb-server) with production durability (innodb_flush_log_at_trx_commit=1) unless --fast-disk.

The daemon's mail sources are stand-ins by default (--sources none): registrations are checked, stored and
published, and the Watcher reads each changed mailbox's folders and tells its tenant's source to watch it, as
always, but the stand-in source does nothing with that. The dev config's EWS tenant points at a mock that is not
running here, so with --sources config every new mailbox's Subscribe fails and is retried with back-off on
exchangelib's threads: a third of the daemon's CPU that is neither registration work nor what a reachable Exchange
would cost (bench_ews.py measures that).

After each run the script waits until the daemon is idle again (the Watcher has caught up) and charges that CPU
to the run too, so work deferred past the end of a run is neither hidden nor billed to the next run.

    .venv/bin/python scripts/bench_registrations.py [--backends sqlite,mariadb] [--clients 100] [--seconds 20]
    .venv/bin/python scripts/bench_registrations.py --compare ../baseline   # the same runs against another checkout
    .venv/bin/python scripts/bench_registrations.py --backends mariadb --paced-only   # on a fresh, empty database
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from bench_push import cpu_seconds  # noqa: E402

from bemsmail.devconfig import write_dev_config  # noqa: E402
from bemsmail.devservices import free_port  # noqa: E402

# `bemsmail serve` whose tenants' mail sources accept watches and do nothing (--sources none); everything else
# is the real command.
SERVE_WITH_STAND_IN_SOURCES = """
import sys
import bemsmail.app

class StandInSource:
    async def start(self): pass
    async def stop(self): pass
    async def watch(self, mailbox, folders): pass
    async def unwatch(self, mailbox): pass
    async def item_details(self, mailbox, item_ids): return {}
    async def unread_count(self, mailbox): return None

bemsmail.app.build_sources = lambda config, *args, **kwargs: {t.name: StandInSource() for t in config.tenants}
from bemsmail.cli import main
sys.exit(main(sys.argv[1:]))
"""


class LeanClient:
    """One keep-alive HTTP/1.1 connection with pre-built headers: a load generator that leaves the CPU of this
    2-core machine to the server it measures (aiohttp's client costs several times more per request)."""

    def __init__(self, port: int, key: str) -> None:
        self._port = port
        self._head = (f"POST /api/v1/registrations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-API-Key: {key}\r\n"
                      "Content-Type: application/json\r\nContent-Length: ")
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> int:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self._port)
        assert self._reader is not None
        self._writer.write(f"{self._head}{len(body)}\r\n\r\n".encode() + body)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self._reader.readexactly(length)
        return status

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def drive(port: int, key: str, clients: int, seconds: float, warmup: float, rate: float,
                lean: bool = True) -> dict[str, Any]:
    """Closed loop (rate 0: each client sends as soon as its last answer came) or paced (`rate` requests/s
    offered in total, whatever the answers do). Paced latency counts from the scheduled send time, so a
    server that falls behind is charged for the queueing it causes (no coordinated omission)."""
    url = f"http://127.0.0.1:{port}/api/v1/registrations"
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    sent = 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds
    slots = iter(range(10**9))

    run = f"r{int(rate)}"  # each run registers new devices: the paced run must not only update the first's

    async def client(session: aiohttp.ClientSession, n: int) -> None:
        nonlocal sent
        lean_client = LeanClient(port, key) if lean else None
        # Each client is a stream of app installs: a new device (and every second time a new mailbox) or the
        # re-registration of one of its recent devices (as apps do at launch), about half each.
        recent: list[tuple[str, str, str]] = []
        i = 0
        while time.perf_counter() < stop_at:
            if recent and i % 2:
                mailbox, device_id, token = recent[i % len(recent)]
            else:
                mailbox, device_id, token = (f"{run}-user{n}-{i // 2}@example.com", f"{run}-c{n}-d{i}",
                                             secrets.token_hex(32))
                recent = [*recent[-7:], (mailbox, device_id, token)]
            body = json.dumps({"mailbox": mailbox, "device_id": device_id, "platform": "ios", "token": token,
                               "app_id": "com.example.mail", "timezone": "Europe/Berlin"})
            t0 = time.perf_counter()
            if rate:
                t0 = start + next(slots) / rate
                if t0 >= stop_at:
                    break
                await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
            if lean_client is not None:
                status = await lean_client.post(body.encode())
            else:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            t1 = time.perf_counter()
            sent += 1
            if t0 >= measure_from:
                latencies.append(t1 - t0)
                statuses[status] = statuses.get(status, 0) + 1
            i += 1
        if lean_client is not None:
            await lean_client.close()

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session, n) for n in range(clients)))
    latencies.sort()
    ok = statuses.get(200, 0) + statuses.get(201, 0)
    return {
        "requests": len(latencies),
        "sent": sent,
        "ok": ok,
        "errors": len(latencies) - ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "mode": f"paced {rate:g}/s" if rate else "max",
        "upserts_per_s": round(ok / seconds, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "max_ms": round(latencies[-1] * 1000, 2) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else None,
    }


def wait_healthy(port: int, proc: subprocess.Popen[bytes]) -> None:
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("daemon not ready within 60 s")


def wait_idle(pid: int, limit: float = 120.0) -> float:
    """Seconds until the daemon has used under a tenth of a core for two seconds on end (it has caught up)."""
    start = time.monotonic()
    quiet_since = start
    before = cpu_seconds(pid)
    while time.monotonic() - quiet_since < 2.0 and time.monotonic() - start < limit:
        time.sleep(0.25)
        now = cpu_seconds(pid)
        if now - before > 0.025:
            quiet_since = time.monotonic()
        before = now
    return round(quiet_since - start, 1)


def run_backend(name: str, args: argparse.Namespace, stack: ExitStack, tree: Path = ROOT) -> list[dict[str, Any]]:
    """Every run on one backend against the daemon of `tree` (this checkout, or --compare's)."""
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"bench-{name}-")))
    config = work / "bemsmail.toml"
    key = write_dev_config(config)
    port = free_port()
    env = {**os.environ, "BEMSMAIL_SERVER__PORT": str(port), "BEMSMAIL_LOGGING__LEVEL": args.log_level,
           "BEMSMAIL_LOGGING__FORMAT": "json"}
    if name == "sqlite":
        env["BEMSMAIL_DATABASE__URL"] = f"sqlite+aiosqlite:///{work / 'bench.db'}"
    else:
        from bemsmail.devservices import MariaDB

        db = stack.enter_context(MariaDB(durable=not args.fast_disk))
        env["BEMSMAIL_DATABASE__URL"] = db.url
        env["BEMSMAIL_DATABASE__POOL_SIZE"] = str(args.pool)
        env["BEMSMAIL_DATABASE__MAX_OVERFLOW"] = "0"
    # run from `tree`, so that its bemsmail package is the one imported (python -m / -c put the cwd first)
    bemsmail = [sys.executable, "-m", "bemsmail"]
    serve = [sys.executable, "-c", SERVE_WITH_STAND_IN_SOURCES] if args.sources == "none" else bemsmail
    subprocess.run([*bemsmail, "migrate", "--config", str(config)], env=env, check=True, capture_output=True,
                   cwd=tree)
    proc = subprocess.Popen([*serve, "serve", "--config", str(config)], env=env, cwd=tree,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    label = "" if tree == ROOT else str(tree)
    results = []
    try:
        wait_healthy(port, proc)
        for rate in (*([] if args.paced_only else [0.0]), *args.rates):
            load = os.getloadavg()[0]
            cpu_before = cpu_seconds(proc.pid)
            row = asyncio.run(drive(port, key, args.clients, args.seconds, args.warmup, rate, args.client == "lean"))
            row["settle_s"] = wait_idle(proc.pid)
            # the daemon's CPU over the whole run (warm-up and catching up included) per answered request
            row["daemon_cpu_per_request_us"] = round((cpu_seconds(proc.pid) - cpu_before) / max(1, row["sent"]) * 1e6)
            results.append({"backend": name, "tree": label, "load_1min": round(load, 2), **row})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,mariadb")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rates", type=lambda v: [float(x) for x in v.split(",") if x], default=[1500.0],
                        help="paced runs after the closed-loop one, in requests/s offered (comma-separated)")
    parser.add_argument("--paced-only", action="store_true", help="skip the closed-loop run")
    parser.add_argument("--client", choices=["lean", "aiohttp"], default="lean",
                        help="load generator: a minimal keep-alive HTTP/1.1 client, or aiohttp's")
    parser.add_argument("--pool", type=int, default=20, help="MariaDB connection pool size")
    parser.add_argument("--log-level", default="info", help="the daemon's log level (info logs every request)")
    parser.add_argument("--fast-disk", action="store_true", help="MariaDB with innodb_flush_log_at_trx_commit=2")
    parser.add_argument("--sources", choices=["none", "config"], default="none",
                        help="none: stand-in sources that accept watches (see above); config: as the dev config says")
    parser.add_argument("--compare", type=Path, default=None,
                        help="another checkout (e.g. a git worktree of the baseline): each backend is run against "
                             "its daemon and this one's in turn, each on a fresh database")
    args = parser.parse_args()

    trees = [ROOT] if args.compare is None else [args.compare.resolve(), ROOT]
    load_start = os.getloadavg()[0]
    results = []
    for name in args.backends.split(","):
        for tree in trees:
            with ExitStack() as stack:  # a fresh database (and its server) per run
                results.extend(run_backend(name.strip(), args, stack, tree))
    load_end = os.getloadavg()[0]

    print(f"\nRegistration upserts: {args.clients} concurrent clients, {args.seconds:g} s measured after "
          f"{args.warmup:g} s warm-up, daemon log level {args.log_level}, "
          f"MariaDB durability {'flush=2' if args.fast_disk else 'flush=1 (default)'}, {os.cpu_count()} cores, "
          f"{args.client} client, mail sources: {args.sources}, "
          f"load average (1 min) {load_start:.2f} at start, {load_end:.2f} at end")
    tree_width = max([4, *(len(r["tree"]) for r in results)])
    print(f"{'tree':<{tree_width}} {'backend':<9} {'mode':<14} {'upserts/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'requests':>9} {'errors':>7} {'CPU/req':>8} {'settle s':>8} {'load':>5}")
    for r in results:
        print(f"{r['tree'] or '.':<{tree_width}} {r['backend']:<9} {r['mode']:<14} {r['upserts_per_s']:>10.1f} "
              f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['max_ms']:>8.2f} {r['requests']:>9} {r['errors']:>7} "
              f"{r['daemon_cpu_per_request_us']:>6} µs {r['settle_s']:>8.1f} {r['load_1min']:>5.2f}")
    print(json.dumps({"benchmark": "registrations", "clients": args.clients, "seconds": args.seconds,
                      "sources": args.sources, "python": platform.python_version(), "results": results}))


if __name__ == "__main__":
    main()
