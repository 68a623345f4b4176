"""Carrying out a plan against a deployment through the mocks it is configured against: mailboxes provisioned in
the mocks, devices registered through the real registration API, waiting until every mailbox is watched, mail
created in the mock Exchange or mock Graph on schedule, and everything the mock APNs and FCM receive followed."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import ssl
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bemsmail.loadtest.local import Target
from bemsmail.loadtest.plan import Backend, Device, Plan
from bemsmail.loadtest.report import Mail

REGISTER_CONCURRENCY = 50
USERS_PER_POST = 2000
POLL_SECONDS = 0.25
TICK_SECONDS = 0.05  # mail due in one tick goes in one request per backend
PAGE = 5000  # pushes per read of a mock's feed


class LoadTestError(RuntimeError):
    """The run cannot go on; the message says why in one line."""


def require_loopback(url: str, what: str) -> str:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise LoadTestError(f"{what} {url!r} is not on loopback: the load test talks only to 127.0.0.1/::1")
    return url.rstrip("/")


@dataclass(frozen=True, slots=True)
class Watched:
    """What the nodes' /metrics say, summed over the nodes."""

    ews_subscribed: float = 0
    ews_caught_up: float = 0
    ews_groups_down: float = 0
    graph_subscribed: float = 0
    graph_caught_up: float = 0

    def covers(self, ews: int, graph: int) -> bool:
        return (self.ews_subscribed >= ews and self.ews_caught_up >= ews and self.ews_groups_down == 0
                and self.graph_subscribed >= graph and self.graph_caught_up >= graph)

    def ready(self, ews: int, graph: int) -> int:
        """Mailboxes counted as watched so far (for a progress bar)."""
        return int(min(ews, self.ews_subscribed, self.ews_caught_up) + min(graph, self.graph_subscribed,
                                                                           self.graph_caught_up))


def parse_watched(texts: Iterable[str]) -> Watched:
    sums: dict[str, float] = defaultdict(float)
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = sample.name
                if key == "bemsmail_ews_groups":
                    key += "_" + sample.labels.get("state", "")
                sums[key] += sample.value
    return Watched(sums["bemsmail_ews_subscriptions"], sums["bemsmail_ews_catch_ups_total"],
                   sums["bemsmail_ews_groups_down"], sums["bemsmail_graph_subscriptions"],
                   sums["bemsmail_graph_catch_ups_total"])


