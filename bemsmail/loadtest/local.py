"""A whole deployment on this machine for the demo and `loadtest --local`: the mock Exchange, mock Graph, mock
APNs and mock FCM and one daemon on the embedded SQLite default, each its own process on loopback, configured
against each other with throwaway credentials."""

from __future__ import annotations

import json
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from bemsmail.config import load_config
from bemsmail.devconfig import MOCK_GRAPH_CLIENT_ID, MOCK_GRAPH_TENANT_ID, graph_section, write_dev_config
from bemsmail.devservices import free_port

EWS_DOMAIN = "example.com"
GRAPH_DOMAIN = "contoso.com"
EWS_USER = "svc-bemsmail@example.com"
START_SECONDS = 60.0


class StartFailed(RuntimeError):
    """A process of the local deployment did not come up; the message carries the end of its log."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where a load test finds a deployment and the mocks it is configured against (all loopback)."""

    api_urls: tuple[str, ...]
    api_key: str
    ews_url: str | None  # the mock Exchange's base URL; its control API is under /_mock
    graph_url: str | None  # the mock Graph's base URL (https); control API under /_mock
    graph_ca_file: str | None
    apns_url: str | None  # the mock APNs's control API
    fcm_url: str | None  # the mock FCM's base URL (its control API is under /mock)
    ews_domain: str = EWS_DOMAIN
    graph_domain: str = GRAPH_DOMAIN
    ios_app: str = "com.example.mail"
    android_app: str = "com.example.mail.android"


