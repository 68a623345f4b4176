"""ApnsSender against the real mock APNs over real TLS + HTTP/2 on loopback: every row of the error table, deadlines,
dropped connections and GOAWAY, what goes on the wire, both auth modes, both environments, and a concurrent run."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from bemsmail.config import ApnsAppConfig
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
from bemsmail.mocks.apns import Answer, MockApns, load_provider_key
from bemsmail.mocks.tls import TestPki, ensure_test_pki, generate_provider_key, issue_client_certificate
from bemsmail.push.apns import (
    MAX_PAYLOAD,
    PRODUCTION_HOST,
    SANDBOX_HOST,
    ApnsSender,
    apns_id,
    render_payload,
)
from bemsmail.push.outcomes import APNS_TABLE, Row
from bemsmail.push.text import fit

APP = "com.example.mail"
TOPIC = "com.example.mail"
KEY_ID = "ABCDE12345"
TEAM_ID = "TEAM123456"
TOKEN = "ab" * 32


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture
async def mock(pki: TestPki, key_file: Path) -> AsyncIterator[MockApns]:
    async with MockApns(pki, topics=[TOPIC], keys=[load_provider_key(KEY_ID, TEAM_ID, key_file)],
                        control_port=None) as server:
        yield server


def app_config(mock: MockApns, key_file: Path | None = None, **overrides: Any) -> ApnsAppConfig:
    values: dict[str, Any] = {
        "id": APP, "topic": TOPIC, "auth": "token", "key_file": key_file, "key_id": KEY_ID, "team_id": TEAM_ID,
        "endpoint": {"host": "127.0.0.1", "port": mock.port, "ca_file": mock.ca_file},
        "max_connections": 2, "timeout_seconds": 10.0,
    }
    values.update(overrides)
    return ApnsAppConfig.model_validate(values)


@pytest.fixture
async def sender(mock: MockApns, key_file: Path) -> AsyncIterator[ApnsSender]:
    apns = ApnsSender(app_config(mock, key_file))
    yield apns
    await apns.close()


def push(**overrides: Any) -> PushMessage:
    values: dict[str, Any] = {
        "registration_id": "reg-1", "mailbox": "alice@example.com", "platform": Platform.IOS, "app_id": APP,
        "environment": Environment.PRODUCTION, "token": TOKEN, "notification_id": str(uuid.uuid4()),
        "kind": PushKind.ALERT, "category": Category.NEW_MAIL, "collapse_id": "mbx-7f3a",
        "priority": Priority.ALERT, "expires_at": datetime.now(UTC) + timedelta(hours=4),
        "badge": 3, "sound": "default", "data": {"account": "a1", "folder": "inbox"},
    }
    values.update(overrides)
    return PushMessage(**values)


def token(n: int) -> str:
    return f"{n:064x}"


# --- the error table -----------------------------------------------------------------------------------------


def _row_id(row: Row) -> str:
    return f"{row.status}-{row.reason or 'ok'}"


@pytest.mark.parametrize("row", APNS_TABLE, ids=_row_id)
async def test_every_apns_answer_maps_to_its_outcome(row: Row, mock: MockApns, sender: ApnsSender) -> None:
    stamp = 1_795_401_548_708
    mock.set_token(TOKEN, Answer(row.status, row.reason, timestamp_ms=stamp if row.status == 410 else None,
                                 retry_after=7 if row.status == 429 else None))
    outcome = await sender.send(push())
    assert outcome.kind is row.kind
    assert outcome.quota is row.quota
    assert mock.recent()[-1].status == row.status
    if row.status == 410:
        assert outcome.invalid_since == datetime.fromtimestamp(stamp / 1000, UTC)
    if row.status == 429:
        assert outcome.retry_after_seconds == 7
    if row.status != 200:
        assert row.reason in outcome.reason


async def test_thousands_of_error_answers_on_one_connection(mock: MockApns, key_file: Path) -> None:
    """aioapns never returns the receive window, so stock it stalls after ~64 KiB of error bodies; ours does not."""
    mock.set_default(Answer(400, "BadDeviceToken"))
    apns = ApnsSender(app_config(mock, key_file, max_connections=1))
    gate = asyncio.Semaphore(100)

    async def one(n: int) -> OutcomeKind:
        async with gate:
            return (await apns.send(push(token=token(n)))).kind

    try:
        kinds = await asyncio.gather(*(one(n) for n in range(3000)))
    finally:
        await apns.close()
    assert set(kinds) == {OutcomeKind.INVALID_TOKEN}
    assert mock.stats.connections == 1
    assert mock.stats.by_status[400] == 3000


async def test_mock_own_checks_become_outcomes(mock: MockApns, sender: ApnsSender, key_file: Path) -> None:
    oversized = push(data={"blob": "x" * 5000})
    assert (await sender.send(oversized)).kind is OutcomeKind.REJECTED  # refused locally: no round trip
    assert mock.stats.requests == 0
    assert (await sender.send(push(token="not-a-token"))).kind is OutcomeKind.INVALID_TOKEN
    other_topic = ApnsSender(app_config(mock, key_file, topic="com.example.other"))
    try:
        outcome = await other_topic.send(push())
    finally:
        await other_topic.close()
    assert outcome.kind is OutcomeKind.CONFIG_FAILURE and "TopicDisallowed" in outcome.reason


# --- deadlines, dropped connections, GOAWAY ------------------------------------------------------------------


async def test_never_answered_stream_hits_the_deadline_and_leaves_the_connection_usable(
        mock: MockApns, key_file: Path) -> None:
    mock.set_token(token(1), Answer(action="hang"))
    apns = ApnsSender(app_config(mock, key_file, timeout_seconds=0.3))
    try:
        outcome = await apns.send(push(token=token(1)))
        assert outcome.kind is OutcomeKind.RETRY and "no answer" in outcome.reason
        apns.timeout = 30.0  # the next send must not depend on a tight deadline
        assert (await apns.send(push(token=token(2)))).kind is OutcomeKind.DELIVERED
        assert mock.stats.connections == 1
    finally:
        await apns.close()
    assert mock.stats.hung == 1


async def test_a_never_answered_stream_is_cancelled_after_the_deadline(
        mock: MockApns, key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The abandoned send does not hold its stream slot forever: a guard resets the stream (RST_STREAM CANCEL)."""
    import bemsmail.push.apns as module

    monkeypatch.setattr(module, "STREAM_GUARD_EXTRA", 0.0)
    mock.set_default(Answer(action="hang"))
    apns = ApnsSender(app_config(mock, key_file, timeout_seconds=0.1))
    try:
        assert (await apns.send(push())).kind is OutcomeKind.RETRY
        abandoned = list(apns._abandoned)
        assert len(abandoned) == 1
        (result,) = await asyncio.gather(*abandoned, return_exceptions=True)
        assert isinstance(result, Exception) and "no answer within 0.2s" in str(result)
        assert not apns._abandoned
    finally:
        await apns.close()


