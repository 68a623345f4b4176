"""Mock FCM HTTP v1 and Google's OAuth2 token endpoint: a real aiohttp server, scriptable, for tests and load tests.

Routes (one port, plain HTTP/1.1, as firebase-admin speaks to a cleartext endpoint):

- ``POST /v1/projects/{project}/messages:send`` validates the body as FCM does (a ``message`` with exactly one
  target, the android/apns/webpush/notification/data shapes, string data values, payload ≤ 4096 bytes) and the
  bearer access token this mock issued; answers ``{"name": ...}`` or Google's error body with an ``FcmError``
  detail.
- ``POST /token``: the OAuth2 JWT-bearer grant google-auth makes for a service account (RS256 assertion, checked
  against registered service-account keys when there are any; ``aud`` must be https://oauth2.googleapis.com/token
  whatever URI it was posted to).
- ``GET /v1/projects/-/serviceAccounts/{email}/allowedLocations``: google-auth's Regional Access Boundary
  lookup, answered with "no boundary" (google-auth hard-codes iamcredentials.googleapis.com, so this only helps a
  client routed here by a proxy).
- ``/mock/...``: the control API (script, stats, requests, received?after=N for load tests, revoke,
  reset), the same as the Python methods.

The payload size FCM limits is measured here, and in the sender, as the compact UTF-8 JSON of the ``message``
object without its target field.

Scripts answer per token first, then globally; each rule may be limited to a number of uses (``times``). A rule
can reply with any status/canonical status/errorCode/message/Retry-After, add latency, drop the connection
without an answer, or never answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import itertools
import json
import re
import secrets
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from bemsmail.mocks.feed import MAX_PAGE, received_handler, rows_after

FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_SCOPES = frozenset({
    "https://www.googleapis.com/auth/firebase.messaging",
    "https://www.googleapis.com/auth/cloud-platform",
})
MAX_PAYLOAD_BYTES = 4096
INVALID_TOKEN_MESSAGE = "The registration token is not a valid FCM registration token"  # noqa: S105
#: per-token counters stop adding new tokens beyond this (a load test with random tokens must not grow forever)
MAX_TRACKED_TOKENS = 100_000

# FCM v1 ErrorCode values (the errorCode of an FcmError detail); every other reason is a canonical status only.
FCM_ERROR_CODES = frozenset({
    "UNSPECIFIED_ERROR", "INVALID_ARGUMENT", "UNREGISTERED", "SENDER_ID_MISMATCH", "QUOTA_EXCEEDED",
    "UNAVAILABLE", "INTERNAL", "THIRD_PARTY_AUTH_ERROR", "APNS_AUTH_ERROR",
})

CANONICAL_STATUS = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

# reason -> (default HTTP status, canonical status, Google's message)
_PRESETS: dict[str, tuple[int, str, str]] = {
    "UNREGISTERED": (404, "NOT_FOUND", "Requested entity was not found."),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED", "SenderId mismatch"),
    "INVALID_ARGUMENT": (400, "INVALID_ARGUMENT",
                         "Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration)"),
    "QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED",
                       "Quota exceeded for quota metric 'Send requests' and limit 'Send requests per minute'"),
    "UNAVAILABLE": (503, "UNAVAILABLE", "The service is currently unavailable."),
    "INTERNAL": (500, "INTERNAL", "Internal error encountered."),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service"),
    "APNS_AUTH_ERROR": (401, "UNAUTHENTICATED", "Auth error from APNS"),
    "UNSPECIFIED_ERROR": (500, "UNKNOWN", "Unknown error."),
    "RESOURCE_EXHAUSTED": (429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    "UNAUTHENTICATED": (401, "UNAUTHENTICATED",
                        "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
                        "cookie or other valid authentication credential."),
    "PERMISSION_DENIED": (403, "PERMISSION_DENIED",
                          "Permission 'cloudmessaging.messages.create' denied on resource (or it may not exist)."),
    "NOT_FOUND": (404, "NOT_FOUND", "Requested entity was not found."),
    "DEADLINE_EXCEEDED": (504, "DEADLINE_EXCEEDED", "Deadline exceeded."),
}


class Action(enum.StrEnum):
    REPLY = "reply"
    DROP = "drop"  # close the connection without an answer
    HANG = "hang"  # never answer (until the mock stops)


@dataclass(frozen=True, slots=True)
class Rule:
    """One scripted answer. For the send endpoint: HTTP status, canonical status, FcmError errorCode (None: no
    FcmError detail), message. For the token endpoint: status and, when not 200, the OAuth ``error`` (taken from
    ``error_code``) and ``error_description`` (``message``)."""

    status: int = 200
    error_code: str | None = None
    status_name: str | None = None
    message: str | None = None
    retry_after: float | None = None
    latency_ms: float = 0.0
    action: Action = Action.REPLY
    #: how many answers this rule gives before the next rule (or the default) applies; None: every answer
    times: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status, "error_code": self.error_code, "status_name": self.status_name,
            "message": self.message, "retry_after": self.retry_after, "latency_ms": self.latency_ms,
            "action": self.action.value, "times": self.times,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Rule:
        """A rule from JSON; ``{"preset": "UNREGISTERED", ...}`` expands `fcm_error` and overrides its fields."""
        data = dict(data)
        preset = data.pop("preset", None)
        names_token = bool(data.pop("names_token", False))
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown rule fields: {', '.join(sorted(unknown))}")
        if "action" in data:
            data["action"] = Action(data["action"])
        if preset is not None:
            base = fcm_error(str(preset), data.pop("status", None), names_token=names_token)
            return replace(base, **data)
        return cls(**data)


def fcm_error(reason: str, status: int | None = None, *, message: str | None = None, names_token: bool = False,
              retry_after: float | None = None, latency_ms: float = 0.0, times: int | None = None) -> Rule:
    """Google's answer for `reason`: an FCM errorCode (UNREGISTERED, QUOTA_EXCEEDED, ...) is sent as the FcmError
    detail under its canonical status; any other reason (UNAUTHENTICATED, NOT_FOUND, ...) is the canonical status
    alone. `names_token` makes an INVALID_ARGUMENT message about the registration token."""
    default_status, canonical, default_message = _PRESETS.get(
        reason, (status or 500, CANONICAL_STATUS.get(status or 500, reason), reason))
    if names_token:
        default_message = INVALID_TOKEN_MESSAGE
    return Rule(
        status=status or default_status,
        error_code=reason if reason in FCM_ERROR_CODES else None,
        status_name=canonical,
        message=default_message if message is None else message,
        retry_after=retry_after, latency_ms=latency_ms, times=times,
    )


def oauth_error(status: int = 503, error: str = "temporarily_unavailable", description: str = "",
                *, times: int | None = None) -> Rule:
    """A token-endpoint failure: ``{"error": error, "error_description": description}`` with `status`."""
    return Rule(status=status, error_code=error, message=description, times=times)


def drop(times: int | None = None) -> Rule:
    """Close the connection without answering."""
    return Rule(action=Action.DROP, times=times)


def hang(times: int | None = None) -> Rule:
    """Never answer (until the mock stops)."""
    return Rule(action=Action.HANG, times=times)


class _Script:
    """Rules answered in order; a rule with `times` is used up after that many answers."""

    __slots__ = ("_rules",)

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self._rules: deque[list[Any]] = deque([r, r.times] for r in rules)

    def __bool__(self) -> bool:
        return bool(self._rules)

    def next(self) -> Rule | None:
        rules = self._rules
        while rules:
            entry = rules[0]
            rule: Rule = entry[0]
            left: int | None = entry[1]
            if left is None:
                return rule
            if left > 0:
                entry[1] = left - 1
                if left == 1:
                    rules.popleft()
                return rule
            rules.popleft()
        return None

    def to_json(self) -> list[dict[str, Any]]:
        return [{**r.to_json(), "left": left} for r, left in self._rules]


# --- request validation: FCM v1 Message, as its JSON parser and FCM's checks see it ---------------------------

Check = Callable[[Any, str], str | None]  # (value, path) -> Google's error message, or None if valid

_DURATION = re.compile(r"^\d+(\.\d{1,9})?s$")
_TOKEN = re.compile(r"^[A-Za-z0-9_:.%-]{1,4096}$")
_TOPIC = re.compile(r"^[A-Za-z0-9_.~%-]+$")
_RESERVED_DATA = frozenset({"from", "notification", "message_type"})
_TARGETS = ("token", "topic", "condition", "fid")


def _invalid(path: str, kind: str, value: Any) -> str:
    return f"Invalid value at '{path}' ({kind}), {json.dumps(value, ensure_ascii=False)[:200]}"


def _string(value: Any, path: str) -> str | None:
    return None if isinstance(value, str) else _invalid(path, "TYPE_STRING", value)


def _boolean(value: Any, path: str) -> str | None:
    return None if isinstance(value, bool) else _invalid(path, "TYPE_BOOL", value)


def _integer(value: Any, path: str) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    if isinstance(value, str) and value.lstrip("-").isdigit():  # proto3 JSON takes integers as strings too
        return None
    return _invalid(path, "TYPE_INT32", value)


def _duration(value: Any, path: str) -> str | None:
    if isinstance(value, str) and _DURATION.match(value):
        return None
    return _invalid(path, "type.googleapis.com/google.protobuf.Duration", value)


def _struct(value: Any, path: str) -> str | None:
    return None if isinstance(value, dict) else _invalid(path, "type.googleapis.com/google.protobuf.Struct", value)


def _string_list(value: Any, path: str) -> str | None:
    if not isinstance(value, list):
        return _invalid(path, "TYPE_STRING", value)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            return _invalid(f"{path}[{i}]", "TYPE_STRING", item)
    return None


def _duration_list(value: Any, path: str) -> str | None:
    if not isinstance(value, list):
        return _invalid(path, "type.googleapis.com/google.protobuf.Duration", value)
    for i, item in enumerate(value):
        problem = _duration(item, f"{path}[{i}]")
        if problem:
            return problem
    return None


def _string_map(value: Any, path: str) -> str | None:
    if not isinstance(value, dict):
        return _invalid(path, "TYPE_MESSAGE", value)
    for i, item in enumerate(value.values()):
        if not isinstance(item, str):
            return _invalid(f"{path}[{i}].value", "TYPE_STRING", item)
    return None


def _data_map(value: Any, path: str) -> str | None:
    problem = _string_map(value, path)
    if problem:
        return problem
    for key in value:
        if key in _RESERVED_DATA or key.startswith(("google.", "gcm.")):
            return f"Invalid data payload key: {key!r} is reserved"
    return None


def _enum(type_name: str, *values: str, case_insensitive: bool = False) -> Check:
    allowed = frozenset(v.lower() for v in values) if case_insensitive else frozenset(values)

    def check(value: Any, path: str) -> str | None:
        probe = value.lower() if case_insensitive and isinstance(value, str) else value
        if isinstance(probe, str) and probe in allowed:
            return None
        return _invalid(path, type_name, value)

    return check


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _message(fields: Mapping[str, Check]) -> Check:
    """An object with these fields; proto3 JSON also accepts each field's lowerCamelCase name."""
    table = dict(fields)
    table.update({_camel(k): v for k, v in fields.items()})

    def check(value: Any, path: str) -> str | None:
        if not isinstance(value, dict):
            return _invalid(path, "TYPE_MESSAGE", value)
        for key, item in value.items():
            checker = table.get(key)
            if checker is None:
                return f"Invalid JSON payload received. Unknown name \"{key}\" at '{path}': Cannot find field."
            problem = checker(item, f"{path}.{key}")
            if problem:
                return problem
        return None

    return check


