"""/notificationClient as Graph sees it: the validation handshake first, then every kind of bad post answered with
a precise problem and nothing queued; the source-address allowlist behind a trusted proxy."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote_plus

import pytest

from tests.support import dev_config, running_api

# A real token's shape (microsoft-graph-docs #21160): spaces and colons, form-encoded with + and lower-case %3a
TOKEN = "Validation: Testing client application reachability for subscription Request-Id: 1f0e-2a <b>&</b>"
ENCODED = quote_plus(TOKEN).replace("%3A", "%3a")


@pytest.mark.parametrize("path", ["/notificationClient", "/notificationClient/lifecycle"])
async def test_the_handshake_echoes_the_decoded_token_as_plain_text(tmp_path: Path, path: str) -> None:
    config, key = dev_config(tmp_path)
    async with running_api(config, key) as api:
        # as Graph sends it: POST, empty body, text/plain, no credentials
        response = await api.client.post(f"{path}?validationToken={ENCODED}",
                                          headers={"Content-Type": "text/plain; charset=utf-8"})
        assert response.status == 200
        assert response.content_type == "text/plain"
        assert await response.text() == TOKEN  # exactly: not re-encoded, not HTML-escaped
        assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_the_handshake_comes_before_any_body_check(tmp_path: Path) -> None:
    config, key = dev_config(tmp_path)
    async with running_api(config, key) as api:
        response = await api.client.post(f"/notificationClient?validationToken={ENCODED}", data=b"\xff not json",
                                          headers={"Content-Type": "application/octet-stream"})
        assert (response.status, await response.text()) == (200, TOKEN)


async def test_bad_posts_get_precise_problems(tmp_path: Path) -> None:
    config, key = dev_config(tmp_path, env={"BEMSMAIL_WEBHOOK__MAX_BODY_BYTES": "2048"})
    async with running_api(config, key) as api:
        cases = [
            ({"data": "{}", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported-media-type"),
            ({"data": "{not json", "headers": {"Content-Type": "application/json"}}, 400, "malformed-json"),
            ({"json": {"items": []}}, 400, "malformed-notification"),
            ({"json": {"value": {"subscriptionId": "x"}}}, 400, "malformed-notification"),
            ({"json": [1, 2]}, 400, "malformed-notification"),
            ({"json": {"value": [{"subscriptionId": "x" * 3000}]}}, 413, "body-too-large"),
        ]
        for request, status, kind in cases:
            response = await api.client.post("/notificationClient", **request)  # type: ignore[arg-type]
            assert response.status == status, request
            assert response.content_type == "application/problem+json"
            problem = await response.json()
            assert problem["type"].endswith(kind)
            assert "Traceback" not in problem["detail"]


async def test_a_chunked_body_over_the_limit_is_refused(tmp_path: Path) -> None:
    config, key = dev_config(tmp_path, env={"BEMSMAIL_WEBHOOK__MAX_BODY_BYTES": "2048"})

    async def body():  # type: ignore[no-untyped-def]
        yield b'{"value": ['
        for _ in range(100):
            yield b'{"subscriptionId": "0123456789abcdef0123456789"},'
        yield b"{}]}"

    async with running_api(config, key) as api:
        response = await api.client.post("/notificationClient", data=body(),
                                          headers={"Content-Type": "application/json"})
        assert response.status == 413


async def test_notifications_for_unknown_subscriptions_are_accepted_and_ignored(tmp_path: Path) -> None:
    config, key = dev_config(tmp_path)
    async with running_api(config, key) as api:
        response = await api.client.post("/notificationClient", json={"value": [
            {"subscriptionId": "not-ours", "clientState": "x", "changeType": "created",
             "resourceData": {"id": "AAMk"}}, "not even an object"]})
        assert response.status == 202
        response = await api.client.post("/notificationClient/lifecycle", json={"value": [
            {"subscriptionId": "not-ours", "lifecycleEvent": "missed"}]})
        assert response.status == 202


async def test_allowlist_behind_a_trusted_proxy(tmp_path: Path) -> None:
    config, key = dev_config(tmp_path, env={"BEMSMAIL_WEBHOOK__ALLOWED_NETWORKS": '["52.96.0.0/14"]'})
    async with running_api(config, key) as api:
        body = {"value": []}
        refused = await api.client.post("/notificationClient", json=body)  # the peer itself: 127.0.0.1
        assert refused.status == 403
        assert (await refused.json())["type"].endswith("source-not-allowed")
        # the handshake is refused too: a subscription cannot be validated from elsewhere
        assert (await api.client.post(f"/notificationClient?validationToken={ENCODED}")).status == 403
        forwarded = await api.client.post("/notificationClient", json=body,
                                          headers={"X-Forwarded-For": "198.51.100.7, 52.97.1.2"})
        assert forwarded.status == 202  # the last hop before our (trusted, loopback) proxy is Microsoft's
        spoofed = await api.client.post("/notificationClient", json=body,
                                        headers={"X-Forwarded-For": "52.97.1.2, 198.51.100.7"})
        assert spoofed.status == 403  # a client cannot prepend an allowed address
        for hop in ("52.97.1.2:50123", "[2603:1063::1]:443"):  # proxies that forward the port too
            ported = await api.client.post("/notificationClient", json=body, headers={"X-Forwarded-For": hop})
            assert ported.status == (202 if hop.startswith("52.") else 403), hop


async def test_forwarded_for_is_ignored_from_untrusted_peers(tmp_path: Path) -> None:
    config, key = dev_config(tmp_path, env={"BEMSMAIL_WEBHOOK__ALLOWED_NETWORKS": '["52.96.0.0/14"]',
                                            "BEMSMAIL_WEBHOOK__TRUSTED_PROXIES": "[]"})
    async with running_api(config, key) as api:
        response = await api.client.post("/notificationClient", json={"value": []},
                                         headers={"X-Forwarded-For": "52.97.1.2"})
        assert response.status == 403
