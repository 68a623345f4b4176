"""The daemon as a user runs it: `bemsmail serve` in a subprocess, its schema check, SIGTERM drain, restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bemsmail import __version__
from tests.support import free_port, registration

BEMSMAIL = [sys.executable, "-m", "bemsmail"]


def _env(tmp_path: Path, port: int) -> dict[str, str]:
    return {**os.environ, "BEMSMAIL_SERVER__PORT": str(port), "BEMSMAIL_LOGGING__FORMAT": "json",
            "BEMSMAIL_DATABASE__URL": f"sqlite+aiosqlite:///{tmp_path / 'bemsmail.db'}"}


def _request(port: int, method: str, path: str, key: str | None = None, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if key:
        req.add_header("X-API-Key", key)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback only
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _wait_healthy(proc: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"daemon exited early with {proc.returncode}: {err}")
        try:
            if _request(port, "GET", "/healthz")[0] == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("daemon did not become healthy within 30 s")


def _serve(config: Path, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*BEMSMAIL, "serve", "--config", str(config), *extra], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


def test_version() -> None:
    run = subprocess.run([*BEMSMAIL, "--version"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and run.stdout.strip() == f"bemsmail {__version__}"


def test_serve_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    subprocess.run([*BEMSMAIL, "init", "--output", str(tmp_path / "c.toml")], check=True, capture_output=True,
                   timeout=60)
    run = subprocess.run([*BEMSMAIL, "serve", "--config", str(tmp_path / "c.toml")], env=_env(tmp_path, free_port()),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 3
    assert "no bemsmail schema: run `bemsmail migrate`" in run.stderr
    assert "Traceback" not in run.stderr


def test_registrations_survive_a_restart_and_sigterm_exits_cleanly(tmp_path: Path) -> None:
    init = subprocess.run([*BEMSMAIL, "init", "--output", str(tmp_path / "c.toml")], capture_output=True, text=True,
                          check=True, timeout=60)
    key = (tmp_path / "secrets" / "api-key").read_text().strip()
    assert key in init.stdout
    port = free_port()
    env = _env(tmp_path, port)
    migrate = subprocess.run([*BEMSMAIL, "migrate", "--config", str(tmp_path / "c.toml")], env=env,
                             capture_output=True, text=True, timeout=60)
    from bemsmail.store.schema import head_revision

    assert migrate.returncode == 0 and f"is at schema {head_revision()}" in migrate.stdout

    proc = _serve(tmp_path / "c.toml", env)
    try:
        _wait_healthy(proc, port)
        status, created = _request(port, "POST", "/api/v1/registrations", key, registration())
        assert status == 201
    finally:
        code, out, err = _stop(proc)
    assert code == 0, err
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    assert events.index("node_started") < events.index("stop_requested") < events.index("node_stopped")
    assert events[-1] == "node_stopped"
    assert key not in out + err

    proc = _serve(tmp_path / "c.toml", env)
    try:
        _wait_healthy(proc, port)
        status, listed = _request(port, "GET", "/api/v1/registrations?mailbox=alice@example.com", key)
        assert status == 200
        assert [item["id"] for item in listed["items"]] == [created["id"]]
    finally:
        assert _stop(proc)[0] == 0


def test_sigterm_lets_an_in_flight_request_finish(tmp_path: Path) -> None:
    """SIGTERM while a client is mid-request: the listener closes, the request is still answered."""
    subprocess.run([*BEMSMAIL, "init", "--output", str(tmp_path / "c.toml")], check=True, capture_output=True,
                   timeout=60)
    key = (tmp_path / "secrets" / "api-key").read_text().strip()
    port = free_port()
    proc = _serve(tmp_path / "c.toml", _env(tmp_path, port), "--migrate")
    import socket

    try:
        _wait_healthy(proc, port)
        body = json.dumps(registration()).encode()
        head = (f"POST /api/v1/registrations HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head + body[:10])  # the handler is now waiting for the rest of the body
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            sock.sendall(body[10:])
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    with pytest.raises(OSError):
        _request(port, "GET", "/healthz")


@pytest.mark.parametrize("provider", ["apns", "fcm"])
def test_bemsmail_mock_serves_until_sigterm(provider: str, tmp_path: Path) -> None:
    """`bemsmail mock apns|fcm` hands its arguments to the mock, which says when it listens and stops cleanly."""
    extra = ["--cert-dir", str(tmp_path / "pki"), "--control-port", "0"] if provider == "apns" else []
    command = [*BEMSMAIL, "mock", provider, "--port", "0", *extra]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "ready" in line and "port" in line, line + (proc.stderr.read() if proc.stderr else "")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
