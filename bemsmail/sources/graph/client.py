"""The Microsoft Graph calls the Graph source makes, through msgraph-sdk and azure-identity: subscriptions, Inbox
delta rounds, message details and the unread count. Every failure becomes one GraphCallError."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
import httpx
import structlog
from azure.core.exceptions import AzureError, ClientAuthenticationError
from kiota_abstractions.api_error import APIError
from kiota_abstractions.base_request_configuration import RequestConfiguration
from kiota_http.middleware.options import RetryHandlerOption
from msgraph.generated.models.message import Message
from msgraph.generated.models.o_data_errors.o_data_error import ODataError
from msgraph.generated.models.subscription import Subscription
from msgraph.generated.users.item.mail_folders.item.messages.delta.delta_request_builder import DeltaRequestBuilder
from msgraph.graph_request_adapter import GraphRequestAdapter
from msgraph.graph_service_client import GraphServiceClient
from msgraph_core import GraphClientFactory
from msgraph_core.authentication import AzureIdentityAuthenticationProvider

from bemsmail.config import GraphConfig
from bemsmail.core.model import EventKind, ItemDetails, normalize_mailbox

log = structlog.get_logger(__name__)

SCOPES = ["https://graph.microsoft.com/.default"]
INBOX = "inbox"
DELTA_PAGE = 50
DETAIL_FIELDS = ["subject", "from", "importance", "receivedDateTime", "isRead"]
TRANSIENT = frozenset({0, 408, 429, 500, 502, 503, 504})


class GraphCallError(Exception):
    """A Graph call that failed: HTTP status (0 when nothing answered), Graph's error code, and how long Graph
    asked us to wait, if it did."""

    def __init__(self, status: int, code: str, message: str = "", retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" if message else f"{status} {code}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        return self.status in TRANSIENT


@dataclass(frozen=True, slots=True)
class RemoteSubscription:
    id: str
    resource: str
    notification_url: str | None
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class DeltaItem:
    id: str
    received_at: datetime | None
    is_read: bool
    removed: bool
    details: ItemDetails | None


@dataclass(frozen=True, slots=True)
class DeltaPage:
    items: Sequence[DeltaItem]
    next_link: str | None
    delta_link: str | None


def inbox_resource(mailbox: str) -> str:
    return f"users/{mailbox}/mailFolders('inbox')/messages"


def _retry_after(headers: Any) -> float | None:
    if not headers:
        return None
    value = next((v for k, v in dict(headers).items() if k.lower() == "retry-after"), None)
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _importance(value: object) -> Literal["low", "normal", "high"]:
    text = str(getattr(value, "value", value) or "normal").lower()
    return "high" if text == "high" else "low" if text == "low" else "normal"


def details_of(message: Message) -> ItemDetails:
    sender = message.from_.email_address.address if message.from_ and message.from_.email_address else None
    kind = EventKind.MEETING_REQUEST if (message.odata_type or "").lower().endswith("eventmessage") \
        else EventKind.NEW_MAIL
    return ItemDetails(kind, normalize_mailbox(sender) if sender else None, message.subject,
                       _importance(message.importance))


def _parse_time(text: str) -> datetime | None:
    """Graph's date-times: seven fractional digits, 'Z' or an offset (also non-UTC ones)."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?", text.strip())
    if match is None:
        return None
    fraction = (match.group(2) or "0")[:6].ljust(6, "0")
    zone = match.group(3) or "Z"
    moment = datetime.fromisoformat(f"{match.group(1)}.{fraction}{'+00:00' if zone == 'Z' else zone}")
    return moment.astimezone(UTC)


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class GraphClient:
    """One tenant's Graph app: a token credential, an HTTP/2 connection pool and a bound on requests in flight."""

    def __init__(self, settings: GraphConfig) -> None:
        from azure.identity.aio import CertificateCredential, ClientSecretCredential

        self.settings = settings
        verify: str | bool = str(settings.ca_file) if settings.ca_file else True
        authority = str(settings.authority).rstrip("/")
        self._credential: Any
        if settings.client_secret is not None:
            self._credential = ClientSecretCredential(
                settings.tenant_id, settings.client_id, settings.client_secret.get_secret_value(),
                authority=authority, connection_verify=verify)
        else:
            password = settings.certificate_password.get_secret_value().encode() \
                if settings.certificate_password else None
            self._credential = CertificateCredential(
                settings.tenant_id, settings.client_id, certificate_path=str(settings.certificate_file),
                password=password, authority=authority, connection_verify=verify)
        context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
        # its own context: httpcore sets ALPN (h2) on the context it is given, and aiohttp speaks HTTP/1.1 only
        self._context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
        self._read_session: aiohttp.ClientSession | None = None
        self._http = httpx.AsyncClient(
            verify=context, http2=True, timeout=httpx.Timeout(30.0, connect=10.0),
            limits=httpx.Limits(max_connections=2 * settings.concurrency + settings.read_concurrency,
                                max_keepalive_connections=2 * settings.concurrency + settings.read_concurrency))
        # Our source retries with its own back-off and write budget: kiota's hidden retries would spend the budget
        # behind its back and sleep up to 180 s inside one call.
        options = {RetryHandlerOption.get_key(): RetryHandlerOption(max_retries=0, should_retry=False)}
        client = GraphClientFactory.create_with_default_middleware(client=self._http, options=options)
        graph_url = httpx.URL(str(settings.graph_url))
        auth = AzureIdentityAuthenticationProvider(self._credential, scopes=SCOPES, allowed_hosts=[graph_url.host])
        adapter = GraphRequestAdapter(auth, client=client)
        adapter.base_url = str(settings.graph_url).rstrip("/")
        self._graph = GraphServiceClient(request_adapter=adapter)
        self._slots = asyncio.Semaphore(settings.concurrency)
        # reads for pushes have their own bound: a burst of them must not hold back renewals, nor wait behind them
        self._reads = asyncio.Semaphore(settings.read_concurrency)
        self._write_slots = asyncio.Semaphore(settings.concurrency)
        self._base = str(settings.graph_url).rstrip("/")

    async def close(self) -> None:
        await self._http.aclose()
        if self._read_session is not None:
            await self._read_session.close()
        await self._credential.close()

    async def _call(self, what: str, call: Any, *, write: bool = False) -> Any:
        # A write has spent its /subscriptions budget already: it goes at once (the source's few writer tasks bound
        # writes in flight), never queued behind delta reads, or it would reach Graph in a later 20 s window than
        # the one the budget counted it in.
        async with self._write_slots if write else self._slots:
            try:
                return await call
            except ODataError as exc:
                error = exc.error
                raise GraphCallError(exc.response_status_code or 0, (error.code if error else None) or "ODataError",
                                     (error.message if error else None) or "", _retry_after(exc.response_headers)
                                     ) from None
            except APIError as exc:
                raise GraphCallError(exc.response_status_code or 0, "APIError", exc.message or "",
                                     _retry_after(exc.response_headers)) from None
            except ClientAuthenticationError as exc:
                raise GraphCallError(401, "token", f"the token request failed: {str(exc)[:300]}") from None
            except (AzureError, httpx.HTTPError, OSError) as exc:
                raise GraphCallError(0, type(exc).__name__, f"{what}: {str(exc)[:300]}") from None

    # --- subscriptions ---------------------------------------------------------------------------------------

    async def create_subscription(self, mailbox: str, client_state: str, minutes: int) -> RemoteSubscription:
        expires = datetime.now(UTC) + timedelta(minutes=minutes)
        body = Subscription(
            change_type="created", notification_url=self.settings.webhook_url,
            lifecycle_notification_url=self.settings.lifecycle_url, resource=inbox_resource(mailbox),
            expiration_date_time=expires, client_state=client_state, latest_supported_tls_version="v1_2")
        made = await self._call("create subscription", self._graph.subscriptions.post(body), write=True)
        return self._remote(made)

    async def renew(self, subscription_id: str, minutes: int) -> datetime | None:
        expires = datetime.now(UTC) + timedelta(minutes=minutes)
        builder = self._graph.subscriptions.by_subscription_id(subscription_id)
        done = await self._call("renew subscription", builder.patch(Subscription(expiration_date_time=expires)),
                                write=True)
        return _aware(done.expiration_date_time) if done is not None else expires

    async def reauthorize(self, subscription_id: str) -> None:
        builder = self._graph.subscriptions.by_subscription_id(subscription_id).reauthorize
        await self._call("reauthorize subscription", builder.post(), write=True)

    async def delete_subscription(self, subscription_id: str) -> None:
        builder = self._graph.subscriptions.by_subscription_id(subscription_id)
        await self._call("delete subscription", builder.delete(), write=True)

    async def subscriptions(self) -> AsyncIterator[RemoteSubscription]:
        """Every subscription this app holds in the tenant, page by page (plain JSON: at 100,000 subscriptions
        kiota's model parsing made a restart's reconciliation take minutes of CPU)."""
        link: str | None = "subscriptions"
        while link is not None:
            page = await self._get_json("list subscriptions", link, None, for_push=False)
            for made in page.get("value") or ():
                if isinstance(made, dict) and isinstance(made.get("id"), str):
                    expires = made.get("expirationDateTime")
                    yield RemoteSubscription(made["id"], str(made.get("resource") or ""),
                                             made.get("notificationUrl"),
                                             _parse_time(expires) if isinstance(expires, str) else None)
            next_link = page.get("@odata.nextLink")
            link = next_link if isinstance(next_link, str) and next_link else None

    @staticmethod
    def _remote(made: Subscription | None) -> RemoteSubscription:
        if made is None or not made.id:
            raise GraphCallError(0, "EmptyAnswer", "Graph answered without a subscription")
        return RemoteSubscription(made.id, made.resource or "", made.notification_url,
                                  _aware(made.expiration_date_time))

    # --- mail ------------------------------------------------------------------------------------------------

    async def delta(self, mailbox: str, link: str | None, since: datetime | None) -> DeltaPage:
        """One page of the Inbox's changes: from `link` (a next or delta link), else a new round for mail received
        from `since` on (from the beginning if None)."""
        builder = self._graph.users.by_user_id(mailbox).mail_folders.by_mail_folder_id(INBOX).messages.delta
        config: RequestConfiguration[DeltaRequestBuilder.DeltaRequestBuilderGetQueryParameters] = \
            RequestConfiguration()
        config.headers.add("Prefer", f"odata.maxpagesize={DELTA_PAGE}")
        if link is not None:
            builder = builder.with_url(link)
        else:
            config.query_parameters = DeltaRequestBuilder.DeltaRequestBuilderGetQueryParameters(
                select=DETAIL_FIELDS, change_type="created",
                filter=f"receivedDateTime ge {since.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"
                if since is not None else None)
        answer = await self._call("delta", builder.get(config))
        if answer is None:
            raise GraphCallError(0, "EmptyAnswer", "Graph answered a delta request without a body")
        items = []
        for message in answer.value or ():
            if not message.id:
                continue
            removed = "@removed" in (message.additional_data or {})
            items.append(DeltaItem(message.id, _aware(message.received_date_time), bool(message.is_read), removed,
                                   None if removed else details_of(message)))
        return DeltaPage(items, answer.odata_next_link, answer.odata_delta_link)

    # Details and unread counts are read for pushes, thousands a second at peak: plain JSON with the same token,
    # over aiohttp, because kiota's model parsing costs milliseconds of CPU per answer and httpx itself was a
    # quarter of the daemon's CPU at 1,000 reads/s (py-spy, bench_graph.py).

    def _reader(self) -> aiohttp.ClientSession:
        if self._read_session is None:
            connector = aiohttp.TCPConnector(ssl=self._context,
                                             limit=self.settings.read_concurrency + self.settings.concurrency)
            self._read_session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=30.0, sock_connect=10.0))
        return self._read_session

    async def _get_json(self, what: str, path: str, params: dict[str, str] | None, *,
                        for_push: bool = True) -> dict[str, Any]:
        """GET a path under the Graph URL (or a whole link Graph gave, such as a nextLink)."""
        url = path if path.startswith(("https://", "http://")) else f"{self._base}/{path}"
        async with self._reads if for_push else self._slots:
            try:
                token = await self._credential.get_token(*SCOPES)
                async with self._reader().get(url, params=params, headers={
                        "Authorization": f"Bearer {token.token}", "Accept": "application/json"}) as answer:
                    status, headers, raw = answer.status, answer.headers, await answer.read()
            except ClientAuthenticationError as exc:
                raise GraphCallError(401, "token", f"the token request failed: {str(exc)[:300]}") from None
            except (AzureError, aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise GraphCallError(0, type(exc).__name__, f"{what}: {str(exc)[:300]}") from None
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if status >= 400:
            error = body.get("error") if isinstance(body, dict) else None
            error = error if isinstance(error, dict) else {}
            raise GraphCallError(status, str(error.get("code") or "HTTPError"),
                                 str(error.get("message") or "")[:300], _retry_after(headers))
        if not isinstance(body, dict):
            raise GraphCallError(0, "EmptyAnswer", f"{what}: Graph answered without a JSON object")
        return body

    async def message(self, mailbox: str, item_id: str) -> ItemDetails | None:
        try:
            found = await self._get_json("get message", f"users/{quote(mailbox)}/messages/{quote(item_id)}",
                                         {"$select": "subject,from,importance"})
        except GraphCallError as exc:
            if exc.status == 404:
                return None  # deleted or moved since: nothing to tell
            raise
        sender = found.get("from")
        address = sender.get("emailAddress", {}).get("address") if isinstance(sender, dict) else None
        kind = EventKind.MEETING_REQUEST if str(found.get("@odata.type", "")).lower().endswith("eventmessage") \
            else EventKind.NEW_MAIL
        subject = found.get("subject")
        return ItemDetails(kind, normalize_mailbox(address) if isinstance(address, str) and address else None,
                           subject if isinstance(subject, str) else None, _importance(found.get("importance")))

    async def unread_count(self, mailbox: str) -> int | None:
        folder = await self._get_json("get inbox", f"users/{quote(mailbox)}/mailFolders/{INBOX}",
                                      {"$select": "unreadItemCount"})
        count = folder.get("unreadItemCount")
        return count if isinstance(count, int) and not isinstance(count, bool) else None
