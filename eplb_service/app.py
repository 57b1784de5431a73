"""Wires the service: one asyncio process running the grpc.aio server and uvicorn on one loop.

:class:`EplbService` starts and stops everything (usable in-process, e.g. by tests);
:func:`serve` is ``eplb serve``: it adds logging and graceful shutdown on SIGTERM/SIGINT
(readiness drops, agent streams get ``shutdown_grace_s`` to finish, then everything stops).
See docs/decisions/0004-service-concurrency.md for why one process and a planner thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Generator
from typing import Any

import uvicorn

from eplb_service.config import Settings
from eplb_service.control import ControlPlane
from eplb_service.grpc_server import GrpcServer
from eplb_service.rest import create_app
from eplb_service.store import MemoryStore, Store


def make_store(settings: Settings) -> Store:
    """The store ``settings.store`` names: a MemoryStore, or a RedisStore for a redis:// URL."""
    if settings.store == "memory":
        return MemoryStore(settings.rollouts_kept)
    from eplb_service.redis_store import RedisStore  # redis is only imported when used

    return RedisStore(
        settings.store,
        prefix=settings.redis_prefix,
        rollouts_kept=settings.rollouts_kept,
        timeout_s=settings.store_timeout_s,
    )

log = logging.getLogger("eplb_service")


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn that leaves signals to us (it runs inside our loop, next to gRPC)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        return None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class EplbService:
    """The whole service on the running event loop.

    Args:
        settings: validated settings (ports may be 0: see :attr:`grpc_port`, :attr:`http_port`).
        store: durable state; a MemoryStore by default.
    """

    def __init__(self, settings: Settings, *, store: Store | None = None) -> None:
        self.settings = settings
        self.control = ControlPlane(
            settings, store=store if store is not None else make_store(settings)
        )
        self.grpc: GrpcServer | None = None
        self._http: _EmbeddedUvicorn | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._http_socket: socket.socket | None = None
        self.grpc_port = 0
        self.http_port = 0
        self._stopping = False

    @property
    def telemetry(self) -> Any:
        return self.control.telemetry

    def not_ready(self) -> str | None:
        """None when ready, else why not."""
        if self._stopping:
            return "shutting down"
        if self.grpc is None or not self.control.started:
            return "starting"
        return self.control.not_ready()

    async def start(self) -> None:
        """Binds both ports, restores state and starts serving.

        Raises:
            OSError: a port cannot be bound (nothing is left running).
        """
        s = self.settings
        try:
            self._http_socket = _bind(s.host, s.http_port)
            self.http_port = self._http_socket.getsockname()[1]
            grpc_server = GrpcServer(self.control)
            self.grpc_port = grpc_server.port
            if not s.advertise_address:
                self.control.advertise = f"{s.host}:{self.grpc_port}"
            # Ports are bound (so the lease can name our address); state is loaded (when this
            # replica leads) before anything is served.
            await self.control.start()
            await grpc_server.start()
            self.grpc = grpc_server
            app = create_app(self.control, ready=self.not_ready)
            config = uvicorn.Config(
                app,
                log_level=s.log_level,
                access_log=s.log_level == "debug",
                lifespan="off",
                timeout_graceful_shutdown=max(1, int(s.shutdown_grace_s)),
                ssl_certfile=s.tls_cert,
                ssl_keyfile=s.tls_key,
            )
            self._http = _EmbeddedUvicorn(config)
            self._http_task = asyncio.create_task(
                self._http.serve(sockets=[self._http_socket]), name="uvicorn"
            )
            for _ in range(500):  # startup is quick; it fails fast if the app is broken
                if self._http.started or self._http_task.done():
                    break
                await asyncio.sleep(0.01)
            if self._http_task.done():
                self._http_task.result()
                raise RuntimeError("HTTP server exited during startup")
        except BaseException:
            await self.stop(grace=0)
            raise
        scheme = "https" if s.tls_cert else "http"
        log.info(
            "eplb serving: gRPC %s:%d%s, HTTP %s://%s:%d (docs at /docs), store %s%s%s",
            s.host, self.grpc_port, " (TLS)" if s.tls_cert else "", scheme, s.host,
            self.http_port, getattr(self.control.store, "url", "memory"),
            ", bearer token required" if self.control.token else "",
            "" if self.control.leader else f"; {self.control.not_ready()}",
        )

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: not ready, streams get ``grace`` seconds, then everything closes."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.settings.shutdown_grace_s if grace is None else grace
        # Agents get UNAVAILABLE and reconnect (elsewhere, or here after a restart); their
        # unacknowledged reports are resent, so nothing is lost.
        self.control.disconnect_all("service shutting down")
        if self.grpc is not None:
            await self.grpc.stop(grace)
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, timeout=grace + 2)
        if self._http_socket is not None:
            self._http_socket.close()
        await self.control.close()
        log.info("eplb stopped")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("eplb_service").setLevel(level.upper())


async def serve(settings: Settings, *, store: Store | None = None) -> None:
    """Runs the service until SIGTERM or SIGINT, then shuts down gracefully."""
    service = EplbService(settings, store=store)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("signal received: shutting down (grace %gs)", settings.shutdown_grace_s)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        await service.stop()
