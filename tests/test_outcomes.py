"""The error tables row by row: each provider answer means exactly what its row says."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bemsmail.core.model import OutcomeKind
from bemsmail.push.outcomes import APNS_TABLE, FCM_TABLE, Row, apns_outcome, fcm_outcome, transport_failure


@pytest.mark.parametrize("row", APNS_TABLE, ids=lambda r: f"{r.status}-{r.reason or 'ok'}")
def test_every_apns_row(row: Row) -> None:
    outcome = apns_outcome(row.status, row.reason, timestamp_ms=1_780_000_000_000, retry_after=7)
    assert outcome.kind is row.kind and outcome.quota is row.quota
    assert outcome.reason.startswith(str(row.status))
    assert (outcome.retry_after_seconds == 7) is (row.kind is OutcomeKind.RETRY)
    if row.status == 410:
        assert outcome.invalid_since == datetime.fromtimestamp(1_780_000_000, UTC)
    else:
        assert outcome.invalid_since is None


@pytest.mark.parametrize("row", FCM_TABLE, ids=lambda r: f"{r.status}-{r.reason or 'ok'}")
def test_every_fcm_row(row: Row) -> None:
    outcome = fcm_outcome(row.status, row.reason, "Request contains an invalid argument.", retry_after=3)
    assert outcome.kind is row.kind and outcome.quota is row.quota
    assert (outcome.retry_after_seconds == 3) is (row.kind is OutcomeKind.RETRY)


def test_only_the_documented_reasons_kill_a_token() -> None:
    apns = {(r.status, r.reason) for r in APNS_TABLE if r.kind is OutcomeKind.INVALID_TOKEN}
    assert apns == {(400, "BadDeviceToken"), (400, "DeviceTokenNotForTopic"), (410, "Unregistered"),
                    (410, "ExpiredToken")}
    fcm = {r.reason for r in FCM_TABLE if r.kind is OutcomeKind.INVALID_TOKEN}
    assert fcm == {"UNREGISTERED", "SENDER_ID_MISMATCH"}


def test_fcm_invalid_argument_kills_the_token_only_when_it_names_the_token() -> None:
    named = fcm_outcome(400, "INVALID_ARGUMENT", "The registration token is not a valid FCM registration token")
    other = fcm_outcome(400, "INVALID_ARGUMENT", "Invalid value at 'message.android.ttl'")
    assert named.kind is OutcomeKind.INVALID_TOKEN
    assert other.kind is OutcomeKind.REJECTED


@pytest.mark.parametrize(("status", "kind"), [
    (502, OutcomeKind.RETRY), (504, OutcomeKind.RETRY), (429, OutcomeKind.RETRY),
    (401, OutcomeKind.CONFIG_FAILURE), (403, OutcomeKind.CONFIG_FAILURE), (418, OutcomeKind.REJECTED),
])
def test_unknown_answers_fall_back_by_status_and_never_kill_a_token(status: int, kind: OutcomeKind) -> None:
    assert apns_outcome(status, "SomethingNew").kind is kind
    assert fcm_outcome(status, "SOMETHING_NEW").kind is kind


def test_a_410_without_timestamp_still_kills_and_the_outcome_keeps_no_timestamp() -> None:
    outcome = apns_outcome(410, "Unregistered")
    assert outcome.kind is OutcomeKind.INVALID_TOKEN and outcome.invalid_since is None


def test_transport_failures_are_retried() -> None:
    outcome = transport_failure("timeout after 10 s")
    assert outcome.kind is OutcomeKind.RETRY and not outcome.quota