async def test_stream_reset_by_server_is_a_retry(mock: MockApns, sender: ApnsSender) -> None:
    mock.set_token(TOKEN, Answer(action="reset", times=1))
    outcome = await sender.send(push())
    assert outcome.kind is OutcomeKind.RETRY and "reset" in outcome.reason
    assert (await sender.send(push())).kind is OutcomeKind.DELIVERED


async def test_dropped_connection_is_a_retry_then_sends_succeed(mock: MockApns, sender: ApnsSender) -> None:
    mock.set_faults(drop_after=1)
    assert (await sender.send(push())).kind is OutcomeKind.DELIVERED
    dropped = await sender.send(push())
    assert dropped.kind is OutcomeKind.RETRY and "connection lost" in dropped.reason
    mock.set_faults()
    assert [(await sender.send(push())).kind for _ in range(3)] == [OutcomeKind.DELIVERED] * 3
    assert mock.stats.drops == 1
    assert mock.stats.connections == 2


async def test_goaway_resends_only_unprocessed_streams(mock: MockApns, sender: ApnsSender) -> None:
    """GOAWAY names the last processed stream; later ones were not processed, so re-sending them is safe (RFC 9113
    §6.8): the send is delivered over a new connection, exactly once."""
    mock.set_faults(goaway_after=2)
    messages = [push() for _ in range(5)]
    kinds = [(await sender.send(m)).kind for m in messages]
    assert kinds == [OutcomeKind.DELIVERED] * 5
    assert mock.stats.goaways == 2
    assert mock.stats.connections == 3
    assert mock.stats.distinct_apns_ids == 5 and mock.stats.duplicate_apns_ids == 0


