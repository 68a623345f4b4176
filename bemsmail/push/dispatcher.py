"""The dispatcher: one bulkhead per app (bounded queue, fixed workers, circuit breaker) in front of its sender,
retrying what the providers' libraries do not, with backoff, jitter, Retry-After and a total deadline.

A slow or broken app only fills its own queue and occupies its own workers, so it cannot delay any other app.
Every submitted message ends in exactly one final `Outcome`, handed to the `on_final` callback (the relay's
recorder) and to the future `submit` returns.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import structlog

from bemsmail.core.model import Outcome, OutcomeKind, PushMessage
from bemsmail.core.ports import Clock, PushSender

log = structlog.get_logger(__name__)

FinalHandler = Callable[[PushMessage, Outcome], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    deadline_seconds: float = 300.0
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 60.0
    quota_backoff_seconds: float = 30.0
    circuit_failures: int = 5
    circuit_open_seconds: float = 30.0
    config_failure_log_seconds: float = 300.0

    def delay(self, attempt: int, outcome: Outcome, rnd: random.Random) -> float:
        """Full-jitter exponential backoff; never shorter than the provider's Retry-After or the quota floor."""
        ceiling = min(self.backoff_max_seconds, self.backoff_initial_seconds * 2 ** (attempt - 1))
        delay = rnd.uniform(0, ceiling)
        if outcome.quota:
            delay = max(delay, self.quota_backoff_seconds)
        if outcome.retry_after_seconds is not None:
            delay = max(delay, outcome.retry_after_seconds)
        return delay


class CircuitState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class LaneObserver:
    """What a lane reports; the metrics adapter overrides these. The default does nothing."""

    def sent(self, lane: Lane, outcome: Outcome, seconds: float) -> None: ...

    def final(self, lane: Lane, outcome: Outcome, attempts: int) -> None: ...

    def dropped(self, lane: Lane, reason: str) -> None: ...

    def depth(self, lane: Lane) -> None: ...

    def circuit(self, lane: Lane) -> None: ...


@dataclass(slots=True)
class _Job:
    message: PushMessage
    deadline: float
    future: asyncio.Future[Outcome]
    attempts: int = 0
    last: Outcome | None = field(default=None)


