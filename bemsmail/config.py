"""Configuration: one TOML file plus BEMSMAIL_* environment overrides, validated by pydantic at start-up."""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Network, IPv6Network, ip_address
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "BEMSMAIL_"
ENV_NESTING = "__"
DEFAULT_DB_URL = "sqlite+aiosqlite:///var/bemsmail.db"

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")]
Domain = Annotated[
    str,
    StringConstraints(to_lower=True, strip_whitespace=True, pattern=r"^[a-z0-9-]+(\.[a-z0-9-]+)+$"),
]


class ConfigError(Exception):
    """A configuration that cannot be used; `problems` holds one human line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Section(BaseModel):
    """Base of every config section: unknown keys are errors (typos must not be silently ignored), and a
    secret field `x` may instead be given as `x_file`, a path whose contents are the secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key in [k for k in data if isinstance(k, str) and k.endswith("_file")]:
            field = key.removesuffix("_file")
            info = cls.model_fields.get(field)
            if info is None or "SecretStr" not in repr(info.annotation):
                continue
            if data.get(field) is not None:
                raise ValueError(f"give either {field} or {key}, not both")
            path = Path(str(data.pop(key)))
            try:
                data[field] = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"{key}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
        return data


def _readable_file(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"file {str(path)!r} does not exist or is not a regular file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"file {str(path)!r} cannot be read: {exc.strerror}") from None
    return path


ReadableFile = Annotated[Path, AfterValidator(_readable_file)]


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TlsConfig(Section):
    cert_file: ReadableFile
    key_file: ReadableFile


class ServerConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8443, ge=1, le=65535)
    tls: TlsConfig | None = None
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    shutdown_grace_seconds: float = Field(10.0, gt=0, le=300)
    public_url: AnyHttpUrl | None = None


class DatabaseConfig(Section):
    url: str = DEFAULT_DB_URL
    password: SecretStr | None = None
    pool_size: int = Field(10, ge=1, le=200)
    max_overflow: int = Field(10, ge=0, le=200)
    pool_recycle_seconds: int = Field(1800, ge=30)
    connect_timeout_seconds: float = Field(10.0, gt=0, le=120)

    @field_validator("url")
    @classmethod
    def _supported(cls, url: str) -> str:
        scheme = url.split("://", 1)[0]
        if scheme not in {"sqlite+aiosqlite", "mysql+aiomysql", "mariadb+aiomysql"}:
            raise ValueError(
                "must start with sqlite+aiosqlite://, mysql+aiomysql:// or mariadb+aiomysql://"
            )
        return url

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")


class LoggingConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class ApiKeyConfig(Section):
    name: Name
    sha256: Annotated[str, StringConstraints(to_lower=True, pattern=r"^[0-9a-fA-F]{64}$")] = Field(
        description="hex SHA-256 of the key; `bemsmail hash-api-key` prints it"
    )


