"""FcmSender against the real mock FCM (HTTP v1 + OAuth token endpoint) on loopback: every error-table row,
token refresh, deadlines, dropped connections, the message FCM receives, and concurrency."""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from structlog.testing import capture_logs

from bemsmail.config import FcmAppConfig
from bemsmail.core.model import (
    Category,
    Environment,
    OutcomeKind,
    Platform,
    Priority,
    PushKind,
    PushMessage,
    RichContent,
)
from bemsmail.devservices import free_port
from bemsmail.mocks.fcm import FcmMock, drop, fcm_error, hang, oauth_error
from bemsmail.mocks.fcm import payload_size as mock_payload_size
from bemsmail.push.fcm import (
    MAX_PAYLOAD_BYTES,
    AccessTokens,
    FcmSender,
    TokenUnavailable,
    load_credential,
    parse_error,
    parse_retry_after,
    payload_size,
    render,
)
from bemsmail.push.outcomes import FCM_TABLE, Row

PROJECT = "bemsmail-test"
ANDROID_APP = "com.example.mail.android"
ANDROID_TOKEN = "fcm-token-" + "x" * 40 + ":APA91b" + "y" * 60  # the shape of tests.support's token
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
_KEYS: dict[str, str] = {}




def _private_key(name: str) -> str:
    if name not in _KEYS:  # RSA key generation is slow: once per test session
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _KEYS[name] = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()).decode()
    return _KEYS[name]


def service_account(name: str = "main", project: str = PROJECT) -> dict[str, str]:
    return {
        "type": "service_account", "project_id": project, "private_key_id": f"kid-{name}",
        "private_key": _private_key(name), "client_email": f"push-{name}@{project}.iam.gserviceaccount.com",
        "client_id": "1234567890", "token_uri": "https://oauth2.googleapis.com/token",
    }


@pytest.fixture
def sa_file(tmp_path: Path) -> Path:
    path = tmp_path / "fcm-service-account.json"
    path.write_text(json.dumps(service_account()), encoding="utf-8")
    return path


@pytest.fixture
async def mock() -> AsyncIterator[FcmMock]:
    # The sender refreshes tokens in a worker thread, so a mock on the test's own loop cannot deadlock.
    async with FcmMock(service_accounts=[service_account()]) as server:
        yield server


def app_config(sa_file: Path, mock: FcmMock, **overrides: Any) -> FcmAppConfig:
    values: dict[str, Any] = {
        "id": ANDROID_APP, "project_id": PROJECT, "credentials_file": sa_file, "fcm_url": mock.base_url,
        "token_uri": mock.token_uri, "concurrency": 20, "timeout_seconds": 10.0,
    }
    values.update(overrides)
    return FcmAppConfig.model_validate(values)


@pytest.fixture
async def sender(sa_file: Path, mock: FcmMock) -> AsyncIterator[FcmSender]:
    fcm = FcmSender(app_config(sa_file, mock), now=lambda: NOW, token_retry_seconds=0)
    yield fcm
    await fcm.close()


def push(**overrides: Any) -> PushMessage:
    values: dict[str, Any] = {
        "registration_id": "reg-1", "mailbox": "alice@example.com", "platform": Platform.ANDROID,
        "app_id": ANDROID_APP, "environment": Environment.PRODUCTION, "token": ANDROID_TOKEN,
        "notification_id": "n-1", "kind": PushKind.ALERT, "category": Category.NEW_MAIL,
        "collapse_id": "alice-inbox", "priority": Priority.ALERT, "expires_at": NOW + timedelta(hours=1),
        "badge": 3, "sound": "default", "data": {"account": "a1b2", "folder": "Inbox", "count": "1"},
    }
    values.update(overrides)
    return PushMessage(**values)


def received(mock: FcmMock) -> dict[str, Any]:
    """The `message` of the last send the mock received."""
    last = mock.requests(1)[-1]
    message: dict[str, Any] = last["body"]["message"]
    return message


# --- the error table --------------------------------------------------------------------------------------


