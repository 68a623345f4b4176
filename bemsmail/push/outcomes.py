"""The error tables: what each APNs and FCM answer means for bemsmail, one explicit table per provider.

Every answer a provider documents is a row. Adapters look up the row and return the `Outcome`; the relay acts on
the outcome's kind and never sees an HTTP status. Unknown answers fall back by status class (5xx retry, other 4xx
rejected), so a new reason from Apple or Google is never mistaken for a dead token."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from bemsmail.core.model import Outcome, OutcomeKind

DELIVERED = OutcomeKind.DELIVERED
INVALID = OutcomeKind.INVALID_TOKEN
RETRY = OutcomeKind.RETRY
CONFIG = OutcomeKind.CONFIG_FAILURE
REJECTED = OutcomeKind.REJECTED


@dataclass(frozen=True, slots=True)
class Row:
    status: int
    reason: str  # APNs `reason`, or FCM `errorCode` / canonical status; "" matches a status with no reason
    kind: OutcomeKind
    quota: bool = False


# Apple: "Handling notification responses from APNs" (status codes and reason strings).
APNS_TABLE: tuple[Row, ...] = (
    Row(200, "", DELIVERED),
    Row(400, "BadDeviceToken", INVALID),
    Row(400, "DeviceTokenNotForTopic", INVALID),
    Row(400, "BadCollapseId", REJECTED),
    Row(400, "BadExpirationDate", REJECTED),
    Row(400, "BadMessageId", REJECTED),
    Row(400, "BadPriority", REJECTED),
    Row(400, "DuplicateHeaders", REJECTED),
    Row(400, "InvalidPushType", REJECTED),
    Row(400, "MissingDeviceToken", REJECTED),
    Row(400, "PayloadEmpty", REJECTED),
    Row(400, "IdleTimeout", RETRY),
    Row(400, "BadTopic", CONFIG),
    Row(400, "MissingTopic", CONFIG),
    Row(400, "TopicDisallowed", CONFIG),
    Row(403, "BadCertificate", CONFIG),
    Row(403, "BadCertificateEnvironment", CONFIG),
    Row(403, "ExpiredProviderToken", CONFIG),
    Row(403, "Forbidden", CONFIG),
    Row(403, "InvalidProviderToken", CONFIG),
    Row(403, "MissingProviderToken", CONFIG),
    Row(403, "UnrelatedKeyIdInToken", CONFIG),
    Row(403, "BadEnvironmentKeyInToken", CONFIG),
    Row(404, "BadPath", CONFIG),
    Row(405, "MethodNotAllowed", CONFIG),
    Row(410, "Unregistered", INVALID),
    Row(410, "ExpiredToken", INVALID),
    Row(413, "PayloadTooLarge", REJECTED),
    Row(429, "TooManyProviderTokenUpdates", RETRY, quota=True),
    Row(429, "TooManyRequests", RETRY, quota=True),
    Row(500, "InternalServerError", RETRY),
    Row(503, "ServiceUnavailable", RETRY),
    Row(503, "Shutdown", RETRY),
)

# Google: FCM HTTP v1 `ErrorCode` (details[@type=...FcmError].errorCode) and canonical statuses.
FCM_TABLE: tuple[Row, ...] = (
    Row(200, "", DELIVERED),
    Row(404, "UNREGISTERED", INVALID),
    Row(403, "SENDER_ID_MISMATCH", INVALID),
    Row(400, "INVALID_ARGUMENT", REJECTED),  # INVALID_ARGUMENT naming the token: see fcm_outcome
    Row(429, "QUOTA_EXCEEDED", RETRY, quota=True),
    Row(429, "RESOURCE_EXHAUSTED", RETRY, quota=True),
    Row(503, "UNAVAILABLE", RETRY),
    Row(500, "INTERNAL", RETRY),
    Row(401, "THIRD_PARTY_AUTH_ERROR", CONFIG),
    Row(401, "APNS_AUTH_ERROR", CONFIG),
    Row(401, "UNAUTHENTICATED", CONFIG),
    Row(403, "PERMISSION_DENIED", CONFIG),
    Row(404, "NOT_FOUND", CONFIG),  # no UNREGISTERED detail: a wrong project or URL, not a dead token
)

_APNS = {(r.status, r.reason): r for r in APNS_TABLE}
_FCM = {(r.status, r.reason): r for r in FCM_TABLE}


def _fallback(status: int) -> Row:
    if status >= 500 or status == 429:
        return Row(status, "", RETRY, quota=status == 429)
    if status in (401, 403):
        return Row(status, "", CONFIG)
    if 200 <= status < 300:
        return Row(status, "", DELIVERED)
    return Row(status, "", REJECTED)


def _outcome(row: Row, reason: str, retry_after: float | None, invalid_since: datetime | None = None) -> Outcome:
    return Outcome(row.kind, reason, retry_after if row.kind is RETRY else None,
                   invalid_since if row.kind is INVALID else None, row.quota)


def apns_outcome(status: int, reason: str | None = None, timestamp_ms: int | None = None,
                 retry_after: float | None = None) -> Outcome:
    """The outcome of one APNs answer: HTTP status, JSON `reason`, and the 410 `timestamp` (ms since epoch)."""
    reason = reason or ""
    row = _APNS.get((status, reason)) or _fallback(status)
    since = datetime.fromtimestamp(timestamp_ms / 1000, UTC) if timestamp_ms and status == 410 else None
    return _outcome(row, f"{status} {reason}".strip(), retry_after, since)


def fcm_outcome(status: int, code: str | None = None, message: str = "",
                retry_after: float | None = None) -> Outcome:
    """The outcome of one FCM v1 answer: HTTP status, the FcmError errorCode (or the canonical status), and
    the error message, which is the only place FCM says an INVALID_ARGUMENT is about the token."""
    code = code or ""
    row = _FCM.get((status, code)) or _FCM.get((status, "")) or _fallback(status)
    if code == "INVALID_ARGUMENT" and names_the_token(message):
        row = Row(status, code, INVALID)
    return _outcome(row, f"{status} {code}".strip(), retry_after)


def names_the_token(message: str) -> bool:
    """FCM's INVALID_ARGUMENT covers any bad field; only a message about the registration token kills it."""
    text = message.lower()
    return "registration token" in text or "not a valid fcm registration token" in text


def transport_failure(what: str) -> Outcome:
    """A timeout, a reset or a refused connection: nothing was decided about the token, try again."""
    return Outcome(RETRY, what)