_LIGHT_SETTINGS = _message({"color": _struct, "light_on_duration": _duration, "light_off_duration": _duration})
_ANDROID_NOTIFICATION = _message({
    "title": _string, "body": _string, "icon": _string, "color": _string, "sound": _string, "tag": _string,
    "click_action": _string, "body_loc_key": _string, "body_loc_args": _string_list, "title_loc_key": _string,
    "title_loc_args": _string_list, "channel_id": _string, "ticker": _string, "sticky": _boolean,
    "event_time": _string, "local_only": _boolean,
    "notification_priority": _enum(
        "type.googleapis.com/google.firebase.fcm.v1.AndroidNotification.NotificationPriority",
        "PRIORITY_UNSPECIFIED", "PRIORITY_MIN", "PRIORITY_LOW", "PRIORITY_DEFAULT", "PRIORITY_HIGH",
        "PRIORITY_MAX"),
    "default_sound": _boolean, "default_vibrate_timings": _boolean, "default_light_settings": _boolean,
    "vibrate_timings": _duration_list,
    "visibility": _enum("type.googleapis.com/google.firebase.fcm.v1.AndroidNotification.Visibility",
                        "VISIBILITY_UNSPECIFIED", "PRIVATE", "PUBLIC", "SECRET"),
    "notification_count": _integer, "light_settings": _LIGHT_SETTINGS, "image": _string,
    "bypass_proxy_notification": _boolean,
    "proxy": _enum("type.googleapis.com/google.firebase.fcm.v1.AndroidNotification.Proxy",
                   "PROXY_UNSPECIFIED", "ALLOW", "DENY", "IF_PRIORITY_LOWERED"),
})
_ANDROID = _message({
    "collapse_key": _string,
    # FCM's parser takes the enum in any case; the Admin SDKs send "high" / "normal".
    "priority": _enum("type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority",
                      "NORMAL", "HIGH", case_insensitive=True),
    "ttl": _duration, "restricted_package_name": _string, "data": _data_map,
    "notification": _ANDROID_NOTIFICATION, "fcm_options": _message({"analytics_label": _string}),
    "direct_boot_ok": _boolean, "bandwidth_constrained_ok": _boolean, "restricted_satellite_ok": _boolean,
})
_APNS = _message({
    "headers": _string_map, "payload": _struct,
    "fcm_options": _message({"analytics_label": _string, "image": _string}),
    "live_activity_token": _string,
})
_WEBPUSH = _message({
    "headers": _string_map, "data": _data_map, "notification": _struct,
    "fcm_options": _message({"link": _string, "analytics_label": _string}),
})
_MESSAGE = _message({
    "name": _string, "data": _data_map,
    "notification": _message({"title": _string, "body": _string, "image": _string}),
    "android": _ANDROID, "webpush": _WEBPUSH, "apns": _APNS,
    "fcm_options": _message({"analytics_label": _string}),
    "token": _string, "topic": _string, "condition": _string, "fid": _string,
})