def _row_id(row: Row) -> str:
    return f"{row.status}-{row.reason or 'ok'}"


@pytest.mark.parametrize("row", FCM_TABLE, ids=_row_id)
async def test_every_row_of_the_fcm_table(row: Row, sender: FcmSender, mock: FcmMock) -> None:
    if row.status != 200:
        mock.script_token(ANDROID_TOKEN, fcm_error(row.reason, row.status))
    outcome = await sender.send(push())
    assert outcome.kind is row.kind, outcome
    assert outcome.quota is row.quota
    stats = mock.stats()
    if row.status == 401 and row.reason == "UNAUTHENTICATED":
        assert stats["sends"] == 2 and stats["tokens_issued"] == 2  # one refresh, one re-send, no more
    else:
        assert stats["sends"] == 1 and stats["tokens_issued"] == 1  # THIRD_PARTY_AUTH_ERROR is not our token


async def test_invalid_argument_naming_the_token_kills_the_token(sender: FcmSender, mock: FcmMock) -> None:
    mock.script_token(ANDROID_TOKEN, fcm_error("INVALID_ARGUMENT", names_token=True))
    assert (await sender.send(push())).kind is OutcomeKind.INVALID_TOKEN


async def test_invalid_argument_naming_another_field_rejects_the_message(sender: FcmSender, mock: FcmMock) -> None:
    mock.script_token(ANDROID_TOKEN, fcm_error(
        "INVALID_ARGUMENT", message="Invalid value at 'message.android.collapse_key' (TYPE_STRING)"))
    assert (await sender.send(push())).kind is OutcomeKind.REJECTED


async def test_a_malformed_token_is_refused_by_fcm_validation(sender: FcmSender, mock: FcmMock) -> None:
    outcome = await sender.send(push(token="not a token"))
    assert outcome.kind is OutcomeKind.INVALID_TOKEN
    assert mock.stats()["by_outcome"] == {"INVALID_ARGUMENT": 1}


async def test_quota_is_retry_with_quota_flag_and_retry_after(sender: FcmSender, mock: FcmMock) -> None:
    mock.script_token(ANDROID_TOKEN, fcm_error("QUOTA_EXCEEDED", retry_after=17))
    outcome = await sender.send(push())
    assert (outcome.kind, outcome.quota, outcome.retry_after_seconds) == (OutcomeKind.RETRY, True, 17.0)


async def test_unavailable_carries_retry_after(sender: FcmSender, mock: FcmMock) -> None:
    mock.script_token(ANDROID_TOKEN, fcm_error("UNAVAILABLE", retry_after=2.5))
    outcome = await sender.send(push())
    assert (outcome.kind, outcome.quota, outcome.retry_after_seconds) == (OutcomeKind.RETRY, False, 2.5)


async def test_scripted_answers_are_used_up_in_order(sender: FcmSender, mock: FcmMock) -> None:
    mock.script_token(ANDROID_TOKEN, fcm_error("UNAVAILABLE", times=1), fcm_error("INTERNAL", times=1))
    kinds = [(await sender.send(push())).reason for _ in range(3)]
    assert kinds == ["503 UNAVAILABLE", "500 INTERNAL", ""]


# --- the access token -------------------------------------------------------------------------------------


async def test_a_revoked_token_is_refreshed_once_and_the_push_resent(sender: FcmSender, mock: FcmMock) -> None:
    assert (await sender.send(push())).kind is OutcomeKind.DELIVERED
    mock.revoke_access_tokens()
    with capture_logs() as logs:
        assert (await sender.send(push())).kind is OutcomeKind.DELIVERED
    stats = mock.stats()
    assert stats["tokens_issued"] == 2
    assert stats["by_outcome"] == {"delivered": 2, "UNAUTHENTICATED": 1}
    assert [r["auth"] for r in mock.requests()] == ["valid", "invalid", "valid"]
    assert "ya29" not in repr(logs)  # never an access token in the logs


