"""Throwaway real servers (MariaDB, Redis, nginx) in a temp dir on a free loopback port, for tests, benchmarks and
demos.

Each is a context manager that starts the server from the Debian package's binary, waits until it answers, and on
exit kills it and removes its directory. `ServiceUnavailable` says which package to install when a binary is
missing, so a caller can skip (or, under BEMSMAIL_REQUIRE_SERVICES=1, fail) with a useful message. `Nginx` serves
the production site file deploy/nginx/bemsmail.conf, only its marked site-specific lines replaced, in front of
daemons on loopback.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

START_TIMEOUT_SECONDS = 60.0
#: the production nginx site file (in a source checkout; not part of an installed package)
NGINX_SITE = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "bemsmail.conf"


class ServiceUnavailable(Exception):
    """A server binary this machine lacks; the message names the Debian package."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _binary(names: tuple[str, ...], package: str) -> str:
    for name in names:
        found = shutil.which(name) or next(
            (str(p) for d in ("/usr/sbin", "/usr/bin") if (p := Path(d) / name).is_file()), None
        )
        if found:
            return found
    raise ServiceUnavailable(f"{names[0]} not found: install the Debian package {package}")


class _Server:
    """A child process in its own temp dir; subclasses say how to start it and how to tell it is ready."""

    package = ""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"bemsmail-{type(self).__name__.lower()}-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.dir / "server.log"

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Work done once before the first start (e.g. initialising a data directory)."""

    def _ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{type(self).__name__} exited with {self._proc.returncode}: {self.log_tail()}")
            if self._ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{type(self).__name__} not ready within {START_TIMEOUT_SECONDS:g} s: {self.log_tail()}")

    def stop(self) -> None:
        """Stop the server (its data stays until `close`), so tests can restart it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> _Server:
        self._prepare()
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class MariaDB(_Server):
    """A MariaDB server with one database and user for bemsmail; `url` is the SQLAlchemy URL.

    `durable=True` keeps production's innodb_flush_log_at_trx_commit=1 (benchmarks say which they used)."""

    package = "mariadb-server"
    database = "bems"
    user = "bems"
    password = "bems-test-only"  # noqa: S105 - a throwaway loopback server's password

    def __init__(self, durable: bool = False) -> None:
        self._mariadbd = _binary(("mariadbd", "mysqld"), self.package)
        self._install_db = _binary(("mariadb-install-db", "mysql_install_db"), self.package)
        self._client = _binary(("mariadb", "mysql"), self.package)
        super().__init__()
        self.durable = durable

    @property
    def url(self) -> str:
        return f"mysql+aiomysql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def url_for(self, database: str) -> str:
        return f"mysql+aiomysql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _root(self) -> list[str]:
        return ["--user=root"] if os.geteuid() == 0 else []

    def _prepare(self) -> None:
        subprocess.run(
            [self._install_db, "--no-defaults", f"--datadir={self.dir / 'data'}",
             "--auth-root-authentication-method=normal", "--skip-test-db", *self._root()],
            check=True, capture_output=True, timeout=120,
        )

    def _command(self) -> list[str]:
        return [
            self._mariadbd, "--no-defaults", f"--datadir={self.dir / 'data'}", f"--socket={self.dir / 's.sock'}",
            f"--port={self.port}", "--bind-address=127.0.0.1", "--skip-name-resolve",
            "--innodb-buffer-pool-size=128M", "--max-connections=500", f"--pid-file={self.dir / 'm.pid'}",
            f"--innodb-flush-log-at-trx-commit={1 if self.durable else 2}", "--skip-log-bin", *self._root(),
        ]

    def sql(self, statement: str) -> str:
        done = subprocess.run(
            [self._client, "--no-defaults", "-uroot", "-h127.0.0.1", f"-P{self.port}", "-N", "-B", "-e", statement],
            capture_output=True, text=True, timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"mariadb: {done.stderr.strip()}")
        return done.stdout

    def _ready(self) -> bool:
        try:
            self.sql("SELECT 1")
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    def start(self) -> None:
        super().start()
        self.create_database(self.database)

    def create_database(self, name: str) -> str:
        """An empty database the bemsmail user may use; returns its URL."""
        self.sql(
            f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;"
            f"CREATE USER IF NOT EXISTS '{self.user}'@'127.0.0.1' IDENTIFIED BY '{self.password}';"
            f"GRANT ALL ON `{name}`.* TO '{self.user}'@'127.0.0.1';"
        )
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        self.sql(f"DROP DATABASE IF EXISTS `{name}`")

    def __enter__(self) -> MariaDB:
        super().__enter__()
        return self


