"""Whole nodes against the mock Graph and the mock APNs: a subscription made through the real handshake, pushes
from notifications (alone and batched), forged clientStates ignored, every lifecycle event, renewal timing,
reconciliation after a restart, delta catch-up with no loss and no duplicate, throttling, refused mailboxes,
and details fetched only when a device needs them."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from bemsmail.core.model import Backend
from bemsmail.mocks.graph import Fault
from bemsmail.sources.graph.source import digest
from tests.graph_support import ALICE, GraphWorld, alice_watched, graph_world, register, source_of, started
from tests.support import IOS_TOKEN, until

BOB = "bob@example.com"


def subscription_of(world: GraphWorld, mailbox: str = ALICE) -> dict[str, object]:
    [found] = [s for s in world.graph.subscription_list() if s["mailbox"] == mailbox]
    return found


async def test_a_registration_subscribes_through_the_handshake_and_mail_becomes_a_push(tmp_path: Path) -> None:
    async with graph_world(tmp_path) as world:
        node = await started(world.config())
        try:
            source = source_of(node)
            await register(node)
            await until(lambda: source.subscribed() == 1, "the subscription")
            sub = subscription_of(world)
            # Graph validated both URLs with the handshake before it answered the create
            assert world.graph.stats.validations == 2 and world.graph.stats.validations_failed == 0
            assert sub["notificationUrl"] == f"http://127.0.0.1:{world.port}/notificationClient"
            assert sub["lifecycleNotificationUrl"] == f"http://127.0.0.1:{world.port}/notificationClient/lifecycle"
            assert sub["changeType"] == "created" and sub["resource"] == f"users/{ALICE}/mailFolders('inbox')/messages"
            expires = datetime.fromisoformat(str(sub["expirationDateTime"]).replace("Z", "+00:00"))
            assert 10_000 * 60 < (expires - datetime.now(UTC)).total_seconds() <= 10_070 * 60
            client_state = str(sub["clientState"])
            assert len(client_state) >= 32

            async def stored() -> bool:
                return bool(await node.store.all_folder_states(Backend.GRAPH))

            await until(stored, "the subscription saved")
            [state] = await node.store.all_folder_states(Backend.GRAPH)
            assert state.client_state == digest(client_state)  # only a digest is stored

            await until(lambda: source.stats.catch_ups == 1, "the baseline delta round")
            world.graph.add_mail(ALICE, subject="Quarterly numbers")
            await until(lambda: len(world.pushes()) == 1, "the push")
            [push] = world.pushes()
            assert push.token == IOS_TOKEN and push.payload["aps"]["badge"] == 1
            assert "Quarterly" not in json.dumps(push.payload)  # content-free by default
            assert world.graph.stats.messages_read == 0  # so no message was fetched

            scrape = node.metrics.render().decode()
            assert 'bemsmail_graph_subscriptions{tenant="example"} 1.0' in scrape
            for secret in (client_state, world.secret, ALICE, IOS_TOKEN):
                assert secret not in scrape
        finally:
            await node.stop()


async def test_a_forged_client_state_is_ignored_and_counted(tmp_path: Path) -> None:
    async with graph_world(tmp_path) as world, alice_watched(world) as source:
        sub = subscription_of(world)
        message_id = world.graph.add_mail(ALICE)
        await until(lambda: len(world.pushes()) == 1, "the real notification's push")
        forged = {"value": [{"subscriptionId": sub["id"], "clientState": "guessed-" + "x" * 30,
                             "changeType": "created", "resource": f"Users/x/Messages/{message_id}-2",
                             "resourceData": {"id": f"{message_id}-2"}}]}
        async with aiohttp.ClientSession() as session, session.post(
                f"http://127.0.0.1:{world.port}/notificationClient", json=forged) as answer:
            assert answer.status == 202  # Graph must not learn anything, nor redeliver
        assert source.stats.forged == 1
        await asyncio.sleep(0.3)  # a push would have been on its way; not a timing assertion
        assert len(world.pushes()) == 1


async def test_a_batch_of_notifications_for_several_mailboxes_is_one_post_and_every_device_gets_its_push(
        tmp_path: Path) -> None:
    mailboxes = [f"user{i}@example.com" for i in range(6)]
    async with graph_world(tmp_path, batch_wait_ms=300) as world:
        node = await started(world.config())
        try:
            source = source_of(node)
            for i, mailbox in enumerate(mailboxes):
                await register(node, mailbox=mailbox, device=f"phone-{i}", token=f"{i:02x}" * 32)
            await until(lambda: source.subscribed() == 6 and source.stats.catch_ups == 6, "all subscribed")
            for mailbox in mailboxes:
                world.graph.add_mail(mailbox)
            await until(lambda: len(world.pushes()) == 6, "six pushes")
            assert world.graph.stats.notification_posts == 1 and world.graph.stats.largest_batch == 6
            assert sorted(p.token for p in world.pushes()) == sorted(f"{i:02x}" * 32 for i in range(6))
        finally:
            await node.stop()


async def test_reauthorization_required_is_answered_and_delivery_goes_on(tmp_path: Path) -> None:
    async with graph_world(tmp_path, reauthorize_grace_seconds=0.0) as world, alice_watched(world) as source:
        sub_id = str(subscription_of(world)["id"])
        world.graph.send_lifecycle(sub_id, "reauthorizationRequired")
        await until(lambda: world.graph.subscriptions[sub_id].reauthorize_by is None, "the reauthorization")
        assert source.stats.lifecycle == {"reauthorizationRequired": 1}
        world.graph.add_mail(ALICE)  # with the grace at 0, this would be lost had we not answered
        await until(lambda: len(world.pushes()) == 1, "the push after it")
        assert world.graph.stats.notifications_paused == 0


async def test_subscription_removed_is_recreated_and_the_gap_caught_up_by_delta(tmp_path: Path) -> None:
    async with graph_world(tmp_path) as world, alice_watched(world) as source:
        first = str(subscription_of(world)["id"])
        world.graph.send_lifecycle(first, "subscriptionRemoved")  # Graph has removed it: no notification now
        world.graph.add_mail(ALICE, subject="in the gap")
        await until(lambda: len(world.pushes()) == 1, "the mail of the gap pushed")
        second = str(subscription_of(world)["id"])
        assert second != first and world.graph.stats.creates == 2
        assert source.stats.caught_up_items == 1 and source.stats.lifecycle == {"subscriptionRemoved": 1}
        world.graph.add_mail(ALICE, subject="after")
        await until(lambda: len(world.pushes()) == 2, "the new subscription's push")


async def test_missed_starts_a_delta_round_that_finds_what_was_lost_and_pushes_nothing_twice(tmp_path: Path) -> None:
    async with graph_world(tmp_path) as world, alice_watched(world) as source:
        world.graph.add_mail(ALICE, subject="notified")
        await until(lambda: len(world.pushes()) == 1, "the notified mail's push")
        world.graph.drop_notifications(ALICE, 1)
        world.graph.add_mail(ALICE, subject="lost")
        assert world.graph.stats.notifications_dropped == 1
        world.graph.send_lifecycle(str(subscription_of(world)["id"]), "missed")
        await until(lambda: source.stats.catch_ups == 2, "the delta round")
        await until(lambda: len(world.pushes()) == 2, "the lost mail's push")
        # the round saw both mails; the notified one is not pushed again
        assert source.stats.caught_up_items == 1
        await asyncio.sleep(0.3)
        assert len(world.pushes()) == 2


async def test_renewal_falls_in_its_window_and_renews_the_subscription_when_due(tmp_path: Path) -> None:
    async with graph_world(tmp_path) as world:
        node = await started(world.config())
        offset = [0.0]
        real = node.clock.monotonic
        node.clock.monotonic = lambda: real() + offset[0]  # type: ignore[method-assign]
        try:
            source = source_of(node)
            settings = source.settings
            await register(node)
            await until(lambda: source.subscribed() == 1, "subscribed")
            [due] = source.renewals_due(within_seconds=10**7)
            lifetime = settings.subscription_minutes * 60
            latest = lifetime - settings.renew_before_minutes * 60
            assert latest - settings.renew_spread_minutes * 60 - 60 <= due <= latest
            sub_id = str(subscription_of(world)["id"])
            before = world.graph.subscriptions[sub_id].expires_at
            offset[0] = due + 1  # the monotonic clock jumps to just past the renewal time
            await until(lambda: world.graph.stats.renewals == 1, "the renewal PATCH")
            await until(lambda: source.stats.renewals == 1, "the renewal recorded")
            assert world.graph.subscriptions[sub_id].expires_at > before
            [again] = source.renewals_due(within_seconds=10**7)
            assert latest - settings.renew_spread_minutes * 60 - 60 <= again <= latest
            assert world.graph.stats.creates == 1  # renewed, not recreated
        finally:
            node.clock.monotonic = real  # type: ignore[method-assign]
            await node.stop()


async def test_a_restart_reuses_subscriptions_deletes_orphans_and_catches_up_once(tmp_path: Path) -> None:
    async with graph_world(tmp_path) as world:
        node = await started(world.config())
        source = source_of(node)
        await register(node)
        await register(node, mailbox=BOB, device="bob-phone", token="cd" * 32)
        await until(lambda: source.subscribed() == 2 and source.stats.catch_ups == 2, "subscribed")
        world.graph.add_mail(ALICE, subject="before")
        await until(lambda: len(world.pushes()) == 1, "the first push")
        await node.stop()

        # while the node is down: a mail, and an orphan (a subscription we made but never saved)
        world.graph.add_mail(ALICE, subject="while down")
        orphan_mailbox = "carol@example.com"
        world.graph.add_user(orphan_mailbox)
        creates_before = world.graph.stats.creates
        node = await started(world.config())
        try:
            source = source_of(node)
            client = source.client
            await client.create_subscription(orphan_mailbox, "orphan-state", 60)
            await until(lambda: source.reconciled.is_set(), "the reconciliation")
        finally:
            await node.stop()
        node = await started(world.config())
        try:
            source = source_of(node)
            await until(lambda: source.reconciled.is_set(), "the reconciliation")
            await until(lambda: not any(s["mailbox"] == orphan_mailbox for s in world.graph.subscription_list()),
                        "the orphan deleted")
            await until(lambda: len(world.pushes()) == 2, "the mail from the downtime")
            assert world.graph.stats.conflicts == 0
            assert world.graph.stats.creates == creates_before + 1  # only the orphan; ours were reused
            assert source.stats.orphans_deleted == 1
            await asyncio.sleep(0.3)
            assert len(world.pushes()) == 2
        finally:
            await node.stop()


async def test_throttled_creates_honour_retry_after(tmp_path: Path) -> None:
    async with graph_world(tmp_path) as world:
        world.graph.add_fault(Fault("create", status=429, code="TooManyRequests", message="slow down",
                                    retry_after=1, times=2))
        node = await started(world.config())
        try:
            source = source_of(node)
            started_at = time.monotonic()
            await register(node)
            await until(lambda: source.subscribed() == 1, "subscribed after the throttling")
            assert source.stats.throttled == 2 and world.graph.stats.faults == 2
            assert time.monotonic() - started_at >= 2.0  # two Retry-After: 1 waits, never sooner
        finally:
            await node.stop()


async def test_refused_and_unknown_mailboxes_are_reported_and_not_retried_at_once(tmp_path: Path) -> None:
    async with graph_world(tmp_path, auto_users=False) as world:
        world.graph.add_user(ALICE)
        world.graph.add_fault(Fault("create", status=403, code="ExtensionError", mailbox=ALICE, times=None,
                                    message="Operation: Create; Exception: [Status Code: Forbidden]"))
        node = await started(world.config())
        try:
            source = source_of(node)
            await register(node)
            await register(node, mailbox="ghost@example.com", device="ghost-phone", token="ef" * 32)
            await until(lambda: source.stats.refused_mailboxes == 2, "both refused")
            attempts = world.graph.stats.faults
            await asyncio.sleep(1.0)
            assert world.graph.stats.faults == attempts  # the next try is half an hour away
            assert source.subscribed() == 0
        finally:
            await node.stop()


async def test_details_and_unread_count_are_fetched_only_when_a_device_wants_them(tmp_path: Path) -> None:
    async with graph_world(tmp_path) as world:
        node = await started(world.config(env={"BEMSMAIL_TENANTS__0__RICH_CONTENT": "true"}))
        try:
            source = source_of(node)
            await register(node, content="rich", vip_senders=["boss@example.org"])
            await until(lambda: source.subscribed() == 1 and source.stats.catch_ups == 1, "subscribed")
            world.graph.add_mail(ALICE, subject="Budget", sender="boss@example.org", importance="high")
            await until(lambda: len(world.pushes()) == 1, "the push")
            [push] = world.pushes()
            assert "Budget" in json.dumps(push.payload)
            assert world.graph.stats.messages_read == 1 and world.graph.stats.folders_read >= 1
        finally:
            await node.stop()


async def test_check_config_connect_reaches_the_graph_tenant_and_keeps_the_secret(tmp_path: Path) -> None:
    import os
    import sys

    async with graph_world(tmp_path) as world:
        world.graph.add_mail(ALICE)

        async def check(**env: str) -> tuple[int, str]:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bemsmail", "check-config", "--config", str(world.path), "--connect",
                "--mailbox", ALICE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **env})
            out, _ = await process.communicate()
            return process.returncode or 0, out.decode()

        from bemsmail.store.engine import create_engine
        from bemsmail.store.schema import migrate

        engine = create_engine(world.config().database)
        await migrate(engine)
        await engine.dispose()
        code, out = await check()
        assert code == 0, out
        assert f"Graph reachable at {world.graph.graph_url}" in out and f"{ALICE} has 1 unread" in out
        wrong = tmp_path / "wrong-secret"
        wrong.write_text("not-the-secret")
        code, out = await check(BEMSMAIL_TENANTS__0__GRAPH__CLIENT_SECRET_FILE=str(wrong))
        assert code != 0 and "Graph call failed: 401" in out
        assert "not-the-secret" not in out and world.secret not in out


def test_graph_date_times_with_seven_digits_and_non_utc_offsets_parse_to_utc() -> None:
    from bemsmail.sources.graph.client import _parse_time

    assert _parse_time("2026-12-10T05:51:22.2359000Z") == datetime(2026, 12, 10, 5, 51, 22, 235900, tzinfo=UTC)
    assert _parse_time("2016-03-19T22:11:09.952-08:00") == datetime(2016, 3, 20, 6, 11, 9, 952000, tzinfo=UTC)
    assert _parse_time("not a time") is None
