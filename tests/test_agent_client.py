"""The agent client: exactly-once bookkeeping, plan validation and the stream over real sockets.

Three layers of tests:

- the pure pieces (codec, ledger, plan validation, backoff), including a property test of the
  exactly-once protocol under arbitrary interleavings of sends, acks and disconnects;
- the client against a scripted in-process gRPC service (loopback sockets) that can withhold
  acks, drop streams, reject reports and push plans — to check exact wire behaviour;
- the client against the real ``eplb serve`` subprocess: forced disconnects and a service
  restart, with ``tokens_total`` checked against what the agent recorded.
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_proto.v1 import eplb_pb2, eplb_pb2_grpc
from worker_agent.agent import EplbAgent
from worker_agent.client import AgentClient, ClientOptions, RankState, backoff_delay
from worker_agent.codec import CodecError, decode, encode, encode_counts
from worker_agent.ledger import LedgerError, ReportLedger
from worker_agent.plans import PlanBook, PlanError, ReadyPlan, Shape, validate_plan
from worker_agent.recording import LoadDelta

READY = eplb_pb2.PlanAck.STATUS_READY
APPLIED = eplb_pb2.PlanAck.STATUS_APPLIED
FAILED = eplb_pb2.PlanAck.STATUS_FAILED

L, E, P, R = 2, 4, 8, 2  # layers, experts, slots, ranks for the small cases


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def identity(layers: int = L, experts: int = E, slots: int = P) -> np.ndarray:
    return np.tile(np.arange(slots, dtype=np.int64) % experts, (layers, 1))


# ---------------------------------------------------------------------------------------------
# Codec


def test_codec_round_trips_and_picks_int32_for_counts() -> None:
    arr = np.arange(12, dtype=np.int64).reshape(3, 4)
    assert np.array_equal(decode(encode(arr)), arr)
    small = encode_counts(arr)
    assert small.dtype == eplb_pb2.DTYPE_INT32 and len(small.data) == 12 * 4
    big = encode_counts(arr + 2**31)
    assert big.dtype == eplb_pb2.DTYPE_INT64
    assert np.array_equal(decode(big), arr + 2**31)


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        (eplb_pb2.Tensor(dtype=eplb_pb2.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 8), "dtype"),
        (eplb_pb2.Tensor(dtype=eplb_pb2.DTYPE_INT64, shape=[2, 2], data=b"\0" * 8), "bytes"),
    ],
)
def test_codec_refuses_bad_tensors(tensor: eplb_pb2.Tensor, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode(tensor, name="phy2log")


# ---------------------------------------------------------------------------------------------
# Ledger


def counts(value: int, shape: tuple[int, int] = (L, P)) -> np.ndarray:
    return np.full(shape, value, dtype=np.int64)


def test_ledger_sequences_start_at_one_and_acks_are_cumulative() -> None:
    ledger = ReportLedger(L, P, max_inflight=8)
    for step in range(3):
        ledger.add(0, step, step, counts(1))
        report = ledger.take()
        assert report is not None and report.sequence == step + 1
    assert ledger.inflight_count == 3
    assert ledger.ack(2) == 2 * L * P  # cumulative: 1 and 2
    assert [r.sequence for r in ledger.unacked()] == [3]
    assert ledger.ack(1) == 0  # stale ack: nothing more
    assert ledger.ack(3) == L * P and ledger.drained
    with pytest.raises(LedgerError, match="never sent"):
        ledger.ack(4)


def test_ledger_merges_pending_per_version_and_never_mixes_versions() -> None:
    ledger = ReportLedger(L, P)
    ledger.add(0, 0, 9, counts(1))
    ledger.add(0, 10, 19, counts(2))
    ledger.add(1, 20, 29, counts(5))
    ledger.add(0, 0, 0, counts(0))  # empty deltas are ignored
    assert ledger.pending_versions == [0, 1]
    first, second = ledger.take(), ledger.take()
    assert first is not None and second is not None
    assert (first.placement_version, first.step_begin, first.step_end) == (0, 0, 19)
    assert np.all(decode(first.counts) == 3)
    assert (second.placement_version, second.step_begin, second.step_end) == (1, 20, 29)
    assert np.all(decode(second.counts) == 5)
    assert ledger.take() is None


def test_ledger_memory_stays_bounded_through_an_outage() -> None:
    """With the in-flight window full (no acks), thousands of intervals merge into one matrix
    per version; nothing is lost."""
    ledger = ReportLedger(L, P, max_inflight=4, max_pending_versions=8)
    for step in range(4):
        ledger.add(0, step, step, counts(1))
        assert ledger.take() is not None
    assert not ledger.can_take()
    for step in range(4, 5000):
        ledger.add(step // 2500, step, step, counts(1))
        assert ledger.take() is None  # the window is full
    assert ledger.inflight_count == 4 and ledger.pending_versions == [0, 1]
    assert ledger.pending_tokens + ledger.inflight_tokens == 5000 * L * P
    ledger.ack(4)
    reports = [ledger.take(), ledger.take()]
    assert all(r is not None for r in reports)
    assert sum(int(decode(r.counts).sum()) for r in reports if r) == 4996 * L * P


def test_ledger_caps_pending_versions_and_counts_what_it_drops() -> None:
    ledger = ReportLedger(L, P, max_pending_versions=2)
    for version in range(3):
        ledger.add(version, version, version, counts(1))
    assert ledger.pending_versions == [1, 2]
    assert ledger.dropped_tokens == L * P


def test_ledger_refuses_wrong_shapes_and_negative_counts() -> None:
    ledger = ReportLedger(L, P)
    with pytest.raises(LedgerError, match="shape"):
        ledger.add(0, 0, 0, counts(1, (L, P + 1)))
    bad = counts(1)
    bad[0, 0] = -5
    with pytest.raises(LedgerError, match="negative"):
        ledger.add(0, 0, 0, bad)


def test_ledger_reject_oldest_drops_the_poison_report() -> None:
    ledger = ReportLedger(L, P)
    ledger.add(0, 0, 0, counts(1))
    ledger.add(1, 1, 1, counts(1))
    first, _ = ledger.take(), ledger.take()
    dropped = ledger.reject_oldest()
    assert dropped is first and ledger.rejected_reports == 1
    assert [r.sequence for r in ledger.unacked()] == [2]


@dataclass
class _ModelService:
    """The service side of the protocol: count a sequence once, ack cumulatively."""

    last: int = 0
    counted: int = 0
    wire: list[eplb_pb2.LoadReport] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.sampled_from(["add", "add_next_version", "send", "deliver", "ack", "disconnect"]),
        max_size=120,
    ),
    max_inflight=st.integers(1, 4),
)
def test_exactly_once_under_any_interleaving(ops: list[str], max_inflight: int) -> None:
    """Whatever happens on the wire, every token added is counted exactly once, resends are
    byte-identical, and memory stays within the caps."""
    ledger = ReportLedger(L, P, max_inflight=max_inflight, max_pending_versions=64)
    service = _ModelService()
    sent: dict[int, bytes] = {}
    version, step = 0, 0
    rng = random.Random(len(ops))

    def deliver_one() -> None:
        report = service.wire.pop(0)
        if report.sequence > service.last:
            service.last = report.sequence
            service.counted += int(decode(report.counts).sum())
        service.acks.append(service.last)

    for op in ops:
        if op in ("add", "add_next_version"):
            version += op == "add_next_version"
            ledger.add(version, step, step, counts(rng.randint(0, 3)))
            step += 1
        elif op == "send":
            report = ledger.take()
            if report is not None:
                assert report.sequence not in sent
                sent[report.sequence] = report.SerializeToString()
                service.wire.append(report)
        elif op == "deliver" and service.wire:
            deliver_one()
        elif op == "ack" and service.acks:
            ledger.ack(service.acks.pop(0))
        elif op == "disconnect":
            service.wire.clear()
            service.acks.clear()
            for report in ledger.unacked():  # the reconnect resends, unchanged
                assert report.SerializeToString() == sent[report.sequence]
                service.wire.append(report)
        assert ledger.inflight_count <= max_inflight
    # Drain: send everything, deliver everything, ack everything.
    while not ledger.drained:
        while (report := ledger.take()) is not None:
            service.wire.append(report)
        while service.wire:
            deliver_one()
        while service.acks:
            ledger.ack(service.acks.pop(0))
    assert service.counted == ledger.tokens_added == ledger.tokens_acked
    assert ledger.dropped_tokens == 0


# ---------------------------------------------------------------------------------------------
# Plan validation


SHAPE = Shape(num_layers=L, num_experts=E, num_slots=P, world_size=R)


def test_validate_plan_accepts_a_valid_map() -> None:
    validate_plan(identity(), SHAPE)


@pytest.mark.parametrize(
    ("phy2log", "match"),
    [
        (identity(slots=P - 2), r"shape \[2, 6\] != \[layers, slots\] \[2, 8\]"),
        (identity()[0], "shape"),
        (np.where(identity() == 3, 7, identity()), r"phy2log\[0\]\[3\] = 7 is outside \[0, 4\)"),
        (np.where(identity() == 3, -1, identity()), "outside"),
        (np.where(identity() == 2, 1, identity()), "logical expert 2 has no replica"),
    ],
)
def test_validate_plan_names_the_problem(phy2log: np.ndarray, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        validate_plan(phy2log, SHAPE)


def test_shape_refuses_slots_not_divisible_by_ranks() -> None:
    with pytest.raises(ValueError, match="divisible"):
        Shape(num_layers=1, num_experts=4, num_slots=6, world_size=4)


def test_plan_book() -> None:
    book = PlanBook()
    assert book.highest() is None
    for version in (3, 1, 2):
        book.stage(ReadyPlan.create(version, f"ro-{version}", identity()))
    assert book.highest() is not None and book.highest().version == 3  # type: ignore[union-attr]
    assert not book.cancel(3, "ro-other") and book.cancel(3, "ro-3")
    book.discard_through(1)
    assert book.versions() == [2]
    plan = book.get(2)
    assert plan is not None and not plan.phy2log.flags.writeable


def test_backoff_grows_exponentially_with_jitter_and_caps() -> None:
    rng = random.Random(0)
    delays = [[backoff_delay(a, 0.1, 5.0, rng) for _ in range(200)] for a in range(10)]
    for attempt, samples in enumerate(delays):
        ceiling = min(5.0, 0.1 * 2**attempt)
        assert all(ceiling / 2 <= d <= ceiling for d in samples)
        assert max(samples) - min(samples) > ceiling / 10  # jittered, not constant


# ---------------------------------------------------------------------------------------------
# Against a scripted service (real loopback sockets)


@dataclass
class _Conn:
    out: queue.Queue[Any]
    metadata: dict[str, str]
    hello: eplb_pb2.Hello | None = None
    reports: list[eplb_pb2.LoadReport] = field(default_factory=list)
    plan_acks: list[eplb_pb2.PlanAck] = field(default_factory=list)


class ScriptedService(eplb_pb2_grpc.EplbServicer):
    """Answers hello with settings, counts and acks reports (unless told not to), records
    everything, and lets the test push messages, drop streams or reject reports."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conns: list[_Conn] = []
        self.last: dict[str, int] = {}
        self.tokens = 0
        self.ack_reports = True
        self.reject_reports: grpc.StatusCode | None = None
        self.settings = eplb_pb2.Settings(report_interval_s=0.03, agreement_period_steps=4)

    def Connect(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        conn = _Conn(queue.Queue(), dict(context.invocation_metadata()))
        with self.lock:
            self.conns.append(conn)

        def read() -> None:
            with contextlib.suppress(Exception):
                for message in request_iterator:
                    self._on_message(conn, message)
            conn.out.put(None)

        threading.Thread(target=read, daemon=True).start()
        while (item := conn.out.get()) is not None:
            if isinstance(item, tuple):
                context.abort(*item)
            yield item

    def _on_message(self, conn: _Conn, message: eplb_pb2.AgentMessage) -> None:
        kind = message.WhichOneof("body")
        with self.lock:
            if kind == "hello":
                conn.hello = message.hello
                conn.out.put(eplb_pb2.ServiceMessage(settings=self.settings))
            elif kind == "report":
                report = message.report
                conn.reports.append(report)
                if self.reject_reports is not None:
                    conn.out.put((self.reject_reports, "report.placement_version: stale"))
                    return
                assert conn.hello is not None
                incarnation = conn.hello.incarnation
                if report.sequence > self.last.get(incarnation, 0):
                    self.last[incarnation] = report.sequence
                    self.tokens += int(decode(report.counts).sum())
                if self.ack_reports:
                    ack = eplb_pb2.Ack(sequence=self.last.get(incarnation, 0))
                    conn.out.put(eplb_pb2.ServiceMessage(ack=ack))
            elif kind == "plan_ack":
                conn.plan_acks.append(message.plan_ack)

    def push(self, message: eplb_pb2.ServiceMessage) -> None:
        self.conns[-1].out.put(message)

    def drop(self) -> None:
        self.conns[-1].out.put(None)

    def all_reports(self) -> list[eplb_pb2.LoadReport]:
        return [r for c in self.conns for r in c.reports]

    def all_plan_acks(self) -> list[eplb_pb2.PlanAck]:
        return [a for c in self.conns for a in c.plan_acks]


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedService, str]]:
    service = ScriptedService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    eplb_pb2_grpc.add_EplbServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield service, f"127.0.0.1:{port}"
    server.stop(grace=None)