async def test_goaway_with_many_in_flight(mock: MockApns, sender: ApnsSender) -> None:
    mock.set_faults(goaway_after=60)
    outcomes = await asyncio.gather(*(sender.send(push(token=token(n))) for n in range(100)))
    assert {o.kind for o in outcomes} == {OutcomeKind.DELIVERED}
    assert mock.stats.requests == 100 and mock.stats.duplicate_apns_ids == 0
    mock.set_faults()
    assert (await sender.send(push())).kind is OutcomeKind.DELIVERED


async def test_a_resend_carries_the_same_apns_id(mock: MockApns, sender: ApnsSender) -> None:
    message = push()
    mock.set_token(TOKEN, Answer(503, "ServiceUnavailable", times=1))
    assert (await sender.send(message)).kind is OutcomeKind.RETRY
    assert (await sender.send(message)).kind is OutcomeKind.DELIVERED
    ids = [r.apns_id for r in mock.recent()]
    assert ids == [message.notification_id, message.notification_id]
    assert mock.stats.duplicate_apns_ids == 1


def test_apns_id_is_a_stable_uuid() -> None:
    nid = str(uuid.uuid4())
    assert apns_id(nid) == nid
    assert apns_id(nid.upper()) == nid
    derived = apns_id("relay-notification-42")
    assert str(uuid.UUID(derived)) == derived == apns_id("relay-notification-42")


# --- what goes on the wire -----------------------------------------------------------------------------------


async def test_alert_headers_and_content_free_payload(mock: MockApns, sender: ApnsSender) -> None:
    message = push(rich=None)
    assert (await sender.send(message)).kind is OutcomeKind.DELIVERED
    seen = mock.recent()[-1]
    assert seen.headers[":path"] == f"/3/device/{TOKEN}"
    assert seen.headers["apns-id"] == message.notification_id
    assert seen.headers["apns-topic"] == TOPIC
    assert seen.headers["apns-push-type"] == "alert"
    assert seen.headers["apns-priority"] == "10"
    assert seen.headers["apns-expiration"] == str(int(message.expires_at.timestamp()))
    assert seen.headers["apns-collapse-id"] == "mbx-7f3a"
    assert seen.headers["authorization"].startswith("bearer ")
    assert seen.auth == "token"
    assert seen.payload == {
        "account": "a1", "folder": "inbox",
        "aps": {"alert": {"title-loc-key": "NEW_MAIL_TITLE", "loc-key": "NEW_MAIL"}, "badge": 3,
                "sound": "default", "category": "NEW_MAIL", "thread-id": "mbx-7f3a"},
    }


async def test_content_free_by_default_even_with_mail_details_elsewhere(mock: MockApns, sender: ApnsSender) -> None:
    await sender.send(push(category=Category.MEETING_REQUEST, mailbox="bob@example.com"))
    raw = json.dumps(mock.recent()[-1].payload)
    assert "bob" not in raw and "title\"" not in raw and "body" not in raw
    assert mock.recent()[-1].payload["aps"]["alert"]["loc-key"] == "MEETING_REQUEST"


