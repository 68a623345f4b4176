"""Configuration: TOML plus environment overrides, *_file secrets, one clear line per problem, exit code 2."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from bemsmail.config import Config, ConfigError, load_config
from bemsmail.devconfig import write_dev_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "bemsmail.example.toml"
MINIMAL = '[[api.auth.api_keys]]\nname = "fe"\nsha256 = "' + "a" * 64 + '"\n'


def problems(text: str, env: dict[str, str] | None = None, tmp_path: Path | None = None) -> list[str]:
    path = None
    if tmp_path is not None:
        path = tmp_path / "c.toml"
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env or {})
    return info.value.problems


def test_defaults_are_the_embedded_single_node(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL)
    config = load_config(path, {})
    assert config.database.url == "sqlite+aiosqlite:///var/bemsmail.db"
    assert config.server.port == 8443
    assert config.cluster.mode == "single"
    assert config.relay.stale_after_hours == 72 and config.relay.delete_after_days == 30


def test_environment_overrides_nested_keys_and_list_elements(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL)
    config = load_config(path, {
        "BEMSMAIL_SERVER__PORT": "9443",
        "BEMSMAIL_LOGGING__LEVEL": "debug",
        "BEMSMAIL_API__AUTH__API_KEYS__0__NAME": "renamed",
    })
    assert config.server.port == 9443
    assert config.logging.level == "debug"
    assert config.api.auth.api_keys[0].name == "renamed"


def test_unknown_environment_key_is_an_error(tmp_path: Path) -> None:
    lines = problems(MINIMAL, {"BEMSMAIL_SERVER__PROT": "1"}, tmp_path)
    assert lines == ["server.prot: Extra inputs are not permitted"]


def test_secret_from_file_and_not_both(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL + f'[database]\npassword_file = "{secret}"\n')
    assert load_config(path, {}).database.password.get_secret_value() == "s3cret"  # type: ignore[union-attr]
    lines = problems(MINIMAL + f'[database]\npassword = "x"\npassword_file = "{secret}"\n', tmp_path=tmp_path)
    assert lines == ["database: give either password or password_file, not both"]


def test_every_problem_gets_one_line_naming_its_key(tmp_path: Path) -> None:
    text = MINIMAL + """
[server]
port = 70000
[database]
url = "postgresql://x"
password_file = "/nonexistent/pw"
[[tenants]]
name = "t"
domains = ["not a domain"]
backend = "graph"
[[apns.apps]]
id = "a"
topic = "com.x"
key_file = "/nonexistent/key.p8"
[cluster]
mode = "redis"
"""
    lines = problems(text, tmp_path=tmp_path)
    # a section whose fields are wrong is not also checked as a whole: the tenant's missing [graph] shows
    # up once its domains are fixed
    assert lines == [
        "server.port: Input should be less than or equal to 65535",
        "database: password_file: cannot read '/nonexistent/pw': No such file or directory",
        "tenants[0].domains[0]: String should match pattern '^[a-z0-9-]+(\\.[a-z0-9-]+)+$'",
        "apns.apps[0].key_file: file '/nonexistent/key.p8' does not exist or is not a regular file",
        "cluster: mode = 'redis' needs redis_url (or redis_url_file)",
    ]


def test_api_must_have_some_authentication(tmp_path: Path) -> None:
    assert problems("[api.auth]\n", tmp_path=tmp_path) == [
        "api.auth: configure at least one of api_keys or oidc: the API never runs open"
    ]


def test_secret_values_are_never_echoed(tmp_path: Path) -> None:
    env = {"BEMSMAIL_CLUSTER__REDIS_URL": "redis://:hunter2@h", "BEMSMAIL_CLUSTER__SHARDS": "hunter3"}
    lines = problems(MINIMAL, env, tmp_path)
    assert lines and not any("hunter" in line for line in lines)


def test_not_toml(tmp_path: Path) -> None:
    lines = problems("[server\nport=1", tmp_path=tmp_path)
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path / 'c.toml'}: not valid TOML")


def test_credentials_are_checked_at_start(tmp_path: Path) -> None:
    write_dev_config(tmp_path / "dev.toml")
    bad_key = tmp_path / "secrets" / "apns-dev.p8"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    (tmp_path / "secrets" / "fcm-dev.json").write_text('{"type": "authorized_user"}')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "dev.toml", {})
    assert info.value.problems == [
        f"apns.apps[0]: key_file {str(bad_key)!r} is not a PEM private key (.p8)",
        f"fcm.apps[0]: credentials_file {str(tmp_path / 'secrets' / 'fcm-dev.json')!r} is not a service-account key",
    ]


def test_dev_config_is_valid(tmp_path: Path) -> None:
    write_dev_config(tmp_path / "dev.toml")
    config = load_config(tmp_path / "dev.toml", {})
    assert config.app_platform("com.example.mail") == "ios"
    assert config.app_platform("com.example.mail.android") == "android"
    assert config.app_platform("nope") is None
    assert (tmp_path / "secrets" / "apns-dev.p8").stat().st_mode & 0o077 == 0


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, info in model.model_fields.items():
        keys.add(name)
        for arg in (*getattr(info.annotation, "__args__", ()), info.annotation):
            inner = getattr(arg, "__args__", (arg,))
            for candidate in inner:
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    keys |= _keys(candidate)
    return keys


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    tomllib.loads(text)
    assignment = r"(^|[\s#{{])%s(_file)?\s*="
    header = r"\[\[?([\w.]*\.)?%s[.\]]"
    missing = sorted(k for k in _keys(Config) if not re.search(f"{assignment % k}|{header % k}", text, re.M))
    assert missing == []


def test_example_validates_once_its_files_exist(tmp_path: Path) -> None:
    write_dev_config(tmp_path / "dev.toml")
    s = tmp_path / "secrets"
    (s / "pw").write_text("x")
    env = {
        "BEMSMAIL_TENANTS__0__EWS__PASSWORD_FILE": str(s / "pw"),
        "BEMSMAIL_TENANTS__1__GRAPH__CLIENT_SECRET_FILE": str(s / "pw"),
        "BEMSMAIL_APNS__APPS__0__KEY_FILE": str(s / "apns-dev.p8"),
        "BEMSMAIL_FCM__APPS__0__CREDENTIALS_FILE": str(s / "fcm-dev.json"),
    }
    config = load_config(EXAMPLE, env)
    assert [t.backend for t in config.tenants] == ["ews", "graph"]


def test_check_config_cli_exit_code_and_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL + "[server]\nport = 0\nhots = 'x'\n")
    run = subprocess.run([sys.executable, "-m", "bemsmail", "check-config", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.splitlines()[1:] == [
        "  server.port: Input should be greater than or equal to 1",
        "  server.hots: Extra inputs are not permitted",
    ]
    path.write_text(MINIMAL)
    ok = subprocess.run([sys.executable, "-m", "bemsmail", "check-config", "--config", str(path)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "configuration OK" in ok.stdout


def test_environment_names_outside_the_config_are_left_alone(tmp_path: Path) -> None:
    """BEMSMAIL_CONFIG or CI's BEMSMAIL_REQUIRE_SERVICES are not config keys; a top-level table may be JSON."""
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL)
    config = load_config(path, {"BEMSMAIL_REQUIRE_SERVICES": "1", "BEMSMAIL_CONFIG": "/x.toml",
                                "BEMSMAIL_RELAY": '{"coalesce_seconds": 2}'})
    assert config.relay.coalesce_seconds == 2