async def test_401_after_a_fresh_token_is_a_config_failure(sender: FcmSender, mock: FcmMock) -> None:
    mock.script_global(fcm_error("UNAUTHENTICATED"))
    outcome = await sender.send(push())
    assert outcome.kind is OutcomeKind.CONFIG_FAILURE
    assert (mock.stats()["sends"], mock.stats()["tokens_issued"]) == (2, 2)


async def test_many_401s_at_once_share_one_refresh(sender: FcmSender, mock: FcmMock) -> None:
    assert (await sender.send(push())).kind is OutcomeKind.DELIVERED
    mock.revoke_access_tokens()
    outcomes = await asyncio.gather(*(sender.send(push()) for _ in range(50)))
    assert {o.kind for o in outcomes} == {OutcomeKind.DELIVERED}
    assert mock.stats()["tokens_issued"] == 2


async def test_one_token_serves_concurrent_sends(sender: FcmSender, mock: FcmMock) -> None:
    outcomes = await asyncio.gather(*(sender.send(push(token=f"tok-{i}")) for i in range(300)))
    assert {o.kind for o in outcomes} == {OutcomeKind.DELIVERED}
    stats = mock.stats()
    assert (stats["delivered"], stats["tokens_issued"], len(stats["by_token"])) == (300, 1, 300)


async def test_token_endpoint_dropping_is_retry_and_recovers(sender: FcmSender, mock: FcmMock) -> None:
    mock.script_oauth(drop(times=1))
    outcome = await sender.send(push())
    assert outcome.kind is OutcomeKind.RETRY
    assert "oauth" in outcome.reason
    assert mock.stats()["sends"] == 0
    assert (await sender.send(push())).kind is OutcomeKind.DELIVERED


async def test_token_endpoint_unreachable_is_retry(sa_file: Path, mock: FcmMock) -> None:
    config = app_config(sa_file, mock, token_uri=f"http://127.0.0.1:{free_port()}/token")
    fcm = FcmSender(config, token_retry_seconds=0)
    try:
        outcome = await fcm.send(push())
    finally:
        await fcm.close()
    assert outcome.kind is OutcomeKind.RETRY
    assert outcome.reason == "oauth token endpoint unreachable"


async def test_token_endpoint_server_error_is_retry(sender: FcmSender, mock: FcmMock) -> None:
    # google-auth retries 5xx itself (three attempts, ~3 s of sleeps in the worker thread); 501 is not retried.
    mock.script_oauth(oauth_error(501, "not_implemented", times=1))
    assert (await sender.send(push())).kind is OutcomeKind.RETRY
    assert (await sender.send(push())).kind is OutcomeKind.DELIVERED


async def test_token_endpoint_failure_cools_down_before_asking_again(sa_file: Path, mock: FcmMock) -> None:
    mock.script_oauth(drop())
    fcm = FcmSender(app_config(sa_file, mock), token_retry_seconds=60)
    try:
        first, second = await fcm.send(push()), await fcm.send(push())
    finally:
        await fcm.close()
    assert first.kind is second.kind is OutcomeKind.RETRY
    assert mock.stats()["token_requests"] == 1


async def test_a_refused_service_account_is_a_config_failure(sender: FcmSender, mock: FcmMock) -> None:
    mock.script_oauth(oauth_error(400, "invalid_grant", "Invalid JWT Signature."))
    outcome = await sender.send(push())
    assert outcome.kind is OutcomeKind.CONFIG_FAILURE
    assert outcome.reason == "oauth token refused: invalid_grant"


async def test_an_assertion_signed_by_another_key_is_refused(sa_file: Path) -> None:
    # The mock trusts a different key for the same account: the signature check fails.
    impostor = {**service_account(), "private_key": _private_key("other")}
    async with FcmMock(service_accounts=[impostor]) as other:
        fcm = FcmSender(app_config(sa_file, other), token_retry_seconds=0)
        try:
            outcome = await fcm.send(push())
        finally:
            await fcm.close()
        assert outcome.kind is OutcomeKind.CONFIG_FAILURE
        assert other.stats()["token_failures"] == {"invalid_grant": 1}


