"""The mock APNs on its own, driven by an independent HTTP/2 client (httpx): Apple's checks, the script, the control
API, and the mock as its own process."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import jwt
import pytest

from bemsmail.mocks.apns import MAX_PAYLOAD, Answer, MockApns, load_provider_key
from bemsmail.mocks.tls import TestPki, ensure_test_pki, generate_provider_key

TOPIC = "com.example.mail"
KEY_ID = "ABCDE12345"
TEAM_ID = "TEAM123456"
TOKEN = "ab" * 32


@pytest.fixture
async def mock(pki: TestPki, key_file: Path) -> AsyncIterator[MockApns]:
    async with MockApns(pki, topics=[TOPIC], keys=[load_provider_key(KEY_ID, TEAM_ID, key_file)]) as server:
        yield server


@pytest.fixture
async def client(pki: TestPki) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(http2=True, verify=pki.client_context()) as http:
        yield http


def bearer(key_file: Path, *, iat: float | None = None, kid: str = KEY_ID, iss: str = TEAM_ID) -> str:
    claims = {"iss": iss, "iat": int(time.time() if iat is None else iat)}
    return "bearer " + jwt.encode(claims, key_file.read_text(), algorithm="ES256", headers={"kid": kid})


async def post(client: httpx.AsyncClient, mock: MockApns, key_file: Path, *, token: str = TOKEN,
               headers: dict[str, str | None] | None = None, body: bytes | None = None,
               method: str = "POST", path: str | None = None) -> httpx.Response:
    sent: dict[str, str] = {"apns-topic": TOPIC, "authorization": bearer(key_file), "apns-push-type": "alert"}
    for name, value in (headers or {}).items():
        if value is None:
            sent.pop(name, None)
        else:
            sent[name] = value
    url = f"https://127.0.0.1:{mock.port}{path or f'/3/device/{token}'}"
    content = b'{"aps":{"alert":"hi"}}' if body is None else body
    return await client.request(method, url, headers=sent, content=content)


def reason(response: httpx.Response) -> str:
    data: dict[str, Any] = response.json()
    return str(data["reason"])


async def test_success_is_headers_only_over_http2(mock: MockApns, client: httpx.AsyncClient, key_file: Path) -> None:
    nid = str(uuid.uuid4())
    response = await post(client, mock, key_file, headers={"apns-id": nid})
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200 and response.content == b""
    assert response.headers["apns-id"] == nid
    generated = await post(client, mock, key_file)
    assert str(uuid.UUID(generated.headers["apns-id"])) == generated.headers["apns-id"]
    seen = mock.recent()[-2]
    assert seen.payload == {"aps": {"alert": "hi"}} and seen.apns_id == nid and seen.auth == "token"


CHECKS: list[tuple[str, dict[str, Any], int, str]] = [
    ("method", {"method": "PUT"}, 405, "MethodNotAllowed"),
    ("path", {"path": "/2/device/abcd"}, 404, "BadPath"),
    ("no-token", {"token": ""}, 400, "MissingDeviceToken"),
    ("bad-token", {"token": "zz" * 32}, 400, "BadDeviceToken"),
    ("apns-id", {"headers": {"apns-id": "123"}}, 400, "BadMessageId"),
    ("no-auth", {"headers": {"authorization": None}}, 403, "MissingProviderToken"),
    ("no-bearer", {"headers": {"authorization": "basic abc"}}, 403, "MissingProviderToken"),
    ("garbage-jwt", {"headers": {"authorization": "bearer not.a.jwt"}}, 403, "InvalidProviderToken"),
    ("no-topic", {"headers": {"apns-topic": None}}, 400, "MissingTopic"),
    ("topic", {"headers": {"apns-topic": "com.example.other"}}, 400, "TopicDisallowed"),
    ("push-type", {"headers": {"apns-push-type": "shout"}}, 400, "InvalidPushType"),
    ("priority", {"headers": {"apns-priority": "7"}}, 400, "BadPriority"),
    ("expiration", {"headers": {"apns-expiration": "soon"}}, 400, "BadExpirationDate"),
    ("collapse", {"headers": {"apns-collapse-id": "c" * 65}}, 400, "BadCollapseId"),
    ("empty", {"body": b""}, 400, "PayloadEmpty"),
    ("too-large", {"body": b'{"aps":{"alert":"' + b"x" * MAX_PAYLOAD + b'"}}'}, 413, "PayloadTooLarge"),
]


@pytest.mark.parametrize(("change", "status", "why"), [c[1:] for c in CHECKS], ids=[c[0] for c in CHECKS])
async def test_apple_checks(change: dict[str, Any], status: int, why: str, mock: MockApns,
                            client: httpx.AsyncClient, key_file: Path) -> None:
    response = await post(client, mock, key_file, **change)
    assert (response.status_code, reason(response)) == (status, why)
    assert response.headers["content-type"] == "application/json"


async def test_payload_of_exactly_4096_bytes_is_accepted(mock: MockApns, client: httpx.AsyncClient,
                                                         key_file: Path) -> None:
    frame = b'{"aps":{"alert":""}}'
    body = frame[:-3] + b"x" * (MAX_PAYLOAD - len(frame)) + frame[-3:]
    assert len(body) == MAX_PAYLOAD
    assert (await post(client, mock, key_file, body=body)).status_code == 200


@pytest.mark.parametrize(("token_kwargs", "why"), [
    ({"iat": time.time() - 3700}, "ExpiredProviderToken"),
    ({"iat": time.time() + 3600}, "InvalidProviderToken"),
    ({"kid": "ZZZZZ99999"}, "InvalidProviderToken"),
    ({"iss": "OTHERTEAM1"}, "InvalidProviderToken"),
])
async def test_provider_token_checks(token_kwargs: dict[str, Any], why: str, mock: MockApns,
                                     client: httpx.AsyncClient, key_file: Path) -> None:
    response = await post(client, mock, key_file, headers={"authorization": bearer(key_file, **token_kwargs)})
    assert (response.status_code, reason(response)) == (403, why)


async def test_token_signed_by_another_key(mock: MockApns, client: httpx.AsyncClient, tmp_path: Path) -> None:
    other = generate_provider_key(tmp_path / "other.p8")
    response = await post(client, mock, other)
    assert (response.status_code, reason(response)) == (403, "InvalidProviderToken")


async def test_a_provider_token_is_verified_once(mock: MockApns, client: httpx.AsyncClient, key_file: Path) -> None:
    header = bearer(key_file)
    for _ in range(5):
        assert (await post(client, mock, key_file, headers={"authorization": header})).status_code == 200
    assert mock.stats.provider_tokens == 1


async def test_scripted_answers_per_token_and_default(mock: MockApns, client: httpx.AsyncClient,
                                                      key_file: Path) -> None:
    gone, busy = "cd" * 32, "ef" * 32
    mock.set_token(gone, Answer(410, "Unregistered", timestamp_ms=1234, times=2))
    mock.set_token(busy, Answer(429, "TooManyRequests", retry_after=30))
    mock.set_default(Answer(500, "InternalServerError", times=1))
    first = await post(client, mock, key_file, token=gone)
    assert first.status_code == 410 and first.json() == {"reason": "Unregistered", "timestamp": 1234}
    assert (await post(client, mock, key_file, token=gone)).status_code == 410
    assert (await post(client, mock, key_file, token=gone)).status_code == 500  # spent: the default, once
    assert (await post(client, mock, key_file, token=gone)).status_code == 200
    limited = await post(client, mock, key_file, token=busy)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "30"
    mock.set_token(gone, Answer(410, "Unregistered"))
    before = int(time.time() * 1000)
    stamped = (await post(client, mock, key_file, token=gone)).json()["timestamp"]
    assert before <= stamped <= int(time.time() * 1000)
    assert mock.stats.by_token[gone] == 5
    assert mock.stats.by_status == {410: 3, 500: 1, 200: 1, 429: 1}


async def test_latency_applies_per_answer(mock: MockApns, client: httpx.AsyncClient, key_file: Path) -> None:
    mock.set_default(Answer(latency_ms=50))
    started = time.monotonic()
    assert (await post(client, mock, key_file)).status_code == 200
    assert time.monotonic() - started >= 0.05  # a lower bound only: never flaky


async def test_control_api(mock: MockApns, client: httpx.AsyncClient, key_file: Path) -> None:
    async with aiohttp.ClientSession(mock.control_url) as control:
        script = {"tokens": {TOKEN: {"status": 400, "reason": "BadDeviceToken"}}, "latency_ms": 0}
        async with control.post("/mock/script", json=script) as r:
            assert r.status == 200
            assert (await r.json())["tokens"][TOKEN]["reason"] == "BadDeviceToken"
        async with control.post("/mock/script", json={"default": {"status": 999}}) as r:
            assert r.status == 400
        async with control.post("/mock/script", json={"nonsense": 1}) as r:
            assert r.status == 400
        assert (await post(client, mock, key_file)).status_code == 400
        async with control.get("/mock/stats") as r:
            stats = await r.json()
        assert stats["requests"] == 1 and stats["by_status"] == {"400": 1} and stats["by_token"] == {TOKEN: 1}
        async with control.get("/mock/requests", params={"limit": "1"}) as r:
            rows = await r.json()
        assert rows[0]["token"] == TOKEN and rows[0]["payload"] == {"aps": {"alert": "hi"}}
        async with control.post("/mock/script", json={"tokens": {TOKEN: None}, "goaway_after": 5}) as r:
            assert (await r.json())["goaway_after"] == 5
        assert (await post(client, mock, key_file)).status_code == 200
        async with control.post("/mock/reset") as r:
            assert r.status == 200
        async with control.get("/mock/stats") as r:
            assert (await r.json())["requests"] == 0
        assert mock.script.goaway_after is None


async def test_goaway_after_n_requests(mock: MockApns, client: httpx.AsyncClient, key_file: Path) -> None:
    mock.set_faults(goaway_after=2)
    for _ in range(5):  # httpx re-sends on a new connection what the GOAWAY left unprocessed
        assert (await post(client, mock, key_file)).status_code == 200
    assert mock.stats.goaways >= 2 and mock.stats.requests == 5


def test_mock_as_its_own_process(tmp_path: Path, key_file: Path) -> None:
    args = [sys.executable, "-m", "bemsmail.mocks.apns", "--cert-dir", str(tmp_path / "certs"), "--topic", TOPIC,
            "--key-id", KEY_ID, "--team-id", TEAM_ID, "--public-key-file", str(key_file), "--max-streams", "50"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "mock_apns_ready" and ready["port"] > 0 and ready["control_port"] > 0
        ca = ready["ca_file"]

        async def use() -> dict[str, Any]:
            async with httpx.AsyncClient(http2=True, verify=ensure_test_pki(Path(ca).parent).client_context()) \
                    as http:
                url = f"https://127.0.0.1:{ready['port']}/3/device/{TOKEN}"
                headers = {"apns-topic": TOPIC, "authorization": bearer(key_file)}
                assert (await http.post(url, headers=headers, content=b'{"aps":{}}')).status_code == 200
            async with aiohttp.ClientSession() as control, \
                    control.get(f"http://127.0.0.1:{ready['control_port']}/mock/stats") as r:
                stats: dict[str, Any] = await r.json()
                return stats

        assert asyncio.run(use())["requests"] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "bemsmail.mocks.apns", "--cert-dir", str(tmp_path), "--key-id",
                          KEY_ID], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
