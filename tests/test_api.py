"""The registration API over real HTTP on loopback: upserts, reads, patches, deletes and every error shape."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bemsmail.core.model import RegistrationChange, RegistrationChanged
from bemsmail.core.registrations import REGISTRATION_TOPIC
from tests.support import (
    ANDROID_APP,
    ANDROID_TOKEN,
    IOS_TOKEN,
    Api,
    dev_config,
    registration,
    running_api,
)

PROBLEM = "application/problem+json"
URL = "/api/v1/registrations"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    config, key = dev_config(tmp_path)
    async with running_api(config, key) as api:
        yield api


async def post(api: Api, body: Any, **kwargs: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {**api.headers, **kwargs.pop("headers", {})}
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    kwargs.setdefault("content_type", "application/json")
    headers.setdefault("Content-Type", kwargs.pop("content_type"))
    resp = await api.client.post(URL, data=data, headers=headers)
    text = await resp.text()
    return resp.status, (json.loads(text) if text else {}), dict(resp.headers)


async def count(api: Api, mailbox: str = "alice@example.com") -> int:
    resp = await api.client.get(URL, params={"mailbox": mailbox}, headers=api.headers)
    assert resp.status == 200
    return len((await resp.json())["items"])


async def test_create_then_update_same_device(api: Api) -> None:
    status, body, headers = await post(api, registration(locale="de-DE", timezone="Europe/Berlin"))
    assert status == 201
    assert headers["Location"] == f"{URL}/{body['id']}"
    assert body["mailbox"] == "alice@example.com"
    assert body["locale"] == "de-DE" and body["timezone"] == "Europe/Berlin"
    assert body["settings"]["folders"] == ["Inbox"] and body["settings"]["content"] == "minimal"
    assert "token" not in body and len(body["token_fingerprint"]) == 16

    status2, body2, _ = await post(api, registration(settings={"content": "rich"}))
    assert status2 == 200
    assert body2["id"] == body["id"]
    assert body2["settings"]["content"] == "rich"
    assert body2["created_at"] == body["created_at"]
    assert body2["updated_at"] > body["updated_at"]
    assert await count(api) == 1


async def test_token_moves_to_new_device_and_mailbox(api: Api) -> None:
    _, first, _ = await post(api, registration())
    status, moved, _ = await post(api, registration(mailbox="bob@example.com", device_id="iphone-2"))
    assert status == 201
    assert moved["id"] != first["id"]
    assert await count(api, "alice@example.com") == 0
    assert await count(api, "bob@example.com") == 1
    gone = await api.client.get(f"{URL}/{first['id']}", headers=api.headers)
    assert gone.status == 404


async def test_android_registration(api: Api) -> None:
    status, body, _ = await post(
        api, registration(platform="android", token=ANDROID_TOKEN, app_id=ANDROID_APP, device_id="pixel")
    )
    assert status == 201
    assert body["platform"] == "android"


async def test_registration_changes_are_published(api: Api) -> None:
    seen: list[RegistrationChanged] = []

    async def handler(message: object) -> None:
        assert isinstance(message, RegistrationChanged)
        seen.append(message)

    api.node.bus.subscribe(REGISTRATION_TOPIC, handler)
    _, first, _ = await post(api, registration())
    await post(api, registration())
    _, moved, _ = await post(api, registration(device_id="iphone-2"))
    await api.client.delete(f"{URL}/{moved['id']}", headers=api.headers)
    assert [(m.registration_id, m.change) for m in seen] == [
        (first["id"], RegistrationChange.CREATED),
        (first["id"], RegistrationChange.UPDATED),
        (first["id"], RegistrationChange.DELETED),
        (moved["id"], RegistrationChange.CREATED),
        (moved["id"], RegistrationChange.DELETED),
    ]
    assert {m.mailbox for m in seen} == {"alice@example.com"}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"mailbox": "not-an-address"}, "mailbox"),
        ({"mailbox": "a" * 300 + "@example.com"}, "mailbox"),
        ({"mailbox": "alice@unknown-domain.org"}, "mailbox"),
        ({"token": "zz" * 32}, "token"),
        ({"token": "ab" * 31}, "token"),
        ({"token": "ab" * 101}, "token"),
        ({"platform": "windows"}, "platform"),
        ({"app_id": "com.unknown.app"}, "app_id"),
        ({"app_id": ANDROID_APP}, "app_id"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"locale": "x" * 40}, "locale"),
        ({"device_id": "d" * 201}, "device_id"),
        ({"device_id": "has space"}, "device_id"),
        ({"environment": "staging"}, "environment"),
        ({"settings": {"content": "loud"}}, "settings.content"),
        ({"settings": {"quiet_hours": {"start": "22:00", "end": "22:00"}}}, "settings.quiet_hours"),
        ({"settings": {"vip_senders": ["not-an-address"]}}, "settings.vip_senders"),
        ({"settings": {"unknown": True}}, "settings.unknown"),
        ({"surprise": 1}, "surprise"),
    ],
)
async def test_invalid_fields_are_named_and_nothing_is_written(
    api: Api, overrides: dict[str, Any], field: str
) -> None:
    status, body, headers = await post(api, registration(**overrides))
    assert status == 422
    assert headers["Content-Type"].startswith(PROBLEM)
    assert body["type"] == "urn:bemsmail:problem:invalid-fields"
    assert field in [e["field"] for e in body["errors"]], body
    assert body["detail"]
    assert await count(api) == 0


async def test_missing_fields_are_all_named(api: Api) -> None:
    status, body, _ = await post(api, {"mailbox": "alice@example.com"})
    assert status == 422
    assert {e["field"] for e in body["errors"]} == {"device_id", "platform", "token", "app_id"}


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "slug"),
    [
        (b'{"mailbox": ', "application/json", 400, "malformed-json"),
        (b"", "application/json", 400, "malformed-json"),
        (b"[1, 2]", "application/json", 422, "invalid-fields"),
        (json.dumps(registration()).encode(), "text/plain", 415, "unsupported-media-type"),
        (json.dumps(registration()).encode(), "application/x-www-form-urlencoded", 415, "unsupported-media-type"),
        (json.dumps(registration(device_id="x" * 70_000)).encode(), "application/json", 413, "body-too-large"),
    ],
)
async def test_bad_bodies(api: Api, raw: bytes, content_type: str, status: int, slug: str) -> None:
    got, body, headers = await post(api, raw, content_type=content_type)
    assert got == status
    assert headers["Content-Type"].startswith(PROBLEM)
    assert body["type"] == f"urn:bemsmail:problem:{slug}"
    assert body["status"] == status and body["detail"]
    assert await count(api) == 0


async def test_oversized_body_without_content_length(api: Api) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(80):
            yield b" " * 1024

    resp = await api.client.post(URL, data=chunks(), headers={**api.headers, "Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json(content_type=None))["type"].endswith("body-too-large")


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer not.a.jwt"}, {"Authorization": "Basic dTpw"}],
)
async def test_unauthenticated(api: Api, headers: dict[str, str]) -> None:
    resp = await api.client.post(URL, json=registration(), headers=headers)
    assert resp.status == 401
    assert resp.headers["Content-Type"].startswith(PROBLEM)
    assert "WWW-Authenticate" in resp.headers
    assert await count(api) == 0


async def test_api_key_in_authorization_header(api: Api) -> None:
    resp = await api.client.get(URL, params={"mailbox": "a@example.com"},
                                headers={"Authorization": f"ApiKey {api.key}"})
    assert resp.status == 200


async def test_get_patch_delete(api: Api) -> None:
    _, created, _ = await post(api, registration(settings={"folders": ["Inbox", "Projects"], "badge": False}))
    one = f"{URL}/{created['id']}"
    resp = await api.client.get(one, headers=api.headers)
    assert resp.status == 200 and (await resp.json())["id"] == created["id"]

    resp = await api.client.patch(
        one,
        data=json.dumps({"locale": "fr", "settings": {"content": "rich", "quiet_hours": {"start": "22:00",
                                                                                          "end": "07:00"}}}),
        headers={**api.headers, "Content-Type": "application/merge-patch+json"},
    )
    assert resp.status == 200
    patched = await resp.json()
    assert patched["locale"] == "fr"
    assert patched["settings"]["content"] == "rich"
    assert patched["settings"]["folders"] == ["Inbox", "Projects"]  # merged, not replaced
    assert patched["settings"]["badge"] is False
    assert patched["settings"]["quiet_hours"] == {"start": "22:00:00", "end": "07:00:00", "silent_badge": False}

    resp = await api.client.patch(one, json={"settings": {"quiet_hours": None}, "timezone": None},
                                  headers=api.headers)
    patched = await resp.json()
    assert patched["settings"]["quiet_hours"] is None and patched["timezone"] is None

    resp = await api.client.delete(one, headers=api.headers)
    assert resp.status == 204
    resp = await api.client.delete(one, headers=api.headers)
    assert resp.status == 404
    assert (await resp.json())["type"].endswith("not-found")


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"token": None}, "token"),
        ({"token": "nothex"}, "token"),
        ({"app_id": ANDROID_APP}, "app_id"),
        ({"app_id": None}, "app_id"),
        ({"settings": {"content": "loud"}}, "settings.content"),
        ({"timezone": "Nowhere/Town"}, "timezone"),
        ({"platform": "android"}, "platform"),
        ({}, "(body)"),
    ],
)
async def test_bad_patch_writes_nothing(api: Api, patch: dict[str, Any], field: str) -> None:
    _, created, _ = await post(api, registration(locale="de"))
    one = f"{URL}/{created['id']}"
    resp = await api.client.patch(one, json=patch, headers=api.headers)
    assert resp.status == 422
    assert field in [e["field"] for e in (await resp.json())["errors"]]
    after = await (await api.client.get(one, headers=api.headers)).json()
    assert after == created


async def test_patch_token_takes_over_from_other_registration(api: Api) -> None:
    _, first, _ = await post(api, registration())
    _, second, _ = await post(api, registration(device_id="ipad", token="cd" * 32))
    resp = await api.client.patch(f"{URL}/{second['id']}", json={"token": IOS_TOKEN.upper()}, headers=api.headers)
    assert resp.status == 200
    assert (await resp.json())["token_fingerprint"] == first["token_fingerprint"]
    assert (await api.client.get(f"{URL}/{first['id']}", headers=api.headers)).status == 404


async def test_patch_wrong_content_type(api: Api) -> None:
    _, created, _ = await post(api, registration())
    resp = await api.client.patch(f"{URL}/{created['id']}", data="locale=de",
                                  headers={**api.headers, "Content-Type": "text/plain"})
    assert resp.status == 415
    assert "Accept-Patch" in resp.headers


async def test_list_needs_a_valid_mailbox(api: Api) -> None:
    resp = await api.client.get(URL, headers=api.headers)
    assert resp.status == 422
    assert (await resp.json())["errors"][0]["field"] == "mailbox"
    resp = await api.client.get(URL, params={"mailbox": "nope"}, headers=api.headers)
    assert resp.status == 422


async def test_unknown_id_route_and_method(api: Api) -> None:
    resp = await api.client.get(f"{URL}/{'0' * 32}", headers=api.headers)
    assert resp.status == 404
    resp = await api.client.get("/api/v1/nothing-here", headers=api.headers)
    assert resp.status == 404 and resp.headers["Content-Type"].startswith(PROBLEM)
    resp = await api.client.put(URL, json={}, headers=api.headers)
    assert resp.status == 405 and resp.headers["Content-Type"].startswith(PROBLEM)
    assert "POST" in resp.headers["Allow"]


async def test_request_id_is_echoed_or_made(api: Api) -> None:
    resp = await api.client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["X-Request-ID"] == "abc-123"
    resp = await api.client.post(URL, data="{", headers={**api.headers, "Content-Type": "application/json",
                                                         "X-Request-ID": "bad id with spaces"})
    made = resp.headers["X-Request-ID"]
    assert made != "bad id with spaces" and len(made) == 32
    assert (await resp.json(content_type=None))["request_id"] == made


async def test_problem_documents_never_echo_the_token(api: Api) -> None:
    secret_token = "f" * 63 + "g"  # invalid (not hex) so it is rejected
    _, body, _ = await post(api, registration(token=secret_token))
    assert secret_token not in json.dumps(body)
    _, body, _ = await post(api, registration(token="c" * 64, app_id="x" * 201))
    assert "c" * 64 not in json.dumps(body)


async def test_health_ready_and_metrics(api: Api) -> None:
    assert (await api.client.get("/healthz")).status == 200
    ready = await api.client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["checks"] == {"database": "ok", "schema": "ok"}
    await post(api, registration())
    await api.client.get(f"{URL}/{'1' * 32}", headers=api.headers)
    text = await (await api.client.get("/metrics")).text()
    assert 'bemsmail_http_requests_total{method="POST",route="/api/v1/registrations",status="201"} 1.0' in text
    assert 'route="/api/v1/registrations/{id}"' in text
    assert "bemsmail_http_request_duration_seconds_bucket" in text
    assert 'bemsmail_registration_changes_total{change="created"} 1.0' in text
    assert "alice" not in text and IOS_TOKEN not in text and "1" * 32 not in text


async def test_not_ready_without_schema(tmp_path: Path) -> None:
    config, key = dev_config(tmp_path)
    async with running_api(config, key, migrate=False) as api:
        resp = await api.client.get("/readyz")
        assert resp.status == 503
        body = await resp.json()
        assert "bemsmail migrate" in body["checks"]["schema"]


async def test_repeated_requests_count_on_the_same_series(api: Api) -> None:
    """The labelled metric children are cached: every request still counts, on its own series."""
    tokens = [f"{n}" * 64 for n in range(3)]
    for n, token in enumerate(tokens):
        await post(api, registration(device_id=f"dev-{n}", token=token))
    await post(api, registration(device_id="dev-0", token=tokens[0]))
    await post(api, registration(mailbox="nope"))
    text = await (await api.client.get("/metrics")).text()
    assert 'bemsmail_http_requests_total{method="POST",route="/api/v1/registrations",status="201"} 3.0' in text
    assert 'bemsmail_http_requests_total{method="POST",route="/api/v1/registrations",status="200"} 1.0' in text
    assert 'bemsmail_http_requests_total{method="POST",route="/api/v1/registrations",status="422"} 1.0' in text
    assert 'bemsmail_http_request_duration_seconds_count{method="POST",route="/api/v1/registrations"} 5.0' in text
    assert 'bemsmail_registration_changes_total{change="created"} 3.0' in text
    assert 'bemsmail_registration_changes_total{change="updated"} 1.0' in text


async def test_mailbox_validation_answers_the_same_from_its_cache(api: Api) -> None:
    """Valid addresses are remembered (normalized as before); invalid ones are refused every time."""
    for _ in range(2):
        status, body, _ = await post(api, registration(mailbox=" Alice@Example.COM "))
        assert status in (200, 201) and body["mailbox"] == "alice@example.com"
    details = set()
    for _ in range(2):
        status, body, _ = await post(api, registration(mailbox="alice@@example.com"))
        assert status == 422 and body["errors"][0]["field"] == "mailbox"
        details.add(body["detail"])
    assert len(details) == 1 and "not a valid email address" in details.pop()