async def test_a_service_account_of_another_project_is_a_config_failure(tmp_path: Path, mock: FcmMock) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps(service_account("stranger", project="other-project")), encoding="utf-8")
    mock.add_service_account(service_account("stranger", project="other-project"))
    fcm = FcmSender(app_config(path, mock), token_retry_seconds=0)
    try:
        outcome = await fcm.send(push())
    finally:
        await fcm.close()
    assert (outcome.kind, outcome.reason) == (OutcomeKind.CONFIG_FAILURE, "403 PERMISSION_DENIED")


async def test_start_fetches_the_token_ahead_of_the_first_push(sender: FcmSender, mock: FcmMock) -> None:
    await sender.start()
    assert mock.stats()["tokens_issued"] == 1
    assert (await sender.send(push())).kind is OutcomeKind.DELIVERED
    assert mock.stats()["tokens_issued"] == 1


async def test_the_token_is_refreshed_ahead_of_expiry_in_the_background(sa_file: Path, mock: FcmMock) -> None:
    clock = [1000.0]
    config = app_config(sa_file, mock)
    tokens = AccessTokens(load_credential(config), request_timeout=5, margin_seconds=300,
                          monotonic=lambda: clock[0])
    try:
        first = await tokens.get()
        clock[0] += 3599 - 200  # inside the refresh margin, not yet expired
        assert await tokens.get() == first  # the current token is still used
        refresh = tokens._task
        assert refresh is not None
        second = await refresh
        assert second != first
        assert await tokens.get() == second
        assert mock.stats()["tokens_issued"] == 2
    finally:
        await tokens.close()


async def test_a_failed_background_refresh_keeps_the_token_and_waits_before_trying_again(
        sa_file: Path, mock: FcmMock) -> None:
    clock = [1000.0]
    tokens = AccessTokens(load_credential(app_config(sa_file, mock)), request_timeout=5, retry_seconds=10,
                          monotonic=lambda: clock[0])
    try:
        first = await tokens.get()
        mock.script_oauth(drop())
        clock[0] += 3599 - 200
        assert await tokens.get() == first
        failing = tokens._task
        assert failing is not None
        with pytest.raises(TokenUnavailable):
            await failing
        assert await tokens.get() == first  # still valid: used, and no new refresh during the cool-down
        assert tokens._task is None
        mock.script_oauth()
        clock[0] += 10
        assert await tokens.get() == first
        assert tokens._task is not None
        assert await tokens._task != first
        assert mock.stats()["token_requests"] == 3
    finally:
        await tokens.close()


# --- transport ----------------------------------------------------------------------------------------------


async def test_a_never_answering_fcm_hits_the_deadline(sa_file: Path, mock: FcmMock) -> None:
    mock.script_global(hang())
    fcm = FcmSender(app_config(sa_file, mock, timeout_seconds=0.3), token_retry_seconds=0)
    try:
        outcome = await fcm.send(push())
    finally:
        await fcm.close()
    assert outcome.kind is OutcomeKind.RETRY
    assert outcome.reason.startswith("no answer from FCM")


async def test_a_dropped_connection_is_retry_and_later_sends_succeed(sender: FcmSender, mock: FcmMock) -> None:
    mock.script_global(drop(times=1))
    outcome = await sender.send(push())
    assert (outcome.kind, outcome.reason) == (OutcomeKind.RETRY, "FCM closed the connection")
    outcomes = await asyncio.gather(*(sender.send(push()) for _ in range(5)))
    assert {o.kind for o in outcomes} == {OutcomeKind.DELIVERED}


async def test_a_refused_connection_is_retry(sa_file: Path, mock: FcmMock) -> None:
    fcm = FcmSender(app_config(sa_file, mock, fcm_url=f"http://127.0.0.1:{free_port()}"), token_retry_seconds=0)
    try:
        outcome = await fcm.send(push())
    finally:
        await fcm.close()
    assert outcome.kind is OutcomeKind.RETRY
    assert outcome.reason.startswith("FCM unreachable")