async def test_rich_content_is_sent_and_truncated_to_fit(mock: MockApns, sender: ApnsSender) -> None:
    sender_name = "Zoë Ångström 😀 " * 40
    subject = ("Réunion budgétaire 会議 📅 — " * 400)
    message = push(rich=RichContent(sender=sender_name, subject=subject, importance="high"))
    assert (await sender.send(message)).kind is OutcomeKind.DELIVERED  # the mock refuses > 4096 with 413
    body = render_payload(message)
    assert len(body) <= MAX_PAYLOAD
    seen = mock.recent()[-1].payload
    assert seen == json.loads(body.decode("utf-8"))  # strict UTF-8 decode: no split characters
    alert = seen["aps"]["alert"]
    assert "loc-key" not in alert and "title-loc-key" not in alert
    assert alert["title"].endswith("…") and sender_name.startswith(alert["title"][:-1])
    assert alert["body"].endswith("…") and subject.startswith(alert["body"][:-1])
    assert len(body) > MAX_PAYLOAD - 16  # the room was used, not wasted
    assert seen["importance"] == "high"


async def test_short_rich_content_is_not_touched(mock: MockApns, sender: ApnsSender) -> None:
    await sender.send(push(rich=RichContent(sender="Ann", subject="Lunch?")))
    alert = mock.recent()[-1].payload["aps"]["alert"]
    assert alert == {"title": "Ann", "body": "Lunch?"}


@pytest.mark.parametrize("limit", range(0, 40))
def test_truncation_never_splits_a_character(limit: int) -> None:
    text = "a😀é中\"\n" * 5
    cut = fit(text, limit)
    encoded = json.dumps(cut, ensure_ascii=False).encode()
    assert len(encoded) - 2 <= limit
    encoded.decode("utf-8")
    assert text.startswith(cut.removesuffix("…"))


async def test_background_push_shape(mock: MockApns, sender: ApnsSender) -> None:
    message = push(kind=PushKind.BACKGROUND, priority=Priority.ALERT, badge=None, sound=None,
                   rich=RichContent(sender="Ann", subject="secret"), data={"account": "a1"})
    assert (await sender.send(message)).kind is OutcomeKind.DELIVERED
    seen = mock.recent()[-1]
    assert seen.payload == {"account": "a1", "aps": {"content-available": 1}}
    assert seen.headers["apns-push-type"] == "background"
    assert seen.headers["apns-priority"] == "5"


async def test_badge_only_push(mock: MockApns, sender: ApnsSender) -> None:
    message = push(kind=PushKind.BADGE, priority=Priority.BACKGROUND, badge=9, sound="default", data={})
    await sender.send(message)
    seen = mock.recent()[-1]
    assert seen.payload == {"aps": {"badge": 9}}
    assert seen.headers["apns-push-type"] == "alert" and seen.headers["apns-priority"] == "5"


async def test_long_collapse_id_is_hashed_to_fit(mock: MockApns, sender: ApnsSender) -> None:
    message = push(collapse_id="m" * 100)
    assert (await sender.send(message)).kind is OutcomeKind.DELIVERED
    assert len(mock.recent()[-1].headers["apns-collapse-id"]) == 64


# --- credentials and environments ----------------------------------------------------------------------------


async def test_certificate_auth(mock: MockApns, pki: TestPki, tmp_path: Path) -> None:
    not_after = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    cert = issue_client_certificate(pki, TOPIC, tmp_path / "apns-cert.pem", not_after=not_after)
    apns = ApnsSender(app_config(mock, auth="certificate", key_file=None, key_id=None, team_id=None,
                                 cert_file=cert))
    try:
        assert apns.credential_expiry() == not_after
        assert (await apns.send(push())).kind is OutcomeKind.DELIVERED
    finally:
        await apns.close()
    seen = mock.recent()[-1]
    assert seen.auth == "certificate" and "authorization" not in seen.headers


async def test_certificate_for_another_topic_is_a_config_failure(mock: MockApns, pki: TestPki,
                                                                  tmp_path: Path) -> None:
    cert = issue_client_certificate(pki, "com.example.other", tmp_path / "other.pem")
    apns = ApnsSender(app_config(mock, auth="certificate", key_file=None, key_id=None, team_id=None,
                                 cert_file=cert))
    try:
        outcome = await apns.send(push())
    finally:
        await apns.close()
    assert outcome.kind is OutcomeKind.CONFIG_FAILURE and "TopicDisallowed" in outcome.reason


