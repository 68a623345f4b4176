"""Domain types shared by every part of bemsmail: mailboxes, registrations, settings, events, pushes, outcomes."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

MAX_DEVICE_ID = 200
MAX_APP_ID = 200
MAX_TOKEN = 4096
MAX_FOLDERS = 50
MAX_VIP_SENDERS = 500

_EMAILISH = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}$")


def normalize_mailbox(address: str) -> str:
    """Return the one identity of a mailbox everywhere in bemsmail: the lower-cased SMTP address."""
    return address.strip().lower()


def token_fingerprint(token: str) -> str:
    """A stable, non-reversible handle for a push token: safe to index, log and compare."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Platform(enum.StrEnum):
    IOS = "ios"
    ANDROID = "android"


class Environment(enum.StrEnum):
    PRODUCTION = "production"
    SANDBOX = "sandbox"


class Backend(enum.StrEnum):
    """Where a mailbox lives and how it is watched."""

    EWS = "ews"
    GRAPH = "graph"
    UNASSIGNED = "unassigned"


class MailboxState(enum.StrEnum):
    ACTIVE = "active"
    IDLE = "idle"


class QuietHours(BaseModel):
    """A daily window, in the device's time zone, in which alerts are withheld; may cross midnight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: time
    end: time
    silent_badge: bool = Field(False, description="Still send a silent badge update during quiet hours.")

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHours:
        if self.start == self.end:
            raise ValueError("quiet_hours start and end must differ")
        return self


ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)]


class DeviceSettings(BaseModel):
    """What one device wants to be told about, and how. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    new_mail: bool = True
    calendar: bool = True
    folders: tuple[ShortText, ...] = Field(("Inbox",), max_length=MAX_FOLDERS)
    vip_senders: tuple[ShortText, ...] = Field((), max_length=MAX_VIP_SENDERS)
    important_only: bool = False
    quiet_hours: QuietHours | None = None
    content: Literal["minimal", "rich"] = "minimal"
    badge: bool = True
    sound: Annotated[str, StringConstraints(max_length=64)] | None = "default"

    @field_validator("vip_senders")
    @classmethod
    def _vip_addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            if not _EMAILISH.match(address):
                raise ValueError("each VIP sender must be an e-mail address")
        return tuple(normalize_mailbox(a) for a in value)


@dataclass(frozen=True, slots=True)
class Registration:
    """One device's push registration for one mailbox."""

    id: str
    mailbox: str
    device_id: str
    platform: Platform
    token: str = field(repr=False)
    app_id: str
    environment: Environment
    locale: str | None
    timezone: str | None
    settings: DeviceSettings
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime
    last_push_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class RegistrationInput:
    """What a client asks to store; the store fills in id and timestamps."""

    mailbox: str
    device_id: str
    platform: Platform
    token: str = field(repr=False)
    app_id: str
    environment: Environment = Environment.PRODUCTION
    locale: str | None = None
    timezone: str | None = None
    settings: DeviceSettings = field(default_factory=DeviceSettings)


@dataclass(frozen=True, slots=True)
class UpsertResult:
    registration: Registration
    created: bool
    #: registrations that held the same token under another mailbox/device and were removed
    displaced: tuple[Registration, ...] = ()
    #: the folders the registration asked for before this upsert (none when it was created)
    folders_before: tuple[str, ...] = ()


class EventKind(enum.StrEnum):
    NEW_MAIL = "new_mail"
    MEETING_REQUEST = "meeting_request"


@dataclass(frozen=True, slots=True)
class MailboxEvent:
    """Something happened in a watched mailbox that a device may want to hear about."""

    mailbox: str
    folder: str
    item_id: str
    kind: EventKind
    received_at: datetime
    sender: str | None = None
    subject: str | None = None
    importance: Literal["low", "normal", "high"] = "normal"
    unread_count: int | None = None
    #: sender, subject, importance and kind come from the item itself (not guessed from a bare notification)
    details_known: bool = False

    @property
    def dedupe_key(self) -> str:
        """The same item seen twice (reconnect, catch-up, redelivered webhook) has the same key. The kind is not
        part of it: a stream may report a meeting request as new mail before its details are known."""
        return f"{self.mailbox}\x1f{self.item_id}"

    def with_details(self, details: ItemDetails) -> MailboxEvent:
        return dataclasses.replace(self, kind=details.kind, sender=details.sender, subject=details.subject,
                                   importance=details.importance, details_known=True)