class Redis(_Server):
    """A Redis server without persistence unless `appendonly`; `url` is its redis:// URL."""

    package = "redis-server"

    def __init__(self, appendonly: bool = False) -> None:
        self._redis = _binary(("redis-server",), self.package)
        super().__init__()
        self.appendonly = appendonly

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        aof = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.appendonly else ["--appendonly", "no"]
        return [self._redis, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *aof,
                "--dir", str(self.dir), "--pidfile", str(self.dir / "r.pid")]

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def __enter__(self) -> Redis:
        super().__enter__()
        return self


def render_site(template: str, values: Mapping[str, Sequence[str]]) -> str:
    """The nginx site file with each group of lines ending in `#@name` replaced by `values[name]` (at the first
    line's place and indentation). Every marker must have values and every value a marker: a renamed marker
    fails loudly instead of leaving a production path in a test."""
    out: list[str] = []
    done: set[str] = set()
    found: set[str] = set()
    for line in template.splitlines():
        body, sep, name = line.rpartition("#@")
        name = name.strip()
        if not sep or not name.isidentifier():
            out.append(line)
            continue
        found.add(name)
        if name not in values:
            raise ValueError(f"no value for the nginx site's #@{name} lines")
        if name not in done:
            done.add(name)
            indent = body[: len(body) - len(body.lstrip())]
            out.extend(indent + value for value in values[name])
    if missing := sorted(set(values) - found):
        raise ValueError(f"the nginx site has no #@{missing[0]} line")
    return "\n".join(out) + "\n"


class Nginx(_Server):
    """nginx with the production site (deploy/nginx/bemsmail.conf) on a loopback HTTPS port in front of daemons on
    `upstream_ports`; `url` is its https:// base URL. Logs, pid and every temp path are in its directory."""

    package = "nginx"

    def __init__(self, upstream_ports: int | Sequence[int], certificate: Path, certificate_key: Path,
                 site: Path = NGINX_SITE) -> None:
        self._nginx = _binary(("nginx",), self.package)
        super().__init__()
        self.upstream_ports = [upstream_ports] if isinstance(upstream_ports, int) else list(upstream_ports)
        self.certificate = Path(certificate)
        self.certificate_key = Path(certificate_key)
        self.site = Path(site)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def _prepare(self) -> None:
        site = render_site(self.site.read_text(encoding="utf-8"), {
            "listen": [f"listen 127.0.0.1:{self.port} ssl http2;"],
            "upstream": [f"server 127.0.0.1:{port} max_fails=1 fail_timeout=5s;" for port in self.upstream_ports],
            "certificate": [f'ssl_certificate "{self.certificate}";'],
            "certificate_key": [f'ssl_certificate_key "{self.certificate_key}";'],
        })
        (self.dir / "bemsmail.conf").write_text(site, encoding="utf-8")
        d = self.dir
        # as root, workers would run as nobody and could not enter this 0700 directory
        user = "user root;\n" if os.geteuid() == 0 else ""
        (d / "nginx.conf").write_text(
            f"""{user}worker_processes 1;
error_log "{self._log}" info;
pid "{d / 'nginx.pid'}";
lock_file "{d / 'nginx.lock'}";
events {{
    worker_connections 512;
}}
http {{
    access_log "{d / 'access.log'}";
    client_body_temp_path "{d / 'client_body'}";
    proxy_temp_path "{d / 'proxy'}";
    fastcgi_temp_path "{d / 'fastcgi'}";
    uwsgi_temp_path "{d / 'uwsgi'}";
    scgi_temp_path "{d / 'scgi'}";
    default_type application/octet-stream;
    include "{d / 'bemsmail.conf'}";
}}
""", encoding="utf-8")

    def _command(self) -> list[str]:
        # -e: the log for what happens before the configuration is read (not the package's /var/log path)
        return [self._nginx, "-p", f"{self.dir}/", "-c", str(self.dir / "nginx.conf"), "-e", str(self._log),
                "-g", "daemon off;"]

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def __enter__(self) -> Nginx:
        super().__enter__()
        return self


__all__ = ["MariaDB", "Nginx", "Redis", "ServiceUnavailable", "free_port", "render_site"]
