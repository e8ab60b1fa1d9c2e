"""``python -m sampler.serve`` child processes and plain HTTP calls for the server tests."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "test-admin-token"
API_KEY = "test-api-key"
#: The known request and, per test module, its greedy answer (computed once at start-up).
KNOWN_BODY = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "temperature": 0.0}}
#: Generous bounds that only a broken server reaches.
READY_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 300


#: Ports below this are never handed out for outgoing connections (the kernel's ephemeral range).
EPHEMERAL_LOW = 32768
#: Where test servers listen: below the ephemeral range, so no client connection of this or
#: another test process can take a port between the check and the server's bind.
SERVER_PORTS = (10000, EPHEMERAL_LOW)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return EPHEMERAL_LOW


def free_ports(count: int = 1) -> int:
    """The first of ``count`` consecutive free loopback ports, chosen at random below the
    ephemeral range (a port from ``bind(0)`` is in it: once released, any outgoing connection
    can take it before the server binds)."""
    rng = random.Random()
    low, high = SERVER_PORTS[0], min(SERVER_PORTS[1], _ephemeral_low())
    for _ in range(100):
        base = rng.randrange(low, high - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError(f"no {count} consecutive free ports in {low}..{high}")


def free_port() -> int:
    return free_ports(1)


def call(
    url: str,
    body=None,
    *,
    method: str | None = None,
    token: str | None = None,
    raw: bytes | None = None,
    content_type: str = "application/json",
    headers: dict | None = None,
    timeout: float = REQUEST_TIMEOUT_S,
):
    """(status, decoded JSON body or the raw bytes, lower-cased headers)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("GET" if data is None else "POST"))
    if data is not None:
        req.add_header("Content-Type", content_type)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, payload, hdrs = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        status, payload, hdrs = e.code, e.read(), e.headers
    try:
        decoded = json.loads(payload) if payload else None
    except ValueError:
        decoded = payload
    return status, decoded, {k.lower(): v for k, v in hdrs.items()}


def error_message(body) -> str:
    """The message of any of the server's error forms ({"error": {...}}, flat OpenAI errors)."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
    return str(body)


class ServerProcess:
    """A real ``python -m sampler.serve`` child on a free loopback port."""

    def __init__(self, model_path: Path, log: Path, *extra: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sampler.serve",
                "--model-path",
                str(model_path),
                "--port",
                str(self.port),
                "--admin-token",
                ADMIN_TOKEN,
                "--log-level",
                "info",
                *extra,
            ],
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
            cwd=ROOT,
        )

    def wait_ready(self) -> "ServerProcess":
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited:\n{self.log.read_text()[-3000:]}"
            if "listening on" in self.log.read_text():
                return self
            time.sleep(0.5)
        raise AssertionError(f"server not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def call(self, path: str, body=None, **kw):
        return call(self.url + path, body, **kw)

    def admin(self, path: str, body=None, **kw):
        return call(self.url + path, body, token=ADMIN_TOKEN, **kw)

    def status(self) -> dict:
        code, body, _ = self.admin("/admin/reload_status")
        assert code == 200, body
        return body
