"""The gRPC face of the control plane: ``eplb.v1.Eplb`` on grpc.aio, plus standard health
checking (``grpc.health.v1``) and server reflection.

Each ``Connect`` stream has two halves: a reader task that feeds incoming messages to the
:class:`~eplb_service.control.ControlPlane`, and the handler itself, which writes the stream's
:class:`~eplb_service.deployments.Outbox` in order. A refused message closes the outbox with an
error; the handler writes what was queued before it, then aborts *that* stream with the status
and message. Nothing a client sends can end another stream or the server.

Message size: gRPC itself refuses messages above ``2 * max_message_bytes`` (a transport hard
stop); messages between ``max_message_bytes`` and that are refused by the service with
RESOURCE_EXHAUSTED, a message naming the setting, and a metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from eplb_proto.v1 import eplb_pb2, eplb_pb2_grpc
from eplb_service import codec
from eplb_service.control import ControlPlane
from eplb_service.deployments import NAME_RE, AgentLink, Close, Outbox
from eplb_service.errors import Code, EplbError
from eplb_service.store import StoreError
from eplb_service.telemetry import REJECT_REASONS

log = logging.getLogger(__name__)

SERVICE_NAME = eplb_pb2.DESCRIPTOR.services_by_name["Eplb"].full_name  # "eplb.v1.Eplb"

STATUS: dict[Code, grpc.StatusCode] = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.ABORTED: grpc.StatusCode.ABORTED,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
}

_INTERNAL = "internal"


class EplbServicer(eplb_pb2_grpc.EplbServicer):
    """``eplb.v1.Eplb`` backed by a :class:`ControlPlane`."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self.settings = control.settings
        self.telemetry = control.telemetry
        self.token: str | None = control.token

    async def Connect(  # gRPC method name
        self,
        request_iterator: AsyncIterator[eplb_pb2.AgentMessage],
        context: grpc.aio.ServicerContext[eplb_pb2.AgentMessage, eplb_pb2.ServiceMessage],
    ) -> None:
        outbox = Outbox()
        peer = context.peer() or ""
        refused = self._refuse_unauthenticated(context)
        if refused is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refused)
        reader = asyncio.create_task(self._read(request_iterator, outbox, peer))
        try:
            while True:
                item = await outbox.get()
                if isinstance(item, Close):
                    if item.code is not None:
                        await context.abort(STATUS[item.code], item.message)
                    return
                await context.write(item)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _read(
        self, requests: AsyncIterator[eplb_pb2.AgentMessage], outbox: Outbox, peer: str
    ) -> None:
        link: AgentLink | None = None
        control = self.control
        try:
            iterator = requests.__aiter__()
            try:
                first = await asyncio.wait_for(
                    iterator.__anext__(), timeout=self.settings.hello_timeout_s
                )
            except StopAsyncIteration:
                outbox.close(None)
                return
            except asyncio.TimeoutError:
                raise EplbError(
                    Code.INVALID_ARGUMENT,
                    f"no hello within hello_timeout_s={self.settings.hello_timeout_s:g}",
                    "protocol",
                ) from None
            self._check_size(first)
            if first.WhichOneof("body") != "hello":
                raise EplbError(
                    Code.INVALID_ARGUMENT,
                    f"the first message must be hello, got {first.WhichOneof('body') or 'empty'}",
                    "protocol",
                )
            link = await control.hello(first.hello, outbox, peer)
            async for message in iterator:
                self._check_size(message)
                kind = message.WhichOneof("body")
                if kind == "report":
                    await control.report(link, message.report)
                elif kind == "plan_ack":
                    await control.plan_ack(link, message.plan_ack)
                elif kind == "heartbeat":
                    await control.heartbeat(link, message.heartbeat)
                elif kind == "hello":
                    raise EplbError(
                        Code.INVALID_ARGUMENT, "hello: only the first message may be a hello",
                        "protocol",
                    )
                else:
                    raise EplbError(
                        Code.INVALID_ARGUMENT, "AgentMessage: empty (no body set)", "protocol"
                    )
            outbox.close(None)
        except EplbError as exc:
            self.telemetry.reports_rejected.labels(_reason(exc.reason)).inc()
            who = f"{link.deployment} rank {link.rank}" if link else peer
            log.info("refused %s: %s %s", who, exc.code.value, exc.message)
            outbox.close(exc.code, exc.message)
        except DecodeError:
            self.telemetry.reports_rejected.labels("protocol").inc()
            log.info("refused %s: INVALID_ARGUMENT undecodable message", peer)
            outbox.close(
                Code.INVALID_ARGUMENT,
                "AgentMessage: not a valid eplb.v1.AgentMessage (protobuf decoding failed)",
            )
        except StoreError as exc:
            # Not counted, not acknowledged: the agent resends after reconnecting.
            self.telemetry.reports_rejected.labels("store").inc()
            outbox.close(Code.UNAVAILABLE, f"store unavailable: {exc}; retry later")
            control.on_store_error(exc)
        except asyncio.CancelledError:
            raise
        except (grpc.RpcError, grpc.aio.AbortError, grpc.aio.UsageError):
            outbox.close(None)  # the call ended under us (client gone, or we aborted it)
        except Exception as exc:
            if outbox.closed is None:  # a bug: end this stream only, keep serving
                log.exception("agent stream %s failed", peer)
                outbox.close(Code.UNAVAILABLE, f"internal error: {type(exc).__name__}")
        finally:
            if link is not None:
                control.disconnect(link)

    def _refuse_unauthenticated(
        self, context: Any, *, read: bool = False
    ) -> str | None:
        """None when the call may proceed, else why not (never echoes the token)."""
        token = self.token
        if token is None or (read and not self.settings.auth_reads):
            return None
        given = ""
        for key, value in context.invocation_metadata() or ():
            if key.lower() == "authorization":
                given = value if isinstance(value, str) else value.decode("latin-1")
                break
        scheme, _, credential = given.partition(" ")
        if not given:
            why = "missing bearer token: send metadata 'authorization: Bearer <token>'"
        elif scheme.lower() != "bearer" or not credential.strip():
            why = "malformed authorization metadata: expected 'Bearer <token>'"
        elif hmac.compare_digest(credential.strip().encode(), token.encode()):
            return None
        else:
            why = "invalid bearer token"
        self.telemetry.auth_failures.labels("grpc").inc()
        self.telemetry.reports_rejected.labels("unauthenticated").inc()
        log.info("refused %s: UNAUTHENTICATED %s", context.peer() or "?", why)
        return why

    def _check_size(self, message: eplb_pb2.AgentMessage) -> None:
        size = message.ByteSize()
        limit = self.settings.max_message_bytes
        if size > limit:
            kind = message.WhichOneof("body") or "message"
            raise EplbError(
                Code.RESOURCE_EXHAUSTED,
                f"{kind}: message of {size} bytes exceeds max_message_bytes={limit}",
                "oversize",
            )

    async def GetPlacement(  # gRPC method name
        self,
        request: eplb_pb2.GetPlacementRequest,
        context: grpc.aio.ServicerContext[eplb_pb2.GetPlacementRequest, eplb_pb2.PlacementReply],
    ) -> eplb_pb2.PlacementReply:
        refused = self._refuse_unauthenticated(context, read=True)
        if refused is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refused)
        if not NAME_RE.match(request.deployment):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"deployment: {request.deployment!r} must match [A-Za-z0-9._-]{{1,63}}",
            )
        try:
            self.control.require_leader()
            version, placement = self.control.get_placement(request.deployment)
        except EplbError as exc:
            await context.abort(STATUS[exc.code], exc.message)
        return eplb_pb2.PlacementReply(
            deployment=request.deployment, version=version, phy2log=codec.encode(placement.phy2log)
        )


