"""What a load test does, decided before it starts: the mailboxes, their devices and when each mail arrives."""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass
from enum import StrEnum


class Backend(StrEnum):
    EWS = "ews"
    GRAPH = "graph"


@dataclass(frozen=True, slots=True)
class Device:
    mailbox: str
    device_id: str
    platform: str  # "ios" | "android"
    token: str


@dataclass(frozen=True, slots=True)
class Mailbox:
    address: str
    backend: Backend
    devices: tuple[Device, ...]


@dataclass(frozen=True, slots=True)
class Shape:
    """The options of a run, validated by the command line."""

    mailboxes: int
    devices_per_mailbox: int = 1
    android_share: float = 0.5
    graph_share: float = 0.5
    rate: float = 100.0  # new mails per second (ignored with a burst)
    duration: float = 10.0  # seconds of mail at `rate`
    burst: int = 0  # this many mails at once instead of a rate
    seed: int = 1


@dataclass(frozen=True, slots=True)
class Plan:
    run_id: str
    mailboxes: tuple[Mailbox, ...]
    #: (seconds after the start, index into mailboxes), in time order
    mails: tuple[tuple[float, int], ...]

    @property
    def devices(self) -> list[Device]:
        return [d for m in self.mailboxes for d in m.devices]

    def count(self, backend: Backend) -> int:
        return sum(1 for m in self.mailboxes if m.backend is backend)

    @property
    def expected_pushes(self) -> int:
        return sum(len(self.mailboxes[i].devices) for _, i in self.mails)


def ios_token(run_id: str, n: int) -> str:
    return f"{run_id}{n:056x}"


def android_token(run_id: str, n: int) -> str:
    return f"lt{run_id}:{n:012d}-" + "x" * 16


def make_plan(shape: Shape, *, ews_domain: str, graph_domain: str, run_id: str | None = None) -> Plan:
    """Mailboxes `lt000000@domain`…; backends and platforms by share (spread evenly, not at random, so small runs
    still have both); mail goes round-robin through the mailboxes in a shuffled order, so one mailbox gets a new
    mail only every `mailboxes / rate` seconds and the relay has nothing to coalesce unless that is shorter than
    its window."""
    run = run_id or secrets.token_hex(4)
    rng = random.Random(shape.seed)  # noqa: S311 - a repeatable order, not a secret
    boxes: list[Mailbox] = []
    device_no = 0
    per_backend = dict.fromkeys(Backend, 0)  # platforms are spread within each backend, so both get both
    for n in range(shape.mailboxes):
        backend = Backend.GRAPH if _picked(n, shape.graph_share) else Backend.EWS
        address = f"lt{n:06d}@{graph_domain if backend is Backend.GRAPH else ews_domain}"
        devices = []
        for d in range(shape.devices_per_mailbox):
            android = _picked(per_backend[backend], shape.android_share)
            per_backend[backend] += 1
            platform = "android" if android else "ios"
            token = android_token(run, device_no) if android else ios_token(run, device_no)
            devices.append(Device(address, f"lt-{platform}-{d}", platform, token))
            device_no += 1
        boxes.append(Mailbox(address, backend, tuple(devices)))
    order = list(range(len(boxes)))
    rng.shuffle(order)
    if shape.burst:
        mails = tuple((0.0, order[i % len(order)]) for i in range(shape.burst))
    else:
        total = round(shape.rate * shape.duration)
        mails = tuple((i / shape.rate, order[i % len(order)]) for i in range(total))
    return Plan(run, tuple(boxes), mails)


def _picked(n: int, share: float) -> bool:
    """Whether item n is picked when `share` of the items are, spread evenly (e.g. every other one at 0.5)."""
    return int((n + 1) * share) > int(n * share)
