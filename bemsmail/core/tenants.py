"""Which tenant — and so which backend, EWS or Graph — serves a mailbox, decided by its e-mail domain."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bemsmail.core.model import Backend


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    backend: Backend
    domains: tuple[str, ...]
    #: devices of this tenant may ask for sender and subject in their pushes
    rich_content: bool = False


class TenantDirectory:
    """Maps a mailbox's domain to its tenant; exact domain match, case-insensitive."""

    def __init__(self, tenants: Iterable[Tenant]) -> None:
        self._by_domain = {domain.lower(): t for t in tenants for domain in t.domains}

    def resolve(self, mailbox: str) -> Tenant | None:
        return self._by_domain.get(mailbox.rpartition("@")[2].lower())