async def test_token_auth_has_no_credential_expiry(sender: ApnsSender) -> None:
    assert sender.credential_expiry() is None


async def test_wrong_jwt_key_is_a_config_failure(mock: MockApns, tmp_path: Path) -> None:
    wrong = generate_provider_key(tmp_path / "Wrong.p8")
    apns = ApnsSender(app_config(mock, wrong))
    try:
        outcome = await apns.send(push())
    finally:
        await apns.close()
    assert outcome.kind is OutcomeKind.CONFIG_FAILURE and "InvalidProviderToken" in outcome.reason


async def test_wrong_key_id_is_a_config_failure(mock: MockApns, key_file: Path) -> None:
    apns = ApnsSender(app_config(mock, key_file, key_id="ZZZZZ99999"))
    try:
        assert (await apns.send(push())).kind is OutcomeKind.CONFIG_FAILURE
    finally:
        await apns.close()


async def test_one_provider_token_for_all_connections(mock: MockApns, key_file: Path) -> None:
    mock.set_faults(goaway_after=1)
    apns = ApnsSender(app_config(mock, key_file))
    try:
        for _ in range(3):
            assert (await apns.send(push())).kind is OutcomeKind.DELIVERED
    finally:
        await apns.close()
    assert mock.stats.connections >= 3
    assert mock.stats.provider_tokens == 1


async def test_sandbox_and_production_go_to_their_own_endpoints(pki: TestPki, key_file: Path) -> None:
    keys = [load_provider_key(KEY_ID, TEAM_ID, key_file)]
    async with MockApns(pki, topics=[TOPIC], keys=keys, control_port=None) as production, \
            MockApns(pki, topics=[TOPIC], keys=keys, control_port=None) as sandbox:
        config = app_config(production, key_file, endpoint={
            "host": "127.0.0.1", "port": production.port, "ca_file": pki.ca_cert,
            "sandbox_host": "localhost", "sandbox_port": sandbox.port,
        })
        sandbox_token = token(99)
        apns = ApnsSender(config)
        try:
            assert (await apns.send(push())).kind is OutcomeKind.DELIVERED
            assert (await apns.send(push(environment=Environment.SANDBOX, token=sandbox_token))).kind \
                is OutcomeKind.DELIVERED
            assert (await apns.send(push())).kind is OutcomeKind.DELIVERED
        finally:
            await apns.close()
        assert production.stats.by_token == {TOKEN: 2}
        assert sandbox.stats.by_token == {sandbox_token: 1}
        assert sandbox.recent()[-1].headers[":authority"] == f"localhost:{sandbox.port}"


async def test_default_endpoints_are_apples(key_file: Path) -> None:
    config = ApnsAppConfig.model_validate({"id": APP, "topic": TOPIC, "key_file": key_file, "key_id": KEY_ID,
                                           "team_id": TEAM_ID})
    apns = ApnsSender(config)
    await apns.start()  # builds both clients, no network
    try:
        servers = {env: apns._client(env).pool.protocol_class for env in Environment}
        assert (servers[Environment.PRODUCTION].APNS_SERVER, servers[Environment.PRODUCTION].APNS_PORT) == \
            (PRODUCTION_HOST, 443)
        assert servers[Environment.SANDBOX].APNS_SERVER == SANDBOX_HOST
    finally:
        await apns.close()


async def test_untrusted_server_is_a_transport_failure(mock: MockApns, key_file: Path, tmp_path: Path) -> None:
    other_ca = ensure_test_pki(tmp_path / "other-pki")
    apns = ApnsSender(app_config(mock, key_file, timeout_seconds=10, endpoint={
        "host": "127.0.0.1", "port": mock.port, "ca_file": other_ca.ca_cert}))
    try:
        outcome = await apns.send(push())
    finally:
        await apns.close()
    assert outcome.kind is OutcomeKind.RETRY
    assert "SSLCertVerificationError" in outcome.reason  # the cause, not just "no answer"
    assert mock.stats.requests == 0


