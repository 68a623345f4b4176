#!/usr/bin/env python3
"""Quick benchmark: pushes per second of a bare aioapns loop vs ApnsSender, against the mock APNs in its own process.

Both clients run in this process (uvloop when available, as the daemon does) against one mock process on loopback
(TLS + HTTP/2), with the same concurrency and connection count. Also reports the mock's own CPU use, to show whether
it was the bottleneck. Prints a table and one JSON line.

    .venv/bin/python scripts/bench_push_apns_quick.py [--sends 10000] [--concurrency 200] [--connections 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aioapns import APNs, NotificationRequest, PushType  # noqa: E402
from aioapns.connection import APNsTLSClientProtocol  # noqa: E402

from bemsmail.config import ApnsAppConfig  # noqa: E402
from bemsmail.core.model import Category, Environment, Platform, Priority, PushKind, PushMessage  # noqa: E402
from bemsmail.mocks.tls import generate_provider_key  # noqa: E402
from bemsmail.push.apns import ApnsSender  # noqa: E402

TOPIC = "com.example.mail"
KEY_ID = "ABCDE12345"
TEAM_ID = "TEAM123456"
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (Linux /proc); 0 elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def drive(send: Callable[[int], Awaitable[bool]], sends: int, concurrency: int, mock_pid: int) -> dict[str, Any]:
    latencies: list[float] = []
    failures = 0
    counter = iter(range(sends))

    async def worker() -> None:
        nonlocal failures
        for n in counter:
            started = time.perf_counter()
            ok = await send(n)
            latencies.append(time.perf_counter() - started)
            failures += not ok

    started, cpu, mock_cpu = time.perf_counter(), time.process_time(), cpu_seconds(mock_pid)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"sends": sends, "seconds": elapsed, "rate": sends / elapsed, "failures": failures,
            "p50_ms": percentile(latencies, 0.5) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
            "client_us_per_send": (time.process_time() - cpu) / sends * 1e6,
            "mock_us_per_send": (cpu_seconds(mock_pid) - mock_cpu) / sends * 1e6,
            "mock_cpu_pct": 100 * (cpu_seconds(mock_pid) - mock_cpu) / elapsed}


async def bare_aioapns(port: int, ca: str, key: str, args: argparse.Namespace) -> dict[str, Any]:
    class Local(APNsTLSClientProtocol):
        APNS_SERVER = "127.0.0.1"
        APNS_PORT = port

    async def quiet(*_: Any) -> None:
        return None

    client = APNs(key=key, key_id=KEY_ID, team_id=TEAM_ID, topic=TOPIC, max_connections=args.connections,
                  ssl_context=ssl.create_default_context(cafile=ca), err_func=quiet)
    client.pool.protocol_class = Local
    payload = {"aps": {"alert": {"loc-key": "NEW_MAIL", "title-loc-key": "NEW_MAIL_TITLE"}, "badge": 1}}

    async def send(n: int) -> bool:
        request = NotificationRequest(f"{n:064x}", payload, priority=10, push_type=PushType.ALERT,
                                      collapse_key="mbx-1", time_to_live=3600)
        result = await asyncio.wait_for(client.send_notification(request), 30)
        return result.is_successful

    await drive(send, min(1000, args.sends), args.concurrency, args.mock_pid)  # warm-up: connections, JWT
    result = await drive(send, args.sends, args.concurrency, args.mock_pid)
    client.pool.close()
    return result


async def apns_sender(port: int, ca: str, key_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    config = ApnsAppConfig.model_validate({
        "id": "bench", "topic": TOPIC, "key_file": key_file, "key_id": KEY_ID, "team_id": TEAM_ID,
        "endpoint": {"host": "127.0.0.1", "port": port, "ca_file": ca}, "max_connections": args.connections,
        "timeout_seconds": 30,
    })
    sender = ApnsSender(config)
    expires = datetime.now(UTC) + timedelta(hours=1)

    async def send(n: int) -> bool:
        message = PushMessage(
            registration_id=str(n), mailbox="alice@example.com", platform=Platform.IOS, app_id="bench",
            environment=Environment.PRODUCTION, token=f"{n:064x}", notification_id=str(uuid.uuid4()),
            kind=PushKind.ALERT, category=Category.NEW_MAIL, collapse_id="mbx-1", priority=Priority.ALERT,
            expires_at=expires, badge=1,
        )
        return (await sender.send(message)).kind == "delivered"

    await drive(send, min(1000, args.sends), args.concurrency, args.mock_pid)
    result = await drive(send, args.sends, args.concurrency, args.mock_pid)
    await sender.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sends", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the two clients this many times")
    parser.add_argument("--mock-no-validate-headers", action="store_true",
                        help="run the mock without h2's inbound header validation")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-apns-") as tmp:
        key_file = generate_provider_key(Path(tmp) / "AuthKey.p8")
        mock = subprocess.Popen(
            [sys.executable, "-m", "bemsmail.mocks.apns", "--cert-dir", str(Path(tmp) / "certs"), "--topic", TOPIC,
             "--key-id", KEY_ID, "--team-id", TEAM_ID, "--public-key-file", str(key_file),
             *(["--no-validate-headers"] if args.mock_no_validate_headers else [])],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )
        try:
            assert mock.stdout is not None
            ready = json.loads(mock.stdout.readline())
            port, ca = int(ready["port"]), str(ready["ca_file"])
            runner: Callable[[Any], Any] = asyncio.run
            if not args.no_uvloop:
                try:
                    import uvloop

                    runner = uvloop.run
                except ImportError:
                    pass
            args.mock_pid = mock.pid
            rows = []
            for _ in range(args.rounds):  # alternate, so drift on a shared box hits both clients alike
                for name, run in (
                    ("bare aioapns", lambda: bare_aioapns(port, ca, key_file.read_text(), args)),
                    ("ApnsSender", lambda: apns_sender(port, ca, key_file, args)),
                ):
                    result = runner(run())
                    result["client"] = name
                    rows.append(result)
        finally:
            mock.terminate()
            mock.wait(timeout=30)

    print(f"\n{args.sends} sends, concurrency {args.concurrency}, {args.connections} connection(s), "
          f"{'asyncio' if args.no_uvloop else 'uvloop'}, mock in its own process; "
          f"{platform.python_version()}, {os.cpu_count()} CPU(s)\n")
    print(f"{'client':<14} {'sends/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7} {'client CPU/send':>16} "
          f"{'mock CPU/send':>14} {'mock CPU':>9}")
    for row in rows:
        print(f"{row['client']:<14} {row['rate']:>9.0f} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} "
              f"{row['failures']:>7} {row['client_us_per_send']:>13.0f} us {row['mock_us_per_send']:>11.0f} us "
              f"{row['mock_cpu_pct']:>8.0f}%")
    best = {name: max(r["rate"] for r in rows if r["client"] == name) for name in ("bare aioapns", "ApnsSender")}
    ratio = best["ApnsSender"] / best["bare aioapns"]
    mock_us = statistics.median(r["mock_us_per_send"] for r in rows if r["client"] == "ApnsSender")
    print(f"\nbest of {args.rounds}: bare aioapns {best['bare aioapns']:.0f}/s, ApnsSender {best['ApnsSender']:.0f}/s "
          f"(x{ratio:.2f}); the mock needs ~{mock_us:.0f} us of CPU per ApnsSender push "
          f"(~{1e6 / mock_us:.0f}/s per core)" if mock_us else "")
    print(json.dumps({"bench": "push_apns_quick", "rows": rows, "best": best, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
