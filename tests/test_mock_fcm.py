"""The mock FCM itself: FCM-like validation, the OAuth JWT-bearer grant, the control API, compatibility with
firebase-admin's own client and error classes, and running as its own process."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import jwt
import pytest

from bemsmail.mocks.fcm import (
    FCM_ERROR_TYPE,
    GOOGLE_TOKEN_AUDIENCE,
    JWT_BEARER,
    FcmMock,
    Rule,
    fcm_error,
    hang,
    serve_in_thread,
)
from tests.test_push_fcm import ANDROID_TOKEN, PROJECT, service_account

SEND = f"/v1/projects/{PROJECT}/messages:send"


@pytest.fixture
async def open_mock() -> AsyncIterator[FcmMock]:
    async with FcmMock(require_auth=False) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http: aiohttp.ClientSession, mock: FcmMock, body: Any, path: str = SEND,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(mock.base_url + path, data=data, headers=headers) as response:
        return response.status, await response.json(content_type=None)


def message(**fields: Any) -> dict[str, Any]:
    return {"message": {"token": ANDROID_TOKEN, **fields}}


# --- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "fragment"), [
    (message(data={"count": 1}), "Invalid value at 'message.data[0].value' (TYPE_STRING), 1"),
    (message(data={"from": "x"}), "reserved"),
    (message(android={"ttl": "an hour"}), "message.android.ttl"),
    (message(android={"priority": "urgent"}), "message.android.priority"),
    (message(android={"notification": {"notification_count": "many"}}), "notification_count"),
    (message(android={"notification": {"colour": "#ffffff"}}), 'Unknown name "colour"'),
    (message(frobnicate=True), 'Unknown name "frobnicate" at \'message\''),
    (message(topic="news"), "oneof field 'target' is already set"),
    ({"message": {"data": {"a": "b"}}}, "Recipient of the message is not set."),
    ({"msg": {}}, 'Unknown name "msg"'),
    (message(token="has spaces in it"), "The registration token is not a valid FCM registration token"),
    (message(data={"blob": "x" * 5000}), "Message is too big"),
    (b"{not json", "Invalid JSON payload"),
])
async def test_invalid_bodies_are_refused_like_fcm(body: Any, fragment: str, open_mock: FcmMock,
                                                   http: aiohttp.ClientSession) -> None:
    status, answer = await post(http, open_mock, body)
    assert status == 400
    assert answer["error"]["status"] == "INVALID_ARGUMENT"
    assert fragment in answer["error"]["message"]
    assert answer["error"]["details"] == [{"@type": FCM_ERROR_TYPE, "errorCode": "INVALID_ARGUMENT"}]


async def test_valid_shapes_are_accepted(open_mock: FcmMock, http: aiohttp.ClientSession) -> None:
    body = message(
        data={"a": "b"}, notification={"title": "t", "body": "b"},
        android={"collapseKey": "c", "priority": "HIGH", "ttl": "3.5s", "directBootOk": True,
                 "notification": {"titleLocKey": "K", "vibrate_timings": ["0.1s"], "visibility": "PRIVATE"}},
        apns={"headers": {"apns-priority": "10"}, "payload": {"aps": {"badge": 1}}},
        webpush={"data": {"x": "y"}, "notification": {"title": "w"}},
    )
    status, answer = await post(http, open_mock, body)
    assert status == 200
    assert answer["name"].startswith(f"projects/{PROJECT}/messages/")
    status, answer = await post(http, open_mock, {**message(), "validate_only": True})
    assert (status, answer["name"]) == (200, f"projects/{PROJECT}/messages/fake_message_id")
    stats = open_mock.stats()
    assert (stats["delivered"], stats["validated"]) == (1, 1)


# --- auth ---------------------------------------------------------------------------------------------------


def assertion(account: dict[str, str], **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": account["client_email"], "aud": GOOGLE_TOKEN_AUDIENCE, "iat": now, "exp": now + 3600,
               "scope": "https://www.googleapis.com/auth/firebase.messaging"}
    payload.update(claims)
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, account["private_key"], algorithm="RS256",
                      headers={"kid": account["private_key_id"]})


async def grant(http: aiohttp.ClientSession, mock: FcmMock, jwt_assertion: str,
                grant_type: str = JWT_BEARER) -> tuple[int, dict[str, Any]]:
    async with http.post(mock.token_uri, data={"grant_type": grant_type, "assertion": jwt_assertion}) as response:
        return response.status, await response.json()


@pytest.fixture
async def auth_mock() -> AsyncIterator[FcmMock]:
    async with FcmMock(service_accounts=[service_account()], token_lifetime=600) as server:
        yield server


async def test_the_jwt_bearer_grant_issues_a_token_that_sends(auth_mock: FcmMock,
                                                              http: aiohttp.ClientSession) -> None:
    status, token = await grant(http, auth_mock, assertion(service_account()))
    assert status == 200
    assert (token["token_type"], token["expires_in"]) == ("Bearer", 600)
    status, _ = await post(http, auth_mock, message(), headers={"Authorization": f"Bearer {token['access_token']}"})
    assert status == 200
    assert auth_mock.stats()["tokens_issued"] == 1


@pytest.mark.parametrize(("claims", "error", "fragment"), [
    ({"aud": "http://127.0.0.1/token"}, "invalid_grant", "Failed audience check"),
    ({"exp": int(time.time()) + 7200}, "invalid_grant", "short-lived"),
    ({"iat": int(time.time()) - 7200, "exp": int(time.time()) - 3600}, "invalid_grant", "short-lived"),
    ({"scope": None}, "invalid_scope", "Invalid OAuth scope"),
    ({"iss": "nobody@elsewhere.iam.gserviceaccount.com"}, "invalid_grant", "account not found"),
])
async def test_bad_assertions_are_refused(claims: dict[str, Any], error: str, fragment: str, auth_mock: FcmMock,
                                          http: aiohttp.ClientSession) -> None:
    status, answer = await grant(http, auth_mock, assertion(service_account(), **claims))
    assert (status, answer["error"]) == (400, error)
    assert fragment in answer["error_description"]


async def test_a_forged_signature_and_a_wrong_grant_type_are_refused(auth_mock: FcmMock,
                                                                     http: aiohttp.ClientSession) -> None:
    forged = assertion({**service_account(), "private_key": service_account("other")["private_key"]})
    assert await grant(http, auth_mock, forged) == (400, {"error": "invalid_grant",
                                                          "error_description": "Invalid JWT Signature."})
    status, answer = await grant(http, auth_mock, assertion(service_account()), grant_type="client_credentials")
    assert (status, answer["error"]) == (400, "unsupported_grant_type")


async def test_sends_without_a_valid_token_are_unauthenticated(auth_mock: FcmMock,
                                                               http: aiohttp.ClientSession) -> None:
    status, answer = await post(http, auth_mock, message())
    assert (status, answer["error"]["status"]) == (401, "UNAUTHENTICATED")
    assert answer["error"]["details"][0]["reason"] == "CREDENTIALS_MISSING"  # an ErrorInfo, not an FcmError
    status, answer = await post(http, auth_mock, message(), headers={"Authorization": "Bearer ya29.forged"})
    assert status == 401
    _, token = await grant(http, auth_mock, assertion(service_account()))
    headers = {"Authorization": f"Bearer {token['access_token']}"}
    status, answer = await post(http, auth_mock, message(), path="/v1/projects/someone-else/messages:send",
                                headers=headers)
    assert (status, answer["error"]["status"]) == (403, "PERMISSION_DENIED")
    auth_mock.revoke_access_tokens()
    assert (await post(http, auth_mock, message(), headers=headers))[0] == 401
    assert [r["auth"] for r in auth_mock.requests()] == ["missing", "invalid", "project", "invalid"]
    assert all("ya29" not in json.dumps(r) for r in auth_mock.requests())  # access tokens are never recorded


async def test_the_allowed_locations_lookup_is_answered(auth_mock: FcmMock, http: aiohttp.ClientSession) -> None:
    url = f"{auth_mock.base_url}/v1/projects/-/serviceAccounts/a@b.iam.gserviceaccount.com/allowedLocations"
    async with http.get(url) as response:
        assert await response.json() == {"locations": [], "encodedLocations": "0x0"}


# --- scripting and the control API ---------------------------------------------------------------------------


async def test_the_control_api_scripts_counts_and_resets(open_mock: FcmMock, http: aiohttp.ClientSession) -> None:
    script = {"tokens": {"tok-a": [{"preset": "UNREGISTERED", "times": 1}]},
              "global": [{"preset": "QUOTA_EXCEEDED", "retry_after": 9, "times": 1}], "latency_ms": 1}
    async with http.post(f"{open_mock.base_url}/mock/script", json=script) as response:
        assert response.status == 200
    status, answer = await post(http, open_mock, message(token="tok-a"))
    assert (status, answer["error"]["details"][0]["errorCode"]) == (404, "UNREGISTERED")
    async with http.post(open_mock.base_url + SEND, json=message(token="tok-b")) as response:
        assert (response.status, response.headers["Retry-After"]) == (429, "9")
    assert (await post(http, open_mock, message(token="tok-a")))[0] == 200
    async with http.get(f"{open_mock.base_url}/mock/stats") as response:
        stats = await response.json()
    assert stats["by_outcome"] == {"UNREGISTERED": 1, "QUOTA_EXCEEDED": 1, "delivered": 1}
    assert stats["by_token"] == {"tok-a": 2, "tok-b": 1}
    async with http.get(f"{open_mock.base_url}/mock/requests?limit=1") as response:
        [last] = await response.json()
    assert (last["token"], last["outcome"], last["body"]["message"]["token"]) == ("tok-a", "delivered", "tok-a")
    async with http.post(f"{open_mock.base_url}/mock/reset") as response:
        assert response.status == 200
    assert open_mock.stats()["sends"] == 0 and open_mock.requests() == []


async def test_a_bad_script_is_refused(open_mock: FcmMock, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{open_mock.base_url}/mock/script", json={"global": [{"stauts": 500}]}) as response:
        assert response.status == 400
        assert "stauts" in (await response.json())["error"]


def test_rules_round_trip_through_json() -> None:
    rule = fcm_error("SENDER_ID_MISMATCH", retry_after=3, times=2)
    assert Rule.from_json(rule.to_json()) == rule
    assert Rule.from_json({"preset": "INVALID_ARGUMENT", "names_token": True}).message == \
        "The registration token is not a valid FCM registration token"


async def test_a_hung_request_ends_when_the_mock_stops(http: aiohttp.ClientSession) -> None:
    mock = FcmMock(require_auth=False)
    await mock.start()
    mock.script_global(hang())
    request = asyncio.ensure_future(post(http, mock, message()))
    while mock.stats()["by_outcome"].get("hung") != 1:  # noqa: ASYNC110 - no event to wait on; bounded by pytest-timeout
        await asyncio.sleep(0.01)
    await mock.stop()
    with pytest.raises(aiohttp.ClientError):
        await request


# --- compatibility with firebase-admin --------------------------------------------------------------------


def _library_error(status: int, body: bytes) -> Exception:
    from firebase_admin import _utils, messaging

    request = httpx.Request("POST", "http://fcm.test" + SEND)
    response = httpx.Response(status, content=body, request=request)
    error = httpx.HTTPStatusError("error", request=request, response=response)
    return _utils.handle_platform_error_from_httpx(error, messaging._MessagingService._build_fcm_error_httpx)


@pytest.mark.parametrize(("reason", "expected"), [
    ("UNREGISTERED", "UnregisteredError"), ("SENDER_ID_MISMATCH", "SenderIdMismatchError"),
    ("QUOTA_EXCEEDED", "QuotaExceededError"), ("THIRD_PARTY_AUTH_ERROR", "ThirdPartyAuthError"),
    ("APNS_AUTH_ERROR", "ThirdPartyAuthError"), ("INVALID_ARGUMENT", "InvalidArgumentError"),
    ("UNAVAILABLE", "UnavailableError"), ("INTERNAL", "InternalError"),
    ("RESOURCE_EXHAUSTED", "ResourceExhaustedError"), ("UNAUTHENTICATED", "UnauthenticatedError"),
    ("PERMISSION_DENIED", "PermissionDeniedError"), ("NOT_FOUND", "NotFoundError"),
])
async def test_firebase_admin_reads_the_mocks_errors_as_fcm_errors(reason: str, expected: str,
                                                                   open_mock: FcmMock,
                                                                   http: aiohttp.ClientSession) -> None:
    open_mock.script_global(fcm_error(reason))
    async with http.post(open_mock.base_url + SEND, json=message()) as response:
        error = _library_error(response.status, await response.read())
    assert type(error).__name__ == expected


async def test_firebase_admin_send_each_async_works_against_the_mock(monkeypatch: pytest.MonkeyPatch) -> None:
    import firebase_admin
    from firebase_admin import credentials, messaging

    # google-auth refreshes with a blocking `requests` call on this loop: the mock runs on a loop of its own.
    with serve_in_thread(FcmMock(service_accounts=[service_account()])) as mock:
        info = {**service_account(), "token_uri": mock.token_uri}
        app = firebase_admin.initialize_app(credentials.Certificate(info), {"projectId": PROJECT, "httpTimeout": 5},
                                            name=f"test-{uuid.uuid4().hex}")
        google_credential = app.credential.get_credential()
        # Its Regional Access Boundary lookup goes to iamcredentials.googleapis.com, which cannot be pointed here.
        monkeypatch.setattr(google_credential, "_maybe_start_regional_access_boundary_refresh",
                            lambda *args: None)
        service = messaging._get_messaging_service(app)
        service._fcm_url = mock.send_url(PROJECT)
        try:
            mock.script_token("gone-token", fcm_error("UNREGISTERED"))
            batch = await messaging.send_each_async(
                [messaging.Message(data={"a": "b"}, fid=ANDROID_TOKEN), messaging.Message(fid="gone-token")],
                app=app)
            assert batch.responses[0].success
            assert isinstance(batch.responses[1].exception, messaging.UnregisteredError)
            assert mock.stats()["tokens_issued"] >= 1  # concurrent sends may each refresh the first token
            # the two sends run concurrently: the mock may have seen them in either order
            assert {r["body"]["message"]["fid"] for r in mock.requests(2)} == {ANDROID_TOKEN, "gone-token"}
        finally:
            await service._async_client.aclose()
            await asyncio.to_thread(firebase_admin.delete_app, app)  # delete_app on the loop would raise


# --- as its own process -------------------------------------------------------------------------------------


def test_main_serves_until_sigterm() -> None:
    command = [sys.executable, "-m", "bemsmail.mocks.fcm", "--port", "0", "--latency-ms", "1"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("fcm mock ready port=")
            base = line.split("url=")[1].split()[0]
            with httpx.Client() as client:
                assert client.get(f"{base}/mock/health").json() == {"ok": True}
                assert client.post(f"{base}/token", data={"grant_type": "x"}).status_code == 400
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