def _reason(reason: str) -> str:
    return reason if reason in REJECT_REASONS else "other"


class GrpcServer:
    """The grpc.aio server with the Eplb, health and reflection services.

    Args:
        control: the control plane.
        options: extra channel options (name, value) appended to the defaults.
    """

    def __init__(self, control: ControlPlane, options: list[tuple[str, Any]] | None = None) -> None:
        s = control.settings
        hard_limit = 2 * s.max_message_bytes
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", hard_limit),
                ("grpc.max_send_message_length", -1),
                # Find dead agents (half-open TCP) without waiting for the OS.
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.http2.max_ping_strikes", 0),
                ("grpc.so_reuseport", 0),
                *(options or []),
            ]
        )
        self.servicer = EplbServicer(control)
        eplb_pb2_grpc.add_EplbServicer_to_server(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        address = f"{_host(s.host)}:{s.grpc_port}"
        try:
            credentials = server_credentials(s)
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC port {address} (in use, or no such address)")

    async def start(self) -> None:
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        """Reports NOT_SERVING, then stops; open streams get ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def _read_pem(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OSError(f"{what} {path!r}: {exc.strerror or exc}") from None


def server_credentials(settings: Any) -> grpc.ServerCredentials | None:
    """TLS credentials from ``tls_cert``/``tls_key`` (and ``tls_client_ca`` for mTLS)."""
    if settings.tls_cert is None:
        return None
    cert = _read_pem(settings.tls_cert, "tls_cert")
    key = _read_pem(settings.tls_key, "tls_key")
    client_ca = None
    if settings.tls_client_ca is not None:
        client_ca = _read_pem(settings.tls_client_ca, "tls_client_ca")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _host(host: str) -> str:
    """IPv6 literals need brackets in a gRPC address."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
