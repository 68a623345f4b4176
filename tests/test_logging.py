"""Logs: one pipeline for structlog and stdlib, JSON lines, request ids, and no secret ever written."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from bemsmail import log
from bemsmail.log import REDACTED, configure_logging, scrub
from tests.support import IOS_TOKEN, dev_config, registration, running_api


def test_scrub_removes_credential_shapes() -> None:
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"
    text = f"Bearer {jwt} ApiKey abcdefghijklmnop token={IOS_TOKEN} mysql://u:pw@db/x password: hunter2"
    cleaned = scrub(text)
    for secret in (jwt, "abcdefghijklmnop", IOS_TOKEN, "pw@", "hunter2"):
        assert secret not in cleaned
    assert cleaned.count(REDACTED) >= 5


def test_stdlib_and_structlog_share_the_json_pipeline() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    structlog.contextvars.bind_contextvars(request_id="r-1")
    try:
        structlog.get_logger("bemsmail.x").info("hello", token=IOS_TOKEN, client_secret="s3cr3t-value")
        logging.getLogger("aiohttp.server").error("peer sent %s", "Authorization: Bearer abc.def-ghi_jklmnop")
    finally:
        structlog.contextvars.clear_contextvars()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["logger"] for line in lines] == ["bemsmail.x", "aiohttp.server"]
    assert all(line["request_id"] == "r-1" for line in lines)
    assert lines[0]["token"] == REDACTED and lines[0]["client_secret"] == REDACTED
    assert "abc.def-ghi_jklmnop" not in out.getvalue()
    assert "s3cr3t-value" not in out.getvalue()


async def test_no_secret_reaches_the_log_during_api_use(tmp_path: Path) -> None:
    out = io.StringIO()
    configure_logging("debug", "json", out)
    config, key = dev_config(tmp_path)
    android_token = "secret-fcm-token-" + "q" * 40
    async with running_api(config, key) as api:
        h = api.headers
        await api.client.post("/api/v1/registrations", json=registration(), headers=h)
        await api.client.post("/api/v1/registrations", json=registration(token="Z" * 64), headers=h)
        await api.client.post("/api/v1/registrations", json=registration(platform="android", token=android_token,
                                                                          app_id="nope"), headers=h)
        await api.client.post("/api/v1/registrations", json=registration(), headers={"X-API-Key": key + "x"})
        await api.client.post("/api/v1/registrations", json=registration(),
                              headers={"Authorization": "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.sig"})
    text = out.getvalue()
    assert '"event": "request"' in text  # the canonical request lines were written
    for secret in (IOS_TOKEN, "Z" * 64, android_token, key, key + "x", "eyJhbGciOiJub25lIn0"):
        assert secret not in text


@given(st.text(alphabet=st.sampled_from("ab01:@/= -_.eyJBearer APA91token\"x"), max_size=120))
def test_the_quick_precheck_never_lets_a_secret_shape_through(text: str) -> None:
    """scrub() skips texts its combined regex finds clean; that must equal running every scrubber."""
    slow = text
    for pattern, replacement in log._SCRUBBERS:
        slow = pattern.sub(replacement, slow)
    assert log.scrub(text) == slow


def _pipeline_and_fast_lines(level: str, request_id: str, *values: str | int | float) -> tuple[dict[str, object], ...]:
    """The same request line through the structlog pipeline and through EventLog, parsed."""
    out = io.StringIO()
    configure_logging("debug", "json", out)
    fields = ("method", "route", "status", "duration_ms")
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        getattr(structlog.get_logger("bemsmail.api"), level)("request", **dict(zip(fields, values, strict=True)))
        log.EventLog("bemsmail.api", "request", fields).emit(logging.getLevelName(level.upper()), request_id, *values)
    finally:
        structlog.contextvars.clear_contextvars()
    return tuple(json.loads(line) for line in out.getvalue().splitlines())


def test_the_cheap_request_line_says_what_the_pipeline_says() -> None:
    for level in ("info", "debug"):
        slow, fast = _pipeline_and_fast_lines(level, "r-1", "POST", "/api/v1/registrations", 201, 1.23)
        assert slow.pop("timestamp") <= fast.pop("timestamp")  # type: ignore[operator]
        assert fast == slow and list(fast) == list(slow)
        assert fast["level"] == level and fast["request_id"] == "r-1"


def test_the_cheap_request_line_scrubs_and_refuses_secret_fields() -> None:
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"
    slow, fast = _pipeline_and_fast_lines("info", IOS_TOKEN, f"Bearer {jwt}", "/x", 401, 0.5)
    for line in (slow, fast):
        assert line["request_id"] == REDACTED and IOS_TOKEN not in json.dumps(line) and jwt not in json.dumps(line)
    assert fast["method"] == slow["method"]
    with pytest.raises(ValueError, match="secret"):
        log.EventLog("bemsmail.api", "request", ("route", "token"))


def test_the_cheap_request_line_follows_the_level_and_a_reconfigured_structlog() -> None:
    out = io.StringIO()
    configure_logging("warning", "json", out)
    line = log.EventLog("bemsmail.api", "request", ("status",))
    line.emit(logging.INFO, "r-1", 200)
    assert out.getvalue() == ""
    configure_logging("info", "json", out)
    with capture_logs() as captured:  # structlog configured otherwise: the ordinary pipeline takes the event
        line.emit(logging.INFO, "r-2", 200)
    assert captured == [{"event": "request", "status": 200, "request_id": "r-2", "log_level": "info"}]
    assert out.getvalue() == ""
    line.emit(logging.INFO, "r-3", 200)
    assert json.loads(out.getvalue())["request_id"] == "r-3"


def test_console_logs_take_the_request_line_through_the_renderer() -> None:
    out = io.StringIO()
    configure_logging("info", "console", out)
    log.EventLog("bemsmail.api", "request", ("status",)).emit(logging.INFO, "r-1", 204)
    text = out.getvalue()
    assert "request" in text and "status=204" in text and "request_id=r-1" in text and not text.startswith("{")