def payload_size(message: Mapping[str, Any]) -> int:
    """The bytes FCM's 4096-byte limit counts: the compact UTF-8 JSON of the message without its target."""
    rest = {k: v for k, v in message.items() if k not in _TARGETS}
    return len(json.dumps(rest, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))


def validate_send_body(body: Any, raw_length: int) -> tuple[str | None, str | None]:
    """(problem, target) for a messages:send body; problem is Google's INVALID_ARGUMENT message or None."""
    if not isinstance(body, dict):
        return "Invalid JSON payload received. Expected an object.", None
    for key in body:
        if key not in ("message", "validate_only", "validateOnly"):
            return f"Invalid JSON payload received. Unknown name \"{key}\": Cannot find field.", None
    message = body.get("message")
    if message is None:
        return "Request contains an invalid argument: message is required.", None
    problem = _MESSAGE(message, "message")
    if problem:
        return problem, None
    targets = [k for k in _TARGETS if k in message]
    if not targets:
        return "Recipient of the message is not set.", None
    if len(targets) > 1:
        return (f"Invalid value at 'message' (oneof), oneof field 'target' is already set. "
                f"Cannot set '{targets[1]}'"), None
    kind = targets[0]
    target: str = message[kind]
    if kind in ("token", "fid") and not _TOKEN.match(target):
        return INVALID_TOKEN_MESSAGE, None
    if kind == "topic" and not _TOPIC.match(target.removeprefix("/topics/")):
        return "Invalid value at 'message.topic': malformed topic name.", None
    # The re-serialised payload is never longer than the body it came from, so only a long body needs measuring.
    if raw_length > MAX_PAYLOAD_BYTES and payload_size(message) > MAX_PAYLOAD_BYTES:
        return "Message is too big", None
    return None, target


