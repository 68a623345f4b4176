"""Logging: one structlog pipeline for our events and stdlib loggers alike, with secrets redacted on the way out."""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import structlog

REDACTED = "[redacted]"

# Keys whose values are secret wherever they appear in an event (compared lower-cased, '-' as '_').
SECRET_KEYS = frozenset(
    {
        "token", "push_token", "device_token", "password", "passwd", "secret", "client_secret",
        "authorization", "api_key", "x_api_key", "apikey", "bearer", "access_token", "refresh_token",
        "id_token", "client_state", "clientstate", "private_key", "key", "cookie", "set_cookie",
        "redis_url", "validation_token", "validationtoken",
    }
)

_SCRUBBERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\b(bearer|apikey|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 " + REDACTED),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), REDACTED),
    (re.compile(r"(?i)(://[^:/@\s]+:)[^@\s]+@"), r"\1" + REDACTED + "@"),
    (re.compile(r"\b[0-9a-fA-F]{64,}\b"), REDACTED),
    (re.compile(r"\b[A-Za-z0-9_-]{20,}:APA91[A-Za-z0-9_-]{20,}"), REDACTED),
    (re.compile(r'(?i)("?(?:token|password|client_?secret|client_?state|api_?key)"?\s*[:=]\s*)"?[^",}\s]+"?'),
     r"\1" + REDACTED),
)


def _scoped(pattern: re.Pattern[str]) -> str:
    """A pattern as an alternative of one big regex: a leading global (?i) becomes a scoped (?i:...)."""
    source = pattern.pattern
    return f"(?i:{source[4:]})" if source.startswith("(?i)") else f"(?:{source})"


# One search tells whether any scrubber can match: most strings in a log line (event names, routes, ids) are
# clean, and one failed search is much cheaper than six failed substitutions.
_ANY_SECRET_SHAPE = re.compile("|".join(_scoped(p) for p, _ in _SCRUBBERS))
_SPACE = re.compile(r"\s")


def _may_hold_secret(text: str) -> bool:
    """False only if no scrubber can match: each needs one of these (in order: 64 hex digits; a JWT's "eyJ";
    the ':' of a URL's password, of ":APA91" and of `token: …` (or its '='); the space after Bearer/ApiKey/Basic).
    The combined search costs 4-8 µs on a 20-40 character word (its alternatives rescan it), these a fraction."""
    return (len(text) >= 64 or "eyJ" in text or ":" in text or "=" in text
            or _SPACE.search(text) is not None)


def scrub(text: str) -> str:
    """Remove anything shaped like a credential or push token from free text."""
    if not _may_hold_secret(text) or not _ANY_SECRET_SHAPE.search(text):
        return text
    for pattern, replacement in _SCRUBBERS:
        text = pattern.sub(replacement, text)
    return text


