"""The load test and the demo: the plan, matching pushes to mail, the mocks' feeds, and whole runs against a local
deployment of real processes (the four mocks and a daemon)."""

from __future__ import annotations

import collections
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bemsmail.loadtest.local import LocalDeployment
from bemsmail.loadtest.plan import Backend, Shape, make_plan
from bemsmail.loadtest.report import Mail, Received, match, parse_received, percentile, summarize
from bemsmail.mocks.feed import parse_cursor, rows_after

# --- the plan ---------------------------------------------------------------------------------------------------


def test_a_plan_spreads_backends_and_platforms_by_share_and_spaces_each_mailboxs_mail() -> None:
    plan = make_plan(Shape(mailboxes=10, devices_per_mailbox=2, android_share=0.25, graph_share=0.3, rate=5,
                           duration=6), ews_domain="example.com", graph_domain="contoso.com")
    assert plan.count(Backend.GRAPH) == 3 and plan.count(Backend.EWS) == 7
    assert all(m.address.endswith("@contoso.com") == (m.backend is Backend.GRAPH) for m in plan.mailboxes)
    platforms = collections.Counter((m.backend, d.platform) for m in plan.mailboxes for d in m.devices)
    assert platforms == {(Backend.EWS, "android"): 3, (Backend.EWS, "ios"): 11, (Backend.GRAPH, "android"): 1,
                         (Backend.GRAPH, "ios"): 5}
    assert len({d.token for d in plan.devices}) == 20
    assert len(plan.mails) == 30 and plan.expected_pushes == 60
    # round-robin: a mailbox's next mail comes a whole round (mailboxes / rate = 2 s) later
    times: dict[int, list[float]] = collections.defaultdict(list)
    for at, index in plan.mails:
        times[index].append(at)
    assert all(b - a == pytest.approx(2.0) for ts in times.values() for a, b in itertools.pairwise(ts))


def test_a_burst_is_all_at_once_and_tokens_pass_the_apis_checks() -> None:
    from bemsmail.api.schemas import check_token
    from bemsmail.core.model import Platform

    plan = make_plan(Shape(mailboxes=4, burst=6, android_share=0.5), ews_domain="e.test", graph_domain="g.test")
    assert [at for at, _ in plan.mails] == [0.0] * 6
    for device in plan.devices:
        assert check_token(Platform(device.platform), device.token) == device.token


# --- matching -------------------------------------------------------------------------------------------------


def mails(*specs: tuple[str, str, float]) -> list[Mail]:
    return [Mail(item, box, at) for item, box, at in specs]


def push(token: str, item: str | None, at: float, count: int = 1, status: int = 200) -> Received:
    return Received(token, status, "", at, item, count)


def test_every_mail_reaches_every_device_with_its_latency() -> None:
    made = mails(("i1", "a@x", 10.0), ("i2", "b@x", 10.5))
    result = match(made, {"a@x": ["ta1", "ta2"], "b@x": ["tb"]},
                   [push("ta1", "i1", 10.010), push("ta2", "i1", 10.020), push("tb", "i2", 10.600)])
    assert result.expected == 3 and result.lost == 0 and result.duplicates == 0
    assert sorted(round(d.latency_ms) for d in result.deliveries) == [10, 20, 100]


def test_a_coalesced_push_delivers_the_mail_it_stands_for_and_a_repeat_is_a_duplicate() -> None:
    made = mails(("i1", "a@x", 1.0), ("i2", "a@x", 1.2), ("i3", "a@x", 1.4))
    result = match(made, {"a@x": ["t"]}, [
        push("t", "i1", 1.01),
        push("t", "i3", 2.0, count=2),  # the window's push: i2 and i3
        push("t", "i3", 2.5),  # sent again
    ])
    assert result.lost == 0 and result.duplicates == 1
    assert {d.item_id: round(d.latency_ms) for d in result.deliveries} == {"i1": 10, "i2": 800, "i3": 600}


def test_lost_refused_and_foreign_pushes_are_told_apart() -> None:
    made = mails(("i1", "a@x", 1.0), ("i2", "a@x", 2.0))
    result = match(made, {"a@x": ["t1", "t2"]}, [
        push("t1", "i1", 1.1), push("t2", "i1", 1.1, status=410),  # a dead token: not delivered
        push("t1", "older-run", 1.2), push("stranger", "i2", 2.1),  # not this run's mail, or not its device
    ])
    assert result.refused == 1 and result.foreign == 2
    assert sorted(result.missing) == [("i1", "t2"), ("i2", "t1"), ("i2", "t2")] and result.lost == 3