class Driver:
    def __init__(self, target: Target, session: aiohttp.ClientSession) -> None:
        for url in target.api_urls:
            require_loopback(url, "the node")
        for name in ("ews_url", "graph_url", "apns_url", "fcm_url"):
            if getattr(target, name):
                require_loopback(getattr(target, name), name.replace("_url", " mock"))
        self.target = target
        self.session = session
        self._graph_ssl: ssl.SSLContext | bool = (ssl.create_default_context(cafile=target.graph_ca_file)
                                                  if target.graph_ca_file else True)
        self._nodes = itertools.cycle(target.api_urls)

    # --- setting up -------------------------------------------------------------------------------------------

    async def provision(self, plan: Plan) -> None:
        """Graph needs its users to exist; the mock Exchange serves any mailbox of its domains."""
        users = [m.address for m in plan.mailboxes if m.backend is Backend.GRAPH]
        if users and not self.target.graph_url:
            raise LoadTestError("the plan has Graph mailboxes but no mock Graph was given (--graph-mock)")
        if any(m.backend is Backend.EWS for m in plan.mailboxes) and not self.target.ews_url:
            raise LoadTestError("the plan has EWS mailboxes but no mock Exchange was given (--ews-mock)")
        for start in range(0, len(users), USERS_PER_POST):
            await self._post(f"{self.target.graph_url}/_mock/users", {"mailboxes": users[start:start + USERS_PER_POST]},
                             ssl_context=self._graph_ssl)

    async def register(self, devices: Sequence[Device], progress: Callable[[int], None] = lambda n: None,
                       concurrency: int = REGISTER_CONCURRENCY) -> dict[str, str]:
        """Every device through POST /api/v1/registrations (spread over the nodes); token → registration id."""
        ids: dict[str, str] = {}
        pending = iter(devices)

        async def worker() -> None:
            for device in pending:
                app = self.target.ios_app if device.platform == "ios" else self.target.android_app
                body = {"mailbox": device.mailbox, "device_id": device.device_id, "platform": device.platform,
                        "token": device.token, "app_id": app}
                answer = await self._api("POST", "/api/v1/registrations", body)
                ids[device.token] = str(answer["id"])
                progress(1)

        await asyncio.gather(*(worker() for _ in range(min(concurrency, max(1, len(devices))))))
        return ids

    async def registration(self, registration_id: str) -> dict[str, Any] | None:
        """The stored registration, or None once the daemon has deleted it (a pruned token)."""
        url = f"{next(self._nodes)}/api/v1/registrations/{registration_id}"
        async with self.session.get(url, headers=self._auth) as answer:
            if answer.status == 404:
                return None
            if answer.status != 200:
                raise LoadTestError(f"GET {url} answered {answer.status}: {await answer.text()}")
            found: dict[str, Any] = await answer.json()
            return found

    async def watched(self) -> Watched:
        texts = []
        for node in self.target.api_urls:
            async with self.session.get(f"{node}/metrics") as answer:
                texts.append(await answer.text())
        return parse_watched(texts)

    async def wait_watched(self, plan: Plan, limit_seconds: float,
                           progress: Callable[[int], None] = lambda n: None) -> float:
        """Until every mailbox has its subscription, its stream and its first catch-up; seconds taken."""
        ews, graph = plan.count(Backend.EWS), plan.count(Backend.GRAPH)
        started = time.monotonic()
        while True:
            state = await self.watched()
            progress(state.ready(ews, graph))
            if state.covers(ews, graph):
                return time.monotonic() - started
            if time.monotonic() - started > limit_seconds:
                raise LoadTestError(f"not every mailbox was watched within {limit_seconds:.0f} s: {state}")
            await asyncio.sleep(0.5)

    # --- mail -------------------------------------------------------------------------------------------------

    async def create_mail(self, backend: Backend, mailboxes: Sequence[str], subject: str) -> list[Mail]:
        """One new mail in each mailbox, in the mock of its backend; created_at is taken before asking."""
        at = time.time()
        if backend is Backend.EWS:
            answer = await self._post(f"{self.target.ews_url}/_mock/mail/bulk",
                                      {"mailboxes": list(mailboxes), "subject": subject})
            ids = answer["item_ids"]
        else:
            answer = await self._post(f"{self.target.graph_url}/_mock/mail",
                                      {"mailboxes": list(mailboxes), "subject": subject}, ssl_context=self._graph_ssl)
            ids = answer["ids"]
        return [Mail(str(i), m, at) for i, m in zip(ids, mailboxes, strict=True)]

    async def send_plan(self, plan: Plan, on_created: Callable[[list[Mail]], None],
                        stop: asyncio.Event | None = None, chunk: int = 500) -> float:
        """Creates the plan's mail on its schedule (each tick's due mail in one request per backend, at most
        `chunk` mailboxes a request); returns the start (epoch seconds)."""
        subject = f"load test {plan.run_id}"
        started_wall, started = time.time(), time.monotonic()
        i, total = 0, len(plan.mails)
        while i < total and not (stop and stop.is_set()):
            now = time.monotonic() - started
            due: dict[Backend, list[str]] = defaultdict(list)
            while i < total and plan.mails[i][0] <= now:
                mailbox = plan.mailboxes[plan.mails[i][1]]
                due[mailbox.backend].append(mailbox.address)
                i += 1
            requests = [self.create_mail(backend, names[s:s + chunk], subject)
                        for backend, names in due.items() for s in range(0, len(names), chunk)]
            for created in await asyncio.gather(*requests):
                on_created(created)
            if i < total:
                wait = plan.mails[i][0] - (time.monotonic() - started)
                await asyncio.sleep(max(0.0, min(TICK_SECONDS, wait)))
        return started_wall

    # --- following the providers ------------------------------------------------------------------------------

    def follower(self, on_received: Callable[[list[dict[str, Any]]], None]) -> Follower:
        feeds = [u + "/mock/received" for u in (self.target.apns_url, self.target.fcm_url) if u]
        return Follower(self.session, feeds, on_received)

    # --- HTTP -------------------------------------------------------------------------------------------------

    @property
    def _auth(self) -> dict[str, str]:
        return {"X-API-Key": self.target.api_key}

    async def _api(self, method: str, path: str, body: Any, attempts: int = 5) -> Any:
        for attempt in range(attempts):
            url = next(self._nodes) + path
            try:
                async with self.session.request(method, url, json=body, headers=self._auth) as answer:
                    if answer.status in (502, 503, 504) and attempt + 1 < attempts:
                        await asyncio.sleep(0.2 * (attempt + 1))
                        continue
                    if answer.status >= 300:
                        detail = await answer.text()
                        raise LoadTestError(f"{method} {path} answered {answer.status}: {detail[:300]}")
                    return await answer.json()
            except aiohttp.ClientConnectionError as exc:
                if attempt + 1 == attempts:
                    raise LoadTestError(f"{method} {url}: {exc}") from None
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _post(self, url: str, body: Any, ssl_context: ssl.SSLContext | bool = True) -> Any:
        try:
            async with self.session.post(url, json=body, ssl=ssl_context) as answer:
                if answer.status != 200:
                    raise LoadTestError(f"POST {url} answered {answer.status}: {(await answer.text())[:300]}")
                return await answer.json()
        except aiohttp.ClientError as exc:
            raise LoadTestError(f"POST {url}: {exc}") from None


