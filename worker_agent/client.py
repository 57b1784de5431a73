"""AgentClient: one rank's stream to the eplb service (``eplb.v1.Eplb/Connect``).

The client runs on an :class:`~worker_agent.runtime.AgentRuntime` (an event loop on a daemon
thread) and never touches the engine's thread except through thread-safe handoffs:

- **load**: every report interval it calls ``source.collect()`` (the recorder's Snapshotter: never
  blocks) and merges the deltas into its :class:`~worker_agent.ledger.ReportLedger`; while the
  stream is up it sends pending deltas as ``LoadReport`` s. Collection goes on while the service is
  unreachable, so the snapshotter's buffers stay bounded and pending deltas merge per version.
- **exactly once** (invariant 4): sequences start at 1 per incarnation; acks are cumulative; after
  a reconnect the sent-but-unacknowledged reports are resent unchanged before anything new.
- **plans**: each ``Plan`` is decoded and validated (invariant 5) on the runtime thread; a valid
  one is staged in the :class:`~worker_agent.plans.PlanBook` (read by the engine's ``step()``) and
  acknowledged READY; a bad one is acknowledged FAILED with the reason. ``Cancel`` unstages it.
- **settings**: the report interval applies at once; K and ``layers_per_step`` go to
  ``on_settings`` (the in-band agreement applies them on every rank at the same step).
- **reconnects**: exponential backoff with jitter; the engine serves on with its last map.

Engine-thread API: :meth:`AgentClient.send_plan_ack` (non-blocking, never raises) and
:meth:`AgentClient.stats`. :meth:`AgentClient.flush` and :meth:`AgentClient.close` block their
caller (bounded) and belong on shutdown paths, not in the forward step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np
import numpy.typing as npt

from eplb_proto.v1 import eplb_pb2, eplb_pb2_grpc
from worker_agent.codec import CodecError, decode, encode
from worker_agent.ledger import LedgerError, ReportLedger
from worker_agent.plans import PlanBook, PlanError, ReadyPlan, Shape, validate_plan
from worker_agent.runtime import AgentRuntime, ChannelOptions

__all__ = [
    "AgentClient",
    "ClientOptions",
    "ClientStats",
    "DeltaSource",
    "RankState",
    "backoff_delay",
]

_log = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str]]
PlanAckStatus = eplb_pb2.PlanAck.Status
READY = eplb_pb2.PlanAck.STATUS_READY
APPLIED = eplb_pb2.PlanAck.STATUS_APPLIED
FAILED = eplb_pb2.PlanAck.STATUS_FAILED

# Codes after which the oldest in-flight report is dropped rather than resent forever.
_REJECTING = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
_MIN_INTERVAL_S = 0.01
# An idle stream (nothing else sent) carries a heartbeat every report interval, but not more
# often than this: short report intervals (load tests) would otherwise double the message rate.
_HEARTBEAT_MIN_S = 1.0


class DeltaLike(Protocol):
    """``worker_agent.recording.LoadDelta``: ``counts [L, P]`` int64 over steps of one version."""

    @property
    def version(self) -> int: ...
    @property
    def step_begin(self) -> int: ...
    @property
    def step_end(self) -> int: ...
    @property
    def counts(self) -> npt.NDArray[np.int64]: ...


class DeltaSource(Protocol):
    """Where load deltas come from: ``worker_agent.recording.Snapshotter`` in an engine.

    ``collect()`` returns finished deltas oldest first and never blocks; ``pending`` counts the
    captures not finished yet (a flush waits for them).
    """

    def collect(self) -> Sequence[DeltaLike]: ...

    @property
    def pending(self) -> int: ...


@dataclass(frozen=True)
class RankState:
    """What the rank routes with now, for ``Hello`` and ``Heartbeat``.

    Attributes:
        version: the active placement version.
        step: the rank's current forward step.
        phy2log: ``[L, P]`` int64 host copy of the active map.
        active_since: first step routed with ``version``.
    """

    version: int
    step: int
    phy2log: npt.NDArray[np.int64]
    active_since: int = 0


@dataclass(frozen=True)
class ClientOptions:
    """Client tuning; the defaults suit an engine rank.

    Attributes:
        report_interval_s: report period until the service's ``Settings`` say otherwise.
        max_inflight_reports: sent-but-unacknowledged reports at most (memory bound).
        max_pending_versions: distinct unsent versions at most (memory bound).
        backoff_initial_s / backoff_max_s: reconnect delay, doubled per failed attempt up to the
            max, with jitter (uniformly 50-100 % of the step); reset after a successful hello.
        hello_timeout_s: time for the service to answer ``hello``.
        metadata: gRPC metadata for every stream, or a callable returning it (called at each
            connect, so a bearer token can be refreshed): ``[("authorization", "Bearer ...")]``.
        credentials: TLS channel credentials (``None``: plaintext).
        channel_key: clients of one runtime with the same key share one channel (connection);
            ``None`` gives the client its own.
        channel_options: extra gRPC channel arguments.
    """

    report_interval_s: float = 1.0
    max_inflight_reports: int = 4
    max_pending_versions: int = 16
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 15.0
    hello_timeout_s: float = 10.0
    metadata: Metadata | Callable[[], Metadata] = ()
    credentials: grpc.ChannelCredentials | None = None
    channel_key: str | None = None
    channel_options: ChannelOptions = ()


@dataclass(frozen=True)
class ClientStats:
    """A snapshot of a client's counters (fields read one by one: not atomic as a whole)."""

    incarnation: str
    connected: bool
    connects: int
    disconnects: int
    reports_sent: int
    reports_resent: int
    reports_acked: int
    tokens_added: int
    tokens_acked: int
    tokens_unacked: int
    inflight: int
    pending_versions: int
    dropped_tokens: int
    rejected_reports: int
    plans_ready: int
    plans_failed: int
    plans_cancelled: int
    last_ready_version: int  # the last plan staged (READY queued)
    last_ready_at: float  # when, on the monotonic clock
    errors: int
    last_error: str