# --- the server -------------------------------------------------------------------------------------------------


def _error_body(status: int, status_name: str, message: str, error_code: str | None,
                extra_details: Sequence[Mapping[str, Any]] = ()) -> bytes:
    details: list[Mapping[str, Any]] = []
    if error_code:
        details.append({"@type": FCM_ERROR_TYPE, "errorCode": error_code})
    details.extend(extra_details)
    error: dict[str, Any] = {"code": status, "message": message, "status": status_name}
    if details:
        error["details"] = details
    return json.dumps({"error": error}).encode()


_JSON = "application/json"


@dataclass(slots=True)
class _Access:
    expires_at: float
    client_email: str
    project: str | None
    fcm_scope: bool


@dataclass(slots=True)
class _Stats:
    sends: int = 0
    delivered: int = 0
    validated: int = 0
    in_flight: int = 0
    by_outcome: Counter[str] = field(default_factory=Counter)
    by_token: Counter[str] = field(default_factory=Counter)
    by_project: Counter[str] = field(default_factory=Counter)
    token_requests: int = 0
    tokens_issued: int = 0
    token_failures: Counter[str] = field(default_factory=Counter)
    allowed_locations: int = 0


class FcmMock:
    """The mock server. Use as ``async with FcmMock() as mock:`` (port 0 picks a free port) on the test's loop, or
    `serve_in_thread` for code that makes blocking calls to it (firebase-admin's token refresh does).

    The scripting and statistics methods may be called from any thread: they swap whole objects or copy with
    single C-level operations, which the GIL makes atomic against the server's loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, latency_ms: float = 0.0,
                 service_accounts: Iterable[Mapping[str, Any] | Path | str] = (), projects: Iterable[str] = (),
                 require_auth: bool = True, token_lifetime: int = 3599, keep_requests: int = 100) -> None:
        self.host = host
        self._port = port
        self.latency_ms = latency_ms
        self.require_auth = require_auth
        self.token_lifetime = token_lifetime
        self._keys: dict[str, tuple[RSAPublicKey, str | None]] = {}
        self._projects: set[str] = set(projects)
        for account in service_accounts:
            self.add_service_account(account)
        self._access: dict[str, _Access] = {}
        self._global = _Script()
        self._tokens: dict[str, _Script] = {}
        self._oauth = _Script()
        self._stats = _Stats()
        self._recent: deque[dict[str, Any]] = deque(maxlen=keep_requests)
        self._recorded = 0  # send requests ever recorded: the numbering GET /mock/received follows
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._hung: set[asyncio.Task[Any]] = set()

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_post("/v1/projects/{project}/messages:send", self._send)
        app.router.add_post("/token", self._token)
        app.router.add_get("/v1/projects/-/serviceAccounts/{email}/allowedLocations", self._allowed_locations)
        app.router.add_post("/mock/script", self._http_script)
        app.router.add_get("/mock/stats", self._http_stats)
        app.router.add_get("/mock/requests", self._http_requests)
        app.router.add_get("/mock/received", received_handler(self.received))
        app.router.add_post("/mock/reset", self._http_reset)
        app.router.add_post("/mock/revoke", self._http_revoke)
        app.router.add_get("/mock/health", self._http_health)
        return app

    async def start(self) -> None:
        self._stopping = asyncio.Event()
        # No access log: it costs more than the handler itself at load-test rates.
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port, backlog=1024)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()  # hung requests end by dropping their connections
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FcmMock:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    def send_url(self, project: str) -> str:
        return f"{self.base_url}/v1/projects/{project}/messages:send"

    # --- scripting (Python side of /mock/*) -------------------------------------------------------------------

    def script(self, *, global_rules: Iterable[Rule] | None = None,
               tokens: Mapping[str, Iterable[Rule]] | None = None, oauth: Iterable[Rule] | None = None,
               latency_ms: float | None = None) -> None:
        """Replace whichever scripts are given (a token mapped to no rules clears that token's script)."""
        if global_rules is not None:
            self._global = _Script(global_rules)
        if tokens is not None:
            updated = dict(self._tokens)
            for token, rules in tokens.items():
                script = _Script(rules)
                if script:
                    updated[token] = script
                else:
                    updated.pop(token, None)
            self._tokens = updated
        if oauth is not None:
            self._oauth = _Script(oauth)
        if latency_ms is not None:
            self.latency_ms = latency_ms

    def script_token(self, token: str, *rules: Rule) -> None:
        self.script(tokens={token: rules})

    def script_global(self, *rules: Rule) -> None:
        self.script(global_rules=rules)

    def script_oauth(self, *rules: Rule) -> None:
        self.script(oauth=rules)

    def add_service_account(self, account: Mapping[str, Any] | Path | str) -> None:
        """Trust assertions signed by this service account (its JSON key file, or the parsed dict)."""
        info = json.loads(Path(account).read_text(encoding="utf-8")) if isinstance(account, Path | str) else account
        if "public_key" in info:
            public = load_pem_public_key(str(info["public_key"]).encode())
        else:
            public = load_pem_private_key(str(info["private_key"]).encode(), password=None).public_key()
        if not isinstance(public, RSAPublicKey):
            raise ValueError("a service-account key must be RSA")
        project = info.get("project_id")
        self._keys = {**self._keys, str(info["client_email"]): (public, project)}
        if project:
            self._projects = {*self._projects, str(project)}

    def revoke_access_tokens(self) -> None:
        """Every access token issued so far becomes invalid (as after a key rotation): the next send gets 401."""
        self._access = {}

    def reset(self) -> None:
        """Forget scripts, statistics and recorded requests; issued access tokens stay valid."""
        self._global = _Script()
        self._tokens = {}
        self._oauth = _Script()
        self._stats = _Stats()
        self._recent.clear()

    def stats(self) -> dict[str, Any]:
        s = self._stats
        return {
            "sends": s.sends, "delivered": s.delivered, "validated": s.validated, "in_flight": s.in_flight,
            "by_outcome": dict(s.by_outcome), "by_token": dict(s.by_token), "by_project": dict(s.by_project),
            "token_requests": s.token_requests, "tokens_issued": s.tokens_issued,
            "token_failures": dict(s.token_failures), "allowed_locations": s.allowed_locations,
            "access_tokens_valid": sum(1 for a in list(self._access.values()) if a.expires_at > time.time()),
            "latency_ms": self.latency_ms,
            "scripts": {"global": self._global.to_json(), "oauth": self._oauth.to_json(),
                        "tokens": {t: s.to_json() for t, s in list(self._tokens.items())}},
        }

    def requests(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The last received send requests, oldest first (never the access token)."""
        recent = list(self._recent)
        return recent[-limit:] if limit else recent

    def received(self, after: int = 0, limit: int = MAX_PAGE) -> dict[str, Any]:
        """What arrived after send number `after`, in the shape a load test follows (see mocks.feed): each
        send's token, status, outcome, arrival time and data map."""
        start, rows = rows_after(self._recent, self._recorded, after, limit)
        pushes = []
        for row in rows:
            message = row["body"].get("message") if isinstance(row["body"], dict) else None
            data = message.get("data") if isinstance(message, dict) else None
            pushes.append({"token": row["token"], "status": row["status"], "reason": row["outcome"],
                           "at": row["at"], "data": data if isinstance(data, dict) else {}})
        return {"after": start, "next": start + len(rows), "total": self._recorded, "pushes": pushes}

    # --- the send endpoint: the hot path ---------------------------------------------------------------------

    def _record(self, outcome: str, project: str, token: str | None, status: int, raw: bytes,
                body: Any, auth: str) -> None:
        stats = self._stats
        stats.by_outcome[outcome] += 1
        stats.by_project[project] += 1
        if token is not None and (token in stats.by_token or len(stats.by_token) < MAX_TRACKED_TOKENS):
            stats.by_token[token] += 1
        try:
            text, utf8 = raw.decode("utf-8"), True
        except UnicodeDecodeError:
            text, utf8 = raw.decode("utf-8", "backslashreplace"), False
        self._recent.append({
            "at": time.time(), "project": project, "token": token, "outcome": outcome, "status": status,
            "auth": auth, "raw": text, "utf8": utf8, "body": body,
        })
        self._recorded += 1

    def _check_auth(self, header: str | None, project: str) -> tuple[str, web.Response | None]:
        if not header or not header.startswith("Bearer "):
            return "missing", self._fail(401, "UNAUTHENTICATED",
                                         "Request is missing required authentication credential. Expected OAuth 2 "
                                         "access token, login cookie or other valid authentication credential.",
                                         None, reason="CREDENTIALS_MISSING")
        access = self._access.get(header[7:])
        if access is None or access.expires_at <= time.time():
            return "invalid", self._fail(401, "UNAUTHENTICATED", _PRESETS["UNAUTHENTICATED"][2], None,
                                         reason="ACCESS_TOKEN_EXPIRED" if access else "ACCESS_TOKEN_TYPE_UNSUPPORTED")
        if not access.fcm_scope:
            return "scope", self._fail(403, "PERMISSION_DENIED", "Request had insufficient authentication scopes.",
                                       None, reason="ACCESS_TOKEN_SCOPE_INSUFFICIENT")
        if (access.project is not None and access.project != project) or (
                self._projects and project not in self._projects):
            # What FCM says to a service account of another project (not SENDER_ID_MISMATCH; see the quirks).
            return "project", self._fail(403, "PERMISSION_DENIED",
                                         f"Permission 'cloudmessaging.messages.create' denied on resource "
                                         f"'//cloudresourcemanager.googleapis.com/projects/{project}' (or it may "
                                         f"not exist).", None, reason="IAM_PERMISSION_DENIED")
        return "valid", None

    @staticmethod
    def _fail(status: int, status_name: str, message: str, error_code: str | None, *,
              reason: str | None = None, retry_after: float | None = None) -> web.Response:
        extra = [{"@type": ERROR_INFO_TYPE, "reason": reason, "domain": "googleapis.com"}] if reason else []
        headers = {"Retry-After": _retry_after(retry_after)} if retry_after is not None else None
        return web.Response(status=status, body=_error_body(status, status_name, message, error_code, extra),
                            content_type=_JSON, headers=headers)

    async def _send(self, request: web.Request) -> web.StreamResponse:
        stats = self._stats
        stats.sends += 1
        stats.in_flight += 1
        try:
            return await self._answer_send(request, stats)
        finally:
            stats.in_flight -= 1

    async def _answer_send(self, request: web.Request, stats: _Stats) -> web.StreamResponse:
        project = request.match_info["project"]
        raw = await request.read()
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000)
        auth = "unchecked"
        if self.require_auth:
            auth, refusal = self._check_auth(request.headers.get("Authorization"), project)
            if refusal is not None:
                self._record("UNAUTHENTICATED" if refusal.status == 401 else "PERMISSION_DENIED",
                             project, None, refusal.status, raw, None, auth)
                return refusal
        try:
            body = json.loads(raw)
        except ValueError:
            self._record("INVALID_ARGUMENT", project, None, 400, raw, None, auth)
            return self._fail(400, "INVALID_ARGUMENT", "Invalid JSON payload received.", "INVALID_ARGUMENT")
        problem, token = validate_send_body(body, len(raw))
        if problem is not None:
            self._record("INVALID_ARGUMENT", project, None, 400, raw, body, auth)
            return self._fail(400, "INVALID_ARGUMENT", problem, "INVALID_ARGUMENT")
        assert token is not None
        script = self._tokens.get(token)
        rule = (script.next() if script else None) or (self._global.next() if self._global else None)
        if rule is not None:
            if rule.latency_ms:
                await asyncio.sleep(rule.latency_ms / 1000)
            if rule.action is not Action.REPLY:
                return await self._no_answer(request, rule.action, project, token, raw, body, auth)
            if rule.status != 200:
                status_name = rule.status_name or CANONICAL_STATUS.get(rule.status, "UNKNOWN")
                self._record(rule.error_code or status_name, project, token, rule.status, raw, body, auth)
                return self._fail(rule.status, status_name, rule.message or "", rule.error_code,
                                  retry_after=rule.retry_after)
        if body.get("validate_only") or body.get("validateOnly"):
            stats.validated += 1
            self._record("validated", project, token, 200, raw, body, auth)
            return web.Response(body=b'{"name":"projects/%s/messages/fake_message_id"}' % project.encode(),
                                content_type=_JSON)
        stats.delivered += 1
        self._record("delivered", project, token, 200, raw, body, auth)
        name = f'{{"name":"projects/{project}/messages/0:{next(self._ids)}%mock"}}'
        return web.Response(body=name.encode(), content_type=_JSON)

    async def _no_answer(self, request: web.Request, action: Action, project: str, token: str | None,
                         raw: bytes, body: Any, auth: str) -> web.StreamResponse:
        self._record("dropped" if action is Action.DROP else "hung", project, token, 0, raw, body, auth)
        if action is Action.HANG and self._stopping is not None:
            await self._stopping.wait()
        if request.transport is not None:
            request.transport.close()
        # aiohttp discards a response written to a closed transport: the client sees the connection end.
        return web.Response(status=500)

    # --- the OAuth token endpoint ----------------------------------------------------------------------------

    def _oauth_fail(self, status: int, error: str, description: str) -> web.Response:
        self._stats.token_failures[error] += 1
        return web.Response(status=status, content_type=_JSON,
                            body=json.dumps({"error": error, "error_description": description}).encode())

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self._stats.token_requests += 1
        form = await request.post()
        rule = self._oauth.next() if self._oauth else None
        if rule is not None:
            if rule.latency_ms:
                await asyncio.sleep(rule.latency_ms / 1000)
            if rule.action is not Action.REPLY:
                self._stats.token_failures["dropped" if rule.action is Action.DROP else "hung"] += 1
                if rule.action is Action.HANG and self._stopping is not None:
                    await self._stopping.wait()
                if request.transport is not None:
                    request.transport.close()
                return web.Response(status=500)
            if rule.status != 200:
                return self._oauth_fail(rule.status, rule.error_code or "internal_failure", rule.message or "")
        if form.get("grant_type") != JWT_BEARER:
            return self._oauth_fail(400, "unsupported_grant_type", "Invalid grant_type.")
        assertion = form.get("assertion")
        if not isinstance(assertion, str) or not assertion:
            return self._oauth_fail(400, "invalid_request", "Missing required parameter: assertion")
        return self._grant(assertion)

    def _grant(self, assertion: str) -> web.Response:
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return self._oauth_fail(400, "invalid_grant", "Invalid JWT: malformed assertion.")
        if header.get("alg") != "RS256":
            return self._oauth_fail(400, "invalid_grant", "Invalid JWT Signature.")
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or not issuer:
            return self._oauth_fail(400, "invalid_grant", "Invalid JWT: iss is missing.")
        project: str | None = None
        if self._keys:
            known = self._keys.get(issuer)
            if known is None:
                return self._oauth_fail(400, "invalid_grant", "Invalid grant: account not found")
            key, project = known
            try:
                jwt.decode(assertion, key, algorithms=["RS256"], options={"verify_aud": False, "verify_exp": False})
            except jwt.InvalidSignatureError:
                return self._oauth_fail(400, "invalid_grant", "Invalid JWT Signature.")
            except jwt.PyJWTError:
                return self._oauth_fail(400, "invalid_grant", "Invalid JWT: malformed assertion.")
        if claims.get("aud") != GOOGLE_TOKEN_AUDIENCE:
            return self._oauth_fail(400, "invalid_grant",
                                    f"Invalid JWT: Failed audience check. The expected audience is "
                                    f"{GOOGLE_TOKEN_AUDIENCE}.")
        now = time.time()
        iat, exp = claims.get("iat"), claims.get("exp")
        if (not isinstance(iat, int | float) or not isinstance(exp, int | float) or exp - iat > 3600
                or exp < now or iat > now + 300):
            return self._oauth_fail(400, "invalid_grant",
                                    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
                                    "timeframe. Check your iat and exp values in the JWT claim.")
        scopes = set(str(claims.get("scope", "")).split())
        if not scopes:
            return self._oauth_fail(400, "invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        token = "ya29.mock." + secrets.token_urlsafe(32)
        access = dict(self._access) if len(self._access) < 10_000 else {
            k: a for k, a in self._access.items() if a.expires_at > now}
        access[token] = _Access(now + self.token_lifetime, issuer, project, bool(scopes & FCM_SCOPES))
        self._access = access
        self._stats.tokens_issued += 1
        body = {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"}
        return web.Response(body=json.dumps(body).encode(), content_type=_JSON)

    async def _allowed_locations(self, request: web.Request) -> web.StreamResponse:
        self._stats.allowed_locations += 1
        return web.json_response({"locations": [], "encodedLocations": "0x0"})

    # --- the control API ---------------------------------------------------------------------------------------

    async def _http_script(self, request: web.Request) -> web.StreamResponse:
        try:
            data = await request.json()
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            unknown = set(data) - {"global", "tokens", "oauth", "latency_ms"}
            if unknown:
                raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")

            def rules(items: Any) -> list[Rule]:
                if not isinstance(items, list):
                    raise ValueError("rules must be a list")
                return [Rule.from_json(item) for item in items]

            tokens = data.get("tokens")
            if tokens is not None and not isinstance(tokens, dict):
                raise ValueError("tokens must map a token to a list of rules")
            self.script(
                global_rules=rules(data["global"]) if "global" in data else None,
                tokens={t: rules(r) for t, r in tokens.items()} if tokens is not None else None,
                oauth=rules(data["oauth"]) if "oauth" in data else None,
                latency_ms=float(data["latency_ms"]) if "latency_ms" in data else None,
            )
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True})

    async def _http_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats())

    async def _http_requests(self, request: web.Request) -> web.StreamResponse:
        limit = request.query.get("limit")
        return web.json_response(self.requests(int(limit) if limit and limit.isdigit() else None))

    async def _http_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return web.json_response({"ok": True})

    async def _http_revoke(self, request: web.Request) -> web.StreamResponse:
        self.revoke_access_tokens()
        return web.json_response({"ok": True})

    async def _http_health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True})


