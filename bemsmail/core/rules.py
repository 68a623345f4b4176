"""Per-device rules: whether one event alerts, silently updates the badge, or is skipped for one registration."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, tzinfo
from email.utils import parseaddr
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from bemsmail.core.model import DeviceSettings, EventKind, MailboxEvent, QuietHours, Registration, normalize_mailbox

__all__ = [
    "Action",
    "Reason",
    "RulePolicy",
    "Verdict",
    "decide",
    "folder_matches",
    "in_quiet_hours",
    "is_expired",
    "is_stale",
    "is_vip",
    "resolve_zone",
]

_DAY = timedelta(days=1)


class Action(enum.StrEnum):
    """What to do with one event for one device."""

    ALERT = "alert"  # shown to the user: alert, sound, badge
    SILENT = "silent"  # badge-only background update (quiet hours with silent_badge)
    SKIP = "skip"  # nothing is sent


class Reason(enum.StrEnum):
    """Why: a short, stable slug, used as a metrics label, so the set is small and never holds user data."""

    # ALERT
    MATCH = "match"  # passed every rule, no sender filter configured (or a meeting request)
    VIP = "vip"  # passed because the sender is a VIP
    IMPORTANT = "important"  # passed because the mail is marked high importance
    # SKIP
    STALE = "stale"
    NEW_MAIL_OFF = "new_mail_off"
    CALENDAR_OFF = "calendar_off"
    FOLDER = "folder"
    NOT_VIP = "not_vip"
    NOT_IMPORTANT = "not_important"
    NOT_VIP_OR_IMPORTANT = "not_vip_or_important"
    # SILENT, or SKIP when no badge update is wanted
    QUIET_HOURS = "quiet_hours"


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    reason: Reason


@dataclass(frozen=True, slots=True)
class RulePolicy:
    """Deployment-wide ageing of registrations (BEMS: AgingStaleUser after 72 h; deletion after 30 days)."""

    #: a registration not refreshed for longer than this gets no pushes
    stale_after: timedelta
    #: a registration not refreshed for longer than this is deleted
    delete_after: timedelta

    def __post_init__(self) -> None:
        if self.stale_after <= timedelta(0) or self.delete_after <= timedelta(0):
            raise ValueError("stale_after and delete_after must be positive")


def decide(registration: Registration, event: MailboxEvent, now: datetime, policy: RulePolicy) -> Verdict:
    """Decide what `registration` gets for `event` at `now`. The first rule that refuses wins, in this order:

    1. Stale (`is_stale`): SKIP `stale` — a device that stopped refreshing gets nothing.
    2. The event kind's toggle:
       - NEW_MAIL needs `new_mail` on (else SKIP `new_mail_off`) and the event's folder among `folders`
         (`folder_matches`; else SKIP `folder`).
       - MEETING_REQUEST needs `calendar` on (else SKIP `calendar_off`). Meeting requests arrive in the Inbox
         whatever the folder list says, so the calendar toggle alone governs them, not `folders`.
    3. Sender rules, for NEW_MAIL only (they are mail rules; a meeting request is governed by `calendar`):
       - `vip_senders` non-empty, `important_only` off: only mail from a VIP alerts (else SKIP `not_vip`).
       - `important_only` on, no VIPs: only importance "high" alerts (else SKIP `not_important`).
       - both: a VIP sender OR high importance alerts (else SKIP `not_vip_or_important`). Each rule widens what
         gets through rather than narrowing it, as in BlackBerry Work, where rules on "who an email is from and
         that it's been marked Important" each mark a message as one to be told about.
    4. Quiet hours (`in_quiet_hours`, device's time zone), for meeting requests too: SILENT `quiet_hours` when
       `quiet_hours.silent_badge` and `badge` are both on, otherwise SKIP `quiet_hours`.

    Otherwise ALERT, with reason `vip` or `important` when a sender rule let it through, else `match`.
    """
    if is_stale(registration, now, policy):
        return Verdict(Action.SKIP, Reason.STALE)
    settings = registration.settings
    if event.kind is EventKind.MEETING_REQUEST:
        if not settings.calendar:
            return Verdict(Action.SKIP, Reason.CALENDAR_OFF)
        passed = Reason.MATCH
    else:
        if not settings.new_mail:
            return Verdict(Action.SKIP, Reason.NEW_MAIL_OFF)
        if not folder_matches(settings, event.folder):
            return Verdict(Action.SKIP, Reason.FOLDER)
        sender_verdict = _sender_rules(settings, event)
        if isinstance(sender_verdict, Verdict):
            return sender_verdict
        passed = sender_verdict
    quiet = settings.quiet_hours
    if quiet is not None and in_quiet_hours(quiet, registration.timezone, now):
        if quiet.silent_badge and settings.badge:
            return Verdict(Action.SILENT, Reason.QUIET_HOURS)
        return Verdict(Action.SKIP, Reason.QUIET_HOURS)
    return Verdict(Action.ALERT, passed)


def _sender_rules(settings: DeviceSettings, event: MailboxEvent) -> Reason | Verdict:
    """The reason a mail passes the VIP/importance rules, or the SKIP verdict when it does not."""
    vip_rule = bool(settings.vip_senders)
    important_rule = settings.important_only
    if not vip_rule and not important_rule:
        return Reason.MATCH
    if vip_rule and is_vip(settings, event.sender):
        return Reason.VIP
    if important_rule and event.importance == "high":
        return Reason.IMPORTANT
    if vip_rule and important_rule:
        return Verdict(Action.SKIP, Reason.NOT_VIP_OR_IMPORTANT)
    return Verdict(Action.SKIP, Reason.NOT_VIP if vip_rule else Reason.NOT_IMPORTANT)


def folder_matches(settings: DeviceSettings, folder: str) -> bool:
    """Whether mail in `folder` is wanted: an exact name match ignoring case and surrounding blanks.

    Sources report the inbox under its well-known name "Inbox" whatever the mailbox's language calls it, and the
    default setting is ("Inbox",), so "inbox", "INBOX" and "Inbox" are one folder. Sub-folders are not implied:
    a device that wants "Inbox/Projects" lists it (BEMS subFolderNotification is opt-in per folder too)."""
    wanted = _fold(folder)
    # At most MAX_FOLDERS (50) short names: a scan is cheaper than building and caching a set per device.
    return any(_fold(name) == wanted for name in settings.folders)


def _fold(name: str) -> str:
    # casefold, not lower: folder names are user text in any language ("Straße" == "STRASSE").
    return name.strip().casefold()


def is_vip(settings: DeviceSettings, sender: str | None) -> bool:
    """Whether `sender` (a bare address or "Name <address>") is one of the device's VIP senders."""
    if not sender or not settings.vip_senders:
        return False
    _, address = parseaddr(sender)
    # The model stores VIPs through normalize_mailbox, so compare through the same function.
    return normalize_mailbox(address or sender) in settings.vip_senders


def is_stale(registration: Registration, now: datetime, policy: RulePolicy) -> bool:
    """Not refreshed for longer than `stale_after`: the device gets no pushes until it refreshes.

    Exactly `stale_after` old is still fresh, the same strict boundary the store's expiry sweep uses. A
    `last_seen_at` in the future (another node's clock ahead of ours) counts as just seen."""
    return _age(registration, now) > policy.stale_after


def is_expired(registration: Registration, now: datetime, policy: RulePolicy) -> bool:
    """Not refreshed for longer than `delete_after`: the registration is to be deleted.

    Strict, matching the store's sweep (`last_seen_at < now - delete_after`)."""
    return _age(registration, now) > policy.delete_after


def _age(registration: Registration, now: datetime) -> timedelta:
    return _as_utc(now) - _as_utc(registration.last_seen_at)


def in_quiet_hours(quiet: QuietHours, timezone: str | None, now: datetime) -> bool:
    """Whether `now` falls in the daily window [start, end) read on the device's wall clock.

    The window may cross midnight (22:00-07:00 holds 23:00 and 06:59, not 07:00). `timezone` is an IANA name;
    None, an unknown or a malformed name mean UTC (`resolve_zone`). Start and end are wall-clock times, so
    across daylight-saving changes the window follows what the user's clock shows:

    - fall back: a repeated local time is inside whenever the wall clock shows it, so both 01:30s of a
      New York fall-back night are inside 01:00-02:00 and the window lasts two real hours that night;
    - spring forward: a window starting in the skipped hour (Berlin 02:30 on the last Sunday of March) begins at
      the first real local time after it (03:00 CEST), and one ending in it ends there too. A window lying
      wholly in the skipped hour (02:15-02:45) has no instant that night.

    A zone attached to start or end is ignored: they are wall-clock times of the device's zone."""
    local = _as_utc(now).astimezone(resolve_zone(timezone)).time()  # naive; `fold` plays no part in comparisons
    start = quiet.start.replace(tzinfo=None)
    end = quiet.end.replace(tzinfo=None)
    return _in_window(local, start, end)


def _in_window(t: time, start: time, end: time) -> bool:
    if start < end:
        return start <= t < end
    # Crosses midnight: the complement of [end, start).
    return t >= start or t < end


def resolve_zone(name: str | None) -> tzinfo:
    """The zone for an IANA name; UTC for None or a name zoneinfo cannot load, so a bad value never stops a push.

    The API refuses unknown names at registration; this fallback covers data written before, or a tz database
    that lost a zone."""
    if name is None:
        return UTC
    return _load_zone(name)


@lru_cache(maxsize=1024)
def _load_zone(name: str) -> tzinfo:
    # Cached, failures included: zoneinfo caches only the zones it found, and a bad name would otherwise go to
    # the file system on every event for that device.
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # ValueError: absolute or "../" keys and corrupt files; OSError: e.g. a directory name on some platforms.
        return UTC


def _as_utc(moment: datetime) -> datetime:
    # The core's clock and the store give aware UTC; a naive value is read as UTC rather than as the host's local
    # time, which is what astimezone() would otherwise assume.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
