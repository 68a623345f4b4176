"""Who is calling the API: API keys for a trusted front end, or OIDC bearer JWTs bound to one mailbox."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import jwt
import structlog

from bemsmail.config import AuthConfig, OidcConfig

log = structlog.get_logger(__name__)

_EMAIL_MIN = 3
FETCH_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Principal:
    kind: Literal["api_key", "oidc"]
    name: str
    #: None: may act for any mailbox (a trusted front end); else the one mailbox this caller is
    mailbox: str | None

    def may_act_for(self, mailbox: str) -> bool:
        return self.mailbox is None or self.mailbox == mailbox


class AuthError(Exception):
    """401: credentials missing or invalid. `detail` is safe to show: it never contains the credential."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class AuthUnavailable(Exception):
    """503: the identity provider's keys could not be fetched; not the caller's fault."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_api_key() -> str:
    return secrets.token_urlsafe(32)


class _Jwks:
    """The issuer's signing keys by kid: cached, refreshed on an unknown kid at a bounded rate, one fetch at a time.

    A failed fetch counts against the rate bound too: requests waiting on it share its failure, and later ones
    fail fast until the minimum interval has passed, so an IdP outage is not met with a fetch (and a timeout)
    per request. Keys already known keep verifying while a refresh fails."""

    def __init__(self, config: OidcConfig, session: Callable[[], aiohttp.ClientSession]) -> None:
        self._config = config
        self._session = session
        self._keys: dict[str, dict[str, Any]] = {}  # kid -> the JWK as published
        self._prepared: dict[tuple[str, str], jwt.PyJWK] = {}  # (kid, alg) -> key bound to that alg
        self._fetched_at = -float("inf")  # last successful fetch
        self._attempted_at = -float("inf")  # last completed fetch attempt, successful or not
        self._attempts = 0
        self._failure: str | None = None  # detail of the last attempt's failure; None if it succeeded
        self._lock = asyncio.Lock()
        self._jwks_url = str(config.jwks_url) if config.jwks_url else None
        self._ssl: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(config.ca_file)) if config.ca_file else True
        )

    async def key(self, kid: str, alg: str) -> jwt.PyJWK:
        now = time.monotonic()
        if kid not in self._keys or now - self._fetched_at > self._config.jwks_cache_seconds:
            try:
                await self._refresh(kid)
            except AuthUnavailable:
                if kid not in self._keys:
                    raise
                log.warning("jwks_refresh_failed_using_cached_keys", kid=kid[:64])
        jwk = self._keys.get(kid)
        if jwk is None:
            raise AuthError("token signed by an unknown key")
        return self._for_alg(kid, jwk, alg)

    def _for_alg(self, kid: str, jwk: dict[str, Any], alg: str) -> jwt.PyJWK:
        """The key bound to the token's (already allowed) alg. A JWK that names its alg is used with that alg
        only; one that does not (Entra's) is used with whichever allowed alg its key type supports."""
        prepared = self._prepared.get((kid, alg))
        if prepared is None:
            if jwk.get("alg", alg) != alg:
                raise AuthError("token algorithm does not match its signing key")
            try:
                prepared = jwt.PyJWK(jwk, algorithm=alg)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
                raise AuthError("token algorithm does not match its signing key") from None
            self._prepared[(kid, alg)] = prepared
        return prepared

    async def _refresh(self, kid: str) -> None:
        attempts_before = self._attempts
        async with self._lock:
            if self._attempts != attempts_before:
                # another request fetched while we waited: share its outcome instead of fetching again
                if self._failure is not None:
                    raise AuthUnavailable(self._failure)
                return
            now = time.monotonic()
            if now - self._attempted_at < self._config.jwks_refresh_min_interval_seconds:
                if self._failure is not None:
                    raise AuthUnavailable(self._failure)  # it failed moments ago: do not hammer it
                if now - self._fetched_at <= self._config.jwks_cache_seconds:
                    return  # fetched moments ago: an unknown kid stays unknown until the interval passes
            try:
                keys = await self._fetch()
            except AuthUnavailable as exc:
                self._attempted(now, exc.detail)
                raise
            self._attempted(now, None)
            self._keys = keys
            self._prepared = {}
            self._fetched_at = time.monotonic()
            log.info("jwks_refreshed", keys=len(self._keys), wanted_kid=kid[:64])

    def _attempted(self, at: float, failure: str | None) -> None:
        """Record a completed attempt (a cancelled one is none: the next waiter tries again)."""
        self._attempts += 1
        self._attempted_at = at
        self._failure = failure

    async def _get_json(self, url: str) -> Any:
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
        try:
            async with self._session().get(url, timeout=timeout, ssl=self._ssl) as resp:
                if resp.status != 200:
                    raise AuthUnavailable(f"the identity provider answered {resp.status} for its keys")
                return json.loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("jwks_fetch_failed", url=url, error=type(exc).__name__)
            raise AuthUnavailable("the identity provider's keys cannot be fetched right now") from None

    async def _fetch(self) -> dict[str, dict[str, Any]]:
        if self._jwks_url is None:
            issuer = str(self._config.issuer).rstrip("/")
            metadata = await self._get_json(f"{issuer}/.well-known/openid-configuration")
            if not isinstance(metadata, dict) or not isinstance(metadata.get("jwks_uri"), str):
                raise AuthUnavailable("the issuer's metadata has no jwks_uri")
            self._jwks_url = metadata["jwks_uri"]
        document = await self._get_json(self._jwks_url)
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise AuthUnavailable("the identity provider's key set is not a JWKS (no \"keys\" list)")
        keys: dict[str, dict[str, Any]] = {}
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" or "kid" not in entry:
                continue
            try:
                jwt.PyJWK(entry)  # usable at all? (bound to the token's alg when used)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
                log.warning("jwks_key_skipped", kid=str(entry.get("kid"))[:64])
                continue
            keys[str(entry["kid"])] = entry
        return keys


class Authenticator:
    """Turns request headers into a Principal, or raises AuthError / AuthUnavailable."""

    def __init__(
        self, config: AuthConfig, session_factory: Callable[[], aiohttp.ClientSession] | None = None
    ) -> None:
        self._config = config
        self._key_hashes = [(k.name, bytes.fromhex(k.sha256)) for k in config.api_keys]
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._jwks = _Jwks(config.oidc, self._client) if config.oidc else None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = self._session_factory() if self._session_factory else aiohttp.ClientSession()
        return self._session

    async def start(self) -> None:
        if self._jwks is not None:
            self._client()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def authenticate(self, authorization: str | None, api_key_header: str | None) -> Principal:
        if api_key_header is not None:
            return self._api_key(api_key_header)
        if not authorization:
            raise AuthError("missing credentials: send X-API-Key or Authorization: Bearer")
        scheme, _, credential = authorization.strip().partition(" ")
        credential = credential.strip()
        if not credential:
            raise AuthError("malformed Authorization header")
        if scheme.lower() == "apikey":
            return self._api_key(credential)
        if scheme.lower() == "bearer":
            return await self._bearer(credential)
        raise AuthError("unsupported authorization scheme: use Bearer or ApiKey")

    def _api_key(self, presented: str) -> Principal:
        if not self._key_hashes:
            raise AuthError("API keys are not accepted here")
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        matched: str | None = None
        for name, expected in self._key_hashes:  # compare against every key: timing says nothing about which
            if hmac.compare_digest(digest, expected):
                matched = name
        if matched is None:
            raise AuthError("invalid API key")
        return Principal("api_key", matched, None)

    async def _bearer(self, token: str) -> Principal:
        oidc = self._config.oidc
        if oidc is None or self._jwks is None:
            raise AuthError("bearer tokens are not accepted here")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:  # DecodeError, and also a non-string kid or an unsupported crit
            raise AuthError("malformed bearer token") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in oidc.algorithms:
            raise AuthError("token algorithm not accepted")
        if not isinstance(kid, str) or not kid:
            raise AuthError("token has no key id (kid)")
        key = await self._jwks.key(kid, str(alg))
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=list(oidc.algorithms),
                audience=oidc.audience,
                issuer=[str(oidc.issuer).rstrip("/"), str(oidc.issuer).rstrip("/") + "/"],
                leeway=oidc.leeway_seconds,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature invalid") from None
        except (jwt.InvalidAlgorithmError, jwt.InvalidKeyError):  # e.g. an EC key on another curve than the alg's
            raise AuthError("token algorithm does not match its signing key") from None
        except jwt.InvalidTokenError:
            raise AuthError("invalid bearer token") from None
        mailbox = claims.get(oidc.mailbox_claim)
        if not isinstance(mailbox, str) or "@" not in mailbox or len(mailbox) < _EMAIL_MIN:
            raise AuthError(f"token has no e-mail address in its {oidc.mailbox_claim!r} claim")
        return Principal("oidc", str(claims.get("sub", "?")), mailbox.strip().lower())
