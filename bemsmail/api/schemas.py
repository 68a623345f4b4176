"""Request and response bodies of the API as pydantic models; the OpenAPI document is generated from them."""

from __future__ import annotations

import re
from datetime import datetime
from functools import lru_cache
from typing import Annotated, Any
from zoneinfo import available_timezones

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)
from pydantic.networks import validate_email

from bemsmail.core.model import (
    MAX_APP_ID,
    MAX_DEVICE_ID,
    MAX_TOKEN,
    DeviceSettings,
    Environment,
    Platform,
    Registration,
    normalize_mailbox,
    token_fingerprint,
)

_APNS_TOKEN = re.compile(r"^[0-9a-fA-F]{64,200}$")
_FCM_TOKEN = re.compile(r"^[A-Za-z0-9_:.\-]{32,4096}$")
_LOCALE = re.compile(r"^[A-Za-z]{2,3}([_-][A-Za-z0-9]{2,8}){0,4}$")


class CachedEmailStr(EmailStr):
    """EmailStr with its successes remembered: email-validator costs ~50 µs an address (a tenth of a
    registration's CPU) and apps re-register the same mailboxes at every launch. The result depends only on the
    text, so a hit answers exactly as a fresh validation would; failures are not kept (they raise each time)."""

    @classmethod
    def _validate(cls, input_value: str, /) -> str:
        return _validated_email(input_value)


@lru_cache(maxsize=16_384)
def _validated_email(value: str) -> str:
    return validate_email(value)[1]  # what EmailStr._validate does


@lru_cache(maxsize=1)
def _timezones() -> frozenset[str]:
    return frozenset(available_timezones())


def _timezone(value: str) -> str:
    if value not in _timezones():
        raise ValueError("must be an IANA time zone name such as Europe/Berlin")
    return value


def check_token(platform: Platform, token: str) -> str:
    """APNs device tokens are hex (64 today, up to 200); FCM tokens are URL-safe text. Messages never echo it."""
    if platform is Platform.IOS:
        if not _APNS_TOKEN.match(token):
            raise ValueError("an iOS token must be a hex string of 64 to 200 characters")
        return token.lower()
    if not _FCM_TOKEN.match(token):
        raise ValueError("an Android token must be 32 to 4096 characters of letters, digits, ':', '_', '-' or '.'")
    return token


Mailbox = Annotated[CachedEmailStr, StringConstraints(max_length=320), AfterValidator(normalize_mailbox)]
DeviceId = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_DEVICE_ID, pattern=r"^[\x21-\x7e]+$")
]
AppId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_APP_ID)]
Token = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TOKEN)]
Locale = Annotated[str, StringConstraints(max_length=35, pattern=_LOCALE.pattern)]
TimeZone = Annotated[str, StringConstraints(max_length=64), AfterValidator(_timezone)]


class RegistrationCreate(BaseModel):
    """POST /api/v1/registrations: upsert keyed by (mailbox, device_id)."""

    model_config = ConfigDict(extra="forbid")

    mailbox: Mailbox
    device_id: DeviceId = Field(description="stable per app install; printable ASCII, no spaces")
    platform: Platform
    token: Token = Field(description="APNs device token (hex) or FCM registration token")
    app_id: AppId = Field(description="an app configured under [[apns.apps]] or [[fcm.apps]]")
    environment: Environment = Environment.PRODUCTION
    locale: Locale | None = None
    timezone: TimeZone | None = None
    settings: DeviceSettings = DeviceSettings()

    @field_validator("token")
    @classmethod
    def _token_matches_platform(cls, value: str, info: ValidationInfo) -> str:
        platform = info.data.get("platform")
        return check_token(platform, value) if isinstance(platform, Platform) else value


class RegistrationUpdate(BaseModel):
    """PATCH /api/v1/registrations/{id}: a JSON merge patch (RFC 7396); `settings` is merged key by key."""

    model_config = ConfigDict(extra="forbid")

    token: Token | None = None
    app_id: AppId | None = None
    environment: Environment | None = None
    locale: Locale | None = None
    timezone: TimeZone | None = None
    settings: dict[str, Any] | None = Field(None, description="partial DeviceSettings; null removes a key")


class RegistrationOut(BaseModel):
    """A stored registration. The push token itself is never sent back, only a fingerprint of it."""

    id: str
    mailbox: str
    device_id: str
    platform: Platform
    token_fingerprint: str = Field(description="first 16 hex digits of the SHA-256 of the token")
    app_id: str
    environment: Environment
    locale: str | None
    timezone: str | None
    settings: DeviceSettings
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime
    last_push_at: datetime | None

    @classmethod
    def of(cls, r: Registration) -> RegistrationOut:
        return cls(
            id=r.id,
            mailbox=r.mailbox,
            device_id=r.device_id,
            platform=r.platform,
            token_fingerprint=token_fingerprint(r.token)[:16],
            app_id=r.app_id,
            environment=r.environment,
            locale=r.locale,
            timezone=r.timezone,
            settings=r.settings,
            created_at=r.created_at,
            updated_at=r.updated_at,
            last_seen_at=r.last_seen_at,
            last_push_at=r.last_push_at,
        )


class RegistrationList(BaseModel):
    items: list[RegistrationOut]


class ProblemDetail(BaseModel):
    """RFC 9457 problem document."""

    type: str
    title: str
    status: int
    detail: str
    request_id: str | None = None
    errors: list[FieldError] | None = None


class FieldError(BaseModel):
    field: str
    message: str


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}


ProblemDetail.model_rebuild()