class Process:
    """A child process whose first line on stdout says it is ready; its stderr (and later stdout) go to a log."""

    def __init__(self, name: str, command: list[str], log_path: Path, env: Mapping[str, str] | None = None,
                 ready_line: bool = True) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        # Its own process group: Ctrl+C in the terminal reaches only the parent, which stops the children in
        # order (the daemon drains into the mocks first).
        group: dict[str, Any] = {"start_new_session": True}
        if sys.platform == "win32":
            group = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE if ready_line else self._log,  # noqa: S603
                                     stderr=self._log, env={**os.environ, **(env or {})}, **group)
        self._lines: queue.Queue[str] = queue.Queue()
        if ready_line:
            threading.Thread(target=self._pump, name=f"{name}-stdout", daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(raw.decode("utf-8", "replace"))
        self._lines.put("")

    def ready(self, timeout: float = START_SECONDS) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            line = ""
        if not line:
            self.stop()
            raise StartFailed(f"{self.name} did not start:\n{self.tail()}")
        return line.strip()

    def tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        self._log.close()
        return self.proc.returncode


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a live process (Linux /proc); None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class LocalDeployment:
    """Start with `with LocalDeployment(workdir) as target:`; everything started is stopped on leaving."""

    def __init__(self, workdir: Path, *, history: int = 20_000, ews_backends: int = 4, log_level: str = "warning",
                 env: Mapping[str, str] | None = None) -> None:
        self.workdir = workdir
        self.history = history
        self.ews_backends = ews_backends
        self.log_level = log_level
        self.env = dict(env or {})
        self.processes: list[Process] = []
        self.daemon: Process | None = None
        self.config_path = workdir / "bemsmail.toml"

    def __enter__(self) -> Target:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> Target:
        work = self.workdir
        work.mkdir(parents=True, exist_ok=True)
        api_key = write_dev_config(self.config_path)
        secrets_dir = work / "secrets"
        graph_secret = secrets.token_urlsafe(24)
        (secrets_dir / "graph-client-secret").write_text(graph_secret + "\n", encoding="utf-8")
        (secrets_dir / "graph-client-secret").chmod(0o600)
        password = (secrets_dir / "ews-password").read_text(encoding="utf-8").strip()
        config = load_config(self.config_path, {})
        apns_app, fcm_app = config.apns.apps[0], config.fcm.apps[0]
        history = str(self.history)

        ews = self._spawn("mock-ews", _python("bemsmail.mocks.ews", "--port", "0", "--user", f"{EWS_USER}:{password}",
                                              "--domain", EWS_DOMAIN, "--backends", str(self.ews_backends),
                                              "--heartbeat-seconds", "5"))
        graph = self._spawn("mock-graph", _python(
            "bemsmail.mocks.graph", "--cert-dir", str(work / "pki"), "--tenant-id", MOCK_GRAPH_TENANT_ID,
            "--client-id", MOCK_GRAPH_CLIENT_ID), env={"BEMSMAIL_MOCK_GRAPH_SECRET": graph_secret})
        apns = self._spawn("mock-apns", _python(
            "bemsmail.mocks.apns", "--cert-dir", str(work / "pki-apns"), "--topic", apns_app.topic,
            "--key-id", str(apns_app.key_id), "--team-id", str(apns_app.team_id),
            "--public-key-file", str(apns_app.key_file), "--history", history, "--no-validate-headers"))
        fcm = self._spawn("mock-fcm", _python("bemsmail.mocks.fcm", "--port", "0", "--service-account",
                                              str(fcm_app.credentials_file), "--history", history))
        ews_url = ews.ready().rsplit(" ", 1)[-1]
        graph_ready = json.loads(graph.ready())
        apns_ready = json.loads(apns.ready())
        fcm_words = dict(w.split("=", 1) for w in fcm.ready().split() if "=" in w)

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with self.config_path.open("a", encoding="utf-8") as handle:
            handle.write(f'''
[[tenants]]
name = "contoso"
domains = ["{GRAPH_DOMAIN}"]
backend = "graph"

{graph_section(secret_file=secrets_dir / "graph-client-secret", notification_url=base,
               authority=graph_ready["url"], graph_url=graph_ready["graph_url"], ca_file=graph_ready["ca_file"])}''')
        env = {
            "BEMSMAIL_SERVER__PORT": str(port),
            "BEMSMAIL_SERVER__SHUTDOWN_GRACE_SECONDS": "2",
            "BEMSMAIL_LOGGING__LEVEL": self.log_level,
            "BEMSMAIL_LOGGING__FORMAT": "json",
            "BEMSMAIL_TENANTS__0__EWS__URL": f"{ews_url}/EWS/Exchange.asmx",
            "BEMSMAIL_APNS__APPS__0__ENDPOINT": json.dumps({"host": "127.0.0.1", "port": apns_ready["port"],
                                                            "ca_file": apns_ready["ca_file"]}),
            "BEMSMAIL_FCM__APPS__0__FCM_URL": fcm_words["url"],
            "BEMSMAIL_FCM__APPS__0__TOKEN_URI": fcm_words["token_uri"],
            **self.env,
        }
        load_config(self.config_path, env)  # refuse here, with the config's own message, not in the child
        self.daemon = Process("bemsmail", _python("bemsmail", "serve", "--config", str(self.config_path),
                                                  "--migrate"), work / "daemon.log", env=env, ready_line=False)
        self.processes.append(self.daemon)
        self._wait_ready(f"{base}/readyz")
        return Target(api_urls=(base,), api_key=api_key, ews_url=ews_url, graph_url=graph_ready["url"],
                      graph_ca_file=graph_ready["ca_file"], apns_url=f"http://127.0.0.1:{apns_ready['control_port']}",
                      fcm_url=fcm_words["url"], ios_app=apns_app.id, android_app=fcm_app.id)

    def _spawn(self, name: str, command: list[str], env: Mapping[str, str] | None = None) -> Process:
        process = Process(name, command, self.workdir / f"{name}.log", env=env)
        self.processes.append(process)
        return process

    def _wait_ready(self, url: str) -> None:
        assert self.daemon is not None
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if not self.daemon.alive():
                raise StartFailed(f"the daemon exited with {self.daemon.proc.returncode}:\n{self.daemon.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 - our own daemon on loopback
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise StartFailed(f"the daemon was not ready within {START_SECONDS:.0f} s:\n{self.daemon.tail()}")

    def cpu(self) -> dict[str, float]:
        """CPU seconds each process has used so far (empty where /proc is not there)."""
        found = {p.name: cpu_seconds(p.proc.pid) for p in self.processes}
        return {name: value for name, value in found.items() if value is not None}

    def stop(self) -> None:
        """The daemon first (it drains into the mocks), then the mocks."""
        for process in sorted(self.processes, key=lambda p: p is not self.daemon):
            process.stop()
        self.processes.clear()