@dataclass(frozen=True, slots=True)
class ItemDetails:
    """What a source can tell about one item when asked (EWS GetItem, Graph GET message)."""

    kind: EventKind
    sender: str | None = None
    subject: str | None = None
    importance: Literal["low", "normal", "high"] = "normal"


@dataclass(frozen=True, slots=True)
class FolderState:
    """What a source keeps per watched folder so that nothing is lost across reconnects, restarts and moves:
    where its change feed stands (EWS SyncState, Graph delta link), its remote subscription, and how far
    items have already been handed on."""

    mailbox: str
    folder: str
    sync_state: str | None = None
    seen_through: datetime | None = None
    remote_id: str | None = None
    watermark: str | None = None
    #: the items handed on that were received at exactly `seen_through` (times may have whole seconds only);
    #: Graph: the latest items handed on (its notifications carry no receive time)
    seen_ids: tuple[str, ...] = ()
    #: Graph: a digest of the subscription's clientState (the secret itself is never stored) and its expiry
    client_state: str | None = None
    expires_at: datetime | None = None

    def handed_on(self, item_id: str, received: datetime) -> bool:
        """Whether catch-up would repeat an item already handed on."""
        if self.seen_through is None:
            return False
        return received < self.seen_through or (received == self.seen_through and item_id in self.seen_ids)

    def after(self, item_id: str, received: datetime, keep: int = 64) -> FolderState:
        """This state once `item_id`, received at `received`, has been handed on."""
        if self.seen_through is None or received > self.seen_through:
            return dataclasses.replace(self, seen_through=received, seen_ids=(item_id,))
        if received == self.seen_through and item_id not in self.seen_ids:
            return dataclasses.replace(self, seen_ids=(*self.seen_ids, item_id)[-keep:])
        return self


class Priority(enum.IntEnum):
    BACKGROUND = 5
    ALERT = 10


class PushKind(enum.StrEnum):
    ALERT = "alert"  # shown to the user (alert, sound, badge)
    BADGE = "badge"  # only the badge changes (quiet hours with silent_badge): no alert, no sound, low priority
    BACKGROUND = "background"  # content-available: wakes the app to fetch; nothing shown


class Category(enum.StrEnum):
    """What the app shows actions for; also the localization key of the content-free alert."""

    NEW_MAIL = "NEW_MAIL"
    MEETING_REQUEST = "MEETING_REQUEST"


@dataclass(frozen=True, slots=True)
class RichContent:
    """Mail details shown on the lock screen; only when the device and tenant ask for rich content,
    since they pass through Apple's and Google's servers."""

    sender: str | None = None
    subject: str | None = None
    importance: Literal["low", "normal", "high"] = "normal"


@dataclass(frozen=True, slots=True)
class PushMessage:
    """One push to one device, provider-neutral; adapters render it as an APNs or FCM request.

    `notification_id` stays the same on every retry of one notification (it becomes the apns-id), so a
    device or provider can tell a re-send from a new notification."""

    registration_id: str
    mailbox: str
    platform: Platform
    app_id: str
    environment: Environment
    token: str = field(repr=False)
    notification_id: str
    kind: PushKind
    category: Category
    collapse_id: str
    priority: Priority
    expires_at: datetime
    badge: int | None = None
    sound: str | None = None
    rich: RichContent | None = None
    #: sent to the app as data (strings only): the account hint, folder, event count, newest item's id
    data: dict[str, str] = field(default_factory=dict)


class OutcomeKind(enum.StrEnum):
    DELIVERED = "delivered"
    INVALID_TOKEN = "invalid_token"  # noqa: S105 - an outcome name, not a secret
    RETRY = "retry"
    CONFIG_FAILURE = "config_failure"
    #: the provider refused this one message for a reason that retrying will not change (too big, bad topic)
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a provider said about one push, translated out of HTTP into the core's terms."""

    kind: OutcomeKind
    reason: str = ""
    retry_after_seconds: float | None = None
    #: when the provider says the token stopped being valid (APNs 410 timestamp)
    invalid_since: datetime | None = None
    #: a quota or rate limit, not a fault: back off for longer
    quota: bool = False


class RegistrationChange(enum.StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class RegistrationChanged:
    """Published on the bus whenever a mailbox's set of registrations changes."""

    mailbox: str
    registration_id: str
    change: RegistrationChange
    #: the registration's folders after and before the change, where the publisher knows both (a created one had
    #: none before): a change that neither adds nor drops a folder of the mailbox's watch needs no re-read of it
    folders: tuple[str, ...] | None = None
    folders_before: tuple[str, ...] | None = None
