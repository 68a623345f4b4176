"""`bemsmail loadtest`: drive a deployment (one node or several, or one started here with --local) through the
mocks, measure every mail → push end to end, and write a JSON result, a PNG plot and a markdown summary."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bemsmail.loadtest.driver import Driver, LoadTestError, require_loopback
from bemsmail.loadtest.local import LocalDeployment, StartFailed, Target
from bemsmail.loadtest.plan import Backend, Plan, Shape, make_plan
from bemsmail.loadtest.report import (
    Delivery,
    Mail,
    markdown,
    match,
    parse_received,
    summarize,
    write_json,
    write_plot,
)

EXIT_BAD_INPUT = 2
EXIT_FAILED = 3
MAX_MAILBOXES = 100_000
MAX_DEVICES = 10
MAX_RATE = 5_000.0
MAX_DURATION = 3_600.0
MAX_BURST = 100_000
DUPLICATE_GRACE_SECONDS = 2.0
T = TypeVar("T")


async def measure(target: Target, plan: Plan, *, console: Console, setup_limit: float, drain_limit: float,
                  options: dict[str, Any], cpu: Callable[[], dict[str, float]] = dict,
                  ) -> tuple[dict[str, Any], list[Delivery], float]:
    """The whole run against `target`: the result document, every delivery, and when the first mail was made.
    `cpu` reads the CPU seconds of the processes worth watching (a local deployment's)."""
    mails: list[Mail] = []
    received: list[dict[str, Any]] = []
    devices = {m.address: [d.token for d in m.devices] for m in plan.mailboxes}
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        driver = Driver(target, session)
        with _progress(console) as progress:
            await driver.provision(plan)
            task = progress.add_task("registering devices", total=len(plan.devices))
            setup_started = time.monotonic()
            await driver.register(plan.devices, lambda n: progress.advance(task, n))
            registered_s = time.monotonic() - setup_started
            task = progress.add_task("waiting until every mailbox is watched", total=len(plan.mailboxes))
            watched_s = await driver.wait_watched(plan, setup_limit,
                                                  lambda n: progress.update(task, completed=n))
            follower = driver.follower(received.extend)
            await follower.start()
            mail_task = progress.add_task("mail created", total=len(plan.mails))

            def created(batch: list[Mail]) -> None:
                mails.extend(batch)
                progress.advance(mail_task, len(batch))

            cpu_before = {**cpu(), "loadtest": time.process_time()}
            started = await driver.send_plan(plan, created)
            push_task = progress.add_task("pushes matched", total=plan.expected_pushes)
            deadline = time.monotonic() + drain_limit
            while True:
                await follower.poll()
                matched = match(mails, devices, parse_received(received))
                progress.update(push_task, completed=len(matched.deliveries))
                if matched.lost == 0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            cpu_after = {**cpu(), "loadtest": time.process_time()}
            await asyncio.sleep(DUPLICATE_GRACE_SECONDS)  # a late second copy still counts as a duplicate
            await follower.stop()
    matched = match(mails, devices, parse_received(received))
    options = {**options, "registration_s": round(registered_s, 1), "watch_s": round(watched_s, 1),
               "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds")}
    paths = {d.token: f"{m.backend.value}→{d.platform}" for m in plan.mailboxes for d in m.devices}
    result = summarize(matched, mails, started, options, paths)
    result["cpu_seconds"] = {name: round(cpu_after[name] - value, 1) for name, value in cpu_before.items()
                             if name in cpu_after}
    return result, matched.deliveries, started


def write_outputs(result: dict[str, Any], deliveries: list[Delivery], started: float, out_dir: Path,
                  plot: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(result, out_dir / "result.json")
    plot_name = None
    if plot:
        plot_name = "loadtest.png"
        write_plot(result, deliveries, started, out_dir / plot_name)
    (out_dir / "summary.md").write_text(markdown(result, plot_name), encoding="utf-8")


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False, refresh_per_second=2)


