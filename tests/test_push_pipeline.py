"""The whole push path of a node — relay, dispatcher, real senders — against the mock APNs (TLS + HTTP/2) and
the mock FCM (v1 + OAuth) on loopback: pushes arrive, dead tokens are deleted, and one broken or stalled
provider does not hold up the other."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bemsmail.app import Node
from bemsmail.config import load_config
from bemsmail.core.model import EventKind, MailboxEvent, Platform, RegistrationInput
from bemsmail.mocks.apns import Answer, MockApns
from bemsmail.mocks.fcm import FcmMock, fcm_error, hang
from bemsmail.mocks.tls import ensure_test_pki
from bemsmail.store.schema import migrate
from tests.support import ANDROID_APP, ANDROID_TOKEN, IOS_APP, IOS_TOKEN, dev_config_with_apns_key, free_port, until

ALICE = "alice@example.com"


@dataclass
class Pipeline:
    node: Node
    apns: MockApns
    fcm: FcmMock

    async def register(self, platform: Platform, token: str, device: str, mailbox: str = ALICE) -> str:
        app = IOS_APP if platform is Platform.IOS else ANDROID_APP
        data = RegistrationInput(mailbox=mailbox, device_id=device, platform=platform, token=token, app_id=app)
        return (await self.node.service.register(data)).registration.id

    async def new_mail(self, n: int = 1, mailbox: str = ALICE) -> None:
        await self.node.relay.on_event(MailboxEvent(mailbox, "Inbox", f"item-{n}", EventKind.NEW_MAIL,
                                                    datetime.now(UTC), sender="boss@example.com",
                                                    subject="Quarterly numbers", unread_count=n))


@pytest.fixture
async def pipeline(tmp_path: Path) -> AsyncIterator[Pipeline]:
    path = tmp_path / "bemsmail.toml"
    topic, keys = dev_config_with_apns_key(path)
    pki = ensure_test_pki(tmp_path / "pki")
    async with FcmMock() as fcm, MockApns(pki, topics=[topic], keys=keys, control_port=None) as apns:
        endpoint = {"host": "127.0.0.1", "port": apns.port, "ca_file": str(apns.ca_file)}
        config = load_config(path, {
            "BEMSMAIL_SERVER__PORT": str(free_port()),
            "BEMSMAIL_FCM__APPS__0__FCM_URL": fcm.base_url,
            "BEMSMAIL_FCM__APPS__0__TOKEN_URI": fcm.token_uri,
            "BEMSMAIL_APNS__APPS__0__ENDPOINT": json.dumps(endpoint),
            "BEMSMAIL_PUSH__BACKOFF_INITIAL_SECONDS": "0.01",
            "BEMSMAIL_PUSH__CIRCUIT_OPEN_SECONDS": "3600",
            "BEMSMAIL_RELAY__COALESCE_SECONDS": "0",
            "BEMSMAIL_SERVER__SHUTDOWN_GRACE_SECONDS": "1",
        })
        node = Node(config)
        await migrate(node.store.engine)
        await node.start_pushing()
        try:
            yield Pipeline(node, apns, fcm)
        finally:
            await node.stop()


def fcm_sends(fcm: FcmMock) -> int:
    sends: int = fcm.stats()["sends"]
    return sends


async def test_new_mail_reaches_every_device_of_the_mailbox(pipeline: Pipeline) -> None:
    await pipeline.register(Platform.IOS, IOS_TOKEN, "iphone")
    await pipeline.register(Platform.ANDROID, ANDROID_TOKEN, "pixel")
    await pipeline.new_mail(3)
    await until(lambda: pipeline.apns.stats.requests == 1 and fcm_sends(pipeline.fcm) == 1, "both pushes")
    [ios] = pipeline.apns.recent()
    assert ios.token == IOS_TOKEN and ios.status == 200
    assert ios.payload["aps"]["badge"] == 3
    [android] = pipeline.fcm.requests()
    assert android["body"]["message"]["token"] == ANDROID_TOKEN
    text = json.dumps(ios.payload) + json.dumps(android["body"])
    assert "boss@" not in text and "Quarterly" not in text  # content-free: nothing of the mail itself, only
    assert ios.payload["item_id"] == android["body"]["message"]["data"]["item_id"] == "item-3"  # its opaque id


async def test_dead_tokens_are_deleted_on_both_providers(pipeline: Pipeline) -> None:
    later = int((datetime.now(UTC) + timedelta(minutes=1)).timestamp() * 1000)
    pipeline.apns.set_token(IOS_TOKEN, Answer(410, "Unregistered", timestamp_ms=later))
    pipeline.fcm.script_token(ANDROID_TOKEN, fcm_error("UNREGISTERED"))
    await pipeline.register(Platform.IOS, IOS_TOKEN, "iphone")
    await pipeline.register(Platform.ANDROID, ANDROID_TOKEN, "pixel")
    await pipeline.new_mail()
    await until(lambda: pipeline.apns.stats.requests == 1 and fcm_sends(pipeline.fcm) == 1, "both pushes")
    async with asyncio.timeout(20):
        while await pipeline.node.store.list_registrations(ALICE):
            await pipeline.node.relay.flush_records()
            await asyncio.sleep(0.01)


async def test_a_broken_apns_key_never_deletes_tokens_nor_delays_fcm(pipeline: Pipeline) -> None:
    pipeline.apns.set_default(Answer(403, "InvalidProviderToken"))
    ios = await pipeline.register(Platform.IOS, IOS_TOKEN, "iphone")
    for n in range(5):
        await pipeline.register(Platform.ANDROID, f"{ANDROID_TOKEN}{n}", f"pixel-{n}", f"u{n}@example.com")
    await pipeline.new_mail()
    await until(lambda: pipeline.apns.stats.requests >= 1, "the APNs attempt")
    lane = pipeline.node.dispatcher.lanes[IOS_APP]
    await until(lambda: int(lane.state) == 2, "the APNs circuit to open")
    for n in range(5):
        await pipeline.new_mail(n, f"u{n}@example.com")
    await until(lambda: fcm_sends(pipeline.fcm) == 5, "every FCM push while APNs is broken")
    await pipeline.node.relay.flush_records()
    assert await pipeline.node.store.get_registration(ios) is not None
    assert pipeline.apns.stats.requests == 1  # the open circuit sends nothing more until its trial


async def test_a_stalled_fcm_project_does_not_delay_apns(pipeline: Pipeline) -> None:
    pipeline.fcm.script_global(hang())
    for n in range(3):
        await pipeline.register(Platform.ANDROID, f"{ANDROID_TOKEN}{n}", f"pixel-{n}", f"a{n}@example.com")
        await pipeline.register(Platform.IOS, f"{n:064x}", f"iphone-{n}", f"i{n}@example.com")
    for n in range(3):
        await pipeline.new_mail(n, f"a{n}@example.com")
        await pipeline.new_mail(n, f"i{n}@example.com")
    await until(lambda: pipeline.apns.stats.by_status[200] == 3, "every APNs push while FCM hangs")
    assert pipeline.node.dispatcher.lanes[ANDROID_APP].in_flight == 3


async def test_push_metrics_name_apps_and_outcomes_never_tokens(pipeline: Pipeline) -> None:
    await pipeline.register(Platform.IOS, IOS_TOKEN, "iphone")
    await pipeline.new_mail()
    await until(lambda: pipeline.apns.stats.requests == 1, "the push")
    await until(lambda: b'outcome="delivered"' in pipeline.node.metrics.render(), "the outcome metric")
    text = pipeline.node.metrics.render().decode()
    assert f'bemsmail_pushes_total{{app="{IOS_APP}",outcome="delivered",provider="apns"}} 1.0' in text
    assert 'bemsmail_push_circuit_state{app="com.example.mail",provider="apns"} 0.0' in text
    assert "bemsmail_push_queue_depth" in text and "bemsmail_relay_events_total" in text
    assert IOS_TOKEN not in text and ALICE not in text

