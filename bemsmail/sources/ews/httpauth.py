"""Credentials for our own aiohttp requests to EWS: Basic, NTLM (pyspnego), Bearer, and app-only OAuth2 tokens.

Why here and not exchangelib's: exchangelib authenticates requests Sessions; the GetStreamingEvents connections
run on aiohttp, so each scheme is re-done as an `EwsAuth` that performs the POST itself — a handshake (NTLM) or
a retry with a fresh token (Bearer) needs more than one request.

NTLM authenticates a TCP connection, not a request: the challenge leg and the authenticate leg must travel on the
same connection. So the session given to `NtlmAuth.authorize` must be dedicated to one stream and have a pool of
one (``aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))``); `NtlmAuth` refuses a larger pool, and
says so when the server or the pool moved the second leg to another connection. Over TLS the authenticate
message carries the channel binding of the server certificate (tls-server-end-point), which Exchange's Extended
Protection requires.

Secrets — passwords, client secrets, tokens, NTLM messages — appear in no repr, exception text or log record:
the fields are ``repr=False``, errors name what failed but never what was sent, and pyspnego's own DEBUG records
of every NTLM token are filtered out (see `_DropNtlmTokens`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import spnego
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from spnego.channel_bindings import GssChannelBindings
from spnego.exceptions import SpnegoError
from yarl import URL

EWS_SCOPE = "https://outlook.office365.com/.default"
DEFAULT_AUTHORITY = "https://login.microsoftonline.com"
#: a token is replaced this long before it expires (or at half its life, if that is shorter)
REFRESH_MARGIN_SECONDS = 300.0
#: 401 bodies are read (so the connection can be reused) up to this size, then the connection is dropped
_DISCARD_LIMIT = 64 * 1024
_TOKEN_BODY_LIMIT = 256 * 1024


class EwsAuthError(Exception):
    """Authentication could not be carried out (as opposed to being refused with a 401, which is an answer)."""


class TokenError(EwsAuthError):
    """The token endpoint did not give a token; `status` is its HTTP status (None: it was not reached)."""

    def __init__(self, message: str, *, status: int | None = None, error: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error


class EwsAuth(Protocol):
    async def authorize(self, session: aiohttp.ClientSession, url: str, body: bytes, headers: Mapping[str, str], *,
                        client_timeout: aiohttp.ClientTimeout | None = None) -> aiohttp.ClientResponse:
        """POST `body` to `url` with `headers` and credentials, doing any handshake; return the final response
        with its body not yet read (the caller reads and releases it). `client_timeout` defaults to the session's."""
        ...


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, headers: Mapping[str, str],
                client_timeout: aiohttp.ClientTimeout | None) -> aiohttp.ClientResponse:
    # Redirects are answers here: EWS does not redirect a POST anywhere useful (a 302 goes to a login page).
    return await session.post(url, data=body, headers=headers, timeout=client_timeout or session.timeout,
                              allow_redirects=False)


async def _discard(response: aiohttp.ClientResponse) -> None:
    """Read and release an interim answer (a 401), so its connection goes back to the pool for the next leg."""
    try:
        read = 0
        while chunk := await response.content.read(16384):
            read += len(chunk)
            if read > _DISCARD_LIMIT:
                response.close()
                return
    except (aiohttp.ClientError, TimeoutError):
        response.close()
        return
    response.release()


def _with(headers: Mapping[str, str], authorization: str) -> dict[str, str]:
    merged = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    merged["Authorization"] = authorization
    return merged


# --- Basic ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BasicAuth:
    """``Authorization: Basic`` — on-premises Exchange with Basic enabled, and test servers."""

    username: str
    password: str = field(repr=False)
    _header: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.username or ":" in self.username:
            raise ValueError("BasicAuth needs a username without ':'")
        pair = f"{self.username}:{self.password}"
        # IIS decodes Basic credentials in the server's code page: Latin-1 matches it for what Latin-1 can carry;
        # anything else goes as UTF-8 (RFC 7617's charset). Encoding errors would quote a password character.
        try:
            raw = pair.encode("latin-1")
        except UnicodeEncodeError:
            raw = pair.encode("utf-8")
        object.__setattr__(self, "_header", "Basic " + base64.b64encode(raw).decode("ascii"))

    async def authorize(self, session: aiohttp.ClientSession, url: str, body: bytes, headers: Mapping[str, str], *,
                        client_timeout: aiohttp.ClientTimeout | None = None) -> aiohttp.ClientResponse:
        return await _post(session, url, body, _with(headers, self._header), client_timeout)


