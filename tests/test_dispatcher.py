"""The dispatcher's retry, deadline, circuit breaker and bulkheads, on a fake clock with scripted senders.

The senders here are test doubles of our own PushSender port (what each provider adapter implements); the
adapters themselves are tested against the real mock servers in test_push_apns.py and test_push_fcm.py."""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime

from bemsmail.core.clock import FakeClock
from bemsmail.core.model import (
    Category,
    Environment,
    Outcome,
    OutcomeKind,
    Platform,
    Priority,
    PushKind,
    PushMessage,
)
from bemsmail.push.dispatcher import CircuitState, Dispatcher, RetryPolicy

D, R, C, X = OutcomeKind.DELIVERED, OutcomeKind.RETRY, OutcomeKind.CONFIG_FAILURE, OutcomeKind.INVALID_TOKEN


def message(app_id: str = "ios-app", n: int = 0) -> PushMessage:
    return PushMessage(
        registration_id=f"r{n}", mailbox="alice@example.com", platform=Platform.IOS, app_id=app_id,
        environment=Environment.PRODUCTION, token="ab" * 32, notification_id=str(uuid.uuid4()),
        kind=PushKind.ALERT, category=Category.NEW_MAIL, collapse_id="m-1", priority=Priority.ALERT,
        expires_at=datetime(2026, 1, 2, tzinfo=UTC),
    )


class ScriptedSender:
    """Answers from a script (then `default`); `gate` can hold sends to model a slow provider."""

    def __init__(self, script: Iterable[Outcome] = (), default: Outcome | None = None) -> None:
        self.script = deque(script)
        self.default = default or Outcome(D)
        self.sent: list[PushMessage] = []
        self.gate: asyncio.Event | None = None
        self.closed = False

    async def send(self, msg: PushMessage) -> Outcome:
        self.sent.append(msg)
        if self.gate is not None:
            await self.gate.wait()
        return self.script.popleft() if self.script else self.default

    async def start(self) -> None: ...

    def credential_expiry(self) -> None:
        return None

    async def close(self) -> None:
        self.closed = True


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def make(clock: FakeClock, policy: RetryPolicy | None = None, **senders: ScriptedSender) -> Dispatcher:
    dispatcher = Dispatcher(clock, policy or RetryPolicy(), seed=1)
    for app, sender in senders.items():
        dispatcher.add_app("apns", app, sender, concurrency=2, queue_size=10)
    dispatcher.start()
    return dispatcher


async def test_delivered_once_and_reported() -> None:
    clock = FakeClock()
    seen: list[Outcome] = []

    async def on_final(_m: PushMessage, o: Outcome) -> None:
        seen.append(o)

    sender = ScriptedSender()
    dispatcher = Dispatcher(clock, RetryPolicy(), on_final=on_final)
    dispatcher.add_app("apns", "ios-app", sender, 2, 10)
    dispatcher.start()
    outcome = await dispatcher.submit(message())
    await settle()
    assert outcome.kind is D and [o.kind for o in seen] == [D] and len(sender.sent) == 1
    await dispatcher.stop()
    assert sender.closed


async def test_retries_with_backoff_keep_the_notification_id() -> None:
    clock = FakeClock()
    sender = ScriptedSender([Outcome(R, "503"), Outcome(R, "timeout")])
    dispatcher = make(clock, **{"ios-app": sender})
    future = dispatcher.submit(message())
    await settle()
    assert len(sender.sent) == 1 and not future.done()
    await clock.advance(120)
    assert (await future).kind is D
    assert len(sender.sent) == 3
    assert len({m.notification_id for m in sender.sent}) == 1
    await dispatcher.stop()


async def test_retry_after_is_honoured() -> None:
    clock = FakeClock()
    sender = ScriptedSender([Outcome(R, "429", retry_after_seconds=40, quota=True)])
    dispatcher = make(clock, RetryPolicy(quota_backoff_seconds=5), **{"ios-app": sender})
    future = dispatcher.submit(message())
    await settle()
    await clock.advance(39)
    assert len(sender.sent) == 1
    await clock.advance(2)
    assert (await future).kind is D and len(sender.sent) == 2
    await dispatcher.stop()


async def test_quota_errors_back_off_at_least_the_quota_floor() -> None:
    clock = FakeClock()
    sender = ScriptedSender([Outcome(R, "429", quota=True)])
    dispatcher = make(clock, RetryPolicy(quota_backoff_seconds=30), **{"ios-app": sender})
    future = dispatcher.submit(message())
    await settle()
    await clock.advance(29)
    assert len(sender.sent) == 1
    await clock.advance(2)
    assert (await future).kind is D
    await dispatcher.stop()


async def test_attempts_are_bounded() -> None:
    clock = FakeClock()
    sender = ScriptedSender(default=Outcome(R, "500"))
    policy = RetryPolicy(max_attempts=3, circuit_failures=100)
    dispatcher = make(clock, policy, **{"ios-app": sender})
    future = dispatcher.submit(message())
    for _ in range(10):
        await settle()
        await clock.advance(60)
    outcome = await future
    assert outcome.kind is R and outcome.reason == "500" and len(sender.sent) == 3
    await dispatcher.stop()