class OidcConfig(Section):
    issuer: AnyHttpUrl
    audience: list[Annotated[str, StringConstraints(min_length=1)]] = Field(min_length=1)
    jwks_url: AnyHttpUrl | None = Field(None, description="default: discovered from the issuer's metadata")
    mailbox_claim: Annotated[str, StringConstraints(min_length=1)] = "preferred_username"
    algorithms: list[Literal["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]] = ["RS256"]
    leeway_seconds: int = Field(60, ge=0, le=600)
    jwks_cache_seconds: int = Field(3600, ge=60)
    jwks_refresh_min_interval_seconds: float = Field(30.0, ge=0)
    ca_file: ReadableFile | None = None

    @field_validator("audience", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class AuthConfig(Section):
    api_keys: list[ApiKeyConfig] = []
    oidc: OidcConfig | None = None

    @model_validator(mode="after")
    def _some_auth(self) -> AuthConfig:
        if not self.api_keys and self.oidc is None:
            raise ValueError("configure at least one of api_keys or oidc: the API never runs open")
        names = [k.name for k in self.api_keys]
        if len(names) != len(set(names)):
            raise ValueError("api_keys names must be unique")
        return self


class ApiConfig(Section):
    auth: AuthConfig


class EwsConfig(Section):
    url: AnyHttpUrl | None = Field(None, description="EWS endpoint; when set, autodiscover is skipped")
    autodiscover_url: AnyHttpUrl | None = None
    auth: Literal["ntlm", "basic", "oauth2"] = "ntlm"
    username: str | None = None
    password: SecretStr | None = None
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    authority: AnyHttpUrl = AnyHttpUrl("https://login.microsoftonline.com")
    impersonation: bool = True
    ca_file: ReadableFile | None = None
    verify_tls: bool = True
    version: Literal["Exchange2013", "Exchange2013_SP1", "Exchange2016", "Exchange2019"] = "Exchange2016"
    mode: Literal["streaming", "push"] = "streaming"
    push_url: AnyHttpUrl | None = Field(
        None, description="mode = push: the URL Exchange posts SendNotification to (this node's /ews/notification)")
    status_frequency_minutes: int = Field(5, ge=1, le=1440)
    group_size: int = Field(200, ge=1, le=200)
    connection_timeout_minutes: int = Field(30, ge=1, le=30)
    watchdog_seconds: float = Field(90.0, ge=1, le=3600)
    catch_up_max_age_minutes: float = Field(60.0, ge=0)
    threads: int = Field(32, ge=2, le=512)
    unread_cache_seconds: float = Field(5.0, ge=0, le=300)
    probe_mailbox: str | None = Field(None, description="mailbox `check-config --connect` tests EWS with")

    @model_validator(mode="after")
    def _credentials(self) -> EwsConfig:
        if self.auth in ("ntlm", "basic") and (not self.username or self.password is None):
            raise ValueError(f"auth = {self.auth!r} needs username and password (or password_file)")
        if self.auth == "oauth2" and not (self.tenant_id and self.client_id and self.client_secret):
            raise ValueError("auth = 'oauth2' needs tenant_id, client_id and client_secret")
        if self.auth == "oauth2" and not self.impersonation:
            raise ValueError("auth = 'oauth2' (app-only, full_access_as_app) needs impersonation = true")
        if self.mode == "push" and self.push_url is None:
            raise ValueError("mode = 'push' needs push_url, the address Exchange can post notifications to")
        return self


class GraphConfig(Section):
    tenant_id: Annotated[str, StringConstraints(min_length=1)]
    client_id: Annotated[str, StringConstraints(min_length=1)]
    client_secret: SecretStr | None = None
    certificate_file: ReadableFile | None = None
    notification_url: AnyHttpUrl = Field(description="public base URL; /notificationClient is appended")
    certificate_password: SecretStr | None = None
    authority: AnyHttpUrl = AnyHttpUrl("https://login.microsoftonline.com")
    graph_url: AnyHttpUrl = AnyHttpUrl("https://graph.microsoft.com/v1.0")
    ca_file: ReadableFile | None = None
    #: requested lifetime; Graph's documented maximum is 10,080 minutes but the service refuses more than 10,070
    subscription_minutes: int = Field(10_070, ge=45, le=10_070)
    #: a subscription is renewed this long before it expires, at a point spread over `renew_spread_minutes`
    renew_before_minutes: int = Field(1440, ge=10)
    renew_spread_minutes: int = Field(1440, ge=0)
    #: /subscriptions writes (create, renew, delete, reauthorize) per sliding 20 s; Graph allows 1,000 per app
    #: per tenant (and 2,000 per tenant for all apps together)
    writes_per_20s: int = Field(900, ge=1, le=2000)
    concurrency: int = Field(16, ge=1, le=256, description="subscription and delta requests in flight at once")
    #: unread counts and message details, read for pushes: at 500 mails/s and ~50 ms per Graph answer that is
    #: 25 in flight, and Outlook's limit of 4 concurrent requests is per mailbox, not per tenant
    read_concurrency: int = Field(64, ge=1, le=1024, description="reads for pushes in flight at once")
    catch_up_max_age_minutes: float = Field(240.0, ge=0, description="older mail is not pushed by a catch-up")
    #: a delta round per mailbox at least this often, also without a gap: a safety net for notifications lost silently
    delta_refresh_minutes: float = Field(60.0, ge=1)
    unread_cache_seconds: float = Field(5.0, ge=0, le=300)
    probe_mailbox: str | None = Field(None, description="mailbox `check-config --connect` tests Graph with")

    @property
    def webhook_url(self) -> str:
        return str(self.notification_url).rstrip("/") + "/notificationClient"

    @property
    def lifecycle_url(self) -> str:
        return self.webhook_url + "/lifecycle"

    @model_validator(mode="after")
    def _credentials(self) -> GraphConfig:
        if (self.client_secret is None) == (self.certificate_file is None):
            raise ValueError("give exactly one of client_secret (or client_secret_file) and certificate_file")
        url = self.notification_url
        if url.scheme != "https" and not _is_loopback(url.host):
            raise ValueError("notification_url must be https (Graph refuses plain http)")
        if self.renew_before_minutes + self.renew_spread_minutes >= self.subscription_minutes:
            raise ValueError("renew_before_minutes + renew_spread_minutes must be less than subscription_minutes")
        return self


class MigrationConfig(Section):
    """How a tenant's mailboxes move from EWS to Graph (docs/migration.md)."""

    #: moves started per window of `every_minutes` (BEMS moves 50 users every 5 minutes)
    users_per_batch: int = Field(50, ge=1, le=10_000)
    #: the window, in minutes; production uses whole minutes, fractions down to 0.01 exist for tests
    every_minutes: float = Field(5.0, ge=0.01, le=1440)
    #: EWS answering 403 (switched off in Exchange Online): "report" logs it and keeps retrying EWS; "migrate"
    #: also moves each such mailbox to Graph at once (needs a [tenants.graph] section)
    on_ews_disabled: Literal["report", "migrate"] = "report"


class TenantConfig(Section):
    name: Name
    domains: list[Domain] = Field(min_length=1)
    backend: Literal["ews", "graph"]
    rich_content: bool = False
    ews: EwsConfig | None = None
    graph: GraphConfig | None = None
    migration: MigrationConfig = MigrationConfig()

    @model_validator(mode="after")
    def _backend_section(self) -> TenantConfig:
        if getattr(self, self.backend) is None:
            raise ValueError(f"backend = {self.backend!r} needs a [{self.backend}] section for this tenant")
        if self.migration.on_ews_disabled == "migrate" and self.graph is None:
            raise ValueError("migration.on_ews_disabled = 'migrate' needs a [graph] section for this tenant")
        return self

    @property
    def migrating(self) -> bool:
        """Switched to Graph with its EWS section kept: mailboxes still on EWS move at the configured rate."""
        return self.backend == "graph" and self.ews is not None

    @property
    def migrates_on_ews_disabled(self) -> bool:
        """On EWS, and a mailbox for which EWS answers 403 moves to Graph."""
        return self.backend == "ews" and self.graph is not None and self.migration.on_ews_disabled == "migrate"


class EndpointOverride(Section):
    """Where to send instead of Apple's host; for tests, load tests and mocks."""

    host: str
    port: int = Field(443, ge=1, le=65535)
    ca_file: ReadableFile | None = None
    #: where sandbox (development) pushes go instead; default: host / port above
    sandbox_host: str | None = None
    sandbox_port: int | None = Field(None, ge=1, le=65535)


class ApnsAppConfig(Section):
    id: Name
    topic: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.-]{1,155}$")]
    auth: Literal["token", "certificate"] = "token"
    key_file: ReadableFile | None = None
    key_id: Annotated[str, StringConstraints(pattern=r"^[A-Z0-9]{10}$")] | None = None
    team_id: Annotated[str, StringConstraints(pattern=r"^[A-Z0-9]{10}$")] | None = None
    cert_file: ReadableFile | None = None
    endpoint: EndpointOverride | None = None
    proxy_url: AnyHttpUrl | None = None
    concurrency: int = Field(100, ge=1, le=10_000)
    push_kind: Literal["alert", "background"] = "alert"
    max_connections: int = Field(2, ge=1, le=100)
    timeout_seconds: float = Field(10.0, gt=0, le=300)

    @model_validator(mode="after")
    def _credentials(self) -> ApnsAppConfig:
        if self.auth == "token":
            if not (self.key_file and self.key_id and self.team_id):
                raise ValueError("auth = 'token' needs key_file (.p8), key_id and team_id")
            _check_p8(self.key_file)
        elif self.cert_file is None:
            raise ValueError("auth = 'certificate' needs cert_file (PEM with certificate and key)")
        else:
            _check_cert_pem(self.cert_file)
        return self


class FcmAppConfig(Section):
    id: Name
    project_id: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{3,62}$")]
    credentials_file: ReadableFile
    fcm_url: AnyHttpUrl | None = Field(None, description="override of the FCM v1 base URL")
    token_uri: AnyHttpUrl | None = Field(None, description="override of the OAuth token endpoint")
    concurrency: int = Field(100, ge=1, le=10_000)
    push_kind: Literal["alert", "background"] = "alert"
    timeout_seconds: float = Field(10.0, gt=0, le=300)

    @model_validator(mode="after")
    def _credentials(self) -> FcmAppConfig:
        _check_service_account(self.credentials_file)
        return self


class ApnsConfig(Section):
    apps: list[ApnsAppConfig] = []


class FcmConfig(Section):
    apps: list[FcmAppConfig] = []


class PushConfig(Section):
    """How the dispatcher treats every app: its queue, retries and circuit breaker."""

    queue_size: int = Field(10_000, ge=1, le=1_000_000)
    max_attempts: int = Field(5, ge=1, le=20)
    deadline_seconds: float = Field(300.0, gt=0, le=86_400)
    backoff_initial_seconds: float = Field(0.5, gt=0)
    backoff_max_seconds: float = Field(60.0, gt=0)
    quota_backoff_seconds: float = Field(30.0, gt=0)
    circuit_failures: int = Field(5, ge=1, le=1000)
    circuit_open_seconds: float = Field(30.0, gt=0)
    config_failure_log_seconds: float = Field(300.0, gt=0)


class RelayConfig(Section):
    stale_after_hours: float = Field(72, gt=0)
    delete_after_days: float = Field(30, gt=0)
    dedupe_window_seconds: float = Field(3600, ge=0)
    dedupe_max_entries: int = Field(250_000, ge=1000, le=10_000_000)
    coalesce_seconds: float = Field(1.0, ge=0, le=60)


class ClusterConfig(Section):
    node_id: Name = Field(default_factory=lambda: re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:200])
    mode: Literal["single", "redis"] = "single"
    redis_url: SecretStr | None = None
    shards: int = Field(1024, ge=1, le=65536)
    heartbeat_seconds: float = Field(5.0, gt=0)
    lease_seconds: float = Field(15.0, gt=0)

    @model_validator(mode="after")
    def _redis(self) -> ClusterConfig:
        if self.mode == "redis" and self.redis_url is None:
            raise ValueError("mode = 'redis' needs redis_url (or redis_url_file)")
        if self.lease_seconds <= 2 * self.heartbeat_seconds:
            raise ValueError("lease_seconds must exceed twice heartbeat_seconds")
        return self


class WebhookConfig(Section):
    """/notificationClient, where Microsoft Graph posts change and lifecycle notifications."""

    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    #: when non-empty, posts from other addresses are refused (e.g. Microsoft 365's published ranges; they change
    #: without notice, so keep the list current)
    allowed_networks: list[IPvAnyNetwork] = []
    #: reverse proxies whose X-Forwarded-For is believed: the client is the last address not in this list
    trusted_proxies: list[IPvAnyNetwork] = [IPv4Network("127.0.0.1/32"), IPv6Network("::1/128")]
    #: notifications accepted but not yet handed on; beyond it Graph is answered 503 and redelivers
    queue_limit: int = Field(100_000, ge=100)


class Config(Section):
    server: ServerConfig = ServerConfig()
    webhook: WebhookConfig = WebhookConfig()
    database: DatabaseConfig = DatabaseConfig()
    logging: LoggingConfig = LoggingConfig()
    api: ApiConfig
    tenants: list[TenantConfig] = []
    apns: ApnsConfig = ApnsConfig()
    fcm: FcmConfig = FcmConfig()
    push: PushConfig = PushConfig()
    relay: RelayConfig = RelayConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        ids = [a.id for a in self.apns.apps] + [a.id for a in self.fcm.apps]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"app ids must be unique across apns.apps and fcm.apps: {', '.join(dupes)}")
        seen: dict[str, str] = {}
        for tenant in self.tenants:
            for domain in tenant.domains:
                if domain in seen:
                    raise ValueError(f"domain {domain!r} belongs to tenants {seen[domain]!r} and {tenant.name!r}")
                seen[domain] = tenant.name
        if self.cluster.mode == "redis" and self.database.is_sqlite:
            raise ValueError("cluster.mode = 'redis' needs a shared database (mysql+aiomysql), not SQLite")
        return self

    def app_platform(self, app_id: str) -> Literal["ios", "android"] | None:
        """Which platform a configured app id serves, or None if no such app."""
        if any(a.id == app_id for a in self.apns.apps):
            return "ios"
        if any(a.id == app_id for a in self.fcm.apps):
            return "android"
        return None