class ListSource:
    """A DeltaSource fed by the test."""

    def __init__(self) -> None:
        self._deltas: list[LoadDelta] = []
        self._lock = threading.Lock()
        self.pending = 0

    def add(self, version: int, begin: int, end: int, value: int) -> None:
        with self._lock:
            self._deltas.append(LoadDelta(version, begin, end, counts(value)))

    def collect(self) -> list[LoadDelta]:
        with self._lock:
            out, self._deltas = self._deltas, []
        return out


@pytest.fixture
def make_client() -> Iterator[Callable[..., tuple[AgentClient, ListSource, PlanBook]]]:
    clients: list[AgentClient] = []

    def make(target: str, **options: Any) -> tuple[AgentClient, ListSource, PlanBook]:
        source, book = ListSource(), PlanBook()
        state = RankState(version=0, step=7, phy2log=identity())
        settings_seen: list[eplb_pb2.Settings] = options.pop("settings_seen", [])
        client = AgentClient(
            target, deployment="unit", rank=1, shape=SHAPE, source=source,
            state=lambda: state, plans=book, on_settings=settings_seen.append,
            options=ClientOptions(backoff_initial_s=0.02, backoff_max_s=0.2, **options),
        )
        clients.append(client)
        return client.start(), source, book

    yield make
    for client in clients:
        client.close(flush_timeout_s=0)


