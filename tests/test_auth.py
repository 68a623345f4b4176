"""OIDC bearer tokens end to end: real keys, real signed JWTs, a real JWKS endpoint on loopback, the real API.

The identity provider is an aiohttp server on 127.0.0.1 shaped like Microsoft Entra ID (issuer
`/<tenant>/v2.0`, metadata at `<issuer>/.well-known/openid-configuration`, keys at
`/<tenant>/discovery/v2.0/keys`); it counts every fetch so the tests can say exactly how often bemsmail asks.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from bemsmail.api import auth
from bemsmail.config import Config, load_config
from bemsmail.log import configure_logging
from tests.support import Api, dev_config, registration, running_api

PROBLEM = "application/problem+json"
URL = "/api/v1/registrations"
TENANT = "9188040d-6c67-4c5b-b112-36a304b66dad"
AUDIENCE = "api://bemsmail"
OTHER_AUDIENCE = "6731de76-14a6-49ae-97bc-6eba6914391e"
ALICE = "alice@example.com"
BOB = "bob@example.com"
LEEWAY = 30
DROP: Any = object()  # a claim value meaning "leave this claim out"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# --- keys and tokens ------------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    private: PrivateKey

    def jwk(self, *, with_alg: bool = True, **extra: Any) -> dict[str, Any]:
        """The public half as a JWKS entry. Entra's entries carry no `alg`; many other IdPs' do."""
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            entry: dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            entry = ECAlgorithm.to_jwk(public, as_dict=True)
        entry.update(kid=self.kid, use="sig")
        if with_alg:
            entry["alg"] = self.alg
        entry.update(extra)
        return entry

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: Mapping[str, Any], *, alg: str | None = None, **header: Any) -> str:
        headers: dict[str, Any] = {"kid": self.kid, **header}
        return jwt.encode(dict(claims), self.private, algorithm=alg or self.alg, headers=headers)


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


RSA_1 = SigningKey("rsa-1", "RS256", _rsa())
RSA_2 = SigningKey("rsa-2", "RS256", _rsa())  # the key the IdP rotates to
IMPOSTOR = SigningKey("rsa-1", "RS256", _rsa())  # claims RSA_1's kid, but it is nobody's published key
EC_1 = SigningKey("ec-1", "ES256", ec.generate_private_key(ec.SECP256R1()))
EC_384 = SigningKey("ec-384", "ES384", ec.generate_private_key(ec.SECP384R1()))


def unsigned(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes = b"") -> str:
    """A compact JWS assembled by hand, for what PyJWT refuses to produce."""
    head = b64url(json.dumps(dict(header)).encode())
    body = b64url(json.dumps(dict(claims)).encode())
    return f"{head}.{body}.{b64url(signature)}"


def hmac_signed(header: Mapping[str, Any], claims: Mapping[str, Any], secret: bytes) -> str:
    head = b64url(json.dumps(dict(header)).encode())
    body = b64url(json.dumps(dict(claims)).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(mac)}"


# --- the identity provider ------------------------------------------------------------------------------------


class Idp:
    """Discovery document and JWKS on loopback; `status` breaks it, `gate` holds key fetches until opened."""

    def __init__(self) -> None:
        self.keys: list[Any] = [RSA_1.jwk(), EC_1.jwk()]
        self.fetches: Counter[str] = Counter()
        self.status = 200
        self.raw_jwks: bytes | None = None
        self.metadata: dict[str, Any] | None = None
        self.gate = asyncio.Event()
        self.gate.set()
        self.fetching = asyncio.Event()  # set once a key fetch has arrived
        app = web.Application()
        app.router.add_get(f"/{TENANT}/v2.0/.well-known/openid-configuration", self._metadata)
        app.router.add_get(f"/{TENANT}/discovery/v2.0/keys", self._jwks)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/{TENANT}/v2.0"

    @property
    def jwks_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/{TENANT}/discovery/v2.0/keys"

    async def _metadata(self, request: web.Request) -> web.Response:
        self.fetches["metadata"] += 1
        if self.status != 200:
            return web.Response(status=self.status)
        document = self.metadata if self.metadata is not None else {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_url,
            "id_token_signing_alg_values_supported": ["RS256"],
        }
        return web.json_response(document)

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches["jwks"] += 1
        self.fetching.set()
        await self.gate.wait()
        if self.status != 200:
            return web.Response(status=self.status, text="upstream trouble")
        if self.raw_jwks is not None:
            return web.Response(body=self.raw_jwks, content_type="application/json")
        return web.json_response({"keys": self.keys})

    async def start(self) -> None:
        await self.server.start_server()

    async def close(self) -> None:
        self.gate.set()  # never leave a handler hanging on shutdown
        await self.server.close()


@pytest.fixture
async def idp() -> AsyncIterator[Idp]:
    provider = Idp()
    await provider.start()
    try:
        yield provider
    finally:
        await provider.close()


def oidc_config(tmp_path: Path, idp: Idp, **settings: str | None) -> tuple[Config, str]:
    """The development config plus an [api.auth.oidc] section, given as BEMSMAIL_API__AUTH__OIDC__* overrides.
    A setting given as None is left out (its default applies)."""
    values: dict[str, str | None] = {
        "issuer": idp.issuer,
        "audience": json.dumps([AUDIENCE, OTHER_AUDIENCE]),
        "jwks_url": idp.jwks_url,
        "algorithms": json.dumps(["RS256", "ES256"]),
        "leeway_seconds": str(LEEWAY),
        "jwks_refresh_min_interval_seconds": "0",
    }
    values.update(settings)
    env = {f"BEMSMAIL_API__AUTH__OIDC__{name.upper()}": v for name, v in values.items() if v is not None}
    return dev_config(tmp_path, env=env)


@pytest.fixture
async def api(tmp_path: Path, idp: Idp) -> AsyncIterator[Api]:
    async with running_api(*oidc_config(tmp_path, idp)) as running:
        yield running


def claims(idp: Idp, mailbox: str = ALICE, claim: str = "preferred_username", **overrides: Any) -> dict[str, Any]:
    """Entra-shaped v2 access-token claims, times relative to now."""
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": idp.issuer,
        "aud": AUDIENCE,
        "sub": f"sub-{mailbox.split('@')[0]}",
        "tid": TENANT,
        "iat": now - 5,
        "nbf": now - 5,
        "exp": now + 600,
        "scp": "Mail.Push",
        claim: mailbox,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not DROP}


# --- talking to the API ---------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: Mapping[str, str]
    text: str


@dataclass
class Leaks:
    """Every token sent; checked against every response body, and later against the captured log."""

    tokens: list[str] = field(default_factory=list)

    def fragments(self) -> list[str]:
        parts = self.tokens + [p for t in self.tokens for p in t.split(".")]
        return [p for p in parts if len(p) >= 16]

    def assert_absent(self, text: str) -> None:
        for fragment in self.fragments():
            assert fragment not in text


async def send(
    api: Api,
    method: str,
    path: str,
    token: str | None = None,
    *,
    body: Any = None,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    content_type: str = "application/json",
) -> Reply:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body)
        sent["Content-Type"] = content_type
    resp = await api.client.request(method, path, data=data, params=params, headers=sent)
    text = await resp.text()
    reply = Reply(resp.status, json.loads(text) if text else {}, resp.headers, text)
    if reply.status >= 400:
        assert resp.headers["Content-Type"].startswith(PROBLEM), text
        assert reply.body["status"] == reply.status and reply.body["detail"]
    if token is not None:
        Leaks([token]).assert_absent(text)
    return reply


async def register(api: Api, token: str, mailbox: str = ALICE, **overrides: Any) -> Reply:
    return await send(api, "POST", URL, token, body=registration(mailbox=mailbox, **overrides))


async def rejected(api: Api, token: str, detail: str) -> Reply:
    """A registration attempt that must fail with 401 and a detail naming why (never echoing the token)."""
    reply = await register(api, token)
    assert reply.status == 401, reply.text
    assert reply.body["type"] == "urn:bemsmail:problem:unauthorized"
    assert detail in reply.body["detail"], reply.body["detail"]
    assert "WWW-Authenticate" in reply.headers
    return reply


async def count_for(api: Api, mailbox: str) -> int:
    """Registrations of `mailbox`, seen through the trusted front end's API key."""
    reply = await send(api, "GET", URL, params={"mailbox": mailbox}, headers=api.headers)
    assert reply.status == 200
    return len(reply.body["items"])