async def test_total_deadline_gives_up_before_attempts_run_out() -> None:
    clock = FakeClock()
    sender = ScriptedSender(default=Outcome(R, "503", retry_after_seconds=100))
    policy = RetryPolicy(max_attempts=10, deadline_seconds=250, circuit_failures=100)
    dispatcher = make(clock, policy, **{"ios-app": sender})
    future = dispatcher.submit(message())
    await settle()
    for _ in range(10):
        await clock.advance(100)
        await settle()
    assert (await future).kind is R
    assert len(sender.sent) == 3  # at 0, 100 and 200 s; a fourth at 300 s would pass the 250 s deadline
    await dispatcher.stop()


async def test_dead_tokens_and_rejections_are_not_retried() -> None:
    clock = FakeClock()
    sender = ScriptedSender([Outcome(X, "410 Unregistered"), Outcome(OutcomeKind.REJECTED, "413")])
    dispatcher = make(clock, **{"ios-app": sender})
    assert (await dispatcher.submit(message())).kind is X
    assert (await dispatcher.submit(message())).kind is OutcomeKind.REJECTED
    assert len(sender.sent) == 2
    await dispatcher.stop()


async def test_config_failure_opens_the_circuit_until_a_trial_succeeds() -> None:
    clock = FakeClock()
    sender = ScriptedSender([Outcome(C, "403 InvalidProviderToken")])
    policy = RetryPolicy(circuit_open_seconds=30, max_attempts=5)
    dispatcher = make(clock, policy, **{"ios-app": sender})
    lane = dispatcher.lanes["ios-app"]
    first = dispatcher.submit(message(n=1))
    await settle()
    assert lane.state is CircuitState.OPEN
    others = [dispatcher.submit(message(n=i)) for i in range(2, 6)]
    await clock.advance(29)
    assert len(sender.sent) == 1  # nothing is sent while the circuit is open
    await clock.advance(2)
    await settle()
    results = await asyncio.gather(first, *others)
    assert [r.kind for r in results] == [D] * 5
    assert lane.state is CircuitState.CLOSED
    await dispatcher.stop()


async def test_a_failed_trial_reopens_the_circuit() -> None:
    clock = FakeClock()
    sender = ScriptedSender([Outcome(C, "403"), Outcome(C, "403")])
    dispatcher = make(clock, RetryPolicy(circuit_open_seconds=30), **{"ios-app": sender})
    lane = dispatcher.lanes["ios-app"]
    future = dispatcher.submit(message())
    await settle()
    await clock.advance(31)
    await settle()
    assert len(sender.sent) == 2 and lane.state is CircuitState.OPEN
    await clock.advance(31)
    assert (await future).kind is D and lane.state is CircuitState.CLOSED
    await dispatcher.stop()


async def test_transport_failures_open_the_circuit_after_a_run_of_them() -> None:
    clock = FakeClock()
    sender = ScriptedSender(default=Outcome(R, "timeout"))
    policy = RetryPolicy(circuit_failures=3, max_attempts=1)
    dispatcher = make(clock, policy, **{"ios-app": sender})
    lane = dispatcher.lanes["ios-app"]
    for n in range(2):
        await dispatcher.submit(message(n=n))
    assert lane.state is CircuitState.CLOSED
    await dispatcher.submit(message(n=3))
    assert lane.state is CircuitState.OPEN
    await dispatcher.stop()


async def test_a_stuck_app_does_not_delay_another() -> None:
    clock = FakeClock()
    stuck = ScriptedSender()
    stuck.gate = asyncio.Event()  # never set: every send hangs
    healthy = ScriptedSender()
    dispatcher = make(clock, **{"ios-app": stuck, "android-app": healthy})
    for n in range(8):
        dispatcher.submit(message("ios-app", n))
    await settle()
    results = [await dispatcher.submit(message("android-app", n)) for n in range(20)]
    assert all(r.kind is D for r in results) and len(healthy.sent) == 20
    assert len(stuck.sent) == 2  # its two workers are busy; the rest wait in its own queue
    stuck.gate.set()
    await dispatcher.stop()


async def test_queues_are_bounded_and_drop_the_oldest() -> None:
    clock = FakeClock()
    slow = ScriptedSender()
    slow.gate = asyncio.Event()
    dispatcher = make(clock, **{"ios-app": slow})
    lane = dispatcher.lanes["ios-app"]
    futures = [dispatcher.submit(message(n=n)) for n in range(2)]
    await settle()  # both workers now hold one each
    futures += [dispatcher.submit(message(n=n)) for n in range(2, 50)]
    await settle()
    assert lane.depth <= lane.queue_size
    dropped = [f for f in futures if f.done()]
    assert len(dropped) == 50 - 2 - 10  # two in flight, ten waiting
    assert all(f.result().reason == "dropped: queue full" for f in dropped)
    slow.gate.set()
    kept = await asyncio.gather(*(f for f in futures if f not in dropped))
    assert all(r.kind is D for r in kept)
    assert {m.registration_id for m in slow.sent} == {"r0", "r1", *(f"r{n}" for n in range(40, 50))}
    await dispatcher.stop()


async def test_unknown_app_is_rejected() -> None:
    dispatcher = make(FakeClock())
    assert (await dispatcher.submit(message("nope"))).kind is OutcomeKind.REJECTED
    await dispatcher.stop()


async def test_a_sender_that_raises_is_a_transport_failure() -> None:
    class Broken(ScriptedSender):
        async def send(self, msg: PushMessage) -> Outcome:
            raise RuntimeError("boom")

    dispatcher = make(FakeClock(), RetryPolicy(max_attempts=1), **{"ios-app": Broken()})
    outcome = await dispatcher.submit(message())
    assert outcome.kind is R and "RuntimeError" in outcome.reason
    await dispatcher.stop()
