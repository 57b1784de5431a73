"""A real ``redis-server`` for tests: started on a free loopback port with a temp directory.

``make test`` installs redis-server (apt) when it is missing; without it the tests that need it
fail (never skip) with a message saying so.

Persistence is AOF with ``appendfsync always``: what the service wrote survives a restart of
Redis, as it must in production (docs/decisions/0008-durable-state-and-ha.md).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

MISSING = (
    "redis-server is not installed: `make test` installs it (apt-get install -y redis-server); "
    "these tests need a real Redis and are never skipped"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process; :meth:`restart` keeps its port and data directory."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(MISSING, pytrace=False)
        self.binary = binary
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--appendonly", "yes",
                "--appendfsync", "always", "--daemonize", "no", "--protected-mode", "no",
                "--logfile", str(self.dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: {log}")
            if self.ping():
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server not answering on port {self.port}")

    def ping(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(
            ("127.0.0.1", self.port), timeout=0.5
        ) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        return False

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=0, socket_timeout=5)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` (stopped at teardown)."""
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop(kill=True)


def start_replica(*flags: str, env: dict[str, str] | None = None) -> Any:
    """``eplb serve`` (a :class:`tests.conftest.ServeProcess`) that may stay a follower: waits
    for ``/healthz`` (up), not ``/readyz`` (leading). Terminate it yourself."""
    import os
    import sys
    import urllib.request

    from tests.conftest import REPO, ServeProcess, free_port

    proc = ServeProcess.__new__(ServeProcess)
    proc.grpc_port, proc.http_port = free_port(), free_port()
    proc.grpc_target = f"127.0.0.1:{proc.grpc_port}"
    proc.http_url = f"http://127.0.0.1:{proc.http_port}"
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    proc.proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from eplb_service.cli import main; sys.exit(main())",
         "serve", "--host", "127.0.0.1", "--grpc-port", str(proc.grpc_port),
         "--http-port", str(proc.http_port), *flags],
        cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"eplb serve exited {proc.proc.returncode}: {proc.output()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(
            f"{proc.http_url}/healthz", timeout=1
        ) as resp:
            if resp.status == 200:
                return proc
        time.sleep(0.05)
    proc.terminate()
    raise RuntimeError("eplb serve did not come up in 20s")