def test_hello_carries_shape_placement_incarnation_and_injected_metadata(
    scripted: tuple[ScriptedService, str], make_client: Any
) -> None:
    service, target = scripted
    seen: list[eplb_pb2.Settings] = []
    tokens = iter(["Bearer one", "Bearer two"])
    client, _, _ = make_client(
        target, metadata=lambda: [("authorization", next(tokens))], settings_seen=seen
    )
    wait_until(lambda: client.stats().connected, what="connected")
    hello = service.conns[0].hello
    assert hello is not None
    assert (hello.deployment, hello.rank, hello.world_size) == ("unit", 1, R)
    assert (hello.num_layers, hello.num_experts, hello.num_slots, hello.num_nodes) == (L, E, P, 1)
    assert hello.incarnation == client.incarnation and (hello.active_version, hello.step) == (0, 7)
    assert np.array_equal(decode(hello.placement), identity())
    assert service.conns[0].metadata["authorization"] == "Bearer one"
    wait_until(lambda: bool(seen), what="settings callback")
    assert seen[0].agreement_period_steps == 4 and client.report_interval_s == pytest.approx(0.03)
    client.disconnect()  # the metadata hook runs again on reconnect (token refresh)
    wait_until(lambda: len(service.conns) == 2 and client.stats().connected, what="reconnect")
    assert service.conns[1].metadata["authorization"] == "Bearer two"
    assert service.conns[1].hello.incarnation == client.incarnation  # type: ignore[union-attr]