async def test_nothing_listening_is_a_transport_failure(key_file: Path, pki: TestPki) -> None:
    from tests.support import free_port

    config = ApnsAppConfig.model_validate({
        "id": APP, "topic": TOPIC, "key_file": key_file, "key_id": KEY_ID, "team_id": TEAM_ID,
        "endpoint": {"host": "127.0.0.1", "port": free_port(), "ca_file": pki.ca_cert}, "timeout_seconds": 0.5,
    })
    apns = ApnsSender(config)
    try:
        assert (await apns.send(push())).kind is OutcomeKind.RETRY
    finally:
        await apns.close()


# --- proxy, load, lifecycle ----------------------------------------------------------------------------------


class ConnectProxy:
    """A minimal HTTP CONNECT proxy on loopback that records the targets asked for."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> ConnectProxy:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        target = head.split(b" ", 2)[1].decode()
        self.targets.append(target)
        port = target.rpartition(":")[2]
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_http_connect_proxy(mock: MockApns, key_file: Path) -> None:
    async with ConnectProxy() as proxy:
        apns = ApnsSender(app_config(mock, key_file, proxy_url=f"http://127.0.0.1:{proxy.port}"))
        try:
            outcomes = [await apns.send(push()) for _ in range(3)]
        finally:
            await apns.close()
    assert [o.kind for o in outcomes] == [OutcomeKind.DELIVERED] * 3
    assert proxy.targets == [f"127.0.0.1:{mock.port}"]


async def test_five_hundred_concurrent_sends_all_delivered(pki: TestPki, key_file: Path) -> None:
    async with MockApns(pki, topics=[TOPIC], keys=[load_provider_key(KEY_ID, TEAM_ID, key_file)],
                        control_port=None, max_streams=100) as small:
        apns = ApnsSender(app_config(small, key_file, max_connections=2))
        try:
            messages = [push(token=token(n)) for n in range(500)]
            outcomes = await asyncio.gather(*(apns.send(m) for m in messages))
        finally:
            await apns.close()
        assert [o.kind for o in outcomes] == [OutcomeKind.DELIVERED] * 500
        assert small.stats.distinct_apns_ids == 500 and small.stats.duplicate_apns_ids == 0
        assert small.stats.connections <= 2


async def test_closed_sender_refuses_and_abandoned_sends_are_cancelled(mock: MockApns, key_file: Path) -> None:
    mock.set_default(Answer(action="hang"))
    apns = ApnsSender(app_config(mock, key_file, timeout_seconds=0.2))
    assert (await apns.send(push())).kind is OutcomeKind.RETRY
    assert len(apns._abandoned) == 1
    await apns.close()
    assert not apns._abandoned
    assert (await apns.send(push())).kind is OutcomeKind.RETRY


async def test_a_caller_cancelled_mid_send_does_not_break_the_connection(mock: MockApns,
                                                                         sender: ApnsSender) -> None:
    mock.set_token(token(1), Answer(action="hang"))
    hung = asyncio.create_task(sender.send(push(token=token(1))))
    await mock.wait_until(lambda stats: stats.hung == 1)
    hung.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hung
    assert (await sender.send(push(token=token(2)))).kind is OutcomeKind.DELIVERED
    mock.set_faults(drop_after=0)  # the connection now dies with the abandoned send on it
    assert (await sender.send(push(token=token(3)))).kind is OutcomeKind.RETRY
    mock.set_faults()
    assert (await sender.send(push(token=token(4)))).kind is OutcomeKind.DELIVERED


def test_credential_expiry_reads_the_certificate(pki: TestPki, tmp_path: Path) -> None:
    cert = issue_client_certificate(pki, TOPIC, tmp_path / "c.pem")
    config = ApnsAppConfig.model_validate({"id": APP, "topic": TOPIC, "auth": "certificate", "cert_file": cert})
    expected = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    assert ApnsSender(config).credential_expiry() == expected

