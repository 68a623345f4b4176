"""Shared fixtures: the databases every store test runs on (SQLite and a real MariaDB), and the rule that,
under BEMSMAIL_REQUIRE_SERVICES=1 (as CI sets), a test that cannot get its real server fails instead of skipping."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bemsmail.devservices import MariaDB, ServiceUnavailable
from bemsmail.mocks.tls import TestPki, ensure_test_pki, generate_provider_key

REQUIRE_SERVICES = os.environ.get("BEMSMAIL_REQUIRE_SERVICES") == "1"


def need_service(message: str) -> None:
    """Skip, or fail when services are required: a silently skipped integration test proves nothing."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} (BEMSMAIL_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaDB]:
    try:
        server = MariaDB()
    except ServiceUnavailable as exc:
        need_service(str(exc))
    with server:
        yield server


@pytest.fixture
def mariadb_url(mariadb_server: MariaDB) -> Iterator[str]:
    """A fresh, empty database on the session's MariaDB server."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = mariadb_server.create_database(name)
    yield url
    mariadb_server.drop_database(name)


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs twice: on the embedded SQLite default and on a real MariaDB."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'bemsmail.db'}"
    url: str = request.getfixturevalue("mariadb_url")
    return url


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    """A throwaway CA and localhost certificate, for the mock APNs and anything else speaking TLS."""
    return ensure_test_pki(tmp_path / "pki")


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """An APNs provider key (.p8, P-256)."""
    return generate_provider_key(tmp_path / "AuthKey.p8")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under BEMSMAIL_REQUIRE_SERVICES=1 any skip fails the run, whatever caused it."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if REQUIRE_SERVICES and skipped and exitstatus == 0:
        if reporter is not None:
            reporter.write_line(f"FAILED: {skipped} test(s) skipped while BEMSMAIL_REQUIRE_SERVICES=1", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