def _plan(version: int, phy2log: np.ndarray, rollout: str = "") -> eplb_pb2.ServiceMessage:
    plan = eplb_pb2.Plan(version=version, rollout_id=rollout or f"ro-{version}",
                         phy2log=encode(phy2log))
    return eplb_pb2.ServiceMessage(plan=plan)


def test_plans_are_validated_before_ready_and_bad_ones_fail_with_a_reason(
    scripted: tuple[ScriptedService, str], make_client: Any
) -> None:
    service, target = scripted
    client, _, book = make_client(target)
    wait_until(lambda: client.stats().connected)
    bad_maps = [
        (1, identity(slots=P - 1), "shape"),
        (2, np.where(identity() == 0, 9, identity()), "outside"),
        (3, np.where(identity() == 2, 1, identity()), "no replica"),
    ]
    for version, phy2log, _ in bad_maps:
        service.push(_plan(version, phy2log))
    garbage = eplb_pb2.Plan(version=4, rollout_id="ro-4", phy2log=eplb_pb2.Tensor(
        dtype=eplb_pb2.DTYPE_INT64, shape=[L, P], data=b"\x00" * 3))
    service.push(eplb_pb2.ServiceMessage(plan=garbage))
    good = np.tile(np.array([0, 1, 2, 3, 0, 1, 0, 0]), (L, 1))
    service.push(_plan(5, good))
    wait_until(lambda: len(service.all_plan_acks()) == 5, what="5 plan acks")
    acks = {a.version: a for a in service.all_plan_acks()}
    for version, _, reason in bad_maps:
        assert acks[version].status == FAILED and reason in acks[version].reason
    assert acks[4].status == FAILED and "bytes" in acks[4].reason
    assert acks[5].status == READY and acks[5].rollout_id == "ro-5"
    staged = book.get(5)
    assert book.versions() == [5] and staged is not None and np.array_equal(staged.phy2log, good)
    assert client.stats().plans_failed == 4
    # A repeat (e.g. after a reconnect) is acknowledged READY again; a cancel unstages it.
    service.push(_plan(5, good))
    wait_until(lambda: len(service.all_plan_acks()) == 6)
    assert service.all_plan_acks()[-1].status == READY
    cancel = eplb_pb2.Cancel(version=5, rollout_id="ro-5", reason="timed out")
    service.push(eplb_pb2.ServiceMessage(cancel=cancel))
    wait_until(lambda: book.versions() == [], what="cancel")
    # A plan for the active version is answered APPLIED; an older one FAILED (stale).
    service.push(_plan(0, identity()))
    wait_until(lambda: len(service.all_plan_acks()) == 7)
    assert service.all_plan_acks()[-1].status == APPLIED