class Clock:
    """Stands in for `time` inside bemsmail.api.auth: the rate limit is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 10_000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(auth, "time", fake)
    return fake


def arrivals(monkeypatch: pytest.MonkeyPatch, api: Api, expected: int) -> asyncio.Event:
    """Set once `expected` requests have reached authentication. Nothing between that point and the key set's
    lock yields to the loop, so by the time a waiter on this event runs, each of them waits on the lock (or,
    for the first, on its fetch)."""
    authenticator = api.node.authenticator
    original = authenticator.authenticate
    ready = asyncio.Event()
    seen = 0

    async def counting(authorization: str | None, api_key_header: str | None) -> auth.Principal:
        nonlocal seen
        seen += 1
        if seen == expected:
            ready.set()
        return await original(authorization, api_key_header)

    monkeypatch.setattr(authenticator, "authenticate", counting)
    return ready


async def all_waiting(ready: asyncio.Event, idp: Idp) -> None:
    async with asyncio.timeout(10):
        await ready.wait()
        await idp.fetching.wait()


# --- the happy paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [RSA_1, EC_1], ids=["RS256", "ES256"])
async def test_valid_token_registers_and_manages_its_own_mailbox(api: Api, idp: Idp, key: SigningKey) -> None:
    token = key.sign(claims(idp))
    created = await register(api, token)
    assert created.status == 201, created.text
    assert created.body["mailbox"] == ALICE
    one = f"{URL}/{created.body['id']}"

    listed = await send(api, "GET", URL, token, params={"mailbox": ALICE})
    assert listed.status == 200
    assert [item["id"] for item in listed.body["items"]] == [created.body["id"]]

    assert (await send(api, "GET", one, token)).status == 200
    patched = await send(api, "PATCH", one, token, body={"locale": "de-DE"},
                         content_type="application/merge-patch+json")
    assert patched.status == 200 and patched.body["locale"] == "de-DE"
    assert (await register(api, token, device_id="iphone-1")).status == 200  # same device: an update
    assert (await send(api, "DELETE", one, token)).status == 204
    assert await count_for(api, ALICE) == 0
    assert idp.fetches == Counter(jwks=1)  # one fetch, then the cache


async def test_token_cannot_touch_another_mailbox(api: Api, idp: Idp) -> None:
    bobs = await send(api, "POST", URL, body=registration(mailbox=BOB, device_id="bob-phone", token="cd" * 32),
                      headers=api.headers)
    assert bobs.status == 201
    bob_one = f"{URL}/{bobs.body['id']}"
    alice = RSA_1.sign(claims(idp))

    post = await register(api, alice, mailbox=BOB)
    assert post.status == 403 and post.body["type"] == "urn:bemsmail:problem:wrong-mailbox"
    assert BOB not in post.text
    listing = await send(api, "GET", URL, alice, params={"mailbox": BOB})
    assert listing.status == 403 and listing.body["type"] == "urn:bemsmail:problem:wrong-mailbox"

    # Bob's registration is invisible to Alice: the same 404 as an id that does not exist at all.
    nowhere = await send(api, "GET", f"{URL}/{'0' * 32}", alice)
    assert nowhere.status == 404
    for method, body in (("GET", None), ("PATCH", {"locale": "fr"}), ("DELETE", None)):
        reply = await send(api, method, bob_one, alice, body=body, content_type="application/merge-patch+json")
        assert reply.status == 404, (method, reply.text)
        assert reply.body["type"] == nowhere.body["type"] and reply.body["detail"] == nowhere.body["detail"]

    still = await send(api, "GET", bob_one, headers=api.headers)
    assert still.status == 200 and still.body["locale"] is None
    assert await count_for(api, BOB) == 1


@pytest.mark.parametrize("claim", ["upn", "preferred_username", "email"])
async def test_each_configurable_mailbox_claim(tmp_path: Path, idp: Idp, claim: str) -> None:
    others = {c: BOB for c in ("upn", "preferred_username", "email") if c != claim}
    async with running_api(*oidc_config(tmp_path, idp, mailbox_claim=claim)) as api:
        token = RSA_1.sign(claims(idp, ALICE, claim, **others))
        assert (await register(api, token, mailbox=ALICE)).status == 201
        assert (await register(api, token, mailbox=BOB, device_id="other")).status == 403  # the others don't count
        # Only the configured claim names the mailbox: a token without it is refused outright.
        dropped: dict[str, Any] = {**others, claim: DROP}
        without = RSA_1.sign(claims(idp, ALICE, claim, **dropped))
        await rejected(api, without, f"no e-mail address in its {claim!r} claim")


async def test_mailbox_claim_is_compared_case_insensitively(api: Api, idp: Idp) -> None:
    token = RSA_1.sign(claims(idp, "Alice@EXAMPLE.com"))
    reply = await register(api, token, mailbox="aLiCe@example.COM")
    assert reply.status == 201 and reply.body["mailbox"] == ALICE


@pytest.mark.parametrize("value", ["alice", "", 42, ["alice@example.com"]])
async def test_mailbox_claim_must_be_an_address(api: Api, idp: Idp, value: object) -> None:
    await rejected(api, RSA_1.sign(claims(idp, preferred_username=value)), "no e-mail address")


async def test_entra_style_keys_without_alg_work_for_every_configured_algorithm(tmp_path: Path, idp: Idp) -> None:
    """Entra's JWKS entries carry kty/use/kid/x5t/n/e but no `alg`: the token's (allowed) alg must be used."""
    idp.keys = [RSA_1.jwk(with_alg=False, x5t="abc", issuer=idp.issuer)]
    algorithms = json.dumps(["RS256", "PS256", "RS512"])
    async with running_api(*oidc_config(tmp_path, idp, algorithms=algorithms)) as api:
        for n, alg in enumerate(["RS256", "PS256", "RS512"]):
            reply = await register(api, RSA_1.sign(claims(idp), alg=alg), device_id=f"phone-{n}")
            assert reply.status == 201, (alg, reply.text)


async def test_a_key_that_names_its_alg_is_used_only_with_that_alg(tmp_path: Path, idp: Idp) -> None:
    idp.keys = [RSA_1.jwk(with_alg=True)]  # "alg": "RS256"
    async with running_api(*oidc_config(tmp_path, idp, algorithms=json.dumps(["RS256", "PS256"]))) as api:
        await rejected(api, RSA_1.sign(claims(idp), alg="PS256"), "does not match its signing key")
        assert (await register(api, RSA_1.sign(claims(idp)))).status == 201


# --- signatures, issuers, audiences, times --------------------------------------------------------------------


async def test_bad_signature(api: Api, idp: Idp) -> None:
    await rejected(api, IMPOSTOR.sign(claims(idp)), "token signature invalid")
    # A genuine token whose payload was swapped for another mailbox's: the signature no longer matches.
    genuine = RSA_1.sign(claims(idp)).split(".")
    forged = b64url(json.dumps(claims(idp, BOB)).encode())
    tampered = ".".join([genuine[0], forged, genuine[2]])
    reply = await send(api, "POST", URL, tampered, body=registration(mailbox=BOB))
    assert reply.status == 401 and "signature invalid" in reply.body["detail"]
    assert await count_for(api, BOB) == 0


async def test_key_of_another_type_under_a_known_kid(api: Api, idp: Idp) -> None:
    """An ES256 token naming the RSA key's kid (and the reverse) is refused, never a server error."""
    await rejected(api, EC_1.sign(claims(idp), kid=RSA_1.kid), "does not match its signing key")
    await rejected(api, RSA_1.sign(claims(idp), kid=EC_1.kid), "does not match its signing key")


