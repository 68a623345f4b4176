"""exchangelib on a bounded thread pool of its own: autodiscover, Subscribe, SyncFolderItems, GetItem, GetFolder,
Unsubscribe — everything EWS except the long-lived GetStreamingEvents connections (see stream.py).

exchangelib is synchronous (requests), but made to be driven from threads: every call here runs on a dedicated
pool whose size is also the size of exchangelib's session pool (its default of one hangs a second caller). Errors
come back as `EwsCallError` with the EWS response code and any BackOffMilliseconds hint, so the asyncio side
decides how to wait; exchangelib's own retry policy stays fail-fast, since it would sleep inside a worker.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
import structlog
from exchangelib import (
    BASIC,
    IMPERSONATION,
    NTLM,
    OAUTH2,
    Account,
    Configuration,
    Credentials,
    Identity,
    OAuth2Credentials,
    Version,
)
from exchangelib import errors as ews_errors
from exchangelib.autodiscover.protocol import AutodiscoverProtocol
from exchangelib.fields import FieldPath
from exchangelib.folders import Inbox
from exchangelib.items import MeetingRequest, Message
from exchangelib.properties import DistinguishedFolderId, FolderId, ItemId, Mailbox
from exchangelib.protocol import BaseProtocol
from exchangelib.services import GetItem, SubscribeToPush, SubscribeToStreaming, SyncFolderItems, Unsubscribe
from exchangelib.services.get_user_settings import GetUserSettings
from exchangelib.version import EXCHANGE_2013, EXCHANGE_2013_SP1, EXCHANGE_2016, EXCHANGE_2019

from bemsmail.config import EwsConfig
from bemsmail.core.model import EventKind, ItemDetails

log = structlog.get_logger(__name__)

T = TypeVar("T")

BUILDS = {"Exchange2013": EXCHANGE_2013, "Exchange2013_SP1": EXCHANGE_2013_SP1,
          "Exchange2016": EXCHANGE_2016, "Exchange2019": EXCHANGE_2019}
MAX_SYNC_CHANGES = 512  # EWS's ceiling for MaxChangesReturned
MEETING_CLASSES = ("IPM.Schedule.Meeting.Request",)
AFFINITY_COOKIE = "X-BackEndOverrideCookie"
_IMPORTANCE = {"Low": "low", "Normal": "normal", "High": "high"}
#: the code for an EWS endpoint answering HTTP 403 Forbidden: Exchange Online does so when EWS is switched off
#: for the organisation, the app or the mailbox (EWSEnabled = false, EWS retirement); retrying does not help
EWS_DISABLED = "ErrorEwsDisabled"
# exchangelib keeps no status on the error it raises for an unexpected HTTP answer, only this text
_UNKNOWN_STATUS = re.compile(r"^Unknown failure in response\. Code: (\d{3})\b")


class EwsCallError(Exception):
    """One EWS call failed. `code` is the EWS response code (ErrorServerBusy, ErrorSubscriptionNotFound, …) or
    the transport failure's class name; `back_off` the server's requested wait in seconds, if it gave one."""

    def __init__(self, code: str, message: str, back_off: float | None = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.back_off = back_off

    @property
    def busy(self) -> bool:
        return self.code in ("ErrorServerBusy", "ErrorTooManyObjectsOpened", "ErrorExceededConnectionCount")


@dataclass(frozen=True, slots=True)
class FolderRef:
    """A folder as EWS names it: a distinguished id ("inbox") or a FolderId."""

    id: str
    distinguished: bool = False


INBOX = FolderRef("inbox", distinguished=True)


@dataclass(frozen=True, slots=True)
class SyncChange:
    """One created item from SyncFolderItems (updates, deletes and read-flag changes are of no use to a push)."""

    item_id: str
    received_at: datetime | None
    kind: EventKind
    details: ItemDetails


@dataclass(frozen=True, slots=True)
class SyncPage:
    created: tuple[SyncChange, ...]
    sync_state: str
    last_page: bool


@dataclass(frozen=True, slots=True)
class Discovered:
    ews_url: str | None
    grouping: str | None


# --- TLS per endpoint -------------------------------------------------------------------------------------------
# exchangelib lets one adapter class be set for every session; it looks up each request's endpoint in a table, so
# tenants with different CA bundles (or verify_tls = false for a lab) do not share one setting.
_TLS_VERIFY: dict[str, bool | str] = {}
_TLS_LOCK = threading.Lock()


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class _PerEndpointTlsAdapter(requests.adapters.HTTPAdapter):
    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        verify = _TLS_VERIFY.get(_origin(request.url or ""))
        if verify is not None:
            kwargs["verify"] = verify
        return super().send(request, *args, **kwargs)


BaseProtocol.HTTP_ADAPTER_CLS = _PerEndpointTlsAdapter


def _register_tls(url: str, settings: EwsConfig) -> None:
    verify: bool | str = str(settings.ca_file) if settings.ca_file else settings.verify_tls
    with _TLS_LOCK:
        _TLS_VERIFY[_origin(url)] = verify


# --- affinity-aware Subscribe -----------------------------------------------------------------------------------

class _GroupAffinity:
    """Requests made with the affinity of a streaming group, not of the account they act for.

    exchangelib anchors every request on the account's own mailbox and keeps the affinity cookie per account, in a
    cookie jar shared by every account on the same pooled session (research §B.3). Here the group's anchor goes in
    X-AnchorMailbox, its cookie goes both as the header exchangelib uses and as the Cookie Microsoft documents, and
    the jar is read and emptied before the session goes back to the pool, so no cookie crosses groups."""

    _anchor: str
    _cookie: str | None
    returned_cookie: str | None

    def _extra_headers(self) -> dict[str, str]:
        headers: dict[str, str] = super()._extra_headers()  # type: ignore[misc]
        headers["X-AnchorMailbox"] = self._anchor
        headers["X-PreferServerAffinity"] = "true"
        if self._cookie:
            headers[AFFINITY_COOKIE] = self._cookie
            headers["Cookie"] = f"{AFFINITY_COOKIE}={self._cookie}"
        else:
            headers.pop(AFFINITY_COOKIE, None)
        return headers

    def _handle_response_cookies(self, session: requests.Session) -> None:
        for cookie in session.cookies:
            if cookie.name == AFFINITY_COOKIE:
                self.returned_cookie = cookie.value
        session.cookies.clear()


class _GroupSubscribe(_GroupAffinity, SubscribeToStreaming):  # type: ignore[misc]
    def __init__(self, *, account: Account, anchor: str, cookie: str | None) -> None:
        super().__init__(account=account)
        self._anchor, self._cookie, self.returned_cookie = anchor, cookie, None


class _GroupUnsubscribe(_GroupAffinity, Unsubscribe):  # type: ignore[misc]
    """A streaming subscription lives on the server its group is pinned to: unsubscribe it there."""

    def __init__(self, *, account: Account, anchor: str, cookie: str | None) -> None:
        super().__init__(account=account)
        self._anchor, self._cookie, self.returned_cookie = anchor, cookie, None


class _TokenUrlOAuth2Credentials(OAuth2Credentials):  # type: ignore[misc]
    """Client credentials against a configurable authority (national clouds, the test IdP)."""

    def __init__(self, *args: Any, authority: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._authority = authority.rstrip("/")

    @property
    def token_url(self) -> str:
        return f"{self._authority}/{self.tenant_id}/oauth2/v2.0/token"


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of a failed EWS answer when exchangelib kept it (CASError) or wrote it in its message."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return status
    if isinstance(exc, ews_errors.MalformedResponseError):
        found = _UNKNOWN_STATUS.match(str(exc))
        return int(found.group(1)) if found else None
    return None


def _translate(exc: BaseException) -> EwsCallError:
    if isinstance(exc, ews_errors.EWSError) and _http_status(exc) == 403:
        return EwsCallError(EWS_DISABLED, "EWS answered HTTP 403 Forbidden (EWS disabled in Exchange Online)")
    if isinstance(exc, ews_errors.ErrorServerBusy):
        return EwsCallError("ErrorServerBusy", str(exc), exc.back_off)
    if isinstance(exc, ews_errors.EWSError):
        return EwsCallError(type(exc).__name__, str(exc))
    if isinstance(exc, requests.RequestException):
        return EwsCallError("TransportError", type(exc).__name__)
    return EwsCallError(type(exc).__name__, str(exc))


def _plain(moment: datetime | None) -> datetime | None:
    """exchangelib's EWSDateTime as a plain aware UTC datetime (it refuses the stdlib's UTC as a zone)."""
    if moment is None:
        return None
    return datetime.fromtimestamp(moment.timestamp(), UTC)


def _details_of(item: Any) -> ItemDetails:
    item_class = getattr(item, "item_class", None) or ""
    kind = EventKind.MEETING_REQUEST if (isinstance(item, MeetingRequest) or item_class.startswith(MEETING_CLASSES)) \
        else EventKind.NEW_MAIL
    sender = getattr(item, "sender", None) or getattr(item, "author", None)
    address = getattr(sender, "email_address", None) if sender is not None else None
    name = getattr(sender, "name", None) if sender is not None else None
    shown = f"{name} <{address}>" if name and address else address or name
    importance = _IMPORTANCE.get(str(getattr(item, "importance", None) or "Normal"), "normal")
    return ItemDetails(kind=kind, sender=shown, subject=getattr(item, "subject", None),
                       importance=importance)  # type: ignore[arg-type]


class ExchangeClient:
    """The EWS calls of one tenant, each run on the tenant's worker threads."""

    def __init__(self, settings: EwsConfig, *, ews_url: str | None = None) -> None:
        self.settings = settings
        self._pool = ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="ews")
        self._credentials = self._make_credentials(settings)
        self._auth_type = {"ntlm": NTLM, "basic": BASIC, "oauth2": OAUTH2}[settings.auth]
        self._version = Version(build=BUILDS[settings.version])
        self._configs: dict[str, Configuration] = {}
        self._accounts: OrderedDict[tuple[str, str], Account] = OrderedDict()
        self._accounts_lock = threading.Lock()
        self._default_url = ews_url or (str(settings.url) if settings.url else None)
        fields = ("datetime_received", "item_class", "subject", "sender", "importance")
        self._sync_fields = [FieldPath(field=Message.get_field_by_fieldname(name)) for name in fields]

    @staticmethod
    def _make_credentials(settings: EwsConfig) -> Any:
        if settings.auth == "oauth2":
            assert settings.client_id and settings.tenant_id and settings.client_secret
            return _TokenUrlOAuth2Credentials(
                client_id=settings.client_id, client_secret=settings.client_secret.get_secret_value(),
                tenant_id=settings.tenant_id, identity=Identity(), authority=str(settings.authority))
        assert settings.username and settings.password is not None
        return Credentials(settings.username, settings.password.get_secret_value())

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)

    async def _run(self, call: Callable[[], T]) -> T:
        def guarded() -> T:
            try:
                return call()
            except EwsCallError:
                raise
            except Exception as exc:
                raise _translate(exc) from None

        return await asyncio.get_running_loop().run_in_executor(self._pool, guarded)

    # --- accounts -------------------------------------------------------------------------------------------

    def endpoint(self, ews_url: str | None = None) -> str:
        url = ews_url or self._default_url
        if url is None:
            raise EwsCallError("ErrorNoEwsUrl", "no EWS URL configured and none discovered")
        return url

    def _config(self, url: str) -> Configuration:
        config = self._configs.get(url)
        if config is None:
            _register_tls(url, self.settings)
            config = Configuration(service_endpoint=url, credentials=self._credentials, auth_type=self._auth_type,
                                   version=self._version, max_connections=self.settings.threads)
            self._configs[url] = config
        return config

    def account(self, mailbox: str, ews_url: str | None = None) -> Account:
        """An Account acting for `mailbox` (impersonation when configured); cached, most recent kept."""
        url = self.endpoint(ews_url)
        key = (url, mailbox)
        with self._accounts_lock:
            account = self._accounts.get(key)
            if account is not None:
                self._accounts.move_to_end(key)
                return account
        access = IMPERSONATION if self.settings.impersonation else "delegate"
        account = Account(mailbox, config=self._config(url), autodiscover=False, access_type=access,
                          default_timezone=UTC)
        with self._accounts_lock:
            self._accounts[key] = account
            while len(self._accounts) > 2000:
                self._accounts.popitem(last=False)
        return account

    def _folder_id(self, mailbox: str, folder: FolderRef) -> FolderId:
        if folder.distinguished:
            return DistinguishedFolderId(id=folder.id, mailbox=Mailbox(email_address=mailbox))
        return FolderId(id=folder.id)

    # --- the calls ------------------------------------------------------------------------------------------

    async def subscribe_streaming(
        self, mailbox: str, folders: Sequence[FolderRef], event_types: Sequence[str], *,
        anchor: str, cookie: str | None, ews_url: str | None = None,
    ) -> tuple[str, str | None]:
        """A streaming subscription for `mailbox` placed by the group's anchor and cookie; returns its id and the
        affinity cookie the server set (the anchor's Subscribe is where a group gets its cookie)."""
        def call() -> tuple[str, str | None]:
            account = self.account(mailbox, ews_url)
            service = _GroupSubscribe(account=account, anchor=anchor, cookie=cookie)
            subscription_id = service.get(folders=[self._folder_id(mailbox, f) for f in folders],
                                          event_types=list(event_types))
            return str(subscription_id), service.returned_cookie or cookie

        return await self._run(call)

    async def subscribe_push(self, mailbox: str, folders: Sequence[FolderRef], event_types: Sequence[str], *,
                             url: str, status_frequency: int, watermark: str | None,
                             ews_url: str | None = None) -> tuple[str, str]:
        def call() -> tuple[str, str]:
            account = self.account(mailbox, ews_url)
            subscription_id, new_watermark = SubscribeToPush(account=account).get(
                folders=[self._folder_id(mailbox, f) for f in folders], event_types=list(event_types),
                watermark=watermark, status_frequency=status_frequency, url=url)
            return str(subscription_id), str(new_watermark)

        return await self._run(call)

    async def unsubscribe(self, mailbox: str, subscription_id: str, *, anchor: str, cookie: str | None,
                          ews_url: str | None = None) -> None:
        def call() -> None:
            service = _GroupUnsubscribe(account=self.account(mailbox, ews_url), anchor=anchor, cookie=cookie)
            service.get(subscription_id=subscription_id, expect_result=None)

        await self._run(call)

    async def sync_page(self, mailbox: str, folder: FolderRef, sync_state: str | None,
                        ews_url: str | None = None) -> SyncPage:
        """One page (≤ 512 changes) of SyncFolderItems from `sync_state`; only created items are returned."""
        def call() -> SyncPage:
            service = SyncFolderItems(account=self.account(mailbox, ews_url))
            created = []
            for change_type, item in service.call(
                folder=self._folder_id(mailbox, folder), shape="IdOnly", additional_fields=self._sync_fields,
                sync_state=sync_state, ignore=None, max_changes_returned=MAX_SYNC_CHANGES, sync_scope=None,
            ):
                if isinstance(item, Exception):
                    raise item
                if change_type != SyncFolderItems.CREATE or getattr(item, "id", None) is None:
                    continue
                details = _details_of(item)
                created.append(SyncChange(item.id, _plain(getattr(item, "datetime_received", None)), details.kind,
                                          details))
            return SyncPage(tuple(created), str(service.sync_state), bool(service.includes_last_item_in_range))

        return await self._run(call)

    async def item_details(self, mailbox: str, item_ids: Sequence[str],
                           ews_url: str | None = None) -> dict[str, ItemDetails]:
        def call() -> dict[str, ItemDetails]:
            account = self.account(mailbox, ews_url)
            found: dict[str, ItemDetails] = {}
            fields = self._sync_fields
            for item in GetItem(account=account).call(items=[ItemId(id=i) for i in item_ids],
                                                      additional_fields=fields, shape="IdOnly"):
                if isinstance(item, Exception):
                    continue  # gone or unreadable: that item goes without details (whole-call errors raise)
                found[item.id] = _details_of(item)
            return found

        return await self._run(call)

    async def unread_count(self, mailbox: str, ews_url: str | None = None) -> int:
        def call() -> int:
            inbox: Inbox = self.account(mailbox, ews_url).inbox
            inbox.refresh()
            return int(inbox.unread_count or 0)

        return await self._run(call)

    async def resolve_folder(self, mailbox: str, path: str, ews_url: str | None = None) -> FolderRef | None:
        """A folder by its display path ("Inbox/Projects", "Archive"), or None if the mailbox has none such."""
        def call() -> FolderRef | None:
            account = self.account(mailbox, ews_url)
            parts = [p for p in path.split("/") if p.strip()]
            if not parts:
                return None
            if parts[0].casefold() == "inbox":
                folder: Any = account.inbox
                parts = parts[1:]
            else:
                folder = account.msg_folder_root
            for name in parts:
                try:
                    folder = folder / name
                except ews_errors.ErrorFolderNotFound:
                    return None
            return FolderRef(str(folder.id))

        return await self._run(call)

    async def discover(self, mailboxes: Sequence[str]) -> dict[str, Discovered]:
        """ExternalEwsUrl and GroupingInformation per mailbox, by SOAP autodiscover GetUserSettings."""
        if self.settings.autodiscover_url is None:
            return await self._run(lambda: {m: self._discover_by_dns(m) for m in mailboxes})
        url = str(self.settings.autodiscover_url)

        def call() -> dict[str, Discovered]:
            _register_tls(url, self.settings)
            protocol = AutodiscoverProtocol(config=Configuration(
                service_endpoint=url, credentials=self._credentials, auth_type=self._auth_type))
            found: dict[str, Discovered] = {}
            for start in range(0, len(mailboxes), 100):  # several users per GetUserSettings request
                chunk = list(mailboxes[start : start + 100])
                responses = GetUserSettings(protocol=protocol).call(
                    users=chunk, settings=["external_ews_url", "internal_ews_url", "grouping_information"])
                for mailbox, response in zip(chunk, responses, strict=False):
                    if isinstance(response, Exception) or response.error_code not in (None, "NoError"):
                        continue
                    settings = response.user_settings or {}
                    found[mailbox] = Discovered(
                        settings.get("external_ews_url") or settings.get("internal_ews_url"),
                        settings.get("grouping_information"))
            return found

        return await self._run(call)

    def _discover_by_dns(self, mailbox: str) -> Discovered:
        from exchangelib.autodiscover import Autodiscovery

        response, _protocol = Autodiscovery(email=mailbox, credentials=self._credentials).discover()
        settings = response.user_settings or {}
        return Discovered(settings.get("external_ews_url") or response.ews_url, settings.get("grouping_information"))