def test_unacked_reports_are_resent_unchanged_after_a_disconnect(
    scripted: tuple[ScriptedService, str], make_client: Any
) -> None:
    service, target = scripted
    service.ack_reports = False
    client, source, _ = make_client(target, max_inflight_reports=3)
    wait_until(lambda: client.stats().connected)
    for step in range(6):
        source.add(0, step, step, 1)

        def collected(expected: int = (step + 1) * L * P) -> bool:
            return client.ledger.tokens_added == expected

        wait_until(collected, what=f"delta {step} collected")
    wait_until(lambda: len(service.all_reports()) == 3, what="window of 3 in flight")
    time.sleep(0.1)
    assert len(service.all_reports()) == 3  # window full: the rest merges into pending
    before = [r.SerializeToString() for r in service.conns[0].reports]
    service.ack_reports = True
    service.drop()
    wait_until(lambda: client.ledger.drained, what="drained after reconnect")
    resent = service.conns[-1].reports[:3]
    assert [r.SerializeToString() for r in resent] == before  # same sequences, same bytes
    assert [r.sequence for r in service.conns[-1].reports] == [1, 2, 3, 4]
    assert service.tokens == 6 * L * P and client.stats().reports_resent == 3


def test_a_rejected_report_is_dropped_instead_of_resent_forever(
    scripted: tuple[ScriptedService, str], make_client: Any
) -> None:
    service, target = scripted
    service.reject_reports = grpc.StatusCode.FAILED_PRECONDITION
    client, source, _ = make_client(target)
    wait_until(lambda: client.stats().connected)
    source.add(0, 0, 0, 1)
    wait_until(lambda: client.stats().rejected_reports == 1, what="rejection")
    service.reject_reports = None
    source.add(0, 1, 1, 2)
    wait_until(lambda: client.ledger.tokens_acked == 2 * L * P, what="second delta acked")
    assert service.tokens == 2 * L * P
    assert "FAILED_PRECONDITION" in client.stats().last_error


