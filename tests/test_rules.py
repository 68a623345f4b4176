"""Per-device rules: toggles, folders, VIP and importance, quiet hours across midnight and DST, stale and expired."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta, timezone
from typing import Any, Literal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bemsmail.core.model import (
    DeviceSettings,
    Environment,
    EventKind,
    MailboxEvent,
    Platform,
    QuietHours,
    Registration,
)
from bemsmail.core.rules import (
    Action,
    Reason,
    RulePolicy,
    Verdict,
    decide,
    folder_matches,
    in_quiet_hours,
    is_expired,
    is_stale,
    is_vip,
    resolve_zone,
)

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)  # a Monday, noon UTC, no DST change near
POLICY = RulePolicy(stale_after=timedelta(hours=72), delete_after=timedelta(days=30))
VIP = "boss@example.com"


def registration(*, timezone_name: str | None = "UTC", seen: datetime = NOW, **settings: Any) -> Registration:
    return Registration(
        id="r1", mailbox="alice@example.com", device_id="d1", platform=Platform.IOS, token="00" * 32,
        app_id="com.example.mail", environment=Environment.PRODUCTION, locale=None, timezone=timezone_name,
        settings=DeviceSettings(**settings), created_at=seen, updated_at=seen, last_seen_at=seen,
    )


def event(*, kind: EventKind = EventKind.NEW_MAIL, folder: str = "Inbox", sender: str | None = "bob@example.com",
          importance: Literal["low", "normal", "high"] = "normal") -> MailboxEvent:
    return MailboxEvent(mailbox="alice@example.com", folder=folder, item_id="i1", kind=kind, received_at=NOW,
                        sender=sender, importance=importance)


def quiet(start: str | time, end: str | time, *, silent_badge: bool = False) -> QuietHours:
    return QuietHours(start=start, end=end, silent_badge=silent_badge)


def at(zone: str, year: int, month: int, day: int, hour: int, minute: int, *, fold: int = 0) -> datetime:
    """A local wall-clock time in `zone` (fold=1: the second of a repeated time), as the UTC instant the clock gives."""
    return datetime(year, month, day, hour, minute, tzinfo=ZoneInfo(zone), fold=fold).astimezone(UTC)


# --- decide: every branch -----------------------------------------------------------------------------------


def test_default_settings_alert_on_inbox_mail_and_meeting_requests() -> None:
    assert decide(registration(), event(), NOW, POLICY) == Verdict(Action.ALERT, Reason.MATCH)
    meeting = event(kind=EventKind.MEETING_REQUEST)
    assert decide(registration(), meeting, NOW, POLICY) == Verdict(Action.ALERT, Reason.MATCH)


def test_stale_registrations_get_nothing_whatever_the_event() -> None:
    old = registration(seen=NOW - timedelta(hours=73), vip_senders=(VIP,))
    for e in (event(), event(sender=VIP, importance="high"), event(kind=EventKind.MEETING_REQUEST)):
        assert decide(old, e, NOW, POLICY) == Verdict(Action.SKIP, Reason.STALE)


def test_new_mail_toggle_governs_mail_only() -> None:
    off = registration(new_mail=False)
    assert decide(off, event(), NOW, POLICY) == Verdict(Action.SKIP, Reason.NEW_MAIL_OFF)
    assert decide(off, event(kind=EventKind.MEETING_REQUEST), NOW, POLICY).action is Action.ALERT


def test_calendar_toggle_governs_meeting_requests_only() -> None:
    off = registration(calendar=False)
    assert decide(off, event(kind=EventKind.MEETING_REQUEST), NOW, POLICY) == Verdict(Action.SKIP,
                                                                                       Reason.CALENDAR_OFF)
    assert decide(off, event(), NOW, POLICY).action is Action.ALERT


def test_mail_outside_the_chosen_folders_is_skipped() -> None:
    reg = registration(folders=("Inbox", "Projects"))
    assert decide(reg, event(folder="Archive"), NOW, POLICY) == Verdict(Action.SKIP, Reason.FOLDER)
    assert decide(reg, event(folder="projects"), NOW, POLICY).action is Action.ALERT


def test_meeting_requests_ignore_the_folder_list() -> None:
    reg = registration(folders=("Projects",))
    assert decide(reg, event(kind=EventKind.MEETING_REQUEST, folder="Inbox"), NOW, POLICY).action is Action.ALERT
    assert decide(reg, event(folder="Inbox"), NOW, POLICY) == Verdict(Action.SKIP, Reason.FOLDER)


@pytest.mark.parametrize("name", ["Inbox", "inbox", "INBOX", " Inbox ", "iNbOx"])
def test_inbox_matches_whatever_its_case(name: str) -> None:
    assert folder_matches(DeviceSettings(), name)
    assert folder_matches(DeviceSettings(folders=(name.strip(),)), "Inbox")


def test_folder_names_are_casefolded_and_sub_folders_are_not_implied() -> None:
    settings = DeviceSettings(folders=("Straße",))
    assert folder_matches(settings, "STRASSE")
    assert not folder_matches(DeviceSettings(), "Inbox/Projects")
    assert folder_matches(DeviceSettings(folders=("Inbox/Projects",)), "inbox/projects")


def test_vip_senders_only_alert_for_vips() -> None:
    reg = registration(vip_senders=("Boss@Example.com",))  # the model lower-cases VIP addresses
    assert decide(reg, event(sender=VIP), NOW, POLICY) == Verdict(Action.ALERT, Reason.VIP)
    assert decide(reg, event(sender="Big Boss <BOSS@example.COM>"), NOW, POLICY).reason is Reason.VIP
    assert decide(reg, event(), NOW, POLICY) == Verdict(Action.SKIP, Reason.NOT_VIP)
    assert decide(reg, event(sender=None), NOW, POLICY) == Verdict(Action.SKIP, Reason.NOT_VIP)
    # high importance does not get a non-VIP through unless important_only says so
    assert decide(reg, event(importance="high"), NOW, POLICY) == Verdict(Action.SKIP, Reason.NOT_VIP)


@pytest.mark.parametrize(("importance", "expected"), [
    ("high", Verdict(Action.ALERT, Reason.IMPORTANT)),
    ("normal", Verdict(Action.SKIP, Reason.NOT_IMPORTANT)),
    ("low", Verdict(Action.SKIP, Reason.NOT_IMPORTANT)),
])
def test_important_only_alerts_for_high_importance(importance: Literal["low", "normal", "high"],
                                                   expected: Verdict) -> None:
    reg = registration(important_only=True)
    assert decide(reg, event(importance=importance), NOW, POLICY) == expected
    assert decide(reg, event(importance=importance, sender=VIP), NOW, POLICY) == expected  # no VIP list set


@pytest.mark.parametrize(("sender", "importance", "expected"), [
    (VIP, "normal", Verdict(Action.ALERT, Reason.VIP)),
    (VIP, "high", Verdict(Action.ALERT, Reason.VIP)),
    ("bob@example.com", "high", Verdict(Action.ALERT, Reason.IMPORTANT)),
    ("bob@example.com", "normal", Verdict(Action.SKIP, Reason.NOT_VIP_OR_IMPORTANT)),
    (None, "low", Verdict(Action.SKIP, Reason.NOT_VIP_OR_IMPORTANT)),
])
def test_vip_and_important_together_let_either_through(sender: str | None,
                                                        importance: Literal["low", "normal", "high"],
                                                        expected: Verdict) -> None:
    reg = registration(vip_senders=(VIP,), important_only=True)
    assert decide(reg, event(sender=sender, importance=importance), NOW, POLICY) == expected


def test_sender_rules_do_not_filter_meeting_requests() -> None:
    reg = registration(vip_senders=(VIP,), important_only=True)
    meeting = event(kind=EventKind.MEETING_REQUEST, sender="bob@example.com", importance="low")
    assert decide(reg, meeting, NOW, POLICY) == Verdict(Action.ALERT, Reason.MATCH)


def test_is_vip_handles_display_names_and_missing_senders() -> None:
    settings = DeviceSettings(vip_senders=(VIP,))
    assert is_vip(settings, "  BOSS@example.com ")
    assert is_vip(settings, '"Boss, The" <boss@example.com>')
    assert not is_vip(settings, "boss@example.org")
    assert not is_vip(settings, None)
    assert not is_vip(settings, "")
    assert not is_vip(DeviceSettings(), VIP)


@pytest.mark.parametrize(("silent_badge", "badge", "action"), [
    (True, True, Action.SILENT),
    (True, False, Action.SKIP),
    (False, True, Action.SKIP),
    (False, False, Action.SKIP),
])
def test_quiet_hours_give_a_silent_badge_or_nothing(silent_badge: bool, badge: bool, action: Action) -> None:
    reg = registration(quiet_hours=quiet("11:00", "13:00", silent_badge=silent_badge), badge=badge)
    assert decide(reg, event(), NOW, POLICY) == Verdict(action, Reason.QUIET_HOURS)
    meeting = event(kind=EventKind.MEETING_REQUEST)
    assert decide(reg, meeting, NOW, POLICY) == Verdict(action, Reason.QUIET_HOURS)  # meetings keep quiet too
    assert decide(reg, event(), NOW + timedelta(hours=1), POLICY) == Verdict(Action.ALERT, Reason.MATCH)


def test_filters_come_before_quiet_hours() -> None:
    """A mail the device never wanted stays SKIP with its own reason: no badge update for it in quiet hours."""
    reg = registration(quiet_hours=quiet("11:00", "13:00", silent_badge=True), vip_senders=(VIP,))
    assert decide(reg, event(), NOW, POLICY) == Verdict(Action.SKIP, Reason.NOT_VIP)
    assert decide(reg, event(sender=VIP), NOW, POLICY) == Verdict(Action.SILENT, Reason.QUIET_HOURS)
    assert decide(reg, event(folder="Archive"), NOW, POLICY) == Verdict(Action.SKIP, Reason.FOLDER)


def test_quiet_hours_use_the_device_time_zone() -> None:
    reg = registration(timezone_name="Asia/Tokyo", quiet_hours=quiet("22:00", "07:00"))  # NOW is 21:00 in Tokyo
    assert decide(reg, event(), NOW, POLICY).action is Action.ALERT
    assert decide(reg, event(), NOW + timedelta(hours=1), POLICY) == Verdict(Action.SKIP, Reason.QUIET_HOURS)


# --- quiet hours ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("clock", "inside"), [
    ("21:59:59.999999", False), ("22:00", True), ("23:59:59", True), ("00:00", True), ("06:59:59.999999", True),
    ("07:00", False), ("12:00", False),
])
def test_a_window_crossing_midnight(clock: str, inside: bool) -> None:
    moment = datetime.combine(NOW.date(), time.fromisoformat(clock), tzinfo=UTC)
    assert in_quiet_hours(quiet("22:00", "07:00"), None, moment) is inside


@pytest.mark.parametrize(("clock", "inside"), [("08:59", False), ("09:00", True), ("16:59", True), ("17:00", False)])
def test_a_window_within_one_day(clock: str, inside: bool) -> None:
    moment = datetime.combine(NOW.date(), time.fromisoformat(clock), tzinfo=UTC)
    assert in_quiet_hours(quiet("09:00", "17:00"), "UTC", moment) is inside


def test_a_window_ending_at_midnight() -> None:
    window = quiet("22:00", "00:00")
    assert in_quiet_hours(window, None, datetime(2026, 6, 15, 23, 59, 59, tzinfo=UTC))
    assert not in_quiet_hours(window, None, datetime(2026, 6, 16, 0, 0, tzinfo=UTC))
    assert not in_quiet_hours(window, None, datetime(2026, 6, 15, 21, 59, tzinfo=UTC))


@pytest.mark.parametrize("name", [None, "Mars/Olympus", "", "America", "../../etc/passwd", "/etc/localtime",
                                  "europe/berlin", "Europe/Berlin ", "x" * 300, "UTC\x00"])
def test_an_unknown_or_missing_time_zone_falls_back_to_utc(name: str | None) -> None:
    assert resolve_zone(name) is UTC
    window = quiet("11:00", "13:00")
    assert in_quiet_hours(window, name, NOW)
    assert not in_quiet_hours(window, name, NOW + timedelta(hours=1))


def test_a_known_zone_is_loaded() -> None:
    assert resolve_zone("Europe/Berlin") == ZoneInfo("Europe/Berlin")


def test_naive_instants_are_read_as_utc_not_host_local_time() -> None:
    window = quiet("11:00", "13:00")
    assert in_quiet_hours(window, None, NOW.replace(tzinfo=None))
    assert in_quiet_hours(window, "Europe/Berlin", datetime(2026, 6, 15, 9, 30))  # 11:30 CEST


def test_non_utc_aware_instants_are_converted() -> None:
    moment = datetime(2026, 6, 15, 7, 30, tzinfo=timezone(timedelta(hours=-4)))  # 11:30 UTC
    assert in_quiet_hours(quiet("11:00", "13:00"), "UTC", moment)


def test_a_zone_on_the_window_times_is_ignored() -> None:
    window = quiet(time(11, 0, tzinfo=timezone(timedelta(hours=5))), time(13, 0, tzinfo=timezone(timedelta(hours=5))))
    assert in_quiet_hours(window, None, NOW)


class TestDaylightSaving:
    """EU changes on the last Sunday of March/October at 01:00 UTC; the US on the 2nd Sunday of March and the 1st
    of November at 02:00 local."""

    def test_fall_back_new_york_both_0130s_are_inside_0100_0200(self) -> None:
        window = quiet("01:00", "02:00")
        first, second = at("America/New_York", 2026, 11, 1, 1, 30), at("America/New_York", 2026, 11, 1, 1, 30, fold=1)
        assert second - first == timedelta(hours=1)
        assert in_quiet_hours(window, "America/New_York", first)
        assert in_quiet_hours(window, "America/New_York", second)
        # the window opens at the first 01:00 EDT and closes at 02:00 EST: two real hours
        assert not in_quiet_hours(window, "America/New_York", datetime(2026, 11, 1, 4, 59, 59, tzinfo=UTC))
        assert in_quiet_hours(window, "America/New_York", datetime(2026, 11, 1, 5, 0, tzinfo=UTC))
        assert in_quiet_hours(window, "America/New_York", datetime(2026, 11, 1, 6, 59, 59, tzinfo=UTC))
        assert not in_quiet_hours(window, "America/New_York", datetime(2026, 11, 1, 7, 0, tzinfo=UTC))

    def test_fall_back_berlin_the_repeated_hour_is_0200_0300(self) -> None:
        window = quiet("02:00", "03:00")
        assert in_quiet_hours(window, "Europe/Berlin", at("Europe/Berlin", 2026, 10, 25, 2, 30))  # CEST
        assert in_quiet_hours(window, "Europe/Berlin", at("Europe/Berlin", 2026, 10, 25, 2, 30, fold=1))  # CET
        assert in_quiet_hours(window, "Europe/Berlin", datetime(2026, 10, 25, 0, 0, tzinfo=UTC))  # 02:00 CEST
        assert in_quiet_hours(window, "Europe/Berlin", datetime(2026, 10, 25, 1, 59, 59, tzinfo=UTC))  # 02:59 CET
        assert not in_quiet_hours(window, "Europe/Berlin", datetime(2026, 10, 25, 2, 0, tzinfo=UTC))  # 03:00 CET

    def test_fall_back_a_night_window_still_ends_at_local_0700(self) -> None:
        window = quiet("22:00", "07:00")
        assert in_quiet_hours(window, "Europe/Berlin", datetime(2026, 10, 25, 5, 59, tzinfo=UTC))  # 06:59 CET
        assert not in_quiet_hours(window, "Europe/Berlin", datetime(2026, 10, 25, 6, 0, tzinfo=UTC))  # 07:00 CET

    def test_spring_forward_berlin_a_window_starting_in_the_skipped_hour_begins_at_0300(self) -> None:
        window = quiet("02:30", "06:00")
        assert not in_quiet_hours(window, "Europe/Berlin", datetime(2026, 3, 29, 0, 59, 59, tzinfo=UTC))  # 01:59 CET
        assert in_quiet_hours(window, "Europe/Berlin", datetime(2026, 3, 29, 1, 0, tzinfo=UTC))  # 03:00 CEST
        assert in_quiet_hours(window, "Europe/Berlin", datetime(2026, 3, 29, 3, 59, 59, tzinfo=UTC))  # 05:59 CEST
        assert not in_quiet_hours(window, "Europe/Berlin", datetime(2026, 3, 29, 4, 0, tzinfo=UTC))  # 06:00 CEST

    def test_spring_forward_berlin_a_window_ending_in_the_skipped_hour_ends_at_0300(self) -> None:
        window = quiet("22:00", "02:30")
        assert in_quiet_hours(window, "Europe/Berlin", datetime(2026, 3, 29, 0, 59, 59, tzinfo=UTC))  # 01:59 CET
        assert not in_quiet_hours(window, "Europe/Berlin", datetime(2026, 3, 29, 1, 0, tzinfo=UTC))  # 03:00 CEST

    def test_spring_forward_a_window_wholly_in_the_skipped_hour_has_no_instant_that_night(self) -> None:
        window = quiet("02:15", "02:45")
        start = datetime(2026, 3, 28, 23, 0, tzinfo=UTC)
        minutes = [start + timedelta(minutes=m) for m in range(4 * 60)]
        assert not any(in_quiet_hours(window, "Europe/Berlin", m) for m in minutes)
        # the night before it held all 30 minutes
        day_before = [m - timedelta(days=1) for m in minutes]
        assert sum(in_quiet_hours(window, "Europe/Berlin", m) for m in day_before) == 30

    def test_spring_forward_new_york(self) -> None:
        window = quiet("02:30", "06:00")
        assert not in_quiet_hours(window, "America/New_York", datetime(2026, 3, 8, 6, 59, 59, tzinfo=UTC))  # 01:59
        assert in_quiet_hours(window, "America/New_York", datetime(2026, 3, 8, 7, 0, tzinfo=UTC))  # 03:00 EDT
        night = quiet("23:00", "07:00")
        assert in_quiet_hours(night, "America/New_York", datetime(2026, 3, 8, 10, 59, tzinfo=UTC))  # 06:59 EDT
        assert not in_quiet_hours(night, "America/New_York", datetime(2026, 3, 8, 11, 0, tzinfo=UTC))  # 07:00 EDT


# --- properties -------------------------------------------------------------------------------------------

instants = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))
windows = st.tuples(st.times(), st.times()).filter(lambda w: w[0] != w[1])
zones = st.sampled_from([None, "UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata",
                         "Pacific/Chatham", "America/St_Johns", "Mars/Olympus"])


def _micros(t: time) -> int:
    return ((t.hour * 60 + t.minute) * 60 + t.second) * 1_000_000 + t.microsecond


@given(windows, zones, instants)
def test_in_quiet_hours_matches_modular_arithmetic_on_the_local_clock(window: tuple[time, time],
                                                                      zone: str | None, now: datetime) -> None:
    """An independent oracle: t is in [start, end) on a 24 h circle iff (t - start) mod day < (end - start) mod day."""
    start, end = window
    local = now.astimezone(resolve_zone(zone)).time()
    day = 86_400_000_000
    expected = (_micros(local) - _micros(start)) % day < (_micros(end) - _micros(start)) % day
    assert in_quiet_hours(quiet(start, end), zone, now) is expected


@given(windows, zones, instants)
def test_a_window_is_the_complement_of_its_reverse(window: tuple[time, time], zone: str | None,
                                                   now: datetime) -> None:
    """Exactly one of [start, end) and [end, start) holds any instant; so a window crossing midnight is the
    complement of the reversed same-day window."""
    start, end = window
    inside = in_quiet_hours(quiet(start, end), zone, now)
    assert inside is not in_quiet_hours(quiet(end, start), zone, now)


@given(windows, instants)
def test_unknown_zones_behave_as_utc(window: tuple[time, time], now: datetime) -> None:
    q = quiet(*window)
    assert in_quiet_hours(q, "No/Such_Zone", now) is in_quiet_hours(q, None, now) is in_quiet_hours(q, "UTC", now)


@given(windows, instants, st.booleans(), st.booleans(), st.sampled_from(list(EventKind)),
       st.sampled_from(["low", "normal", "high"]))
def test_quiet_hours_never_alert_and_only_badge_when_asked(window: tuple[time, time], now: datetime,
                                                            silent_badge: bool, badge: bool, kind: EventKind,
                                                            importance: Literal["low", "normal", "high"]) -> None:
    q = quiet(*window, silent_badge=silent_badge)
    reg = registration(seen=now, quiet_hours=q, badge=badge)
    verdict = decide(reg, event(kind=kind, importance=importance), now, POLICY)
    if in_quiet_hours(q, "UTC", now):
        assert verdict.reason is Reason.QUIET_HOURS
        assert verdict.action is (Action.SILENT if silent_badge and badge else Action.SKIP)
    else:
        assert verdict == Verdict(Action.ALERT, Reason.MATCH)


@given(st.timedeltas(min_value=timedelta(days=-2), max_value=timedelta(days=60)), st.booleans(),
       st.sampled_from(list(EventKind)))
def test_stale_always_wins_and_expired_implies_stale(age: timedelta, vip: bool, kind: EventKind) -> None:
    reg = registration(seen=NOW - age, vip_senders=(VIP,) if vip else ())
    verdict = decide(reg, event(kind=kind, sender=VIP, importance="high"), NOW, POLICY)
    assert (verdict == Verdict(Action.SKIP, Reason.STALE)) is is_stale(reg, NOW, POLICY)
    if is_expired(reg, NOW, POLICY):
        assert is_stale(reg, NOW, POLICY)  # holds because this policy's delete_after > stale_after


@given(st.sampled_from(["Inbox", "Projects", "Straße", "Éléments envoyés"]), st.lists(st.booleans(), min_size=20))
def test_folder_matching_ignores_case(name: str, flips: list[bool]) -> None:
    variant = "".join(c.upper() if flip else c.lower() for c, flip in zip(name, flips, strict=False))
    assert folder_matches(DeviceSettings(folders=(name,)), variant)
    assert folder_matches(DeviceSettings(folders=(variant,)), name)


# --- stale and expired ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("age", "stale"), [
    (timedelta(0), False),
    (timedelta(hours=72) - timedelta(microseconds=1), False),
    (timedelta(hours=72), False),  # exactly stale_after is still fresh
    (timedelta(hours=72, microseconds=1), True),
    (-timedelta(hours=1), False),  # last seen "in the future": another node's clock ran ahead
])
def test_stale_boundary(age: timedelta, stale: bool) -> None:
    assert is_stale(registration(seen=NOW - age), NOW, POLICY) is stale
    assert (decide(registration(seen=NOW - age), event(), NOW, POLICY).reason is Reason.STALE) is stale


@pytest.mark.parametrize(("age", "expired"), [
    (timedelta(days=29), False),
    (timedelta(days=30), False),  # matches the store's sweep: last_seen_at < now - delete_after
    (timedelta(days=30, microseconds=1), True),
])
def test_expired_boundary(age: timedelta, expired: bool) -> None:
    assert is_expired(registration(seen=NOW - age), NOW, POLICY) is expired


def test_stale_and_expired_compare_instants_not_wall_clocks() -> None:
    seen = datetime(2026, 6, 12, 14, 0, tzinfo=timezone(timedelta(hours=2)))  # 12:00 UTC, 72 h before NOW
    assert not is_stale(registration(seen=seen), NOW, POLICY)
    assert is_stale(registration(seen=seen), NOW + timedelta(seconds=1), POLICY)


def test_policy_refuses_non_positive_durations() -> None:
    with pytest.raises(ValueError, match="positive"):
        RulePolicy(stale_after=timedelta(0), delete_after=timedelta(days=30))
    with pytest.raises(ValueError, match="positive"):
        RulePolicy(stale_after=timedelta(hours=72), delete_after=timedelta(seconds=-1))


def test_reasons_are_stable_slugs() -> None:
    assert Verdict(Action.SILENT, Reason.QUIET_HOURS).reason == "quiet_hours"
    assert {r.value for r in Reason} >= {"quiet_hours", "folder", "stale", "new_mail_off", "calendar_off", "not_vip",
                                         "not_important"}
