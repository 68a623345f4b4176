#!/usr/bin/env python3
"""Benchmark: FCM pushes per second and latency against the mock FCM in its own process, our sender vs firebase-admin.

Paths measured, each sending the same rendered message (firebase-admin's encoder) with a real service-account
token from the mock's OAuth endpoint:

- ``sender``: bemsmail.push.fcm.FcmSender (one keep-alive aiohttp session), `--concurrency` pushes in flight;
- ``library-batch``: ``messaging.send_each_async`` with batches of 500 (its natural use), FCM URL overridden
  (``_fcm_url``, research §3.4); the latency is the batch's, since that is when its results are known;
- ``library-each``: ``send_each_async([one])`` from `--concurrency` workers (the PushSender shape).

The mock is started here as `python -m bemsmail.mocks.fcm` and its CPU use is reported, to show whether it (and
not the client) was the limit. Prints a table and one JSON line.

    .venv/bin/python scripts/bench_push_fcm.py [--seconds 10] [--concurrency 100] [--paths sender,library-batch]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

from bemsmail.config import FcmAppConfig  # noqa: E402
from bemsmail.core.model import Category, Environment, Platform, Priority, PushKind, PushMessage  # noqa: E402
from bemsmail.log import configure_logging  # noqa: E402
from bemsmail.push import fcm  # noqa: E402

PROJECT = "bemsmail-bench"
TOKENS = [f"bench-{i:05d}:APA91b" + "y" * 120 for i in range(1000)]


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))]


def push(i: int) -> PushMessage:
    return PushMessage(
        registration_id=f"r{i}", mailbox=f"user{i % 997}@example.com", platform=Platform.ANDROID,
        app_id="com.example.mail.android", environment=Environment.PRODUCTION, token=TOKENS[i % len(TOKENS)],
        notification_id=uuid.uuid4().hex, kind=PushKind.ALERT, category=Category.NEW_MAIL,
        collapse_id=f"user{i % 997}-inbox", priority=Priority.ALERT,
        expires_at=datetime.now(UTC) + timedelta(hours=1), badge=i % 20, sound="default",
        data={"account": f"acct-{i % 997}", "folder": "Inbox", "count": "1"},
    )


def write_service_account(directory: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    info = {"type": "service_account", "project_id": PROJECT, "private_key_id": uuid.uuid4().hex,
            "private_key": key, "client_email": f"bench@{PROJECT}.iam.gserviceaccount.com", "client_id": "1",
            "token_uri": "https://oauth2.googleapis.com/token"}
    path = directory / "sa.json"
    path.write_text(json.dumps(info), encoding="utf-8")
    return path


class Mock:
    """The mock FCM as its own process."""

    def __init__(self, sa_path: Path, latency_ms: float) -> None:
        command = [sys.executable, "-m", "bemsmail.mocks.fcm", "--port", "0", "--service-account", str(sa_path),
                   "--latency-ms", str(latency_ms)]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "port=" not in line:
            raise SystemExit(f"mock did not start: {line!r}")
        self.url = line.split("url=")[1].split()[0]

    def cpu_seconds(self) -> float | None:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stats(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/mock/stats", timeout=10) as response:  # noqa: S310 - loopback
            stats: dict[str, Any] = json.load(response)
            return stats

    def reset(self) -> None:
        import urllib.request

        request = urllib.request.Request(f"{self.url}/mock/reset", method="POST")  # noqa: S310 - loopback
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310
            pass

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


Send = Callable[[int], Awaitable[tuple[int, str]]]  # (i) -> (messages done, outcome label)


async def drive(send: Send, workers: int, seconds: float, warmup: float, per_call: int) -> dict[str, Any]:
    """Run `workers` loops of `send` for warm-up + `seconds`. A call counts if it completes inside the measured
    window (so a long batch is counted when its results are known); its latency only if it also started there."""
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    cpu: list[float] = []

    def sample_cpu() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(usage.ru_utime + usage.ru_stime)

    loop.call_at(measure_from, sample_cpu)
    loop.call_at(stop_at, sample_cpu)

    async def worker(n: int) -> None:
        i = n
        while loop.time() < stop_at:
            t0 = loop.time()
            count, label = await send(i)
            t1 = loop.time()
            if measure_from <= t1 <= stop_at:
                outcomes[label] += count
                if t0 >= measure_from:
                    latencies.append(t1 - t0)
            i += workers * per_call

    await asyncio.gather(*(worker(n * per_call) for n in range(workers)))
    latencies.sort()
    ok = outcomes.get("delivered", 0)
    done = sum(outcomes.values())
    return {
        "pushes_per_s": round(ok / seconds, 1), "delivered": ok, "failed": done - ok,
        "outcomes": dict(outcomes),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2), "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else None,
        "client_cpu_percent": round(100 * (cpu[1] - cpu[0]) / seconds, 1) if len(cpu) == 2 else None,
    }


async def run_sender(config: FcmAppConfig, args: argparse.Namespace) -> dict[str, Any]:
    sender = fcm.FcmSender(config)
    await sender.start()

    async def send(i: int) -> tuple[int, str]:
        outcome = await sender.send(push(i))
        return 1, outcome.kind.value

    try:
        return await drive(send, args.concurrency, args.seconds, args.warmup, 1)
    finally:
        await sender.close()


async def run_library(config: FcmAppConfig, args: argparse.Namespace, batch: int) -> dict[str, Any]:
    import firebase_admin
    from firebase_admin import messaging

    credential = fcm.load_credential(config)
    # Its Regional Access Boundary lookup goes to iamcredentials.googleapis.com (no network here): switched off.
    credential._maybe_start_regional_access_boundary_refresh = lambda *a: None
    app = firebase_admin.initialize_app(
        credential,  # firebase_admin takes a google-auth credential as it is
        {"projectId": PROJECT, "httpTimeout": config.timeout_seconds}, name=f"bench-{uuid.uuid4().hex}")
    service = messaging._get_messaging_service(app)
    service._fcm_url = f"{str(config.fcm_url).rstrip('/')}/v1/projects/{PROJECT}/messages:send"
    now = datetime.now(UTC)

    async def send(i: int) -> tuple[int, str]:
        messages = [fcm._build(push(i + k), now, None, None) for k in range(batch)]
        try:
            result = await messaging.send_each_async(messages, app=app)
        except Exception as exc:  # a token failure or a dropped connection fails the whole batch
            return batch, type(exc).__name__
        if result.failure_count == 0:
            return batch, "delivered"
        # Mixed results are rare here (the mock delivers everything); count the batch by its first failure.
        first = next(r.exception for r in result.responses if not r.success)
        return batch, type(first).__name__

    workers = 1 if batch > 1 else args.concurrency
    try:
        return await drive(send, workers, args.seconds, args.warmup, batch)
    finally:
        await service._async_client.aclose()
        await asyncio.to_thread(firebase_admin.delete_app, app)  # delete_app on the loop would raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", default="sender,library-batch,library-each")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="latency the mock adds to every send")
    args = parser.parse_args()
    configure_logging("warning", "console")

    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:
        loop_factory = asyncio.new_event_loop

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-fcm-") as tmp:
        sa_path = write_service_account(Path(tmp))
        mock = Mock(sa_path, args.latency_ms)
        try:
            config = FcmAppConfig.model_validate({
                "id": "com.example.mail.android", "project_id": PROJECT, "credentials_file": sa_path,
                "fcm_url": mock.url, "token_uri": f"{mock.url}/token", "concurrency": args.concurrency,
                "timeout_seconds": 10.0})
            for name in args.paths.split(","):
                name = name.strip()
                mock.reset()
                runners = {"sender": lambda: run_sender(config, args),
                           "library-batch": lambda: run_library(config, args, 500),
                           "library-each": lambda: run_library(config, args, 1)}
                cpu0 = mock.cpu_seconds()
                with asyncio.Runner(loop_factory=loop_factory) as runner:
                    result = runner.run(runners[name]())
                cpu1 = mock.cpu_seconds()
                stats = mock.stats()
                mock_cpu = None
                if cpu0 is not None and cpu1 is not None:
                    mock_cpu = round(100 * (cpu1 - cpu0) / (args.seconds + args.warmup), 1)
                # Other work on the machine skews a 2-core benchmark: the load average says how much there was.
                results.append({"path": name, **result, "mock_cpu_percent": mock_cpu,
                                "load_average_1m": round(os.getloadavg()[0], 2),
                                "mock_sends": stats["sends"], "mock_tokens_issued": stats["tokens_issued"]})
        finally:
            mock.close()

    print(f"\nFCM pushes against the mock in its own process: {args.seconds:g} s measured after {args.warmup:g} s "
          f"warm-up, concurrency {args.concurrency}, mock latency {args.latency_ms:g} ms, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    print(f"{'path':<14} {'pushes/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7} {'client cpu':>10} "
          f"{'mock cpu':>9} {'load':>5}")
    for r in results:
        print(f"{r['path']:<14} {r['pushes_per_s']:>9.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['failed']:>7} "
              f"{r['client_cpu_percent'] or 0:>9.1f}% {r['mock_cpu_percent'] or 0:>8.1f}% "
              f"{r['load_average_1m']:>5.2f}")
    print(json.dumps({"benchmark": "push_fcm", "seconds": args.seconds, "concurrency": args.concurrency,
                      "mock_latency_ms": args.latency_ms, "cores": os.cpu_count(),
                      "python": platform.python_version(), "results": results}))


if __name__ == "__main__":
    main()