def test_the_mocks_feeds_parse_and_the_summary_reports_percentiles_and_a_timeline() -> None:
    records = [{"token": "t", "status": 200, "reason": "", "at": 1.05, "data": {"item_id": "i1", "count": "1"}},
               {"token": "t", "status": 200, "reason": "", "at": 2.5, "data": {"item_id": "i2"}}]
    made = mails(("i1", "a@x", 1.0), ("i2", "a@x", 2.0))
    matched = match(made, {"a@x": ["t"]}, parse_received(records))
    result = summarize(matched, made, 1.0, {"mailboxes": 1})
    assert result["latency_ms"] == {"p50": 50.0, "p95": 500.0, "p99": 500.0, "max": 500.0}
    assert result["by_mail"]["first of its mailbox"]["max"] == 50.0 and result["by_mail"]["later"]["max"] == 500.0
    assert [(s["t"], s["mails"], s["pushes"]) for s in result["timeline"]] == [(0, 1, 1), (1, 1, 1)]
    assert percentile([], 0.5) is None and percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0


def test_a_feed_reader_learns_when_rows_were_forgotten_before_it_read_them() -> None:
    history = collections.deque(range(1, 11), maxlen=10)  # rows 1..10 arrived, all kept
    assert rows_after(history, 10, 7) == (7, [8, 9, 10])
    history.extend(range(11, 16))  # 15 arrived, 6..15 kept
    start, rows = rows_after(history, 15, 2)
    assert start == 5 and rows[0] == 6  # rows 3..5 are gone: the reader can tell
    assert rows_after(history, 15, 15) == (15, [])
    assert parse_cursor({"after": "3"}) == (3, 10_000)
    with pytest.raises(ValueError, match="integers"):
        parse_cursor({"after": "x"})


# --- the command ------------------------------------------------------------------------------------------------


def bemsmail(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bemsmail", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.parametrize(("args", "message"), [
    (["--local", "--mailboxes", "0"], "--mailboxes must be between 1 and 100000, not 0"),
    (["--local", "--rate", "fast"], "--rate must be a number, not 'fast'"),
    (["--api", "http://10.0.0.7:8443", "--api-key-file", "/dev/null", "--apns-mock", "http://127.0.0.1:1"],
     "is not on loopback"),
    (["--api", "http://127.0.0.1:8443"], "--api-key-file is required"),
    (["--local", "--api", "http://127.0.0.1:8443"], "leave out --api"),
])
def test_bad_options_are_refused_with_one_clear_line(args: list[str], message: str) -> None:
    answer = bemsmail("loadtest", *args, timeout=30)
    assert answer.returncode == 2
    assert message in answer.stderr and "Traceback" not in answer.stderr