async def test_a_closed_sender_answers_retry(sender: FcmSender) -> None:
    await sender.close()
    assert (await sender.send(push())).kind is OutcomeKind.RETRY


# --- what FCM receives ---------------------------------------------------------------------------------------


async def test_an_alert_is_a_content_free_data_carrying_notification(sender: FcmSender, mock: FcmMock) -> None:
    assert (await sender.send(push())).kind is OutcomeKind.DELIVERED
    assert received(mock) == {
        "token": ANDROID_TOKEN,
        "data": {"account": "a1b2", "folder": "Inbox", "count": "1"},
        "android": {
            "collapse_key": "alice-inbox", "priority": "high", "ttl": "3600s",
            "notification": {"title_loc_key": "NEW_MAIL", "body_loc_key": "NEW_MAIL", "tag": "alice-inbox",
                             "notification_count": 3, "sound": "default", "channel_id": "NEW_MAIL"},
        },
    }
    assert mock.requests(1)[0]["auth"] == "valid"


async def test_a_meeting_request_uses_its_category(sender: FcmSender, mock: FcmMock) -> None:
    await sender.send(push(category=Category.MEETING_REQUEST, badge=None, sound=None))
    assert received(mock)["android"]["notification"] == {
        "title_loc_key": "MEETING_REQUEST", "body_loc_key": "MEETING_REQUEST", "tag": "alice-inbox",
        "channel_id": "MEETING_REQUEST"}


async def test_a_background_push_is_data_only_and_normal_priority(sender: FcmSender, mock: FcmMock) -> None:
    rich = RichContent(sender="Bob Sender", subject="Quarterly numbers")
    await sender.send(push(kind=PushKind.BACKGROUND, priority=Priority.BACKGROUND, rich=rich, badge=None))
    assert received(mock) == {"token": ANDROID_TOKEN, "data": {"account": "a1b2", "folder": "Inbox", "count": "1"},
                              "android": {"collapse_key": "alice-inbox", "priority": "normal", "ttl": "3600s"}}
    assert "Bob" not in mock.requests(1)[0]["raw"]


async def test_a_badge_push_carries_the_count_as_data(sender: FcmSender, mock: FcmMock) -> None:
    await sender.send(push(kind=PushKind.BADGE, priority=Priority.BACKGROUND, badge=7))
    message = received(mock)
    assert "notification" not in message["android"]
    assert message["data"]["badge"] == "7"
    assert message["android"]["priority"] == "normal"


async def test_rich_content_only_when_asked(sender: FcmSender, mock: FcmMock) -> None:
    await sender.send(push(rich=RichContent(sender="Bob Sender", subject="Lunch?")))
    notification = received(mock)["android"]["notification"]
    assert (notification["title"], notification["body"]) == ("Bob Sender", "Lunch?")
    assert "title_loc_key" not in notification and "body_loc_key" not in notification


async def test_long_rich_content_is_cut_on_utf8_character_boundaries(sender: FcmSender, mock: FcmMock) -> None:
    subject = "Grüße 😀 € \"quoted\"\n" * 400  # far over 4096 bytes, with 2-, 3- and 4-byte characters
    assert (await sender.send(push(rich=RichContent(sender="Zoë Ünal 😀", subject=subject)))).kind \
        is OutcomeKind.DELIVERED
    last = mock.requests(1)[0]
    assert last["utf8"] is True
    notification = last["body"]["message"]["android"]["notification"]
    assert notification["title"] == "Zoë Ünal 😀"
    assert notification["body"].endswith("…")
    assert subject.startswith(notification["body"].removesuffix("…"))
    size = mock_payload_size(last["body"]["message"])
    assert MAX_PAYLOAD_BYTES - 6 <= size <= MAX_PAYLOAD_BYTES  # cut as late as a 4-byte character allows