# --- NTLM -----------------------------------------------------------------------------------------------------


class _DropNtlmTokens(logging.Filter):
    """pyspnego logs every NTLM token it reads and writes at DEBUG ("NTLM step input/output: <base64>"); the
    authenticate message carries a crackable NTLMv2 response, so those records never leave the library."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("NTLM step")


_NTLM_LOG_FILTER = _DropNtlmTokens()
for _name in ("spnego._ntlm", "spnego._negotiate", "spnego"):
    if _NTLM_LOG_FILTER not in logging.getLogger(_name).filters:
        logging.getLogger(_name).addFilter(_NTLM_LOG_FILTER)

_NTLM_CHALLENGE = re.compile(r"(?:^|,)\s*NTLM\s+([A-Za-z0-9+/=]+)\s*(?:,|$)", re.IGNORECASE)


def _ntlm_challenge(response: aiohttp.ClientResponse) -> bytes | None:
    for value in response.headers.getall("WWW-Authenticate", []):
        found = _NTLM_CHALLENGE.search(value)
        if found is not None:
            try:
                return base64.b64decode(found.group(1), validate=True)
            except ValueError:
                return None
    return None


def _protocol_of(response: aiohttp.ClientResponse) -> Any:
    """The connection (aiohttp protocol object) a response came on.

    ``response.connection`` is public but None as soon as the whole body has arrived with the headers — which is
    how a small 401 arrives — because aiohttp then hands the connection back to the pool at once. The protocol
    object stays on the response as ``_protocol`` (aiohttp 3.14, pinned; the NTLM tests exercise it)."""
    connection = response.connection
    if connection is not None:
        return connection.protocol
    return getattr(response, "_protocol", None)


def _channel_bindings(protocol: Any) -> GssChannelBindings | None:
    """RFC 5929 tls-server-end-point of the connection's server certificate: its hash by the certificate's own
    signature hash, SHA-256 when that is MD5 or SHA-1 (or unknown)."""
    transport = getattr(protocol, "transport", None)
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    algorithm: hashes.HashAlgorithm = hashes.SHA256()
    try:
        signed_with = x509.load_der_x509_certificate(der).signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm):
        signed_with = None
    if signed_with is not None and signed_with.name not in ("md5", "sha1"):
        algorithm = signed_with
    digest = hashes.Hash(algorithm)
    digest.update(der)
    return GssChannelBindings(application_data=b"tls-server-end-point:" + digest.finalize())


@dataclass(frozen=True, slots=True)
class NtlmAuth:
    """NTLM over HTTP (on-premises Exchange's default): ``DOMAIN\\user``, ``user@domain``, or `domain` apart.

    One `authorize` is one handshake: POST with the negotiate message and no body → 401 with the challenge (read
    and released, so the connection returns to the pool) → POST on that same connection with the authenticate
    message and the body. The session must be dedicated to one stream, with ``TCPConnector(limit=1)``.
    """

    username: str
    password: str = field(repr=False)
    domain: str | None = None

    def __post_init__(self) -> None:
        if not self.username:
            raise ValueError("NtlmAuth needs a username")
        if self.domain and ("\\" in self.username or "@" in self.username):
            raise ValueError("give the domain either in the username or as domain, not both")

    @property
    def principal(self) -> str:
        return f"{self.domain}\\{self.username}" if self.domain else self.username

    async def authorize(self, session: aiohttp.ClientSession, url: str, body: bytes, headers: Mapping[str, str], *,
                        client_timeout: aiohttp.ClientTimeout | None = None) -> aiohttp.ClientResponse:
        connector = session.connector
        if isinstance(connector, aiohttp.TCPConnector) and connector.limit != 1:
            raise EwsAuthError("NTLM needs a session of its own with TCPConnector(limit=1): it authenticates "
                               "one connection, and a larger pool may carry the second leg on another")
        try:
            context = spnego.client(self.principal, self.password, hostname=URL(url).host or "unspecified",
                                    service="HTTP", protocol="ntlm")
            negotiate = context.step()
        except SpnegoError:
            raise EwsAuthError("NTLM negotiate message could not be made") from None
        assert negotiate is not None
        # The first leg carries no body: the server answers it with the challenge without reading a request.
        first = await _post(session, url, b"",
                            _with(headers, "NTLM " + base64.b64encode(negotiate).decode("ascii")), client_timeout)
        try:
            challenge = _ntlm_challenge(first) if first.status == 401 else None
            if challenge is None:
                return first  # no NTLM challenge (another scheme, or no auth needed): the caller sees the answer
            leg_one = _protocol_of(first)
            bindings = _channel_bindings(leg_one)
        except BaseException:
            first.close()
            raise
        await _discard(first)
        if leg_one is not None and not leg_one.is_connected():
            # Closed after the challenge (Connection: close, or a body too big to drain): the authenticate leg
            # would open a new connection, which the challenge does not belong to.
            raise EwsAuthError("the server closed the connection after the NTLM challenge; NTLM needs it kept "
                               "alive for the authenticate leg")
        try:
            authenticate = context.step(challenge, channel_bindings=bindings)
        except Exception:  # pyspnego raises ValueError/struct errors, not only SpnegoError, for a bad challenge
            raise EwsAuthError("the server's NTLM challenge could not be answered") from None
        assert authenticate is not None
        final = await _post(session, url, body,
                            _with(headers, "NTLM " + base64.b64encode(authenticate).decode("ascii")), client_timeout)
        leg_two = _protocol_of(final)
        if leg_one is not None and leg_two is not None and leg_one is not leg_two:
            final.close()
            raise EwsAuthError("the NTLM authenticate leg went out on a new connection: the server closed the "
                               "challenge's connection, or the session is shared")
        return final


# --- Bearer ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BearerAuth:
    """``Authorization: Bearer`` from `token_provider`; a 401 gets one fresh token and one re-send.

    Before asking again it calls ``invalidate(token)`` on the provider (or on the object a bound-method provider
    belongs to) when there is one, so a caching provider such as `ClientCredentialsTokens` really fetches anew.
    """

    token_provider: Callable[[], Awaitable[str]] = field(repr=False)

    async def authorize(self, session: aiohttp.ClientSession, url: str, body: bytes, headers: Mapping[str, str], *,
                        client_timeout: aiohttp.ClientTimeout | None = None) -> aiohttp.ClientResponse:
        token = await self.token_provider()
        response = await _post(session, url, body, _with(headers, f"Bearer {token}"), client_timeout)
        if response.status != 401:
            return response
        await _discard(response)
        owner = getattr(self.token_provider, "__self__", None)
        invalidate = getattr(self.token_provider, "invalidate", None) or getattr(owner, "invalidate", None)
        if callable(invalidate):
            invalidate(token)
        fresh = await self.token_provider()
        return await _post(session, url, body, _with(headers, f"Bearer {fresh}"), client_timeout)


# --- OAuth2 client credentials --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Cached:
    token: str = field(repr=False)
    refresh_at: float


class ClientCredentialsTokens:
    """App-only EWS tokens (``full_access_as_app``) by the OAuth2 client-credentials grant:
    POST {authority}/{tenant}/oauth2/v2.0/token with scope https://outlook.office365.com/.default.

    A token is cached until 5 minutes before it expires (half its life when that is shorter); one refresh runs at
    a time, and whoever waits for it gets its result. `token` (or calling the object) gives the token;
    `invalidate` drops it if it is still the cached one, so hundreds of streams rejected at once cause one fetch.
    Without a `session` one is made on first use; `close` closes it.
    """

    __slots__ = ("_authority", "_cached", "_client_id", "_client_secret", "_clock", "_failed", "_finished",
                 "_lock", "_own_session", "_scope", "_session", "_tenant", "_timeout", "fetches")

    def __init__(self, authority: str, tenant_id: str, client_id: str, client_secret: str, *,
                 session: aiohttp.ClientSession | None = None, scope: str = EWS_SCOPE, timeout: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not tenant_id or "/" in tenant_id or not client_id or not client_secret:
            raise ValueError("ClientCredentialsTokens needs a tenant id (no '/'), a client id and a client secret")
        self._authority = (authority or DEFAULT_AUTHORITY).rstrip("/")
        self._tenant = tenant_id
        self._client_id = client_id
        self._client_secret = client_secret
        self._scope = scope
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._session = session
        self._own_session = session is None
        self._lock = asyncio.Lock()
        self._cached: _Cached | None = None
        self._finished = 0  # fetches ended, either way
        self._failed: TokenError | None = None  # how the last fetch failed, for those who waited on it
        self.fetches = 0  # token requests made: for metrics and tests

    def __repr__(self) -> str:
        return f"ClientCredentialsTokens(authority={self._authority!r}, tenant_id={self._tenant!r}, " \
               f"client_id={self._client_id!r})"

    @property
    def token_url(self) -> str:
        return f"{self._authority}/{self._tenant}/oauth2/v2.0/token"

    async def __call__(self) -> str:
        return await self.token()

    async def token(self) -> str:
        cached = self._cached
        if cached is not None and self._clock() < cached.refresh_at:
            return cached.token
        finished = self._finished
        async with self._lock:
            # Whoever held the lock may have just refreshed it — or failed to: then those who waited for that
            # fetch share its failure instead of each trying again (hundreds of streams, one slow endpoint).
            cached = self._cached
            if cached is not None and self._clock() < cached.refresh_at:
                return cached.token
            failed = self._failed
            if failed is not None and self._finished != finished:
                raise TokenError(str(failed), status=failed.status, error=failed.error)
            self._failed = None
            try:
                self._cached = await self._fetch()
            except TokenError as exc:
                self._failed = exc
                raise
            finally:
                self._finished += 1
            return self._cached.token

    def invalidate(self, token: str) -> None:
        """Forget `token` if it is the cached one (a server refused it); the next `token` call fetches anew."""
        if self._cached is not None and self._cached.token == token:
            self._cached = None

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def _fetch(self) -> _Cached:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        form = {"grant_type": "client_credentials", "client_id": self._client_id,
                "client_secret": self._client_secret, "scope": self._scope}
        self.fetches += 1
        started = self._clock()
        try:
            async with self._session.post(self.token_url, data=form, timeout=self._timeout,
                                          headers={"Accept": "application/json"}) as response:
                status = response.status
                raw = await response.content.read(_TOKEN_BODY_LIMIT)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TokenError(f"token endpoint {URL(self.token_url).host} not reached ({type(exc).__name__})") \
                from None
        document = self._json(raw)
        if status != 200:
            error = document.get("error") if isinstance(document.get("error"), str) else None
            codes = re.findall(r"AADSTS\d+", str(document.get("error_description", "")))
            detail = f" {error}" if error else ""
            detail += f" ({', '.join(dict.fromkeys(codes))})" if codes else ""
            raise TokenError(f"token endpoint answered {status}{detail}", status=status, error=error)
        token = document.get("access_token")
        try:
            lifetime = float(document.get("expires_in", 3600))
        except (TypeError, ValueError):
            lifetime = -1.0
        if not isinstance(token, str) or not token or lifetime <= 0:
            raise TokenError("token endpoint answered 200 without a usable access_token/expires_in", status=status)
        margin = min(REFRESH_MARGIN_SECONDS, lifetime / 2)
        return _Cached(token, started + lifetime - margin)

    @staticmethod
    def _json(raw: bytes) -> dict[str, Any]:
        try:
            document = json.loads(raw)
        except ValueError:
            return {}
        return document if isinstance(document, dict) else {}