def backoff_delay(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Reconnect delay after ``attempt`` failures: ``min(max, initial * 2**attempt)``, jittered
    uniformly to 50-100 % so that many ranks cut off together do not reconnect together."""
    ceiling = min(max_s, initial_s * (2.0 ** min(attempt, 30)))
    return ceiling * (0.5 + 0.5 * rng.random())


class _StreamEnded(Exception):
    """The service closed the stream without an error status."""


class AgentClient:
    """The gRPC stream of one rank. See the module docstring for the protocol.

    Args:
        target: ``host:port`` of the service.
        deployment: the deployment name (``[a-zA-Z0-9._-]{1,63}``).
        rank: this rank, ``0..world_size-1``.
        shape: the deployment sizes (every plan is validated against them).
        source: load deltas (the rank's Snapshotter).
        state: returns the rank's current :class:`RankState`; called on the runtime thread at
            each hello and heartbeat, so it must be cheap and thread-safe (e.g. read one
            immutable object the engine thread replaces at a switch).
        plans: where validated plans are staged for the engine thread.
        on_settings: receives each ``Settings`` (runtime thread; must not block).
        prepare: optional hook run before READY (in the loop's executor): stage weights for a
            plan; raising makes the plan FAILED with the exception's message.
        options: tuning and metadata.
        runtime: the event loop to run on; by default the client starts (and owns) one.
        incarnation: unique per agent start (default: a UUID4).
    """

    def __init__(
        self,
        target: str,
        *,
        deployment: str,
        rank: int,
        shape: Shape,
        source: DeltaSource,
        state: Callable[[], RankState],
        plans: PlanBook,
        on_settings: Callable[[eplb_pb2.Settings], None] | None = None,
        prepare: Callable[[ReadyPlan], None] | None = None,
        options: ClientOptions | None = None,
        runtime: AgentRuntime | None = None,
        incarnation: str | None = None,
    ) -> None:
        if not 0 <= rank < shape.world_size:
            raise ValueError(f"rank {rank} outside [0, {shape.world_size})")
        self.target = target
        self.deployment = deployment
        self.rank = rank
        self.shape = shape
        self.options = options or ClientOptions()
        self.incarnation = incarnation or str(uuid.uuid4())
        self._source = source
        self._state = state
        self._plans = plans
        self._on_settings = on_settings
        self._prepare = prepare
        self._owns_runtime = runtime is None
        self.runtime = runtime or AgentRuntime(name=f"eplb-agent-{rank}")
        self.ledger = ReportLedger(
            shape.num_layers,
            shape.num_slots,
            max_inflight=self.options.max_inflight_reports,
            max_pending_versions=self.options.max_pending_versions,
        )
        self._rng = random.Random()
        self._interval = max(_MIN_INTERVAL_S, self.options.report_interval_s)
        # Runtime-thread state.
        self._outbox: deque[eplb_pb2.AgentMessage] = deque()
        self._cancelled: deque[tuple[int, str]] = deque(maxlen=16)  # recent Cancels
        self._wake: asyncio.Event | None = None
        self._call: Any = None
        self._main: asyncio.Task[None] | None = None
        self._collector: asyncio.Task[None] | None = None
        self._closing = False
        self._dropping = False  # disconnect() cancelled the call (not the task)
        self._session_established = False
        self._session_reports = 0
        # Counters: written on the runtime thread, read anywhere.
        self._connected = False
        self._connects = 0
        self._disconnects = 0
        self._reports_sent = 0
        self._reports_resent = 0
        self._plans_ready = 0
        self._plans_failed = 0
        self._plans_cancelled = 0
        self._last_ready = (0, 0.0)
        self._errors = 0
        self._last_error = ""
        self._started = False

    # -- any thread ----------------------------------------------------------------------------

    def start(self) -> AgentClient:
        """Start the stream task on the runtime. Returns at once (never waits for the loop)."""
        if not self._started:
            self._started = True
            if not self.runtime.call_soon(self._start):
                raise RuntimeError("agent runtime is closed")
        return self

    @property
    def report_interval_s(self) -> float:
        """The report interval in force (the service's setting once received)."""
        return self._interval

    def send_plan_ack(
        self,
        version: int,
        rollout_id: str,
        status: PlanAckStatus,
        *,
        reason: str = "",
        step: int = 0,
        migration: eplb_pb2.MigrationStats | None = None,
    ) -> None:
        """Queue a ``PlanAck`` for the service. Any thread; never blocks, never raises.

        Sent in order with the client's other messages once the stream is up; an ack queued
        while disconnected goes out after the reconnect (the hello carries the active version
        too, so the service can reconcile either way).
        """
        try:
            ack = eplb_pb2.PlanAck(
                version=version, rollout_id=rollout_id, status=status, reason=reason[:1000],
                step=step, migration=migration,
            )
            message = eplb_pb2.AgentMessage(plan_ack=ack)
        except Exception as exc:  # bad arguments from the caller: log, never raise
            self._count_error(f"bad plan ack: {exc}")
            return
        if not self.runtime.call_soon(self._enqueue, message):
            self._count_error("runtime closed; plan ack dropped")

    def disconnect(self) -> None:
        """Drop the current stream now; the client reconnects after its backoff. Any thread.

        For tests and operators: the exactly-once machinery makes this safe at any moment.
        """
        self.runtime.call_soon(self._drop_stream)

    def stats(self) -> ClientStats:
        ledger = self.ledger
        version, at = self._last_ready
        return ClientStats(
            incarnation=self.incarnation,
            connected=self._connected,
            connects=self._connects,
            disconnects=self._disconnects,
            reports_sent=self._reports_sent,
            reports_resent=self._reports_resent,
            reports_acked=ledger.reports_acked,
            tokens_added=ledger.tokens_added,
            tokens_acked=ledger.tokens_acked,
            tokens_unacked=ledger.pending_tokens + ledger.inflight_tokens,
            inflight=ledger.inflight_count,
            pending_versions=len(ledger.pending_versions),
            dropped_tokens=ledger.dropped_tokens,
            rejected_reports=ledger.rejected_reports,
            plans_ready=self._plans_ready,
            plans_failed=self._plans_failed,
            plans_cancelled=self._plans_cancelled,
            last_ready_version=version,
            last_ready_at=at,
            errors=self._errors,
            last_error=self._last_error,
        )

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Collect now and wait until every delta is acknowledged (True) or ``timeout_s`` passes
        (False). Blocks the caller: shutdown paths only. Not from the runtime thread."""
        try:
            return self.runtime.run(self.flush_async(timeout_s), timeout_s + 1.0)
        except Exception as exc:
            self._count_error(f"flush failed: {exc!r}")
            return False

    def close(self, flush_timeout_s: float = 5.0) -> bool:
        """Flush (bounded), end the stream and, if the client owns it, stop the runtime.

        Returns whether everything was acknowledged. Idempotent.
        """
        if self.runtime.closed:
            return self.ledger.drained
        flushed = self.flush(flush_timeout_s) if flush_timeout_s > 0 and self._started else False
        try:
            self.runtime.run(self.stop_async(), timeout_s=5.0)
        except Exception as exc:
            self._count_error(f"stop failed: {exc!r}")
        if self._owns_runtime:
            self.runtime.close()
        return flushed

    # -- runtime thread ------------------------------------------------------------------------

    def _start(self) -> None:
        self._wake = asyncio.Event()
        self._main = asyncio.get_running_loop().create_task(self._run())

    async def flush_async(self, timeout_s: float) -> bool:
        """:meth:`flush` as a coroutine on the runtime (flush many clients concurrently)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            self._collect_now()
            if self.ledger.drained and self._source.pending == 0:
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(min(0.02, self._interval))

    async def stop_async(self) -> None:
        """End the stream (half-close, then cancel) and stop the client's tasks."""
        self._closing = True
        call = self._call
        if call is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(call.done_writing(), 1.0)
        if self._main is not None:
            self._main.cancel()
            await asyncio.gather(self._main, return_exceptions=True)
        self._connected = False

    def _enqueue(self, message: eplb_pb2.AgentMessage) -> None:
        self._outbox.append(message)
        self._kick()

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _drop_stream(self) -> None:
        if self._call is not None:
            self._dropping = True
            self._call.cancel()

    def _count_error(self, message: str) -> None:
        self._errors += 1
        self._last_error = message

    def _metadata(self) -> Metadata:
        metadata = self.options.metadata
        return tuple(metadata() if callable(metadata) else metadata)

    def _collect_now(self) -> None:
        try:
            deltas = self._source.collect()
        except Exception as exc:
            self._count_error(f"collect failed: {exc!r}")
            _log.exception("rank %d: collecting load deltas failed", self.rank)
            return
        for delta in deltas:
            try:
                self.ledger.add(delta.version, delta.step_begin, delta.step_end, delta.counts)
            except LedgerError as exc:
                self._count_error(str(exc))
                _log.error("rank %d: dropping a load delta: %s", self.rank, exc)

    async def _run(self) -> None:
        self._restart_collector()
        attempt = 0
        quiet = False  # log repeated connection failures at debug level only
        try:
            while not self._closing:
                try:
                    await self._session()
                except asyncio.CancelledError:
                    if self._closing or not self._dropping or _task_cancelling():
                        raise  # the task itself is cancelled, not just the call
                    self._after_session(_StreamEnded("stream dropped"), quiet)
                except Exception as exc:
                    self._after_session(exc, quiet)
                self._dropping = False
                if self._closing:
                    break
                if self._session_established:
                    attempt, quiet = 0, False
                else:
                    quiet = True
                delay = backoff_delay(
                    attempt, self.options.backoff_initial_s, self.options.backoff_max_s, self._rng
                )
                attempt += 1
                await asyncio.sleep(delay)
        finally:
            collector, self._collector = self._collector, None
            if collector is not None:
                collector.cancel()
                await asyncio.gather(collector, return_exceptions=True)

    def _restart_collector(self) -> None:
        """(Re)start the periodic collection, e.g. when the report interval changes."""
        if self._collector is not None:
            self._collector.cancel()
        self._collector = asyncio.get_running_loop().create_task(self._collect_loop())

    async def _collect_loop(self) -> None:
        """Every report interval, connected or not: collect deltas, then wake the writer (which
        sends them, or a heartbeat). Runs through outages so pending deltas merge."""
        while True:
            await asyncio.sleep(self._interval)
            self._collect_now()
            self._kick()

    def _after_session(self, exc: Exception, quiet: bool) -> None:
        """Log why a session ended; drop a report the service rejects."""
        self._connected = False
        if self._closing:
            return  # our own shutdown (half-close, cancel): nothing to report
        if isinstance(exc, grpc.aio.AioRpcError):
            code, details = exc.code(), exc.details() or ""
            message = f"{code.name}: {details}"
        else:
            code, message = None, str(exc) or repr(exc)
        self._count_error(message)
        if self._session_established:
            self._disconnects += 1
        if code in _REJECTING and self._session_established and self._session_reports:
            dropped = self.ledger.reject_oldest()
            if dropped is not None:
                _log.error(
                    "rank %d: service rejected the stream (%s); dropping report %d "
                    "(version %d, steps %d..%d) instead of resending it",
                    self.rank, message, dropped.sequence, dropped.placement_version,
                    dropped.step_begin, dropped.step_end,
                )
                return
        log = _log.debug if quiet else _log.warning
        log("rank %d: stream to %s ended: %s", self.rank, self.target, message)

    async def _session(self) -> None:
        """One stream, from hello to its end; always ends by raising.

        Sets ``_session_established`` (the service answered the hello) and ``_session_reports``
        (reports written on this stream) for :meth:`_after_session`.
        """
        options = self.options
        self._session_established = False
        self._session_reports = 0
        channel = self.runtime.channel(
            self.target,
            key=options.channel_key if options.channel_key is not None else f"rank-{id(self)}",
            options=_default_channel_options(options) + tuple(options.channel_options),
            credentials=options.credentials,
        )
        stub = eplb_pb2_grpc.EplbStub(channel)
        call = stub.Connect(metadata=self._metadata())
        self._call = call
        reader: asyncio.Task[None] | None = None
        try:
            await call.write(eplb_pb2.AgentMessage(hello=self._hello()))
            first = await asyncio.wait_for(call.read(), options.hello_timeout_s)
            if first is grpc.aio.EOF:
                await _raise_status(call)
            self._handle(first)  # settings, by the contract
            self._session_established = True
            self._connected = True
            self._connects += 1
            if self._connects > 1:
                _log.info("rank %d: reconnected to %s", self.rank, self.target)
            reader = asyncio.get_running_loop().create_task(self._read_loop(call))
            for report in self.ledger.unacked():
                await call.write(eplb_pb2.AgentMessage(report=report))
                self._reports_resent += 1
                self._session_reports += 1
            await self._write_loop(call, reader)
        except (asyncio.CancelledError, grpc.aio.AioRpcError, _StreamEnded):
            raise
        except Exception as exc:
            # Writes on a finished call raise usage/state errors: report the call's status.
            raise await _status_error(call, exc) from None
        finally:
            self._call = None
            self._connected = False
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            if not call.done():
                call.cancel()

    async def _read_loop(self, call: Any) -> None:
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    return
                self._handle(message)
        finally:
            self._kick()  # the writer notices the end of the stream

    async def _write_loop(self, call: Any, reader: asyncio.Task[None]) -> None:
        """Send plan acks, reports and heartbeats until the stream ends; raises when it does.

        Wakes only when there is something to do: the collector's tick (every report
        interval), a plan ack queued, an ack that reopened the window, or the reader's end.
        """
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        last_sent = loop.time()
        while True:
            if reader.done():
                reader.result()  # raises the stream's error
                await _raise_status(call)  # EOF from the service
            while self._outbox:
                await call.write(self._outbox[0])
                self._outbox.popleft()
                last_sent = loop.time()
            report = self.ledger.take()
            if report is not None:
                # One report per pass: a plan ack queued meanwhile goes out before the next
                # report (a READY never waits behind a backlog of reports).
                await call.write(eplb_pb2.AgentMessage(report=report))
                self._reports_sent += 1
                self._session_reports += 1
                last_sent = loop.time()
                continue
            if loop.time() - last_sent >= max(self._interval * 0.9, _HEARTBEAT_MIN_S):
                state = self._state()
                beat = eplb_pb2.Heartbeat(step=state.step, active_version=state.version)
                await call.write(eplb_pb2.AgentMessage(heartbeat=beat))
                last_sent = loop.time()
            self._wake.clear()
            if reader.done() or self._outbox or self.ledger.can_take():
                continue
            await self._wake.wait()

    # -- messages from the service (runtime thread) --------------------------------------------

    def _handle(self, message: eplb_pb2.ServiceMessage) -> None:
        kind = message.WhichOneof("body")
        if kind == "ack":
            try:
                if self.ledger.ack(message.ack.sequence) and self.ledger.can_take():
                    self._kick()  # the window has room again for pending deltas
            except LedgerError as exc:
                self._count_error(str(exc))
                _log.error("rank %d: %s", self.rank, exc)
        elif kind == "plan":
            self._on_plan(message.plan)
        elif kind == "cancel":
            self._on_cancel(message.cancel)
        elif kind == "settings":
            self._on_settings_message(message.settings)
        else:
            _log.warning("rank %d: ignoring an unknown service message %r", self.rank, kind)

    def _on_settings_message(self, settings: eplb_pb2.Settings) -> None:
        interval = max(_MIN_INTERVAL_S, settings.report_interval_s)
        if settings.report_interval_s > 0 and interval != self._interval:
            self._interval = interval
            self._restart_collector()
        if self._on_settings is not None:
            try:
                self._on_settings(settings)
            except Exception as exc:
                self._count_error(f"on_settings failed: {exc!r}")
                _log.exception("rank %d: applying settings failed", self.rank)

    def _on_plan(self, plan: eplb_pb2.Plan) -> None:
        def ack(status: PlanAckStatus, reason: str = "", step: int = 0) -> None:
            message = eplb_pb2.PlanAck(
                version=plan.version, rollout_id=plan.rollout_id, status=status,
                reason=reason[:1000], step=step,
            )
            self._enqueue(eplb_pb2.AgentMessage(plan_ack=message))

        state = self._state()
        if plan.version <= state.version:
            if plan.version == state.version:
                ack(APPLIED, step=state.active_since)  # a repeat: we already route with it
            else:
                self._plans_failed += 1
                ack(FAILED, f"stale plan: version {plan.version} < active {state.version}")
            return
        staged = self._plans.get(plan.version)
        try:
            phy2log = decode(plan.phy2log, name="phy2log")
            validate_plan(phy2log, self.shape)
        except (CodecError, PlanError) as exc:
            self._plans_failed += 1
            _log.error("rank %d: refusing plan version %d: %s", self.rank, plan.version, exc)
            ack(FAILED, str(exc))
            return
        ready = ReadyPlan.create(plan.version, plan.rollout_id, phy2log)
        if staged is not None and staged.fingerprint == ready.fingerprint:
            ack(READY)  # a resend after a reconnect: already staged
            return
        if self._prepare is None:
            self._stage(ready)
            ack(READY)
            return
        asyncio.get_running_loop().create_task(self._prepare_and_stage(ready, ack))

    async def _prepare_and_stage(
        self, ready: ReadyPlan, ack: Callable[[PlanAckStatus, str], None]
    ) -> None:
        assert self._prepare is not None
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._prepare, ready)
        except Exception as exc:
            self._plans_failed += 1
            _log.error("rank %d: preparing plan %d failed: %s", self.rank, ready.version, exc)
            ack(FAILED, f"prepare failed: {exc}")
            return
        if (ready.version, ready.rollout_id) in self._cancelled:
            return  # cancelled while it was being prepared: never staged, nothing to ack
        self._stage(ready)
        ack(READY, "")

    def _stage(self, ready: ReadyPlan) -> None:
        self._plans.stage(ready)
        self._plans_ready += 1
        self._last_ready = (ready.version, time.monotonic())

    def _on_cancel(self, cancel: eplb_pb2.Cancel) -> None:
        self._cancelled.append((cancel.version, cancel.rollout_id))
        if self._plans.cancel(cancel.version, cancel.rollout_id):
            self._plans_cancelled += 1
            _log.warning(
                "rank %d: rollout %s (version %d) cancelled: %s",
                self.rank, cancel.rollout_id, cancel.version, cancel.reason,
            )

    def _hello(self) -> eplb_pb2.Hello:
        state = self._state()
        shape = self.shape
        return eplb_pb2.Hello(
            deployment=self.deployment,
            rank=self.rank,
            world_size=shape.world_size,
            num_layers=shape.num_layers,
            num_experts=shape.num_experts,
            num_slots=shape.num_slots,
            num_nodes=shape.num_nodes,
            incarnation=self.incarnation,
            active_version=state.version,
            step=state.step,
            placement=encode(np.ascontiguousarray(state.phy2log, dtype=np.int64)),
        )


def _task_cancelling() -> bool:
    """Whether the running task has a cancel request pending (Python >= 3.11; else False)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


def _default_channel_options(options: ClientOptions) -> tuple[tuple[str, Any], ...]:
    backoff_ms = int(options.backoff_max_s * 1000)
    return (
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.initial_reconnect_backoff_ms", max(100, int(options.backoff_initial_s * 1000))),
        ("grpc.max_reconnect_backoff_ms", max(1000, backoff_ms)),
        ("grpc.enable_retries", 0),
    )


async def _raise_status(call: Any) -> None:
    """Raise the call's final status as an ``AioRpcError`` (or ``_StreamEnded`` when OK)."""
    code = await call.code()
    if code == grpc.StatusCode.OK:
        raise _StreamEnded("the service ended the stream")
    raise grpc.aio.AioRpcError(
        code, await call.initial_metadata(), await call.trailing_metadata(),
        details=await call.details(),
    )


async def _status_error(call: Any, exc: BaseException) -> Exception:
    """The error to report for a session that ended with ``exc``: the call's status if it
    finished with one, else ``exc`` itself."""
    if call.done():
        try:
            await _raise_status(call)
        except Exception as status:
            return status
    return exc if isinstance(exc, Exception) else _StreamEnded(repr(exc))
