"""``eplb serve`` as a child process on free loopback ports, plus a tiny JSON/HTTP client.

Used by the demo (and handy in scripts): :class:`ServiceProcess` starts the service, waits until
``/readyz`` answers, and always stops it (SIGTERM, then SIGKILL) on :meth:`ServiceProcess.stop`
or when leaving its ``with`` block. The child gets its own session, so a Ctrl-C in the terminal
reaches only the parent, which then stops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

__all__ = ["ServiceProcess", "free_port", "http_json"]

_MAIN = "import sys; from eplb_service.cli import main; sys.exit(main())"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_json(
    method: str, url: str, body: Any = None, timeout_s: float = 5.0
) -> tuple[int, Any]:
    """``(status, parsed JSON or text)``; ``(0, reason)`` when the server cannot be reached."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (OSError, ValueError) as exc:
        return 0, str(exc)
    try:
        return status, json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return status, raw.decode(errors="replace")


class ServiceProcess:
    """``eplb serve --host 127.0.0.1`` on free ports with ``flags``; a context manager.

    Attributes: ``grpc_target`` (``host:port``), ``http_url``, ``proc``, ``log_path`` (its
    merged stdout/stderr).
    """

    def __init__(self, flags: Sequence[str] = (), *, startup_timeout_s: float = 30.0,
                 attempts: int = 3) -> None:
        self.flags = list(flags)
        self.startup_timeout_s = startup_timeout_s
        self.attempts = attempts
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in stop())
            prefix="eplb-demo-serve-", suffix=".log", delete=False
        )
        self.log_path = self._log.name
        self.grpc_port = self.http_port = 0

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> ServiceProcess:
        """Start it and wait for ``/readyz`` (retrying on other free ports if one was taken).

        Raises ``RuntimeError`` (with the log's tail) when it does not come up.
        """
        for _ in range(self.attempts):
            self.grpc_port, self.http_port = free_port(), free_port()
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _MAIN, "serve", "--host", "127.0.0.1",
                 "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
                 *self.flags],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            deadline = time.monotonic() + self.startup_timeout_s
            while time.monotonic() < deadline and self.proc.poll() is None:
                status, _ = http_json("GET", f"{self.http_url}/readyz", timeout_s=1.0)
                if status == 200:
                    return self
                time.sleep(0.1)
            self._terminate()
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"eplb serve did not start; its log:\n{tail}")

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
        return ""

    def _terminate(self, timeout_s: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout_s``, SIGKILL; remove the log. Idempotent."""
        try:
            self._terminate(timeout_s)
        finally:
            self._log.close()
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