def _retry_after(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


@contextlib.contextmanager
def serve_in_thread(mock: FcmMock) -> Iterator[FcmMock]:
    """Run `mock` on its own event loop in a daemon thread, for callers that block on it (google-auth's
    `requests`-based token refresh inside firebase-admin would deadlock a mock served on the caller's loop)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fcm-mock", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(mock.start(), loop).result(timeout=30)
        yield mock
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(mock.stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


# --- as its own process -------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`bemsmail mock fcm`: serve until SIGTERM/SIGINT; prints one line with the port once it listens."""
    parser = argparse.ArgumentParser(prog="bemsmail mock fcm", description="Mock FCM HTTP v1 + OAuth token endpoint.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8083, help="0 picks a free port (default 8083)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every send")
    parser.add_argument("--service-account", action="append", default=[], metavar="FILE", type=Path,
                        help="service-account JSON whose key must have signed the token assertions (repeatable)")
    parser.add_argument("--token-lifetime", type=int, default=3599, help="expires_in of issued access tokens")
    parser.add_argument("--no-auth", action="store_true", help="accept sends without a valid access token")
    parser.add_argument("--history", type=int, default=100,
                        help="send requests kept for GET /mock/requests and /mock/received")
    args = parser.parse_args(argv)
    mock = FcmMock(args.host, args.port, latency_ms=args.latency_ms, service_accounts=args.service_account,
                   token_lifetime=args.token_lifetime, require_auth=not args.no_auth, keep_requests=args.history)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except NotImplementedError:  # Windows
                signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
        await mock.start()
        print(f"fcm mock ready port={mock.port} url={mock.base_url} token_uri={mock.token_uri}", flush=True)
        try:
            await stop.wait()
        finally:
            await mock.stop()

    try:
        import uvloop
    except ImportError:  # Windows
        asyncio.run(serve())
    else:
        uvloop.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