def test_a_local_load_test_over_both_backends_and_platforms_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    answer = bemsmail("loadtest", "--local", "--mailboxes", "60", "--devices-per-mailbox", "2", "--rate", "40",
                      "--duration", "3", "--out", str(out))
    assert answer.returncode == 0, answer.stderr[-3000:]
    result = json.loads(answer.stdout.strip().splitlines()[-1])
    assert result["mails"] == 120 and result["expected_pushes"] == 240
    assert result["delivered"] == 240 and result["lost"] == 0 and result["duplicates"] == 0
    assert result["options"]["ews_mailboxes"] == 30 and result["options"]["android_devices"] == 60
    assert result["latency_ms"]["p99"] is not None
    assert {name: row["pushes"] for name, row in result["by_path"].items()} == {
        "ews→ios": 60, "ews→android": 60, "graph→ios": 60, "graph→android": 60}
    assert set(result["cpu_seconds"]) == {"bemsmail", "mock-ews", "mock-graph", "mock-apns", "mock-fcm",
                                     "loadtest"}
    saved = json.loads((out / "result.json").read_text())
    assert saved["delivered"] == 240 and sum(s["pushes"] for s in saved["timeline"]) == 240
    assert (out / "loadtest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "| **lost** (expected - delivered) | **0** |" in summary and "loadtest.png" in summary


def test_a_load_test_drives_a_running_deployment_twice_counting_only_its_own_pushes(tmp_path: Path) -> None:
    with LocalDeployment(tmp_path / "deployment") as target:
        key_file = tmp_path / "api-key"
        key_file.write_text(target.api_key)
        assert target.ews_url and target.graph_url and target.apns_url and target.fcm_url
        common = ["--api", target.api_urls[0], "--api-key-file", str(key_file), "--ews-mock", target.ews_url,
                  "--graph-mock", target.graph_url, "--graph-ca-file", str(target.graph_ca_file),
                  "--apns-mock", target.apns_url, "--fcm-mock", target.fcm_url, "--mailboxes", "20",
                  "--no-plot"]
        for run, extra in enumerate((["--burst", "30"], ["--rate", "20", "--duration", "1"])):
            answer = bemsmail("loadtest", *common, *extra, "--seed", str(run), "--out", str(tmp_path / f"r{run}"))
            assert answer.returncode == 0, answer.stdout[-3000:] + answer.stderr[-3000:]
            result = json.loads(answer.stdout.strip().splitlines()[-1])
            assert result["lost"] == 0 and result["duplicates"] == 0 and result["foreign_pushes"] == 0
            assert result["delivered"] == result["expected_pushes"] == result["mails"]
        assert not (tmp_path / "r1" / "loadtest.png").exists()
        assert target.api_key not in answer.stdout + answer.stderr


def test_the_demo_shows_both_backends_and_platforms_and_prunes_the_dead_token() -> None:
    answer = bemsmail("demo", "--mails", "5", "--interval", "0.3", "--plain")
    assert answer.returncode == 0, answer.stderr[-3000:]
    delivered = [line.split() for line in answer.stdout.splitlines() if line.endswith("delivered")]
    seen = {(words[2], words[-4]) for words in delivered}  # (backend, platform)
    assert seen == {("EWS", "ios"), ("EWS", "android"), ("GRAPH", "ios"), ("GRAPH", "android")}
    assert any("bob-old-iphone" in line and "410 Unregistered" in line for line in answer.stdout.splitlines())
    assert "dead token pruned" in answer.stdout and "dead tokens pruned 1" in answer.stdout


async def test_a_follower_read_from_two_places_at_once_hands_on_each_push_once() -> None:
    import asyncio

    import aiohttp
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from bemsmail.loadtest.driver import Follower

    history: collections.deque[dict[str, object]] = collections.deque(maxlen=100)
    total = 0

    async def received(request: web.Request) -> web.Response:
        after, limit = parse_cursor(request.query)
        await asyncio.sleep(0.01)  # both readers are in flight at the same cursor
        start, rows = rows_after(history, total, after, limit)
        return web.json_response({"after": start, "next": start + len(rows), "total": total, "pushes": rows})

    app = web.Application()
    app.router.add_get("/mock/received", received)
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        seen: list[object] = []
        follower = Follower(session, [str(server.make_url("/mock/received"))], seen.extend)
        for n in range(5):
            history.append({"token": "t", "status": 200, "at": 1.0, "data": {"item_id": f"i{n}"}})
            total += 1
        await asyncio.gather(follower.poll(), follower.poll(), follower.poll())
        assert len(seen) == 5


async def test_a_follower_stops_the_run_when_the_mock_forgot_pushes_it_had_not_read() -> None:
    import aiohttp
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from bemsmail.loadtest.driver import Follower, LoadTestError

    history: collections.deque[dict[str, object]] = collections.deque(maxlen=3)
    for n in range(8):  # 8 arrived, 3 kept
        history.append({"token": "t", "status": 200, "at": 1.0, "data": {"item_id": f"i{n}"}})

    async def received(request: web.Request) -> web.Response:
        start, rows = rows_after(history, 8, *parse_cursor(request.query))
        return web.json_response({"after": start, "next": start + len(rows), "total": 8, "pushes": rows})

    app = web.Application()
    app.router.add_get("/mock/received", received)
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        follower = Follower(session, [str(server.make_url("/mock/received"))], lambda rows: None)
        with pytest.raises(LoadTestError, match=r"forgot 5 pushes .* longer --history"):
            await follower.poll()


def test_the_demo_stops_by_itself_after_its_duration() -> None:
    answer = bemsmail("demo", "--duration", "2", "--interval", "0.5", "--plain")
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert "delivered" in answer.stdout and "stopping" in answer.stdout


def test_the_demo_refuses_a_bad_option_with_one_line() -> None:
    answer = bemsmail("demo", "--interval", "0", timeout=30)
    assert answer.returncode == 2 and "--interval must be positive" in answer.stderr
    assert "Traceback" not in answer.stderr


async def test_the_mock_providers_feed_refuses_a_bad_cursor_and_starts_empty() -> None:
    import aiohttp

    from bemsmail.mocks.fcm import FcmMock

    async with FcmMock(port=0) as fcm, aiohttp.ClientSession() as session:
        async with session.get(f"{fcm.base_url}/mock/received", params={"after": "x"}) as answer:
            assert answer.status == 400 and "integers" in (await answer.json())["error"]
        async with session.get(f"{fcm.base_url}/mock/received") as answer:
            assert await answer.json() == {"after": 0, "next": 0, "total": 0, "pushes": []}