def test_render_agrees_with_the_mock_on_size_for_any_cut() -> None:
    for length in range(0, 5000, 97):
        message = push(rich=RichContent(sender="S" * (length // 3), subject="ß😀x" * length))
        encoded = render(message, NOW)
        assert payload_size(encoded) == mock_payload_size(encoded) <= MAX_PAYLOAD_BYTES


async def test_an_oversized_data_map_is_rejected_without_sending(sender: FcmSender, mock: FcmMock) -> None:
    outcome = await sender.send(push(data={"blob": "x" * 5000}))
    assert outcome.kind is OutcomeKind.REJECTED
    assert mock.stats()["sends"] == 0


async def test_the_mock_refuses_an_oversized_payload(sender: FcmSender, mock: FcmMock,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Even if the sender's own size check were wrong, FCM (the mock) would refuse: REJECTED, not a dead token.
    monkeypatch.setattr("bemsmail.push.fcm.MAX_PAYLOAD_BYTES", 10**6)
    outcome = await sender.send(push(data={"blob": "x" * 5000}))
    assert (outcome.kind, mock.stats()["by_outcome"]) == (OutcomeKind.REJECTED, {"INVALID_ARGUMENT": 1})


def test_ttl_follows_expiry_and_is_never_negative() -> None:
    assert render(push(expires_at=NOW - timedelta(minutes=5)), NOW)["android"]["ttl"] == "0s"
    assert render(push(expires_at=NOW + timedelta(days=90)), NOW)["android"]["ttl"] == f"{28 * 24 * 3600}s"


def test_lone_surrogates_in_mail_headers_do_not_break_the_body() -> None:
    encoded = render(push(rich=RichContent(sender="Bad \udc80 name", subject="ok")), NOW)
    assert encoded["android"]["notification"]["title"] == "Bad ? name"


# --- parsing --------------------------------------------------------------------------------------------------


def test_parse_error_prefers_the_fcm_error_code_over_the_status() -> None:
    body = {"error": {"code": 404, "status": "NOT_FOUND", "message": "gone", "details": [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "X"},
        {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}]}}
    assert parse_error(json.dumps(body).encode()) == ("UNREGISTERED", "gone")
    assert parse_error(b'{"error": {"status": "NOT_FOUND", "message": "m"}}') == ("NOT_FOUND", "m")
    assert parse_error(b"<html>bad gateway</html>") == (None, "")


def test_parse_retry_after() -> None:
    assert parse_retry_after("30") == 30.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = (datetime.now(UTC) + timedelta(seconds=120)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    value = parse_retry_after(later)
    assert value is not None and 0 < value <= 120


def test_the_firebase_admin_encoder_we_reuse_is_still_there() -> None:
    # A private API (firebase_admin.messaging._MessagingService.encode_message): fail loudly if an upgrade moves it.
    from firebase_admin import messaging

    assert callable(messaging._MessagingService.encode_message)
    assert render(push(), NOW)["token"] == ANDROID_TOKEN


async def test_the_allowed_locations_lookup_is_never_started(sender: FcmSender, mock: FcmMock) -> None:
    assert (await sender.send(push())).kind is OutcomeKind.DELIVERED
    credential = sender._tokens._credential
    # google-auth starts it from before_request(), which the sender never calls (see the quirks file).
    assert credential._rab_manager.refresh_manager._worker is None


def test_rendering_warns_nothing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. firebase-admin's "Message.token is deprecated"
        render(push(rich=RichContent(sender="a", subject="b")), NOW)


def test_credential_expiry_is_unknown_for_a_service_account(sa_file: Path) -> None:
    config = FcmAppConfig.model_validate({"id": ANDROID_APP, "project_id": PROJECT, "credentials_file": sa_file})
    assert FcmSender(config).credential_expiry() is None


def test_messages_differ_only_where_the_push_differs() -> None:
    a, b = render(push(), NOW), render(replace(push(), token="other-token"), NOW)
    assert {k: v for k, v in a.items() if k != "token"} == {k: v for k, v in b.items() if k != "token"}
