"""Register: check and store a device's registration, and tell the rest of the system a mailbox's devices changed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bemsmail.core.model import (
    Platform,
    Registration,
    RegistrationChange,
    RegistrationChanged,
    RegistrationInput,
    UpsertResult,
)
from bemsmail.core.ports import Bus, Store
from bemsmail.core.tenants import TenantDirectory

REGISTRATION_TOPIC = "registration.changed"


class RegistrationRejected(Exception):
    """A registration that is well-formed but not acceptable here; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class RegistrationService:
    """The one home of the *register* verb: every change goes through here, so it is checked and published once."""

    def __init__(
        self, store: Store, bus: Bus, tenants: TenantDirectory, apps: Mapping[str, Platform]
    ) -> None:
        self._store = store
        self._bus = bus
        self._tenants = tenants
        self._apps = apps

    def check_app(self, app_id: str, platform: Platform) -> None:
        served = self._apps.get(app_id)
        if served is None:
            raise RegistrationRejected("app_id", "is not a configured app")
        if served is not platform:
            raise RegistrationRejected("app_id", f"is a {served.value} app, not {platform.value}")

    async def register(self, data: RegistrationInput) -> UpsertResult:
        tenant = self._tenants.resolve(data.mailbox)
        if tenant is None:
            raise RegistrationRejected("mailbox", "no configured tenant serves this mailbox's domain")
        self.check_app(data.app_id, data.platform)
        result = await self._store.upsert_registration(data, tenant.name, tenant.backend)
        for gone in result.displaced:
            await self._publish(gone, RegistrationChange.DELETED)
        change = RegistrationChange.CREATED if result.created else RegistrationChange.UPDATED
        await self._publish(result.registration, change, result.folders_before)
        return result

    async def get(self, registration_id: str) -> Registration | None:
        return await self._store.get_registration(registration_id)

    async def for_mailbox(self, mailbox: str) -> Sequence[Registration]:
        return await self._store.list_registrations(mailbox)

    async def update(self, current: Registration, changes: Mapping[str, object]) -> Registration | None:
        if "app_id" in changes:
            self.check_app(str(changes["app_id"]), current.platform)
        updated = await self._store.update_registration(current.id, changes)
        if updated is not None:
            await self._publish(updated, RegistrationChange.UPDATED, current.settings.folders)
        return updated

    async def delete(self, registration_id: str) -> Registration | None:
        deleted = await self._store.delete_registration(registration_id)
        if deleted is not None:
            await self._publish(deleted, RegistrationChange.DELETED)
        return deleted

    async def _publish(self, registration: Registration, change: RegistrationChange,
                       folders_before: tuple[str, ...] | None = None) -> None:
        """`folders_before`: what the registration asked for before (unknown for a deletion: it asks for none)."""
        folders = None if change is RegistrationChange.DELETED else tuple(registration.settings.folders)
        await self._bus.publish(REGISTRATION_TOPIC, RegistrationChanged(
            registration.mailbox, registration.id, change, folders,
            None if folders is None else folders_before))
