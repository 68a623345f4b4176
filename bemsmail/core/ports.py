"""The interfaces the core talks through; adapters implement them, the composition root wires them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

from bemsmail.core.model import (
    Backend,
    ItemDetails,
    Outcome,
    PushMessage,
    Registration,
    RegistrationInput,
    UpsertResult,
)

T = TypeVar("T")


class Clock(Protocol):
    """Time as the core sees it; tests drive a fake one so nothing sleeps for real."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class Store(Protocol):
    """Durable state: mailboxes, registrations, subscriptions, nodes."""

    async def upsert_registration(
        self, data: RegistrationInput, tenant: str | None, backend: Backend
    ) -> UpsertResult:
        """Insert or update keyed by (mailbox, device_id); a token held elsewhere is moved, never duplicated."""
        ...

    async def get_registration(self, registration_id: str) -> Registration | None: ...

    async def list_registrations(self, mailbox: str) -> Sequence[Registration]: ...

    async def update_registration(
        self, registration_id: str, changes: Mapping[str, object]
    ) -> Registration | None:
        """Apply field changes (keys of RegistrationInput other than mailbox/device_id); None if absent."""
        ...

    async def delete_registration(self, registration_id: str) -> Registration | None: ...

    async def delete_invalid_registration(
        self, registration_id: str, token: str, invalid_since: datetime | None
    ) -> Registration | None:
        """Delete if it still holds `token` and was not updated at or after `invalid_since`."""
        ...

    async def mark_pushed(self, registration_ids: Sequence[str], at: datetime) -> None: ...

    async def delete_expired_registrations(self, seen_before: datetime, limit: int) -> Sequence[Registration]: ...

    async def ping(self) -> None:
        """Raise if the database cannot be reached."""
        ...

    async def schema_status(self) -> SchemaStatus: ...


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """Where the database schema stands against the migrations this build ships."""

    current: str | None
    head: str

    @property
    def is_current(self) -> bool:
        return self.current == self.head


Handler = Callable[[T], Awaitable[None]]


class Bus(Protocol):
    """Fan-out of domain messages between the parts of one node and, in a cluster, between nodes."""

    async def publish(self, topic: str, message: object) -> None: ...

    def subscribe(self, topic: str, handler: Handler[object]) -> None: ...


class Ownership(Protocol):
    """Answers "does this node watch this mailbox?"; a single node owns them all, a cluster shards them."""

    def owns(self, mailbox: str) -> bool: ...


class MailSource(Protocol):
    """Watches mailboxes of one backend (EWS, Graph) and hands what happens in them to the relay.

    `watch` and `unwatch` return at once: the source subscribes, catches up and reconnects on its own, and keeps
    trying while the mailbox stays watched. Calling `watch` again with other folders changes what is watched."""

    async def start(self) -> None: ...

    async def watch(self, mailbox: str, folders: frozenset[str]) -> None: ...

    async def unwatch(self, mailbox: str) -> None: ...

    async def stop(self) -> None: ...


class MailDetails(Protocol):
    """What the relay may ask a source when a device's rules or rich content need more than the notification."""

    async def item_details(self, mailbox: str, item_ids: Sequence[str]) -> Mapping[str, ItemDetails]:
        """Details of the items that still exist; missing ones are left out."""
        ...

    async def unread_count(self, mailbox: str) -> int | None:
        """The Inbox's unread count for the badge; None when it cannot be had quickly."""
        ...


class PushSender(Protocol):
    """Delivers pushes for one app to its provider and says what happened, in the core's terms.

    `send` never raises for anything the provider or the network did and never waits past its own deadline:
    a timeout, reset or refused connection is an `Outcome` of kind RETRY."""

    async def start(self) -> None:
        """Open connections and fetch credentials; failures are logged and left to the first sends to retry."""
        ...

    async def send(self, message: PushMessage) -> Outcome: ...

    def credential_expiry(self) -> datetime | None:
        """When the credential (APNs certificate, …) stops working, if it is known to expire."""
        ...

    async def close(self) -> None: ...
