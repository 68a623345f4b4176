"""A local development configuration with freshly generated throwaway credentials (never for production)."""

from __future__ import annotations

import json
import os
import secrets
import string
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bemsmail.api.auth import generate_api_key, hash_api_key

# Loopback ports the bundled mock servers listen on by default.
MOCK_EWS_URL = "http://127.0.0.1:8081/EWS/Exchange.asmx"
MOCK_APNS_PORT = 8082
MOCK_FCM_URL = "http://127.0.0.1:8083"


def _write_secret(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = content.encode() if isinstance(content, str) else content
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _apple_id() -> str:
    return "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(10))


def write_dev_config(out: Path) -> str:
    """Write `out` and its secrets beside it; return the API key (only its hash is in the file)."""
    secrets_dir = out.parent / "secrets"
    api_key = generate_api_key()
    _write_secret(secrets_dir / "api-key", api_key + "\n")
    _write_secret(secrets_dir / "ews-password", secrets.token_urlsafe(24) + "\n")
    apns_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_secret(secrets_dir / "apns-dev.p8", apns_key)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    service_account = {
        "type": "service_account",
        "project_id": "bemsmail-dev",
        "private_key_id": secrets.token_hex(20),
        "private_key": rsa_key.decode(),
        "client_email": "bemsmail-dev@bemsmail-dev.iam.gserviceaccount.com",
        "client_id": str(secrets.randbelow(10**20)),
        "token_uri": f"{MOCK_FCM_URL}/token",
    }
    _write_secret(secrets_dir / "fcm-dev.json", json.dumps(service_account, indent=2))
    db = out.parent / "bemsmail.db"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"""# Local development configuration written by `bemsmail init`. Throwaway secrets; loopback only.
# Every key is documented in config/bemsmail.example.toml.

[server]
host = "127.0.0.1"
port = 8443

[database]
url = "sqlite+aiosqlite:///{db}"

[logging]
level = "info"
format = "auto"

[[api.auth.api_keys]]
name = "dev"
sha256 = "{hash_api_key(api_key)}"

[[tenants]]
name = "example"
domains = ["example.com"]
backend = "ews"

[tenants.ews]
url = "{MOCK_EWS_URL}"
auth = "basic"
username = "svc-bemsmail@example.com"
password_file = "{secrets_dir / 'ews-password'}"

[[apns.apps]]
id = "com.example.mail"
topic = "com.example.mail"
auth = "token"
key_file = "{secrets_dir / 'apns-dev.p8'}"
key_id = "{_apple_id()}"
team_id = "{_apple_id()}"
endpoint = {{ host = "127.0.0.1", port = {MOCK_APNS_PORT} }}

[[fcm.apps]]
id = "com.example.mail.android"
project_id = "bemsmail-dev"
credentials_file = "{secrets_dir / 'fcm-dev.json'}"
fcm_url = "{MOCK_FCM_URL}"
token_uri = "{MOCK_FCM_URL}/token"
""",
        encoding="utf-8",
    )
    return api_key


#: the app the mock Graph is started with in tests, benchmarks and the demo
MOCK_GRAPH_TENANT_ID = "7d1d5a54-0000-4000-8000-00000000c0de"
MOCK_GRAPH_CLIENT_ID = "0c7e11a5-0000-4000-8000-0000000b3a55"


def graph_section(*, secret_file: Path, notification_url: str, authority: str, graph_url: str, ca_file: Path | str,
                  extra: str = "") -> str:
    """The [tenants.graph] table of a tenant served by a mock Graph."""
    return f'''[tenants.graph]
tenant_id = "{MOCK_GRAPH_TENANT_ID}"
client_id = "{MOCK_GRAPH_CLIENT_ID}"
client_secret_file = "{secret_file}"
notification_url = "{notification_url}"
authority = "{authority}"
graph_url = "{graph_url}"
ca_file = "{ca_file}"
{extra}'''


def use_mock_graph(config_path: Path, *, secret: str, notification_url: str, authority: str, graph_url: str,
                   ca_file: Path | str, extra: str = "") -> None:
    """Switch the example tenant of a config from `write_dev_config` from EWS to a mock Graph."""
    secret_file = config_path.parent / "secrets" / "graph-client-secret"
    _write_secret(secret_file, secret + "\n")
    text = config_path.read_text(encoding="utf-8")
    start, end = text.index('backend = "ews"'), text.index("\n[[apns.apps]]")
    section = graph_section(secret_file=secret_file, notification_url=notification_url, authority=authority,
                            graph_url=graph_url, ca_file=ca_file, extra=extra)
    config_path.write_text(text[:start] + 'backend = "graph"\n\n' + section + text[end:], encoding="utf-8")