class Lane:
    """One app's bulkhead."""

    def __init__(self, provider: str, app_id: str, sender: PushSender, concurrency: int, queue_size: int,
                 policy: RetryPolicy, clock: Clock, finish: Callable[[_Job, Outcome], None],
                 observer: LaneObserver, rnd: random.Random) -> None:
        self.provider = provider
        self.app_id = app_id
        self.sender = sender
        self.concurrency = concurrency
        self.queue_size = queue_size
        self._policy = policy
        self._clock = clock
        self._finish = finish
        self._observer = observer
        self._rnd = rnd
        self._queue: collections.deque[_Job] = collections.deque()
        self._idle: collections.deque[asyncio.Future[None]] = collections.deque()
        self._workers: list[asyncio.Task[None]] = []
        self._waiting_retries: set[asyncio.Task[None]] = set()
        self.in_flight = 0
        self.state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_running = False
        self._last_config_log = -float("inf")
        self._closing = False

    # --- queue ---------------------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._queue) + len(self._waiting_retries)

    def enqueue(self, job: _Job, front: bool = False) -> None:
        if self.depth >= self.queue_size:
            # The newest notification carries the latest badge and mail: drop the oldest waiting one.
            oldest = self._queue.popleft() if self._queue else None
            if oldest is None:
                self._finish(job, Outcome(OutcomeKind.RETRY, "dropped: queue full"))
                self._observer.dropped(self, "queue_full")
                return
            self._finish(oldest, Outcome(OutcomeKind.RETRY, "dropped: queue full"))
            self._observer.dropped(self, "queue_full")
        if front:
            self._queue.appendleft(job)
        else:
            self._queue.append(job)
        self._observer.depth(self)
        self._wake()

    def _wake(self, count: int = 1) -> None:
        """Hand work to up to `count` idle workers."""
        while count and self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    # --- workers -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(), name=f"push-{self.app_id}-{n}")
                         for n in range(self.concurrency)]

    async def _next(self) -> _Job:
        loop = asyncio.get_running_loop()
        while True:
            if self._queue and self._may_send():
                return self._queue.popleft()
            waiter: asyncio.Future[None] = loop.create_future()
            if len(self._idle) > 4 * self.concurrency:  # drop waiters abandoned by timed waits
                self._idle = collections.deque(w for w in self._idle if not w.done())
            self._idle.append(waiter)
            if self.state is not CircuitState.OPEN:
                await waiter
                continue
            # Open circuit: sleep until the trial is due, unless woken earlier.
            remaining = max(0.0, self._opened_at + self._policy.circuit_open_seconds - self._clock.monotonic())
            sleeper = asyncio.ensure_future(self._clock.sleep(remaining))
            try:
                await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waiter.cancel()

    def _may_send(self) -> bool:
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN and \
                self._clock.monotonic() >= self._opened_at + self._policy.circuit_open_seconds:
            self.state = CircuitState.HALF_OPEN
            self._observer.circuit(self)
        if self.state is CircuitState.HALF_OPEN and not self._trial_running:
            self._trial_running = True  # exactly one trial push while half-open
            return True
        return False

    async def _work(self) -> None:
        while True:
            job = await self._next()
            self._observer.depth(self)
            if self._clock.monotonic() >= job.deadline:
                self._trial_done(None)
                self._finish(job, job.last or Outcome(OutcomeKind.RETRY, "deadline passed before sending"))
                continue
            job.attempts += 1
            self.in_flight += 1
            started = self._clock.monotonic()
            try:
                outcome = await self.sender.send(job.message)
            except Exception as exc:  # a sender broke its contract; treat as a transport failure, keep going
                log.exception("push_sender_raised", provider=self.provider, app=self.app_id)
                outcome = Outcome(OutcomeKind.RETRY, f"sender raised {type(exc).__name__}")
            finally:
                self.in_flight -= 1
            self._observer.sent(self, outcome, self._clock.monotonic() - started)
            job.last = outcome
            self._trial_done(outcome)
            self._after(job, outcome)

    def _trial_done(self, outcome: Outcome | None) -> None:
        """A half-open circuit's trial is over once a send settled the state, or was skipped (deadline)."""
        if outcome is not None:
            self._track(outcome)
        if self.state is not CircuitState.HALF_OPEN or outcome is None:
            self._trial_running = False

    def _track(self, outcome: Outcome) -> None:
        """Circuit breaker: a configuration failure opens at once (a bad key does not heal by itself);
        consecutive transport failures open it after `circuit_failures`; any answer from the provider about the
        message (delivered, invalid token, rejected, quota) proves the app's path works."""
        broken = outcome.kind is OutcomeKind.CONFIG_FAILURE or (
            outcome.kind is OutcomeKind.RETRY and not outcome.quota
        )
        if not broken:
            self._failures = 0
            if self.state is not CircuitState.CLOSED:
                self.state = CircuitState.CLOSED
                self._trial_running = False
                log.info("push_circuit_closed", provider=self.provider, app=self.app_id)
                self._observer.circuit(self)
                self._wake_all()
            return
        self._failures += 1
        if outcome.kind is OutcomeKind.CONFIG_FAILURE:
            now = self._clock.monotonic()
            if now - self._last_config_log >= self._policy.config_failure_log_seconds:
                self._last_config_log = now
                log.error("push_config_failure", provider=self.provider, app=self.app_id, reason=outcome.reason)
        if self.state is CircuitState.HALF_OPEN or outcome.kind is OutcomeKind.CONFIG_FAILURE or \
                self._failures >= self._policy.circuit_failures:
            if self.state is not CircuitState.OPEN:
                log.warning("push_circuit_opened", provider=self.provider, app=self.app_id, reason=outcome.reason)
            self.state = CircuitState.OPEN
            self._opened_at = self._clock.monotonic()
            self._trial_running = False
            self._observer.circuit(self)
            self._wake_all()  # idle workers switch to a timed wait for the trial

    def _wake_all(self) -> None:
        self._wake(self.concurrency)

    def _after(self, job: _Job, outcome: Outcome) -> None:
        retryable = outcome.kind is OutcomeKind.RETRY or outcome.kind is OutcomeKind.CONFIG_FAILURE
        if not retryable or job.attempts >= self._policy.max_attempts or self._closing:
            self._finish(job, outcome)
            return
        if outcome.kind is OutcomeKind.CONFIG_FAILURE:
            self.enqueue(job, front=True)  # waits for the circuit's trial; never deletes anything
            return
        delay = self._policy.delay(job.attempts, outcome, self._rnd)
        if self._clock.monotonic() + delay >= job.deadline:
            self._finish(job, outcome)
            return
        task = asyncio.create_task(self._retry_later(job, delay))
        self._waiting_retries.add(task)
        task.add_done_callback(self._waiting_retries.discard)

    async def _retry_later(self, job: _Job, delay: float) -> None:
        await self._clock.sleep(delay)
        me = asyncio.current_task()
        if me is not None:
            self._waiting_retries.discard(me)  # no longer waiting: do not count it twice in the depth
        self.enqueue(job, front=True)

    # --- shutdown ------------------------------------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Let queued pushes go out for up to `grace` seconds, then give up on the rest and close the sender."""
        self._closing = True
        for task in list(self._waiting_retries):
            task.cancel()
        waited = 0.0
        while (self._queue or self.in_flight) and waited < grace and self.state is CircuitState.CLOSED:
            await asyncio.sleep(0.05)
            waited += 0.05
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        while self._queue:
            self._finish(self._queue.popleft(), Outcome(OutcomeKind.RETRY, "dropped: shutting down"))
        await self.sender.close()