def test_engine_thread_calls_never_raise(
    scripted: tuple[ScriptedService, str], make_client: Any
) -> None:
    _, target = scripted
    client, _, _ = make_client(target)
    client.send_plan_ack(1, "ro", APPLIED, step=-5)  # invalid uint64: logged, not raised
    assert client.stats().errors >= 1
    client.close(flush_timeout_s=0)
    client.send_plan_ack(1, "ro", APPLIED, step=3)  # after close: dropped, not raised
    client.disconnect()
    assert client.stats().connected is False


def test_client_keeps_retrying_until_the_service_appears(make_client: Any) -> None:
    sock_port = _free_port()
    client, source, _ = make_client(f"127.0.0.1:{sock_port}")
    source.add(0, 0, 0, 1)
    time.sleep(0.3)
    assert not client.stats().connected and client.stats().errors >= 1
    service = ScriptedService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    eplb_pb2_grpc.add_EplbServicer_to_server(service, server)
    server.add_insecure_port(f"127.0.0.1:{sock_port}")
    server.start()
    try:
        wait_until(lambda: client.ledger.tokens_acked == L * P, what="late service gets it")
        assert service.tokens == L * P
    finally:
        server.stop(grace=None)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Against the real service (`eplb serve` subprocess)

SERVE_FLAGS = ("--report-interval-s", "0.05", "--agreement-period-steps", "4",
               "--rollout-timeout-s", "5", "--log-level", "warning")


def _record(agent: EplbAgent, steps: int, rng: np.random.Generator) -> int:
    """Routes a few tokens per layer per step; returns the (token, expert) pairs recorded."""
    total = 0
    for _ in range(steps):
        for layer in range(agent.view.num_layers):
            ids = torch.from_numpy(rng.integers(0, E, size=(16, 2)))
            agent.map_and_record(layer, ids)
            total += ids.numel()
        agent.step()
        time.sleep(0.002)
    return total


def _deployment(http: Any, url: str, name: str) -> dict[str, Any]:
    status, body = http("GET", f"{url}/v1/deployments/{name}")
    assert status == 200, body
    return dict(body)


def test_real_service_counts_exactly_once_across_forced_disconnects(
    serve_process: Any, http: Any
) -> None:
    service = serve_process(*SERVE_FLAGS)
    rng = np.random.default_rng(0)
    agent = EplbAgent(
        service.grpc_target, deployment="exactly-once", rank=0, world_size=1, num_experts=E,
        phy2log=identity(), options=ClientOptions(backoff_initial_s=0.02, backoff_max_s=0.2),
    )
    recorded = 0
    try:
        wait_until(lambda: agent.stats().client.connected, what="connected")
        for _ in range(5):
            recorded += _record(agent, 25, rng)
            agent.client.disconnect()  # drop the stream with reports in flight
        recorded += _record(agent, 10, rng)
    finally:
        assert agent.close(flush_timeout_s=15)
    stats = agent.stats().client
    assert stats.connects >= 5 and stats.dropped_tokens == 0
    assert stats.tokens_acked == recorded
    assert _deployment(http, service.http_url, "exactly-once")["tokens_total"] == recorded


@pytest.mark.slow
def test_real_service_restart_agent_reconnects_and_resends(serve_process: Any, http: Any) -> None:
    first = serve_process(*SERVE_FLAGS)
    port = first.grpc_port
    rng = np.random.default_rng(1)
    agent = EplbAgent(
        first.grpc_target, deployment="restart", rank=0, world_size=1, num_experts=E,
        phy2log=identity(), options=ClientOptions(backoff_initial_s=0.05, backoff_max_s=0.5),
    )
    try:
        wait_until(lambda: agent.stats().client.connected)
        before = _record(agent, 20, rng)
        assert agent.flush(10)
        first.terminate()
        # The engine keeps serving while the service is down: step() never blocks.
        start = time.monotonic()
        during = _record(agent, 40, rng)
        assert time.monotonic() - start < 5
        assert not agent.stats().client.connected
        second = serve_process(*SERVE_FLAGS, "--grpc-port", str(port))
        wait_until(lambda: agent.stats().client.connected, timeout=15, what="reconnected")
        after = _record(agent, 10, rng)
    finally:
        assert agent.close(flush_timeout_s=15)
    assert agent.stats().client.tokens_acked == before + during + after
    # The new service (memory store) counted what the old one never acknowledged.
    assert _deployment(http, second.http_url, "restart")["tokens_total"] == during + after


