"""Logging: one structlog pipeline for our events and stdlib loggers alike, with secrets redacted on the way out."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
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


def scrub(text: str) -> str:
    """Remove anything shaped like a credential or push token from free text."""
    if not _ANY_SECRET_SHAPE.search(text):
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
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
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
    formatter = structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=final)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log repeats what our request log line says, minus redaction: keep it quiet.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Alembic announces its context on every schema check (each /readyz); `bemsmail migrate` reports itself.
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