class Follower:
    """Polls each mock provider's GET /mock/received by cursor, so nothing it received is missed."""

    def __init__(self, session: aiohttp.ClientSession, feeds: Sequence[str],
                 on_received: Callable[[list[dict[str, Any]]], None]) -> None:
        self._session = session
        self._cursors = {f: 0 for f in feeds}
        self._on_received = on_received
        self._task: asyncio.Task[None] | None = None
        self._reading = asyncio.Lock()  # two readers at one cursor would hand on the same page twice
        self.error: LoadTestError | None = None

    async def start(self) -> None:
        """From now on: what arrived before this is skipped (an earlier run's pushes)."""
        for feed in self._cursors:
            self._cursors[feed] = int((await self._read(feed, 0, limit=1))["total"])
        self._task = asyncio.create_task(self._run(), name="loadtest-follower")

    async def poll(self) -> None:
        """Hand on everything received since the last poll (also called by the run to be sure it is current)."""
        async with self._reading:
            await self._poll()

    async def _poll(self) -> None:
        for feed, cursor in self._cursors.items():
            while True:
                page = await self._read(feed, cursor)
                if page["after"] > cursor:
                    raise LoadTestError(f"{feed} forgot {page['after'] - cursor} pushes before they were read: "
                                        f"start the mock with a longer --history")
                if page["pushes"]:
                    self._on_received(page["pushes"])
                cursor = self._cursors[feed] = page["next"]
                if len(page["pushes"]) < PAGE:
                    break

    async def _run(self) -> None:
        try:
            while True:
                await self.poll()
                await asyncio.sleep(POLL_SECONDS)
        except LoadTestError as exc:
            self.error = exc

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.poll()  # the last of it
        if self.error is not None:
            raise self.error

    async def _read(self, feed: str, after: int, limit: int = PAGE) -> Any:
        try:
            async with self._session.get(feed, params={"after": str(after), "limit": str(limit)}) as answer:
                if answer.status != 200:
                    raise LoadTestError(f"GET {feed} answered {answer.status}: {(await answer.text())[:200]}")
                return await answer.json()
        except aiohttp.ClientError as exc:
            raise LoadTestError(f"GET {feed}: {exc}") from None