async def test_ec_key_on_the_wrong_curve(tmp_path: Path, idp: Idp) -> None:
    """A P-384 key published without alg, used with ES256: a curve mismatch is a 401, not a 500."""
    idp.keys = [EC_384.jwk(with_alg=False)]
    async with running_api(*oidc_config(tmp_path, idp)) as api:
        _, body, signature = EC_384.sign(claims(idp)).split(".")
        head = b64url(json.dumps({"alg": "ES256", "kid": EC_384.kid, "typ": "JWT"}).encode())
        await rejected(api, f"{head}.{body}.{signature}", "does not match its signing key")


@pytest.mark.parametrize("issuer", ["other", "suffix", "http"])
async def test_wrong_issuer(api: Api, idp: Idp, issuer: str) -> None:
    wrong = {
        "other": idp.issuer.replace(TENANT, "72f988bf-86f1-41af-91ab-2d7cd011db47"),
        "suffix": idp.issuer + "/extra",
        "http": "https://login.microsoftonline.com/" + TENANT + "/v2.0",
    }[issuer]
    await rejected(api, RSA_1.sign(claims(idp, iss=wrong)), "token issuer not accepted")


async def test_issuer_with_trailing_slash_is_the_same_issuer(api: Api, idp: Idp) -> None:
    assert (await register(api, RSA_1.sign(claims(idp, iss=idp.issuer + "/")))).status == 201