def _redact(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if depth > 4:
        return value
    if isinstance(value, dict):
        return {
            k: REDACTED if _is_secret_key(k) else _redact(v, depth + 1) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(v, depth + 1) for v in value]
    return value


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and key.lower().replace("-", "_") in SECRET_KEYS


def redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: secret-named keys are replaced, and every string is scrubbed of token shapes."""
    for key in list(event_dict):
        if _is_secret_key(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact(event_dict[key])
    return event_dict


def _scrub_rendered(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Tracebacks are rendered late (after redaction); scrub their text too."""
    for key in ("exception", "stack"):
        if isinstance(event_dict.get(key), str):
            event_dict[key] = scrub(event_dict[key])
    return event_dict


#: set on a LogRecord whose message is an already rendered (and redacted) JSON line
_RENDERED = "_bemsmail_rendered"


class _Formatter(structlog.stdlib.ProcessorFormatter):
    """The pipeline's formatter, which passes lines rendered by `EventLog` through as they are."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, _RENDERED, False):
            return str(record.msg)
        return super().format(record)


#: the structlog processors `configure_logging` installed with JSON output; None: console, or not configured
_json_processors: list[Any] | None = None
_TO_FORMATTER = structlog.stdlib.ProcessorFormatter.wrap_for_formatter


class EventLog:
    """One hot event (the canonical request line) written without the structlog pipeline, which costs ~70 µs
    a line (two LogRecords, every key checked and scrubbed, caller lookup): about a seventh of a registration's
    CPU at info level. The line has the same keys as the pipeline's (`fields`, event, the request id it is
    given, logger, level, timestamp), string values are scrubbed and it goes to the same handlers as a stdlib
    record. Fields with secret-shaped names are refused when the EventLog is made. With the console renderer,
    or while structlog is configured otherwise (structlog.testing.capture_logs), the ordinary pipeline writes it.
    """

    def __init__(self, name: str, event: str, fields: tuple[str, ...]) -> None:
        secret = [f for f in fields if _is_secret_key(f)]
        if secret:
            raise ValueError(f"fields with secret names go through the redacting pipeline: {secret}")
        self._name = name
        self._event = event
        self._fields = fields
        self._stdlib = logging.getLogger(name)
        self._structlog = structlog.get_logger(name)
        # the line as json.dumps renders the pipeline's event dict, with the constant parts rendered once
        self._keys = [("{" if i == 0 else ", ") + _json_str(key) + ": " for i, key in enumerate(fields)]
        self._event_part = ', "event": ' + _json_str(event) + ', "request_id": '
        self._logger_part = ', "logger": ' + _json_str(name) + ', "level": '

    def emit(self, level: int, request_id: str, *values: str | int | float) -> None:
        """`values` in the order of `fields`; `request_id` as the pipeline's context would add it."""
        if not self._stdlib.isEnabledFor(level):
            return
        processors = _json_processors
        level_name = logging.getLevelName(level).lower()
        # capture_logs swaps the processors inside the same list: the last one tells whether ours still run
        if (processors is None or structlog.get_config()["processors"] is not processors
                or processors[-1] is not _TO_FORMATTER):
            method = getattr(self._structlog, level_name)
            method(self._event, **dict(zip(self._fields, values, strict=True)), request_id=request_id)
            return
        parts = [key + _json_value(value) for key, value in zip(self._keys, values, strict=True)]
        parts += (self._event_part, _json_str(scrub(request_id)), self._logger_part, _json_str(level_name),
                  ', "timestamp": "', datetime.now(UTC).isoformat().replace("+00:00", "Z"), '"}')
        record = logging.LogRecord(self._name, level, "", 0, "".join(parts), None, None)
        setattr(record, _RENDERED, True)
        self._stdlib.handle(record)


#: json.dumps's own string encoder (ensure_ascii), in C
_json_str: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _json_value(value: object) -> str:
    """`value` as json.dumps renders it; strings scrubbed first."""
    if isinstance(value, str):
        return _json_str(scrub(value))
    if type(value) is int:
        return int.__repr__(value)
    if type(value) is float and math.isfinite(value):
        return float.__repr__(value)
    return json.dumps(value)


def configure_logging(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
) -> None:
    """Install the pipeline: JSON lines in production, the console renderer on a TTY."""
    stream = stream or sys.stdout
    json_logs = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    global _json_processors
    processors: list[Any] = [
        structlog.stdlib.filter_by_level,
        *shared,
        structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
    ]
    structlog.configure(
        processors=processors,
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    final: list[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if json_logs:
        final += [structlog.processors.format_exc_info, _scrub_rendered, structlog.processors.JSONRenderer()]
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        final += [structlog.processors.format_exc_info, _scrub_rendered, renderer]
    formatter = _Formatter(foreign_pre_chain=shared, processors=final)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    _json_processors = structlog.get_config()["processors"] if json_logs else None
    # aiohttp's access log repeats what our request log line says, minus redaction: keep it quiet.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Alembic announces its context on every schema check (each /readyz); `bemsmail migrate` reports itself.
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