def print_table(result: dict[str, Any], console: Console) -> None:
    from rich.table import Table

    lat = result["latency_ms"]
    table = Table(title="end to end: mail created in the mock → push received by the mock provider")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [("mails", f"{result['mails']:,}"), ("pushes expected", f"{result['expected_pushes']:,}"),
            ("pushes delivered", f"{result['delivered']:,}"), ("lost", f"{result['lost']:,}"),
            ("duplicates", f"{result['duplicates']:,}"), ("mail rate /s", str(result["mail_rate"])),
            ("push rate /s", str(result["push_rate"])),
            ("latency p50 / p95 / p99 / max ms", f"{lat['p50']} / {lat['p95']} / {lat['p99']} / {lat['max']}")]
    rows += [(f"  {name}: pushes, p50 / p99 ms", f"{row['pushes']:,}, {row['p50']} / {row['p99']}")
             for name, row in [*result["by_path"].items(), *result["by_mail"].items()] if row["pushes"]]
    rows += [(f"CPU s during the mail phase: {name}", f"{value}") for name, value in result["cpu_seconds"].items()]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


# --- the command ------------------------------------------------------------------------------------------------


def _bounded(kind: type, low: float, high: float, what: str) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, not {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be between {low:g} and {high:g}, not {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bemsmail loadtest", description=__doc__)
    where = p.add_argument_group("the deployment (--local, or the URLs of one you started against the mocks)")
    where.add_argument("--local", action="store_true",
                       help="start the four mocks and one daemon (SQLite) here, and stop them afterwards")
    where.add_argument("--api", action="append", default=[], metavar="URL",
                       help="a node's base URL (repeat for several nodes; registrations are spread over them)")
    where.add_argument("--api-key-file", type=Path, help="file holding an API key the nodes accept")
    where.add_argument("--ews-mock", metavar="URL", help="the mock Exchange's base URL")
    where.add_argument("--graph-mock", metavar="URL", help="the mock Graph's base URL (https)")
    where.add_argument("--graph-ca-file", type=Path, help="the CA file the mock Graph printed")
    where.add_argument("--apns-mock", metavar="URL", help="the mock APNs's control URL")
    where.add_argument("--fcm-mock", metavar="URL", help="the mock FCM's base URL")
    where.add_argument("--ews-domain", default="example.com")
    where.add_argument("--graph-domain", default="contoso.com")
    where.add_argument("--ios-app", default="com.example.mail")
    where.add_argument("--android-app", default="com.example.mail.android")
    load = p.add_argument_group("the load")
    load.add_argument("--mailboxes", type=_bounded(int, 1, MAX_MAILBOXES, "--mailboxes"), default=1000)
    load.add_argument("--devices-per-mailbox", type=_bounded(int, 1, MAX_DEVICES, "--devices-per-mailbox"),
                      default=1)
    load.add_argument("--android-share", type=_bounded(float, 0, 1, "--android-share"), default=0.5,
                      help="share of devices that are Android (FCM); the rest are iOS (APNs)")
    load.add_argument("--graph-share", type=_bounded(float, 0, 1, "--graph-share"), default=0.5,
                      help="share of mailboxes on Exchange Online (Graph); the rest are on EWS")
    load.add_argument("--rate", type=_bounded(float, 0.1, MAX_RATE, "--rate"), default=100.0,
                      help="new mails per second")
    load.add_argument("--duration", type=_bounded(float, 0.1, MAX_DURATION, "--duration"), default=10.0,
                      help="seconds of mail at --rate")
    load.add_argument("--burst", type=_bounded(int, 1, MAX_BURST, "--burst"),
                      help="this many mails at once instead of --rate/--duration")
    load.add_argument("--seed", type=int, default=1)
    limits = p.add_argument_group("limits and output")
    limits.add_argument("--setup-timeout", type=_bounded(float, 1, 3600, "--setup-timeout"), default=900.0,
                        help="give up if the mailboxes are not all watched after this many seconds")
    limits.add_argument("--drain-timeout", type=_bounded(float, 1, 600, "--drain-timeout"), default=60.0,
                        help="after the last mail, wait this long at most for its pushes")
    limits.add_argument("--out", type=Path, help="directory for result.json, loadtest.png, summary.md "
                                                "(default var/loadtest/<time>)")
    limits.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    limits.add_argument("--keep", type=Path, help="with --local: keep the deployment's files (logs) here")
    return p


def _target(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Target:
    if not args.api:
        parser.error("give --local, or --api URL (and the mocks' URLs) of a deployment")
    if not args.api_key_file:
        parser.error("--api-key-file is required with --api")
    try:
        key = args.api_key_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        parser.error(f"--api-key-file: {exc.strerror}: {args.api_key_file}")
    if not (args.apns_mock or args.fcm_mock):
        parser.error("give --apns-mock and/or --fcm-mock: the load test counts what they receive")
    try:
        return Target(api_urls=tuple(require_loopback(u, "--api") for u in args.api), api_key=key,
                      ews_url=args.ews_mock and require_loopback(args.ews_mock, "--ews-mock"),
                      graph_url=args.graph_mock and require_loopback(args.graph_mock, "--graph-mock"),
                      graph_ca_file=str(args.graph_ca_file) if args.graph_ca_file else None,
                      apns_url=args.apns_mock and require_loopback(args.apns_mock, "--apns-mock"),
                      fcm_url=args.fcm_mock and require_loopback(args.fcm_mock, "--fcm-mock"),
                      ews_domain=args.ews_domain, graph_domain=args.graph_domain, ios_app=args.ios_app,
                      android_app=args.android_app)
    except LoadTestError as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.local and args.api:
        parser.error("--local starts its own deployment: leave out --api")
    if args.keep and not args.local:
        parser.error("--keep goes with --local")
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("the PNG plot needs matplotlib: pip install 'bemsmail[loadtest]' (or pass --no-plot)")
    target = None if args.local else _target(args, parser)
    shape = Shape(mailboxes=args.mailboxes, devices_per_mailbox=args.devices_per_mailbox,
                  android_share=args.android_share, graph_share=args.graph_share, rate=args.rate,
                  duration=args.duration, burst=args.burst or 0, seed=args.seed)
    out = args.out or Path("var/loadtest") / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    console = Console(stderr=True)
    try:
        if args.local:
            keep = args.keep
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="bemsmail-loadtest-") as tmp:
                work = keep or Path(tmp)
                # the mocks keep far more pushes than arrive between two reads of their feeds
                history = max(20_000, 2 * shape.mailboxes * shape.devices_per_mailbox)
                console.print(f"starting the mocks and a daemon in {work} ...")
                deployment = LocalDeployment(work, history=history, ews_backends=max(4, args.mailboxes // 5000))
                with deployment as local_target:
                    result = _run(target=local_target, shape=shape, out=out, console=console, args=args,
                                  cpu=deployment.cpu)
        else:
            assert target is not None
            result = _run(target, shape, out, console, args)
    except (LoadTestError, StartFailed) as exc:
        print(f"bemsmail loadtest: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("bemsmail loadtest: interrupted", file=sys.stderr)
        return 130
    print_table(result, console)
    console.print(f"wrote {out / 'result.json'}, {out / 'summary.md'}"
                  + ("" if args.no_plot else f", {out / 'loadtest.png'}"))
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}))
    return 0 if result["lost"] == 0 and result["duplicates"] == 0 else 1


def _run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """On uvloop where there is one: the harness's own CPU is taken from the deployment it measures."""
    try:
        import uvloop
    except ImportError:  # Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


def _run(target: Target, shape: Shape, out: Path, console: Console, args: argparse.Namespace,
         cpu: Callable[[], dict[str, float]] = dict) -> dict[str, Any]:
    plan = make_plan(shape, ews_domain=target.ews_domain, graph_domain=target.graph_domain)
    ios = sum(1 for d in plan.devices if d.platform == "ios")
    options = {**asdict(shape), "run_id": plan.run_id, "api_urls": list(target.api_urls), "local": args.local,
               "ews_mailboxes": plan.count(Backend.EWS), "graph_mailboxes": plan.count(Backend.GRAPH),
               "ios_devices": ios, "android_devices": len(plan.devices) - ios}
    result, deliveries, started = _run_loop(measure(target, plan, console=console, setup_limit=args.setup_timeout,
                                                      drain_limit=args.drain_timeout, options=options,
                                                      cpu=cpu))
    write_outputs(result, deliveries, started, out, plot=not args.no_plot)
    return result
