"""Shared fixtures: free ports, a running service (in-process or ``eplb serve`` subprocess) and a
raw gRPC agent stream for driving it.

- ``free_port()``: a TCP port free on 127.0.0.1 right now.
- ``service_factory(store=None, **settings)``: starts :class:`eplb_service.app.EplbService` on
  its own event loop in a background thread, on free loopback ports; returns a
  :class:`RunningService`
  (``grpc_target``, ``http_url``, ``service``, ``call(fn)`` to run ``fn`` on the loop). Stopped at
  teardown. ``service``: one with default settings.
- ``serve_process(*flags, env=..., grpc_port=..., http_port=...)``: runs ``eplb serve`` as a
  subprocess (on free ports unless given) and waits for ``/readyz``; returns a
  :class:`ServeProcess` (``grpc_target``, ``http_url``, ``terminate()``).
- ``raw_agent(target)``: a :class:`RawAgent` sync bidi stream built from the eplb_proto stubs
  (``send``, ``recv(kind)``, ``hello(...)``, ``report(...)``, ``status()``), independent of the
  worker_agent library.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from eplb_engine.service import http_json
from eplb_proto.v1 import eplb_pb2, eplb_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 20.0


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------------
# In-process service


class RunningService:
    """An EplbService on its own loop in a daemon thread."""

    def __init__(self, settings: Any, store: Any = None) -> None:
        from eplb_service.app import EplbService

        self.loop = asyncio.new_event_loop()
        self.service = EplbService(settings, store=store)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.call_async(self.service.start(), timeout=STARTUP_TIMEOUT_S)
        self.grpc_target = f"127.0.0.1:{self.service.grpc_port}"
        self.http_url = f"http://127.0.0.1:{self.service.http_port}"

    @property
    def control(self) -> Any:
        return self.service.control

    def call_async(self, coro: Any, timeout: float = 10.0) -> Any:
        """Runs a coroutine on the service loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Runs ``fn()`` on the service loop (safe access to service state)."""

        async def run() -> Any:
            return fn()

        return self.call_async(run(), timeout)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self.call_async(self.service.stop(grace=0.5), timeout=15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


@pytest.fixture
def service_factory() -> Iterator[Callable[..., RunningService]]:
    """``factory(store=None, **settings)`` -> a started :class:`RunningService` on free loopback
    ports (``store``: a :class:`eplb_service.store.Store`, e.g. shared to simulate a restart)."""
    from eplb_service.config import Settings

    started: list[RunningService] = []

    def factory(store: Any = None, **overrides: Any) -> RunningService:
        settings = Settings(**{"host": "127.0.0.1", "grpc_port": 0, "http_port": 0, **overrides})
        running = RunningService(settings, store=store)
        started.append(running)
        return running

    yield factory
    for running in reversed(started):
        running.stop()


@pytest.fixture
def service(service_factory: Callable[..., RunningService]) -> RunningService:
    """A running service with default settings (short rollout timeout)."""
    return service_factory(rollout_timeout_s=5.0)


# ------------------------------------------------------------------------------------------
# Subprocess: `eplb serve`


class ServeProcess:
    """``eplb serve`` in a subprocess on free ports."""

    def __init__(
        self,
        *flags: str,
        env: dict[str, str] | None = None,
        grpc_port: int | None = None,
        http_port: int | None = None,
    ) -> None:
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from eplb_service.cli import main; sys.exit(main())",
                "serve",
                "--host",
                "127.0.0.1",
                "--grpc-port",
                str(self.grpc_port),
                "--http-port",
                str(self.http_port),
                *flags,
            ],
            cwd=REPO,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"eplb serve exited {self.proc.returncode}: {self.output()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.http_url}/readyz", timeout=1) as resp,
            ):
                if resp.status == 200:
                    return
            time.sleep(0.05)
        self.terminate()
        raise RuntimeError(f"eplb serve not ready in {STARTUP_TIMEOUT_S}s: {self.output()}")

    def output(self) -> str:
        if self.proc.poll() is None or self.proc.stdout is None:
            return ""
        return self.proc.stdout.read()

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait; returns the exit code (kills after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@pytest.fixture
def serve_process() -> Iterator[Callable[..., ServeProcess]]:
    """``factory(*flags, env=None, grpc_port=None, http_port=None)`` -> a ready
    :class:`ServeProcess` (ports free ones unless given; terminated at teardown)."""
    started: list[ServeProcess] = []

    def factory(*flags: str, env: dict[str, str] | None = None, **ports: int) -> ServeProcess:
        proc = ServeProcess(*flags, env=env, **ports)
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        proc.terminate()


# ------------------------------------------------------------------------------------------
# Raw agent stream


def tensor(array: Any, dtype: str = "int64") -> eplb_pb2.Tensor:
    arr = np.asarray(array)
    wire = {"int32": eplb_pb2.DTYPE_INT32, "int64": eplb_pb2.DTYPE_INT64}[dtype]
    data = np.ascontiguousarray(arr, dtype="<i4" if dtype == "int32" else "<i8").tobytes()
    return eplb_pb2.Tensor(dtype=wire, shape=list(arr.shape), data=data)


_END = object()


class RawAgent:
    """One ``Connect`` stream driven by hand (sync gRPC, a reader thread, bounded waits)."""

    def __init__(self, target: str, *, max_message_bytes: int = 64 * 1024 * 1024) -> None:
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        self.stub = eplb_pb2_grpc.EplbStub(self.channel)
        self._out: queue.Queue[Any] = queue.Queue()
        self._in: queue.Queue[Any] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        self.call = self.stub.Connect(iter(self._out.get, _END), timeout=60)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.incarnation = uuid.uuid4().hex
        self.sequence = 0

    def _read(self) -> None:
        try:
            for message in self.call:
                self._in.put(message)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.ended.set()
            self._in.put(_END)

    def send(self, message: eplb_pb2.AgentMessage) -> None:
        self._out.put(message)

    def recv(self, kind: str | None = None, timeout: float = 5.0) -> eplb_pb2.ServiceMessage:
        """The next service message (of ``kind``, skipping others); AssertionError on timeout or
        end of stream."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                message = self._in.get(timeout=max(0.0, left))
            except queue.Empty:
                raise AssertionError(f"no {kind or 'message'} within {timeout}s") from None
            if message is _END:
                self._in.put(_END)
                raise AssertionError(
                    f"stream ended waiting for {kind or 'a message'}: {self.status()}"
                )
            if kind is None or message.WhichOneof("body") == kind:
                return message

    def drain(self) -> list[eplb_pb2.ServiceMessage]:
        """Messages received so far (without waiting)."""
        out = []
        while True:
            try:
                message = self._in.get_nowait()
            except queue.Empty:
                return out
            if message is _END:
                self._in.put(_END)
                return out
            out.append(message)

    def status(self, timeout: float = 5.0) -> tuple[grpc.StatusCode, str]:
        """Waits for the stream to end; its (code, details)."""
        assert self.ended.wait(timeout), f"stream still open after {timeout}s"
        if self.error is None:
            return grpc.StatusCode.OK, ""
        return self.error.code(), self.error.details() or ""

    def hello(
        self,
        deployment: str = "dep",
        *,
        rank: int = 0,
        world_size: int = 2,
        layers: int = 2,
        experts: int = 4,
        slots: int = 6,
        nodes: int = 1,
        version: int = 0,
        placement: Any = None,
        incarnation: str | None = None,
        step: int = 0,
    ) -> eplb_pb2.Hello:
        if incarnation is not None:
            self.incarnation = incarnation
        hello = eplb_pb2.Hello(
            deployment=deployment,
            rank=rank,
            world_size=world_size,
            num_layers=layers,
            num_experts=experts,
            num_slots=slots,
            num_nodes=nodes,
            incarnation=self.incarnation,
            active_version=version,
            step=step,
        )
        if placement is not None:
            hello.placement.CopyFrom(tensor(placement))
        self.send(eplb_pb2.AgentMessage(hello=hello))
        return hello

    def report(
        self,
        counts: Any,
        *,
        version: int = 0,
        sequence: int | None = None,
        dtype: str = "int32",
        steps: tuple[int, int] = (0, 0),
    ) -> int:
        """Sends a report (next sequence unless given); returns its sequence."""
        if sequence is None:
            self.sequence += 1
            sequence = self.sequence
        report = eplb_pb2.LoadReport(
            sequence=sequence,
            placement_version=version,
            step_begin=steps[0],
            step_end=steps[1],
            counts=tensor(counts, dtype),
        )
        self.send(eplb_pb2.AgentMessage(report=report))
        return sequence

    def ack_plan(
        self,
        plan: eplb_pb2.Plan,
        status: str,
        *,
        step: int = 0,
        reason: str = "",
        bytes_moved: int = 0,
    ) -> None:
        code = {
            "ready": eplb_pb2.PlanAck.STATUS_READY,
            "applied": eplb_pb2.PlanAck.STATUS_APPLIED,
            "failed": eplb_pb2.PlanAck.STATUS_FAILED,
        }[status]
        ack = eplb_pb2.PlanAck(
            version=plan.version,
            rollout_id=plan.rollout_id,
            status=code,
            step=step,
            reason=reason,
        )
        if status == "applied":
            ack.migration.bytes_moved = bytes_moved
        self.send(eplb_pb2.AgentMessage(plan_ack=ack))

    def close(self) -> None:
        self._out.put(_END)
        self.call.cancel()
        self.channel.close()


@pytest.fixture
def raw_agent() -> Iterator[Callable[..., RawAgent]]:
    """``factory(target)`` -> a :class:`RawAgent` (closed at teardown)."""
    agents: list[RawAgent] = []

    def factory(target: str, **kwargs: Any) -> RawAgent:
        agent = RawAgent(target, **kwargs)
        agents.append(agent)
        return agent

    yield factory
    for agent in agents:
        agent.close()


@pytest.fixture
def http() -> Callable[..., tuple[int, Any]]:
    """``http(method, url, body=None)`` -> (status, JSON body); ``(0, reason)`` when the server
    cannot be reached (the engine's own client, ``eplb_engine.service.http_json``)."""
    return lambda method, url, body=None: http_json(method, url, body, timeout_s=10.0)


# ------------------------------------------------------------------------------------------
# Redis (issue 7): a real redis-server per test, see tests/redis_server.py

from tests.redis_server import redis_server  # noqa: E402,F401  (fixture re-export)
