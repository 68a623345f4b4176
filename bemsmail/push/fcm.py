"""Deliver pushes to one FCM app (HTTP v1): firebase-admin's credentials and message encoder, our own HTTP client.

What comes from firebase-admin / google-auth:
- the service-account credentials (``credentials.Certificate``, with the configured ``token_uri`` override) and
  their OAuth JWT-bearer token grant, which is a blocking ``requests`` call — so it runs here in a worker thread,
  ahead of expiry and one refresh at a time, never on the event loop;
- the ``Message`` model and its JSON encoder (``messaging._MessagingService.encode_message``: private, so pinned
  by a test and by the exact firebase-admin version), so the body is exactly what the SDK would send;
- its error rule: the ``FcmError`` detail's ``errorCode`` decides, else the canonical ``status`` — translated by our
  own table (`bemsmail.push.outcomes.fcm_outcome`).

What does not: the SDK's ``send_each_async`` (an httpx client that refreshes tokens on the loop, retries only
500/503 with sleeps of its own, re-sends every 401 twice, and fails a whole batch on one token failure) manages
about 200-300 pushes/s here; one keep-alive aiohttp session does several thousand (``scripts/bench_push.py``).
google-auth's Regional Access Boundary ("allowedLocations") lookup never runs: it is started only by
``Credentials.before_request``, and this sender calls ``refresh`` alone and writes the header itself.

Outcomes beyond the error table: a token endpoint that is unreachable, times out or answers 5xx makes the waiting
sends RETRY (never a configuration failure: Google's token endpoint has outages too); an OAuth refusal of the
service account (``invalid_grant``, ``invalid_client``, ...) is a CONFIG_FAILURE at once. A 401 from FCM gets one
new token and one re-send, then its table row (CONFIG_FAILURE). A push that cannot be encoded within FCM's limits
is REJECTED without being sent.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog
from aiohttp.helpers import get_env_proxy_for_url
from firebase_admin import credentials as fb_credentials
from firebase_admin import messaging
from google.auth import exceptions as auth_exceptions
from google.auth.transport import requests as auth_requests
from yarl import URL

from bemsmail import __version__
from bemsmail.config import FcmAppConfig
from bemsmail.core.model import Outcome, OutcomeKind, Priority, PushKind, PushMessage
from bemsmail.core.ports import PushSender
from bemsmail.push.outcomes import fcm_outcome, transport_failure
from bemsmail.push.text import fit, json_cost

log = structlog.get_logger(__name__)

FCM_BASE_URL = "https://fcm.googleapis.com"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
#: FCM's limit, measured (as the mock does) on the compact UTF-8 JSON of the message without its target
MAX_PAYLOAD_BYTES = 4096
#: FCM keeps a message at most four weeks
MAX_TTL_SECONDS = 28 * 24 * 3600
#: a sender name keeps at least this many bytes when a long subject has to be cut
SENDER_SHARE_BYTES = 256
# errorCodes of a 401 that are about Apple's or a web-push service's credentials, not our access token:
# a fresh token cannot fix them (firebase-admin refreshes and re-sends anyway, twice).
_THIRD_PARTY = frozenset({"THIRD_PARTY_AUTH_ERROR", "APNS_AUTH_ERROR"})
# OAuth errors by which the token endpoint refuses the service account itself: a retry will not change them.
_OAUTH_REFUSALS = frozenset({"invalid_grant", "invalid_client", "unauthorized_client", "invalid_scope",
                             "unsupported_grant_type", "access_denied"})
_TARGETS = ("token", "topic", "condition", "fid")
_encode_message: Callable[[Any], dict[str, Any]] = messaging._MessagingService.encode_message


def _utcnow() -> datetime:
    return datetime.now(UTC)


class PayloadRejected(Exception):
    """The push cannot be sent as FCM requires (too big, values it refuses); sending it would not help."""


# --- rendering ----------------------------------------------------------------------------------------------


def payload_size(encoded: dict[str, Any]) -> int:
    """Bytes counted against FCM's 4096: the compact UTF-8 JSON of the message without its target."""
    rest = {k: v for k, v in encoded.items() if k not in _TARGETS}
    return len(json.dumps(rest, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _fit(text: str | None, budget: int) -> str | None:
    return None if text is None else fit(text, budget)


def _clean(text: str | None) -> str | None:
    """Mail headers can decode to lone surrogates, which are not UTF-8: replace them rather than fail."""
    if not text:
        return None
    return text.encode("utf-8", "replace").decode("utf-8")


def _build(message: PushMessage, now: datetime, title: str | None, body: str | None) -> messaging.Message:
    alert = message.kind is PushKind.ALERT
    ttl = int((message.expires_at - now).total_seconds())
    data = dict(message.data)
    notification = None
    if alert:
        category = message.category.value
        # Content-free by default: the app shows its own localized strings for the category.
        notification = messaging.AndroidNotification(
            title=title, body=body,
            title_loc_key=category if title is None else None,
            body_loc_key=category if body is None else None,
            tag=message.collapse_id, notification_count=message.badge, sound=message.sound, channel_id=category,
        )
    elif message.badge is not None:
        # No notification to carry the count: the app sets its launcher badge from the data.
        data.setdefault("badge", str(message.badge))
    android = messaging.AndroidConfig(
        collapse_key=message.collapse_id,
        # FCM demotes high-priority messages that show nothing; only a visible alert asks for high.
        priority="high" if alert and message.priority is Priority.ALERT else "normal",
        ttl=max(0, min(MAX_TTL_SECONDS, ttl)),
        notification=notification,
    )
    fcm_message = messaging.Message(data=data or None, android=android)
    # Set after construction: the constructor warns that `token` is deprecated in favour of `fid` (Firebase
    # installation ids), but devices register FCM registration tokens, which FCM v1 takes as `token`.
    fcm_message.token = message.token
    return fcm_message


def _encode(message: PushMessage, now: datetime, title: str | None, body: str | None) -> dict[str, Any]:
    try:
        return _encode_message(_build(message, now, title, body))
    except ValueError as exc:  # the encoder's validation: values FCM would refuse
        raise PayloadRejected(f"FCM message invalid: {exc}") from None


def render(message: PushMessage, now: datetime) -> dict[str, Any]:
    """The FCM v1 ``message`` object for one push. Rich content (sender as title, subject as body) only for an
    alert whose `rich` is set, cut to fit 4096 bytes; raises PayloadRejected when even that cannot fit."""
    rich = message.rich if message.kind is PushKind.ALERT else None
    title = _clean(rich.sender) if rich else None
    body = _clean(rich.subject) if rich else None
    encoded = _encode(message, now, title, body)
    if payload_size(encoded) <= MAX_PAYLOAD_BYTES:
        return encoded
    if title is None and body is None:
        raise PayloadRejected(f"FCM payload over {MAX_PAYLOAD_BYTES} bytes")
    base = _encode(message, now, None if title is None else "", None if body is None else "")
    budget = MAX_PAYLOAD_BYTES - payload_size(base)
    if budget < 0:
        raise PayloadRejected(f"FCM payload over {MAX_PAYLOAD_BYTES} bytes without the mail details")
    # The subject is cut first; the sender keeps what it needs, or at least SENDER_SHARE_BYTES of it.
    title = _fit(title, min(json_cost(title), max(budget - json_cost(body), min(budget, SENDER_SHARE_BYTES))))
    body = _fit(body, budget - json_cost(title))
    encoded = _encode(message, now, title, body)
    if payload_size(encoded) > MAX_PAYLOAD_BYTES:  # not expected: the costs above are exact
        raise PayloadRejected(f"FCM payload over {MAX_PAYLOAD_BYTES} bytes")
    return encoded


def encode_body(message: PushMessage, now: datetime) -> bytes:
    """The request body of messages:send for one push."""
    try:
        return json.dumps({"message": render(message, now)}, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in the app's data map
        raise PayloadRejected("FCM data values must be valid Unicode") from None


# --- answers ------------------------------------------------------------------------------------------------


def parse_error(raw: bytes) -> tuple[str | None, str]:
    """(code, message) of Google's error body: the FcmError detail's errorCode if there is one, else the
    canonical status — the rule firebase-admin's `_MessagingService._build_fcm_error` applies."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None, ""
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None, ""
    message = error.get("message")
    message = message if isinstance(message, str) else ""
    details = error.get("details")
    if isinstance(details, list):
        for detail in details:
            if isinstance(detail, dict) and detail.get("@type") == FCM_ERROR_TYPE:
                code = detail.get("errorCode")
                if isinstance(code, str) and code:
                    return code, message
    status = error.get("status")
    return (status if isinstance(status, str) and status else None), message


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds, from delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - _utcnow()).total_seconds())


# --- the access token -----------------------------------------------------------------------------------------


class TokenUnavailable(Exception):
    """No access token: `outcome` says whether that is worth retrying."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


class _BoundedRequest(auth_requests.Request):
    """google-auth's requests transport with our timeout: its default is 120 s per token request."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self._timeout = timeout

    def __call__(self, url: str, method: str = "GET", body: Any = None, headers: Any = None,
                 timeout: float | None = None, **kwargs: Any) -> Any:
        limit = self._timeout if timeout is None else min(timeout, self._timeout)
        return super().__call__(url, method=method, body=body, headers=headers, timeout=limit,  # type: ignore[no-untyped-call]
                                **kwargs)


def _refresh_failure(exc: Exception) -> Outcome:
    """What a failed token refresh means for the sends waiting on it."""
    if isinstance(exc, auth_exceptions.RefreshError):
        data = exc.args[1] if len(exc.args) > 1 else None
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, str) and error in _OAUTH_REFUSALS:
            # The token endpoint refused this service account (deleted or disabled key, wrong token_uri account):
            # only a configuration change helps.
            return Outcome(OutcomeKind.CONFIG_FAILURE, f"oauth token refused: {error}")
        return transport_failure("oauth token endpoint error")
    if isinstance(exc, auth_exceptions.TransportError):
        return transport_failure("oauth token endpoint unreachable")
    return transport_failure(f"oauth token refresh failed: {type(exc).__name__}")


class AccessTokens:
    """The OAuth access token of one service account, shared by all its sends.

    google-auth's refresh blocks (``requests``), so it runs in a worker thread of its own; one refresh at a time
    (concurrent callers await the same one); ahead of expiry in the background while the current token is still
    used. After a failure, sends fail fast with the same outcome for `retry_seconds` (doubling per failure, up to
    `max_retry_seconds`) instead of each hitting a token endpoint that is down."""

    def __init__(self, credential: Any, *, request_timeout: float, margin_seconds: float = 300.0,
                 retry_seconds: float = 1.0, max_retry_seconds: float = 30.0, name: str = "",
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._credential = credential
        self._monotonic = monotonic
        self._request = _BoundedRequest(request_timeout)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fcm-oauth")
        self._margin = margin_seconds
        self._retry = retry_seconds
        self._max_retry = max_retry_seconds
        self._name = name
        self._token: str | None = None
        self._refresh_at = 0.0  # monotonic: refresh in the background from here
        self._expires_at = 0.0  # monotonic: unusable from here
        self._task: asyncio.Task[str] | None = None
        self._failure: Outcome | None = None
        self._failed_until = 0.0
        self._failures = 0
        self.refreshes = 0

    async def get(self) -> str:
        """A valid access token, fetching one if there is none."""
        token = self._token
        now = self._monotonic()
        if token is not None and now < self._expires_at:
            if now >= self._refresh_at and now >= self._failed_until:
                self._start_refresh()
            return token
        return await self._wait()

    async def replace(self, rejected: str) -> str:
        """FCM refused `rejected` (401): a new token, unless another send has got one meanwhile."""
        if self._token is not None and self._token != rejected and self._monotonic() < self._expires_at:
            return self._token
        if self._token == rejected:
            log.info("fcm_token_refused", app=self._name)  # once per refused token, not once per send
            self._token = None
        return await self._wait()

    async def _wait(self) -> str:
        if self._task is None and self._failure is not None and self._monotonic() < self._failed_until:
            raise TokenUnavailable(self._failure)
        # Shielded: a send reaching its deadline must not cancel the refresh the other sends are waiting for.
        return await asyncio.shield(self._start_refresh())

    def _start_refresh(self) -> asyncio.Task[str]:
        if self._task is None:
            task = asyncio.get_running_loop().create_task(self._refresh())
            # A background refresh may fail with nobody awaiting it; its outcome is kept in _failure.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._task = task
        return self._task

    async def _refresh(self) -> str:
        loop = asyncio.get_running_loop()
        try:
            token, lifetime = await loop.run_in_executor(self._executor, self._fetch)
        except Exception as exc:
            self._failures += 1
            self._failure = _refresh_failure(exc)
            delay = min(self._retry * 2 ** (self._failures - 1), self._max_retry)
            self._failed_until = self._monotonic() + delay
            log.warning("fcm_token_refresh_failed", app=self._name, reason=self._failure.reason,
                        outcome=self._failure.kind.value, error=type(exc).__name__, retry_in_seconds=delay)
            raise TokenUnavailable(self._failure) from None
        else:
            now = self._monotonic()
            self._token = token
            self._expires_at = now + max(0.0, lifetime - 10)  # 10 s for clock skew and requests in flight
            self._refresh_at = now + max(0.0, lifetime - min(self._margin, lifetime / 2))
            self._failure = None
            self._failures = 0
            self.refreshes += 1
            log.debug("fcm_token_refreshed", app=self._name, expires_in_seconds=round(lifetime))
            return token
        finally:
            self._task = None

    def _fetch(self) -> tuple[str, float]:
        """In the worker thread: only the token grant (``refresh``); never ``before_request``, which would also
        start google-auth's background allowedLocations lookup."""
        credential = self._credential
        credential.refresh(self._request)
        expiry = credential.expiry  # naive UTC, as google-auth keeps it
        lifetime = 3600.0
        if isinstance(expiry, datetime):
            lifetime = (expiry - datetime.now(UTC).replace(tzinfo=None)).total_seconds()
        return str(credential.token), lifetime

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        # A refresh in the thread cannot be interrupted; it ends within its request timeout.
        self._executor.shutdown(wait=False, cancel_futures=True)


def load_credential(config: FcmAppConfig) -> Any:
    """The google-auth service-account credential of `config`, its token URI overridden if configured."""
    info = json.loads(config.credentials_file.read_text(encoding="utf-8"))
    if config.token_uri is not None:
        info["token_uri"] = str(config.token_uri)
    return fb_credentials.Certificate(info).get_credential()


def _env_proxy(url: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    """HTTPS_PROXY / NO_PROXY for `url`, as google-auth's `requests` honours them for the token endpoint."""
    try:
        return get_env_proxy_for_url(URL(url))
    except LookupError:
        return None, None


# --- the sender -------------------------------------------------------------------------------------------------


class FcmSender:
    """The PushSender for one FCM app (one Firebase project and its service account)."""

    def __init__(self, config: FcmAppConfig, *, now: Callable[[], datetime] = _utcnow,
                 token_retry_seconds: float = 1.0, token_refresh_margin_seconds: float = 300.0) -> None:
        self.app_id = config.id
        self._config = config
        base = str(config.fcm_url or FCM_BASE_URL).rstrip("/")
        self.url = f"{base}/v1/projects/{config.project_id}/messages:send"
        self._timeout = config.timeout_seconds
        self._now = now
        self._tokens = AccessTokens(load_credential(config), request_timeout=config.timeout_seconds,
                                    margin_seconds=token_refresh_margin_seconds, retry_seconds=token_retry_seconds,
                                    name=config.id)
        self._proxy, self._proxy_auth = _env_proxy(self.url)
        self._session: aiohttp.ClientSession | None = None
        self._headers: tuple[str, dict[str, str]] = ("", {})
        self._closed = False

    @property
    def token_refreshes(self) -> int:
        return self._tokens.refreshes

    def credential_expiry(self) -> datetime | None:
        """A service-account key carries no expiry in its JSON (only Google's console knows): None."""
        return None

    async def start(self) -> None:
        """Open the connection pool and fetch the first access token; a failure is logged, not raised (the first
        sends will retry it), so an FCM outage does not stop the daemon from starting."""
        self._open()
        try:
            await asyncio.wait_for(self._tokens.get(), self._timeout)
        except (TokenUnavailable, TimeoutError):
            log.warning("fcm_start_without_token", app=self.app_id)

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            # HTTP/1.1 keep-alive, one request per connection: `concurrency` connections carry the pushes in flight.
            connector = aiohttp.TCPConnector(limit=self._config.concurrency, limit_per_host=self._config.concurrency,
                                             keepalive_timeout=30)
            # trust_env stays off: aiohttp would then look up netrc and the proxy in a thread on every request
            # (two thread hops per push); the proxy from the environment is resolved once, in __init__.
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers={"User-Agent": f"bemsmail/{__version__}"})
        return self._session

    async def send(self, message: PushMessage) -> Outcome:
        if self._closed:
            return transport_failure("FCM sender closed")
        try:
            body = encode_body(message, self._now())
        except PayloadRejected as exc:
            return Outcome(OutcomeKind.REJECTED, str(exc))
        try:
            async with asyncio.timeout(self._timeout):
                return await self._deliver(body)
        except TokenUnavailable as exc:
            return exc.outcome
        except TimeoutError:
            return transport_failure(f"no answer from FCM within {self._timeout:g} s")
        except aiohttp.ServerDisconnectedError:
            return transport_failure("FCM closed the connection")
        except (aiohttp.ClientError, OSError) as exc:
            return transport_failure(f"FCM unreachable: {type(exc).__name__}")
        except Exception:
            # The port promises an outcome, never an exception; a bug here must not stop the dispatcher's lane.
            log.exception("fcm_send_failed", app=self.app_id)
            return transport_failure("FCM send failed unexpectedly")

    async def _deliver(self, body: bytes) -> Outcome:
        token = await self._tokens.get()
        status, raw, retry_after = await self._post(body, token)
        if status == 200:
            return Outcome(OutcomeKind.DELIVERED)
        code, text = parse_error(raw)
        if status == 401 and code not in _THIRD_PARTY:
            # Our access token was refused (revoked, expired early): one new token and one re-send, no more.
            token = await self._tokens.replace(token)
            status, raw, retry_after = await self._post(body, token)
            if status == 200:
                return Outcome(OutcomeKind.DELIVERED)
            code, text = parse_error(raw)
        return fcm_outcome(status, code, text, retry_after)

    async def _post(self, body: bytes, token: str) -> tuple[int, bytes, float | None]:
        session = self._session or self._open()
        async with session.post(self.url, data=body, headers=self._auth_headers(token), proxy=self._proxy,
                                proxy_auth=self._proxy_auth) as response:
            raw = await response.read()
            status = response.status
            retry_after = None if status < 400 else parse_retry_after(response.headers.get("Retry-After"))
        return status, raw, retry_after

    def _auth_headers(self, token: str) -> dict[str, str]:
        cached_token, headers = self._headers
        if cached_token != token:
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json; charset=UTF-8",
                       "X-GOOG-API-FORMAT-VERSION": "2"}
            self._headers = (token, headers)
        return headers

    async def close(self) -> None:
        """Close the connections and the token thread. There is no firebase_admin App to delete: the sender never
        creates one (``delete_app`` inside a running loop raises)."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self._tokens.close()


def _implements_the_port(sender: FcmSender) -> PushSender:
    return sender  # mypy checks FcmSender against the PushSender protocol here