def test_prepare_hook_runs_before_ready_and_a_cancel_during_it_wins(
    scripted: tuple[ScriptedService, str],
) -> None:
    service, target = scripted
    release = threading.Event()
    prepared: list[int] = []

    def prepare(plan: ReadyPlan) -> None:
        if plan.version == 2:
            raise RuntimeError("no staging memory")
        if plan.version == 3:
            release.wait(5)  # a slow prepare, cancelled meanwhile
        prepared.append(plan.version)

    book = PlanBook()
    state = RankState(version=0, step=0, phy2log=identity())
    client = AgentClient(
        target, deployment="unit", rank=0, shape=SHAPE, source=ListSource(),
        state=lambda: state, plans=book, prepare=prepare,
    ).start()
    try:
        wait_until(lambda: client.stats().connected)
        good = np.tile(np.array([0, 1, 2, 3, 0, 1, 2, 3]), (L, 1))
        for version in (1, 2, 3):
            service.push(_plan(version, good))
        wait_until(lambda: len(service.all_plan_acks()) == 2, what="acks for plans 1 and 2")
        service.push(eplb_pb2.ServiceMessage(cancel=eplb_pb2.Cancel(version=3, rollout_id="ro-3")))
        time.sleep(0.1)
        release.set()
        wait_until(lambda: prepared == [1, 3], what="prepare of plan 3 returned")
        time.sleep(0.1)
        acks = {a.version: a for a in service.all_plan_acks()}
        assert acks[1].status == READY
        assert acks[2].status == FAILED and "no staging memory" in acks[2].reason
        assert 3 not in acks and book.versions() == [1]  # cancelled while preparing
    finally:
        client.close(flush_timeout_s=0)


class _StatsSwitcher:
    """A map switch that reports migration stats, as a weight-moving switcher would."""

    def __init__(self, agent: EplbAgent) -> None:
        from worker_agent.agent import MapSwitcher

        self.inner = MapSwitcher(agent.snapshotter)
        self.last_stats: Any = None

    def begin(self, step: int, plan: ReadyPlan, settings: Any) -> None:
        self.inner.begin(step, plan, settings)

    def advance(self, step: int) -> bool:
        self.last_stats = type("Stats", (), {"bytes_moved": 123, "transfers": 2})()
        return self.inner.advance(step)


def test_agent_switches_in_band_and_reports_applied(
    scripted: tuple[ScriptedService, str],
) -> None:
    service, target = scripted
    agent = EplbAgent(
        target, deployment="unit", rank=0, world_size=1, num_experts=E, phy2log=identity(),
        switcher=_StatsSwitcher, period_steps=4, options=ClientOptions(backoff_initial_s=0.02),
    )
    try:
        wait_until(lambda: agent.stats().client.connected)
        new = np.tile(np.array([3, 2, 1, 0, 3, 2, 1, 0]), (L, 1))
        service.push(_plan(1, new))
        wait_until(lambda: agent.plans.versions() == [1], what="plan staged")
        for _ in range(8):  # K = 4: the agreement closing step 3 switches
            agent.map_and_record(0, torch.tensor([[0, 1]]))
            agent.step()
        assert agent.active_version == 1 and agent.view.version == 1
        assert np.array_equal(agent.view.host_phy2log(), new)
        wait_until(lambda: any(a.status == APPLIED for a in service.all_plan_acks()))
        applied = next(a for a in service.all_plan_acks() if a.status == APPLIED)
        assert (applied.version, applied.rollout_id, applied.step) == (1, "ro-1", 4)
        assert applied.migration.bytes_moved == 123 and applied.migration.transfers == 2
        agent.client.disconnect()  # the next hello reports the new map
        wait_until(lambda: len(service.conns) == 2 and service.conns[1].hello is not None)
        hello = service.conns[1].hello
        assert hello is not None and hello.active_version == 1
        assert np.array_equal(decode(hello.placement), new)
    finally:
        assert agent.close(flush_timeout_s=5)
    # Counts before the switch were reported under version 0, after it under version 1.
    versions = {r.placement_version for r in service.all_reports()}
    assert versions == {0, 1}
