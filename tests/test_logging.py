"""Logs: one pipeline for structlog and stdlib, JSON lines, request ids, and no secret ever written."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import structlog
from hypothesis import given
from hypothesis import strategies as st

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
