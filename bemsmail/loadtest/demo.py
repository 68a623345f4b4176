"""`bemsmail demo`: the whole relay on this machine. It starts the mock Exchange, mock Graph, mock APNs, mock FCM
and a daemon on the embedded SQLite default, registers iPhones and Android phones for mailboxes on both backends
through the registration API, delivers new mail through the mocks and shows each mail → push live, including a
dead token that the daemon prunes. No credentials, no network: everything is on loopback and thrown away."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from bemsmail.loadtest.driver import Driver, LoadTestError
from bemsmail.loadtest.local import GRAPH_DOMAIN, LocalDeployment, StartFailed, Target
from bemsmail.loadtest.plan import Backend, Device, Mailbox, Plan, android_token, ios_token
from bemsmail.loadtest.report import Mail, parse_received

RUN = "de0de0de"
#: (mailbox, device id, platform, dead token?)
DEVICES = [
    ("alice@example.com", "alice-iphone", "ios", False),
    ("alice@example.com", "alice-pixel", "android", False),
    ("bob@example.com", "bob-old-iphone", "ios", True),
    ("bob@example.com", "bob-galaxy", "android", False),
    ("carol@contoso.com", "carol-iphone", "ios", False),
    ("dave@contoso.com", "dave-pixel", "android", False),
]
#: the order mail arrives in: both backends early, Bob's dead iPhone in the first round
MAIL_ORDER = ["alice@example.com", "carol@contoso.com", "bob@example.com", "dave@contoso.com"]
SUBJECTS = ["Quarterly numbers", "Lunch on Friday?", "Invitation: design review", "Re: the release",
            "Your package is on its way", "Minutes of today's meeting"]
SETTLE_SECONDS = 30.0


def demo_plan() -> Plan:
    boxes: dict[str, list[Device]] = {}
    for n, (address, device_id, platform, _dead) in enumerate(DEVICES):
        token = ios_token(RUN, n) if platform == "ios" else android_token(RUN, n)
        boxes.setdefault(address, []).append(Device(address, device_id, platform, token))
    mailboxes = tuple(Mailbox(a, Backend.GRAPH if a.endswith("@" + GRAPH_DOMAIN) else Backend.EWS, tuple(d))
                      for a, d in boxes.items())
    return Plan(RUN, mailboxes, ())


@dataclass
class Row:
    mail: Mail
    backend: Backend
    subject: str
    device: Device
    outcome: str = "waiting"
    latency_ms: float | None = None


@dataclass
class Show:
    """What the demo has seen: one row per mail and device, and the tallies under the table."""

    console: Console
    rows: list[Row] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def line(self, row: Row) -> str:
        latency = f"{row.latency_ms:7.1f} ms" if row.latency_ms is not None else "         "
        return (f"{datetime.fromtimestamp(row.mail.created_at):%H:%M:%S}  {row.mail.mailbox:<20} "
                f"{row.backend.value.upper():<5} {row.subject[:26]:<26} → {row.device.device_id:<15} "
                f"{row.device.platform:<7} {latency}  {row.outcome}")

    def table(self) -> Group:
        table = Table(title="bemsmail demo: new mail → push (Ctrl+C to stop)", expand=False)
        for name in ("time", "mailbox", "via", "subject", "device", "platform", "latency", "outcome"):
            table.add_column(name, justify="right" if name == "latency" else "left")
        for row in self.rows[-18:]:
            style = "green" if row.outcome == "delivered" else "yellow" if row.outcome == "waiting" else "red"
            table.add_row(f"{datetime.fromtimestamp(row.mail.created_at):%H:%M:%S}", row.mail.mailbox,
                          row.backend.value.upper(), row.subject, row.device.device_id, row.device.platform,
                          f"{row.latency_ms:.1f} ms" if row.latency_ms is not None else "",
                          Text(row.outcome, style=style))
        return Group(table, Text(self.summary()), *(Text(n, style="bold red") for n in self.notes[-4:]))

    def summary(self) -> str:
        done = [r for r in self.rows if r.outcome == "delivered" and r.latency_ms is not None]
        latencies = sorted(r.latency_ms for r in done if r.latency_ms is not None)
        median = f"{latencies[len(latencies) // 2]:.1f} ms" if latencies else "-"
        kinds = sorted({f"{r.backend.value.upper()}→{r.device.platform}" for r in done})
        return (f"mails {len({r.mail.item_id for r in self.rows})}, pushes delivered {len(done)} "
                f"(median {median}; {', '.join(kinds) or 'none yet'}), dead tokens pruned {len(self.pruned)}")


async def play(driver: Driver, plan: Plan, show: Show, *, interval: float, mails: int | None,
               duration: float | None, stop: asyncio.Event, live: Live | None) -> None:
    devices = {d.token: d for d in plan.devices}
    dead = {plan.devices[n].token for n, entry in enumerate(DEVICES) if entry[3]}
    backends = {m.address: m.backend for m in plan.mailboxes}
    by_item: dict[tuple[str, str], Row] = {}
    failed: dict[str, float] = {}

    def refresh(row: Row | None = None, note: str | None = None) -> None:
        if note:
            show.notes.append(note)
        if live is not None:
            live.update(show.table())
        elif row is not None:
            show.console.print(show.line(row), highlight=False, soft_wrap=True)
        elif note:
            show.console.print(note, highlight=False, soft_wrap=True)

    def received(records: list[dict[str, Any]]) -> None:
        for push in parse_received(records):
            row = by_item.get((push.item_id or "", push.token))
            if row is None or row.outcome == "delivered":
                continue
            row.latency_ms = (push.at - row.mail.created_at) * 1000
            provider = "APNs" if row.device.platform == "ios" else "FCM"
            row.outcome = "delivered" if push.status == 200 else f"{provider} {push.status} {push.reason}".strip()
            if push.status == 410:
                failed.setdefault(push.token, time.monotonic())
            refresh(row)

    await driver.provision(plan)
    apns = driver.target.apns_url
    async with driver.session.post(f"{apns}/mock/script", json={"tokens": {t: {"status": 410, "reason":
                                                                               "Unregistered"} for t in dead}}) as r:
        r.raise_for_status()
    registration_ids = await driver.register(plan.devices)
    show.console.print(f"registered {len(plan.devices)} devices for {len(plan.mailboxes)} mailboxes through "
                       f"POST /api/v1/registrations; waiting for their subscriptions ...", highlight=False)
    await driver.wait_watched(plan, 120)
    follower = driver.follower(received)
    await follower.start()
    started = time.monotonic()
    sent = 0
    order = itertools.cycle(MAIL_ORDER)
    subjects = itertools.cycle(SUBJECTS)
    next_mail = started
    try:
        while not stop.is_set():
            now = time.monotonic()
            if duration is not None and now - started >= duration:
                break
            if mails is not None and sent >= mails:
                settled = all(r.outcome != "waiting" for r in show.rows) and len(show.pruned) == len(dead)
                if settled or now - next_mail > SETTLE_SECONDS:
                    break
            elif now >= next_mail:
                address, subject = next(order), next(subjects)
                (mail,) = await driver.create_mail(backends[address], [address], subject)
                sent += 1
                for device in (d for d in plan.devices if d.mailbox == address):
                    if device.token in dead and show.pruned:
                        continue  # its registration is gone: no push is expected
                    row = Row(mail, backends[address], subject, device)
                    show.rows.append(row)
                    by_item[(mail.item_id, device.token)] = row
                next_mail = now + interval
                refresh()
            for token in [t for t in failed if t not in show.pruned]:
                if await driver.registration(registration_ids[token]) is None:
                    show.pruned.append(token)
                    refresh(note=f"dead token pruned: APNs said 410 Unregistered for {devices[token].device_id} "
                                 f"({devices[token].mailbox}); the daemon deleted its registration "
                                 f"({time.monotonic() - failed[token]:.1f} s later)")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
    finally:
        await follower.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bemsmail demo", description=__doc__)
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: run until Ctrl+C)")
    p.add_argument("--mails", type=int, help="stop once this many mails have been delivered and accounted for")
    p.add_argument("--interval", type=float, default=1.5, help="seconds between new mails (default 1.5)")
    p.add_argument("--keep", type=Path, help="keep the demo's files (config, logs, database) in this directory")
    p.add_argument("--plain", action="store_true", help="one line per push instead of a live table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("duration", "mails", "interval"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be positive")
    console = Console(soft_wrap=True)
    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bemsmail-demo-")))
        console.print(f"starting the mock Exchange, mock Graph, mock APNs, mock FCM and bemsmail in {work} ...",
                      highlight=False)
        try:
            target = stack.enter_context(LocalDeployment(work, log_level="info"))
        except StartFailed as exc:
            print(f"bemsmail demo: {exc}", file=sys.stderr)
            return 3
        except KeyboardInterrupt:
            return 130
        console.print(f"bemsmail is serving on {target.api_urls[0]} (logs: {work / 'daemon.log'})", highlight=False)
        show = Show(console)
        try:
            asyncio.run(_play(target, show, args))
        except LoadTestError as exc:
            print(f"bemsmail demo: {exc}", file=sys.stderr)
            return 3
        console.print(show.summary(), highlight=False)
        console.print("stopping ...", highlight=False)
    return 0


async def _play(target: Target, show: Show, args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl+C arrives as KeyboardInterrupt
            loop.add_signal_handler(sig, stop.set)
    plan = demo_plan()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        driver = Driver(target, session)
        use_live = show.console.is_terminal and not args.plain
        with Live(show.table(), console=show.console, refresh_per_second=8) if use_live \
                else contextlib.nullcontext() as live:
            await play(driver, plan, show, interval=args.interval, mails=args.mails, duration=args.duration,
                       stop=stop, live=live)