class Dispatcher:
    """Routes each push to its app's lane. `submit` never blocks: a full lane drops its oldest waiting push."""

    def __init__(self, clock: Clock, policy: RetryPolicy, on_final: FinalHandler | None = None,
                 observer: LaneObserver | None = None, seed: int | None = None) -> None:
        self._clock = clock
        self._policy = policy
        self._on_final = on_final
        self._observer = observer or LaneObserver()
        self._rnd = random.Random(seed)  # noqa: S311 - jitter, not security
        self._lanes: dict[str, Lane] = {}
        self._callbacks: set[asyncio.Task[None]] = set()

    @property
    def lanes(self) -> Mapping[str, Lane]:
        return self._lanes

    def add_app(self, provider: str, app_id: str, sender: PushSender, concurrency: int, queue_size: int) -> Lane:
        lane = Lane(provider, app_id, sender, concurrency, queue_size, self._policy, self._clock, self._finish,
                    self._observer, self._rnd)
        self._lanes[app_id] = lane
        return lane

    def start(self) -> None:
        for lane in self._lanes.values():
            lane.start()

    def submit(self, message: PushMessage) -> asyncio.Future[Outcome]:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        job = _Job(message, self._clock.monotonic() + self._policy.deadline_seconds, future)
        lane = self._lanes.get(message.app_id)
        if lane is None:
            self._finish(job, Outcome(OutcomeKind.REJECTED, "no such app"))
        else:
            lane.enqueue(job)
        return future

    def _finish(self, job: _Job, outcome: Outcome) -> None:
        if job.future.done():
            return
        job.future.set_result(outcome)
        lane = self._lanes.get(job.message.app_id)
        if lane is not None:
            self._observer.final(lane, outcome, job.attempts)
        if self._on_final is not None:
            task = asyncio.get_running_loop().create_task(self._report(job.message, outcome))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)

    async def _report(self, message: PushMessage, outcome: Outcome) -> None:
        assert self._on_final is not None
        try:
            await self._on_final(message, outcome)
        except Exception:
            log.exception("push_outcome_handler_failed", app=message.app_id)

    async def stop(self, grace: float = 5.0) -> None:
        await asyncio.gather(*(lane.stop(grace) for lane in self._lanes.values()))
        if self._callbacks:
            await asyncio.gather(*list(self._callbacks), return_exceptions=True)