# --- credential checks: a bad key must stop the daemon at start, not at the first push --------------------


def _check_p8(path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError):
        raise ValueError(f"key_file {str(path)!r} is not a PEM private key (.p8)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"key_file {str(path)!r} is not an ES256 (P-256) key as APNs requires")


def _check_cert_pem(path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = path.read_bytes()
    try:
        x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ValueError(f"cert_file {str(path)!r} holds no PEM certificate") from None
    key_block = re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----", data, re.S)
    try:
        if key_block is None:
            raise ValueError
        load_pem_private_key(key_block.group(0), password=None)
    except (ValueError, TypeError):
        raise ValueError(f"cert_file {str(path)!r} holds no unencrypted PEM private key") from None


def _check_service_account(path: Path) -> None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ValueError(f"credentials_file {str(path)!r} is not JSON") from None
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise ValueError(f"credentials_file {str(path)!r} is not a service-account key")
    missing = [k for k in ("client_email", "private_key", "token_uri") if not info.get(k)]
    if missing:
        raise ValueError(f"credentials_file {str(path)!r} lacks {', '.join(missing)}")


# --- loading ------------------------------------------------------------------------------------------------


def _env_overrides(environ: Mapping[str, str]) -> Iterable[tuple[list[str], str]]:
    """BEMSMAIL_SECTION__KEY=value pairs. A name without `__` is an override only if it names a top-level key
    (`BEMSMAIL_TENANTS='[...]'`); others, such as BEMSMAIL_CONFIG or the test suite's BEMSMAIL_REQUIRE_SERVICES,
    belong to someone else. A nested name is always ours, so a typo in it is reported, not ignored."""
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower().split(ENV_NESTING)
        if len(path) == 1 and path[0] not in Config.model_fields:
            continue
        if all(path):
            yield path, value


def _parse_env_value(value: str) -> Any:
    if value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _apply(data: dict[str, Any], path: list[str], value: Any, env_name: str) -> None:
    node: Any = data
    for i, key in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError([f"{env_name}: no list element {key!r} to override"])
            index = int(key)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError([f"{env_name}: {'.'.join(path[:i])} is not a table"])
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {})


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def format_validation_error(exc: ValidationError) -> list[str]:
    """One line per problem, naming the key; the offending value is never echoed (it may be a secret)."""
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{_location(loc)}: {message}")
    return lines


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any), apply BEMSMAIL_* overrides, validate. Raises ConfigError."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    for key_path, raw in _env_overrides(environ):
        _apply(data, key_path, _parse_env_value(raw), ENV_PREFIX + ENV_NESTING.join(key_path).upper())
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