async def test_audiences(api: Api, idp: Idp) -> None:
    await rejected(api, RSA_1.sign(claims(idp, aud="api://someone-else")), "token audience not accepted")
    await rejected(api, RSA_1.sign(claims(idp, aud=["api://a", "api://b"])), "token audience not accepted")
    assert (await register(api, RSA_1.sign(claims(idp, aud=OTHER_AUDIENCE)), device_id="d1")).status == 201
    both = RSA_1.sign(claims(idp, aud=["api://someone-else", AUDIENCE]))
    assert (await register(api, both, device_id="d2")).status == 201


async def test_times_with_leeway(api: Api, idp: Idp) -> None:
    now = int(time.time())
    await rejected(api, RSA_1.sign(claims(idp, exp=now - LEEWAY - 60)), "token expired")
    await rejected(api, RSA_1.sign(claims(idp, nbf=now + LEEWAY + 60)), "not valid yet")
    await rejected(api, RSA_1.sign(claims(idp, iat=now + LEEWAY + 60, nbf=DROP)), "not valid yet")
    # Clock skew within the configured leeway is forgiven in both directions.
    lately_expired = RSA_1.sign(claims(idp, iat=now - 600, nbf=now - 600, exp=now - LEEWAY // 3))
    assert (await register(api, lately_expired, device_id="d1")).status == 201
    early = RSA_1.sign(claims(idp, iat=now + LEEWAY // 3, nbf=now + LEEWAY // 3))
    assert (await register(api, early, device_id="d2")).status == 201


async def test_zero_leeway_is_strict(tmp_path: Path, idp: Idp) -> None:
    async with running_api(*oidc_config(tmp_path, idp, leeway_seconds="0")) as api:
        now = int(time.time())
        await rejected(api, RSA_1.sign(claims(idp, exp=now - 5)), "token expired")
        await rejected(api, RSA_1.sign(claims(idp, nbf=now + 60)), "not valid yet")


@pytest.mark.parametrize("claim", ["exp", "iss", "aud"])
async def test_required_claims(api: Api, idp: Idp, claim: str) -> None:
    await rejected(api, RSA_1.sign(claims(idp, **{claim: DROP})), f"token lacks the {claim!r} claim")


@pytest.mark.parametrize("value", ["tomorrow", [1], {"at": 1}])
async def test_exp_must_be_a_number(api: Api, idp: Idp, value: object) -> None:
    await rejected(api, RSA_1.sign(claims(idp, exp=value)), "invalid bearer token")


# --- algorithms and malformed tokens --------------------------------------------------------------------------


async def test_alg_none_is_refused(api: Api, idp: Idp) -> None:
    for alg in ("none", "None", "NONE", ""):
        await rejected(api, unsigned({"alg": alg, "kid": RSA_1.kid, "typ": "JWT"}, claims(idp)),
                       "token algorithm not accepted")
    await rejected(api, unsigned({"kid": RSA_1.kid, "typ": "JWT"}, claims(idp)), "token algorithm not accepted")
    assert idp.fetches == Counter()  # refused before the IdP is ever asked


async def test_hs256_with_the_public_key_as_secret_is_refused(api: Api, idp: Idp) -> None:
    """The classic key-confusion attack: an HMAC 'signed' with the RSA public key, which anyone can get."""
    pem = RSA_1.public_pem()
    jwk_text = json.dumps(RSA_1.jwk()).encode()
    for secret in (pem, pem.strip(), jwk_text):
        for alg in ("HS256", "HS384", "HS512"):
            token = hmac_signed({"alg": alg, "kid": RSA_1.kid, "typ": "JWT"}, claims(idp), secret)
            await rejected(api, token, "token algorithm not accepted")
    assert await count_for(api, ALICE) == 0


async def test_allowed_algorithm_list_is_enforced(api: Api, idp: Idp) -> None:
    """RS512 is a fine algorithm and RSA_1 a published key, but the configuration allows only RS256/ES256."""
    await rejected(api, RSA_1.sign(claims(idp), alg="RS512"), "token algorithm not accepted")
    await rejected(api, EC_384.sign(claims(idp)), "token algorithm not accepted")
    assert idp.fetches == Counter()


@pytest.mark.parametrize(
    ("token", "detail"),
    [
        ("not-a-jwt", "malformed bearer token"),
        ("a.b.c", "malformed bearer token"),
        ("eyJhbGciOiJSUzI1NiJ9.e30", "malformed bearer token"),
        (unsigned({"alg": "RS256", "kid": 7}, {}), "malformed bearer token"),
        (unsigned({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}, {}), "malformed bearer token"),
        (unsigned({"alg": "RS256"}, {}), "token has no key id (kid)"),
        (unsigned({"alg": "RS256", "kid": ""}, {}), "token has no key id (kid)"),
    ],
    ids=["garbage", "dots", "two-segments", "kid-not-a-string", "unknown-crit", "no-kid", "empty-kid"],
)
async def test_malformed_tokens_are_401_not_500(api: Api, token: str, detail: str) -> None:
    await rejected(api, token, detail)


async def test_validly_signed_non_json_payload(api: Api) -> None:
    token = jwt.api_jws.encode(b"\xff not json", RSA_1.private, algorithm="RS256", headers={"kid": RSA_1.kid})
    await rejected(api, token, "invalid bearer token")


async def test_authorization_header_forms(api: Api, idp: Idp) -> None:
    token = RSA_1.sign(claims(idp))
    for value in (f"bearer {token}", f"BEARER  {token} "):  # the scheme is case-insensitive
        reply = await send(api, "GET", URL, headers={"Authorization": value}, params={"mailbox": ALICE})
        assert reply.status == 200, reply.text
    for value in ("Bearer", "Bearer   ", f"Token {token}", f"Basic {token}"):
        reply = await send(api, "GET", URL, headers={"Authorization": value}, params={"mailbox": ALICE})
        assert reply.status == 401 and reply.body["type"] == "urn:bemsmail:problem:unauthorized"
        Leaks([token]).assert_absent(reply.text)


# --- the key set: cache, rotation, rate limit, discovery ------------------------------------------------------


async def test_key_rotation_refetches_exactly_once(api: Api, idp: Idp) -> None:
    assert (await register(api, RSA_1.sign(claims(idp)), device_id="d1")).status == 201
    assert idp.fetches["jwks"] == 1
    idp.keys = [RSA_2.jwk(), EC_1.jwk()]  # the IdP rolls its key over
    rotated = RSA_2.sign(claims(idp))
    assert (await register(api, rotated, device_id="d2")).status == 201
    assert idp.fetches["jwks"] == 2
    for n in range(3):
        assert (await register(api, rotated, device_id=f"d{n + 3}")).status == 201
    assert idp.fetches["jwks"] == 2  # the new key is cached
    # The retired key is gone from the set: its tokens fail (after one more look at the set, allowed here).
    await rejected(api, RSA_1.sign(claims(idp)), "token signed by an unknown key")
    assert idp.fetches["jwks"] == 3


async def test_unknown_kids_do_not_hammer_the_idp(tmp_path: Path, idp: Idp, clock: Clock) -> None:
    config = oidc_config(tmp_path, idp, jwks_refresh_min_interval_seconds="30")
    async with running_api(*config) as api:
        assert (await register(api, RSA_1.sign(claims(idp)), device_id="d1")).status == 201
        assert idp.fetches["jwks"] == 1
        for n in range(20):  # an attacker cycling through made-up kids
            await rejected(api, RSA_1.sign(claims(idp), kid=f"made-up-{n}"), "token signed by an unknown key")
        assert idp.fetches["jwks"] == 1

        clock.now += 29.0
        await rejected(api, RSA_1.sign(claims(idp), kid="made-up-x"), "unknown key")
        assert idp.fetches["jwks"] == 1
        clock.now += 2.0  # past the minimum interval: one more fetch, then quiet again
        idp.keys = [RSA_2.jwk()]
        assert (await register(api, RSA_2.sign(claims(idp)), device_id="d2")).status == 201
        assert idp.fetches["jwks"] == 2
        for n in range(5):
            await rejected(api, RSA_1.sign(claims(idp), kid=f"again-{n}"), "unknown key")
        assert idp.fetches["jwks"] == 2
        # The known key keeps working meanwhile, without any fetch.
        assert (await register(api, RSA_2.sign(claims(idp)), device_id="d3")).status == 201
        assert idp.fetches["jwks"] == 2


async def test_cache_expires(tmp_path: Path, idp: Idp, clock: Clock) -> None:
    config = oidc_config(tmp_path, idp, jwks_cache_seconds="600", jwks_refresh_min_interval_seconds="30")
    async with running_api(*config) as api:
        token = RSA_1.sign(claims(idp))
        assert (await register(api, token)).status == 201
        clock.now += 599
        assert (await register(api, token)).status == 200
        assert idp.fetches["jwks"] == 1
        clock.now += 2
        idp.keys = [RSA_2.jwk()]  # RSA_1 was withdrawn: after the cache expires it stops working
        await rejected(api, token, "unknown key")
        assert idp.fetches["jwks"] == 2


async def test_concurrent_unknown_kid_fetches_once(api: Api, idp: Idp, monkeypatch: pytest.MonkeyPatch) -> None:
    idp.gate.clear()
    ready = arrivals(monkeypatch, api, 12)
    token = RSA_1.sign(claims(idp))
    calls = [asyncio.create_task(send(api, "GET", URL, token, params={"mailbox": ALICE})) for _ in range(12)]
    await all_waiting(ready, idp)
    assert idp.fetches["jwks"] == 1
    idp.gate.set()
    replies = await asyncio.gather(*calls)
    assert [r.status for r in replies] == [200] * 12
    assert idp.fetches["jwks"] == 1


async def test_unusable_jwks_entries_are_skipped(api: Api, idp: Idp) -> None:
    idp.keys = [
        "not an object",
        {"kty": "RSA", "use": "sig", "n": "AQAB", "e": "AQAB"},  # no kid
        {"kty": "RSA", "use": "sig", "kid": "broken", "n": "!!", "e": "AQAB"},
        {"kty": "XYZ", "use": "sig", "kid": "strange"},
        RSA_2.jwk(use="enc"),  # an encryption key is never a signing key
        RSA_1.jwk(),
    ]
    assert (await register(api, RSA_1.sign(claims(idp)))).status == 201
    await rejected(api, RSA_2.sign(claims(idp)), "unknown key")


async def test_discovery_when_jwks_url_is_unset(tmp_path: Path, idp: Idp) -> None:
    async with running_api(*oidc_config(tmp_path, idp, jwks_url=None)) as api:
        assert idp.fetches == Counter()
        assert (await register(api, RSA_1.sign(claims(idp)), device_id="d1")).status == 201
        assert idp.fetches == Counter(metadata=1, jwks=1)
        assert (await register(api, EC_1.sign(claims(idp)), device_id="d2")).status == 201
        assert idp.fetches == Counter(metadata=1, jwks=1)
        idp.keys = [RSA_2.jwk()]
        assert (await register(api, RSA_2.sign(claims(idp)), device_id="d3")).status == 201
        assert idp.fetches == Counter(metadata=1, jwks=2)  # the jwks_uri is remembered; only the keys refetched


@pytest.mark.parametrize(
    "metadata",
    [{"issuer": "x"}, {"jwks_uri": 5}, {"jwks_uri": "http://127.0.0.1:9/nothing-listens-here"}],
    ids=["no-jwks-uri", "jwks-uri-not-a-string", "jwks-uri-unreachable"],
)
async def test_discovery_failures_are_503(tmp_path: Path, idp: Idp, metadata: dict[str, Any]) -> None:
    idp.metadata = metadata
    async with running_api(*oidc_config(tmp_path, idp, jwks_url=None)) as api:
        reply = await register(api, RSA_1.sign(claims(idp)))
        assert reply.status == 503 and reply.body["type"] == "urn:bemsmail:problem:auth-unavailable"


# --- the IdP down ---------------------------------------------------------------------------------------------


def assert_unavailable(reply: Reply) -> None:
    assert reply.status == 503, reply.text
    assert reply.body["type"] == "urn:bemsmail:problem:auth-unavailable"
    assert "identity provider" in reply.body["detail"] or "issuer" in reply.body["detail"]
    assert int(reply.headers["Retry-After"]) > 0


@pytest.mark.parametrize("status", [500, 503, 404])
async def test_idp_error_status_is_503(api: Api, idp: Idp, status: int) -> None:
    idp.status = status
    assert_unavailable(await register(api, RSA_1.sign(claims(idp))))
    idp.status = 200  # and it recovers once the IdP does (the minimum interval is 0 here)
    assert (await register(api, RSA_1.sign(claims(idp)))).status == 201


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b"{}", b'{"keys": 5}', b'{"keys": {"kid": "x"}}', b'"keys"'])
async def test_idp_answering_garbage_is_503(api: Api, idp: Idp, raw: bytes) -> None:
    idp.raw_jwks = raw
    assert_unavailable(await register(api, RSA_1.sign(claims(idp))))


async def test_empty_key_set_means_unknown_key(api: Api, idp: Idp) -> None:
    idp.keys = []
    await rejected(api, RSA_1.sign(claims(idp)), "token signed by an unknown key")


async def test_idp_unreachable_is_503(tmp_path: Path, idp: Idp) -> None:
    config = oidc_config(tmp_path, idp, jwks_url="http://127.0.0.1:9/keys", jwks_refresh_min_interval_seconds="30")
    async with running_api(*config) as api:
        assert_unavailable(await register(api, RSA_1.sign(claims(idp))))


async def test_idp_hanging_times_out_as_503(api: Api, idp: Idp, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "FETCH_TIMEOUT_SECONDS", 0.3)
    idp.gate.clear()
    assert_unavailable(await register(api, RSA_1.sign(claims(idp))))


async def test_idp_down_is_not_hammered(
    tmp_path: Path, idp: Idp, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the IdP fails, requests share one failed fetch and then fail fast until the minimum interval
    has passed; they do not queue up one fetch (and one timeout) each."""
    config = oidc_config(tmp_path, idp, jwks_refresh_min_interval_seconds="30")
    async with running_api(*config) as api:
        idp.status = 500
        idp.gate.clear()
        ready = arrivals(monkeypatch, api, 8)
        token = RSA_1.sign(claims(idp))
        calls = [asyncio.create_task(register(api, token, device_id=f"d{n}")) for n in range(8)]
        await all_waiting(ready, idp)
        idp.gate.set()
        for reply in await asyncio.gather(*calls):
            assert_unavailable(reply)
        assert idp.fetches["jwks"] == 1
        for _ in range(5):
            assert_unavailable(await register(api, token))
        assert idp.fetches["jwks"] == 1

        idp.status = 200
        clock.now += 31
        assert (await register(api, token)).status == 201
        assert idp.fetches["jwks"] == 2


async def test_cached_keys_outlive_an_idp_outage(tmp_path: Path, idp: Idp, clock: Clock) -> None:
    config = oidc_config(tmp_path, idp, jwks_cache_seconds="600", jwks_refresh_min_interval_seconds="30")
    async with running_api(*config) as api:
        token = RSA_1.sign(claims(idp))
        assert (await register(api, token)).status == 201
        idp.status = 503
        clock.now += 700  # the cache is stale and the IdP is down: the keys we have still verify
        assert (await register(api, token)).status == 200
        assert idp.fetches["jwks"] == 2
        # An unknown kid cannot be resolved while the IdP is down: that is the IdP's fault, not the caller's.
        assert_unavailable(await register(api, RSA_2.sign(claims(idp))))


# --- API keys beside bearer tokens ----------------------------------------------------------------------------


async def test_api_key_and_bearer_both_configured(api: Api, idp: Idp) -> None:
    for mailbox in (ALICE, BOB):  # the trusted front end acts for any mailbox
        reply = await send(api, "POST", URL, body=registration(mailbox=mailbox, device_id=mailbox,
                                                               token=hashlib.sha256(mailbox.encode()).hexdigest()),
                           headers=api.headers)
        assert reply.status == 201
    via_authorization = await send(api, "GET", URL, params={"mailbox": BOB},
                                   headers={"Authorization": f"ApiKey {api.key}"})
    assert via_authorization.status == 200
    token = RSA_1.sign(claims(idp))
    assert (await send(api, "GET", URL, token, params={"mailbox": ALICE})).status == 200
    assert (await send(api, "GET", URL, token, params={"mailbox": BOB})).status == 403
    # A wrong API key is not rescued by a valid bearer token beside it (nor the reverse).
    wrong = await send(api, "GET", URL, token, params={"mailbox": ALICE}, headers={"X-API-Key": api.key + "x"})
    assert wrong.status == 401 and wrong.body["detail"] == "invalid API key"
    assert api.key not in wrong.text
    both = await send(api, "GET", URL, IMPOSTOR.sign(claims(idp)), params={"mailbox": BOB}, headers=api.headers)
    assert both.status == 200  # X-API-Key is the credential when present


async def test_bearer_only(tmp_path: Path, idp: Idp) -> None:
    """An [api.auth.oidc] section written in the TOML file itself, and no API keys at all."""
    config, key = dev_config(tmp_path)
    path = tmp_path / "bemsmail.toml"
    text = path.read_text()
    start, end = text.index("[[api.auth.api_keys]]"), text.index("[[tenants]]")
    oidc = (f'[api.auth.oidc]\nissuer = "{idp.issuer}"\naudience = "{AUDIENCE}"\n'
            f'jwks_url = "{idp.jwks_url}"\nmailbox_claim = "upn"\n\n')
    path.write_text(text[:start] + oidc + text[end:])
    bearer_only = load_config(path, {"BEMSMAIL_SERVER__PORT": str(config.server.port)})
    assert bearer_only.api.auth.api_keys == []
    assert bearer_only.api.auth.oidc is not None and bearer_only.api.auth.oidc.algorithms == ["RS256"]
    async with running_api(bearer_only, key) as api:
        refused = await send(api, "GET", URL, params={"mailbox": ALICE}, headers=api.headers)
        assert refused.status == 401 and refused.body["detail"] == "API keys are not accepted here"
        token = RSA_1.sign(claims(idp, claim="upn"))
        assert (await register(api, token)).status == 201


async def test_api_keys_only_refuses_bearer_tokens(tmp_path: Path, idp: Idp) -> None:
    config, key = dev_config(tmp_path)
    async with running_api(config, key) as api:
        await rejected(api, RSA_1.sign(claims(idp)), "bearer tokens are not accepted here")
    assert idp.fetches == Counter()


# --- secrecy --------------------------------------------------------------------------------------------------


async def test_tokens_never_reach_responses_or_logs(tmp_path: Path, idp: Idp, clock: Clock) -> None:
    out = io.StringIO()
    configure_logging("debug", "json", out)
    seen = Leaks()
    now = int(time.time())
    tokens = [
        RSA_1.sign(claims(idp)),
        EC_1.sign(claims(idp)),
        IMPOSTOR.sign(claims(idp)),
        RSA_1.sign(claims(idp, iss="https://evil.example/")),
        RSA_1.sign(claims(idp, aud="api://other")),
        RSA_1.sign(claims(idp, exp=now - 3600)),
        RSA_1.sign(claims(idp, nbf=now + 3600)),
        RSA_1.sign(claims(idp, exp=DROP)),
        RSA_1.sign(claims(idp), kid="unknown-kid"),
        RSA_1.sign(claims(idp, BOB)),
        RSA_1.sign(claims(idp, preferred_username="no-address")),
        unsigned({"alg": "none", "kid": RSA_1.kid}, claims(idp)),
        hmac_signed({"alg": "HS256", "kid": RSA_1.kid}, claims(idp), RSA_1.public_pem()),
        unsigned({"alg": "RS256", "kid": 12}, claims(idp)),
    ]
    config = oidc_config(tmp_path, idp, jwks_refresh_min_interval_seconds="30")
    async with running_api(*config) as api:
        calls: list[Callable[[str], Awaitable[Reply]]] = [
            lambda t: register(api, t),
            lambda t: send(api, "GET", URL, t, params={"mailbox": ALICE}),
        ]
        for token in tokens:
            seen.tokens.append(token)
            for call in calls:
                reply = await call(token)
                assert reply.status < 500, reply.text
                seen.assert_absent(reply.text)
                seen.assert_absent(str(dict(reply.headers)))
        idp.status = 500
        clock.now += 10_000
        outage = RSA_2.sign(claims(idp))
        seen.tokens.append(outage)
        reply = await register(api, outage)
        assert reply.status == 503
        seen.assert_absent(reply.text)
    text = out.getvalue()
    assert '"event": "request"' in text and '"event": "jwks_refreshed"' in text
    assert '"status": 401' in text and '"status": 503' in text
    seen.assert_absent(text)
