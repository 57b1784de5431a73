"""The service's gRPC face over real loopback sockets, driven by raw eplb_proto streams."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from eplb_proto.v1 import eplb_pb2, eplb_pb2_grpc
from eplb_service.placement import Placement, Topology

# Small deployment: L=2 layers, E=4 experts, P=6 slots, R=2 ranks (3 slots each).
L, E, P, R = 2, 4, 6, 2
IDENTITY = np.tile(np.arange(P) % E, (L, 1))  # slots -> experts 0 1 2 3 0 1


def counts(value: int = 1) -> np.ndarray:
    return np.full((L, P), value, dtype=np.int64)


def connect(raw_agent, service, rank=0, **hello):
    agent = raw_agent(service.grpc_target)
    agent.hello(rank=rank, world_size=R, layers=L, experts=E, slots=P, **hello)
    agent.recv("settings")
    return agent


def assert_alive(raw_agent, service, rank=1):
    """The service still serves: health SERVING and a fresh stream gets its report acked."""
    with grpc.insecure_channel(service.grpc_target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="eplb.v1.Eplb"), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    agent = connect(raw_agent, service, rank=rank)
    seq = agent.report(counts(1))
    assert agent.recv("ack").ack.sequence == seq
    agent.close()


def test_health_and_reflection(service):
    with grpc.insecure_channel(service.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "eplb.v1.Eplb"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        names = {s.name for s in response.list_services_response.service}
        assert {"eplb.v1.Eplb", "grpc.health.v1.Health"} <= names
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="eplb.v1.Eplb")
        response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        assert response.file_descriptor_response.file_descriptor_proto


def test_registration_settings_and_get_placement(service_factory, raw_agent):
    service = service_factory(report_interval_s=0.25, agreement_period_steps=4, layers_per_step=1)
    custom = np.array([[3, 2, 1, 0, 3, 2], [0, 0, 1, 2, 3, 3]])
    agent = raw_agent(service.grpc_target)
    agent.hello(world_size=R, layers=L, experts=E, slots=P, version=7, placement=custom)
    settings = agent.recv().settings  # the first answer is settings
    assert settings.report_interval_s == pytest.approx(0.25)
    assert settings.agreement_period_steps == 4
    assert settings.layers_per_step == 1
    with grpc.insecure_channel(service.grpc_target) as channel:
        stub = eplb_pb2_grpc.EplbStub(channel)
        reply = stub.GetPlacement(eplb_pb2.GetPlacementRequest(deployment="dep"), timeout=5)
        assert reply.version == 7
        assert list(reply.phy2log.shape) == [L, P]
        assert reply.phy2log.dtype == eplb_pb2.DTYPE_INT64
        got = np.frombuffer(reply.phy2log.data, dtype="<i8").reshape(L, P)
        np.testing.assert_array_equal(got, custom)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetPlacement(eplb_pb2.GetPlacementRequest(deployment="nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "nope" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.GetPlacement(eplb_pb2.GetPlacementRequest(deployment="bad name"), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Without a placement in hello the identity map is registered.
    other = raw_agent(service.grpc_target)
    other.hello("dep2", world_size=R, layers=L, experts=E, slots=P)
    other.recv("settings")
    version, placement = service.call(lambda: service.control.get_placement("dep2"))
    assert version == 0
    np.testing.assert_array_equal(placement.phy2log, IDENTITY)
    assert service.call(lambda: service.control.get("dep").ranks_connected) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"slots": 8}, "num_slots 8 != registered 6"),
        ({"layers": 3}, "num_layers 3 != registered 2"),
        ({"experts": 2}, "num_experts 2 != registered 4"),
        ({"world_size": 3, "slots": 6}, "world_size 3 != registered 2"),
        ({"nodes": 2}, "num_nodes 2 != registered 1"),
    ],
)
def test_shape_mismatch_is_failed_precondition(service, raw_agent, change, message):
    connect(raw_agent, service, rank=0)
    agent = raw_agent(service.grpc_target)
    hello = {"rank": 1, "world_size": R, "layers": L, "experts": E, "slots": P, **change}
    agent.hello(**hello)
    code, details = agent.status()
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert message in details
    assert_alive(raw_agent, service)


def test_exactly_once_with_duplicates_and_replays(service, raw_agent):
    agent = connect(raw_agent, service, rank=0)
    batches = [counts(1), counts(2), counts(3)]
    batches[1][0, 2] = 100  # slot 2 holds expert 2 in layer 0
    assert agent.report(batches[0]) == 1
    assert agent.recv("ack").ack.sequence == 1
    agent.report(batches[1])
    assert agent.recv("ack").ack.sequence == 2
    # A duplicate (same sequence) is acknowledged cumulatively and not counted.
    agent.report(batches[0], sequence=1)
    assert agent.recv("ack").ack.sequence == 2
    dep = service.control.get("dep")
    assert service.call(lambda: dep.tokens_total) == int(batches[0].sum() + batches[1].sum())
    # A reconnect of the same incarnation replays 2 (counted) and 3 (not yet).
    agent.close()
    again = connect(raw_agent, service, rank=0, incarnation=agent.incarnation)
    again.report(batches[1], sequence=2)
    assert again.recv("ack").ack.sequence == 2
    again.report(batches[2], sequence=3)
    assert again.recv("ack").ack.sequence == 3
    expected = int(sum(b.sum() for b in batches))
    assert service.call(lambda: dep.tokens_total) == expected
    # A new incarnation starts its own sequence at 1.
    fresh = connect(raw_agent, service, rank=1)
    fresh.report(counts(1))
    assert fresh.recv("ack").ack.sequence == 1
    assert service.call(lambda: dep.tokens_total) == expected + L * P
    # The window holds the logical load: slot counts mapped with the identity map.
    load = service.call(lambda: dep.window.total())
    assert load.sum() == expected + L * P
    assert load[0, 2] == 1 + 100 + 3 + 1  # expert 2 lives only in slot 2
    assert load[0, 0] == 2 * (1 + 2 + 3 + 1)  # expert 0 in slots 0 and 4


def test_int64_reports_and_heartbeats(service, raw_agent):
    agent = connect(raw_agent, service, rank=0)
    agent.report(counts(2**40), dtype="int64")
    assert agent.recv("ack").ack.sequence == 1
    agent.send(eplb_pb2.AgentMessage(heartbeat=eplb_pb2.Heartbeat(step=42, active_version=0)))
    agent.report(counts(1))
    assert agent.recv("ack").ack.sequence == 2
    dep = service.control.get("dep")
    assert service.call(lambda: dep.tokens_total) == 2**40 * L * P + L * P
    assert service.call(lambda: dep.ranks[0].step) == 0  # the report's step_end came last


def _bad_tensor(**fields):
    base = {
        "dtype": eplb_pb2.DTYPE_INT32,
        "shape": [L, P],
        "data": counts(1).astype("<i4").tobytes(),
    }
    base.update(fields)
    return eplb_pb2.Tensor(**base)


def _report(tensor, sequence=2, version=0, steps=(0, 0)):
    return eplb_pb2.AgentMessage(
        report=eplb_pb2.LoadReport(
            sequence=sequence,
            placement_version=version,
            step_begin=steps[0],
            step_end=steps[1],
            counts=tensor,
        )
    )


BAD_REPORTS = {
    "dtype_unspecified": (
        _report(_bad_tensor(dtype=eplb_pb2.DTYPE_UNSPECIFIED)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "report.counts.dtype",
        "dtype",
    ),
    "dtype_unknown_number": (
        _report(_bad_tensor(dtype=9)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unsupported dtype 9",
        "dtype",
    ),
    "wrong_shape": (
        _report(_bad_tensor(shape=[P, L])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "report.counts.shape: got [6, 2], expected [2, 6]",
        "shape",
    ),
    "three_dims": (
        _report(_bad_tensor(shape=[L, P, 1])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "report.counts.shape",
        "shape",
    ),
    "short_data": (
        _report(_bad_tensor(data=b"\x00" * 10)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "report.counts.data: 10 bytes, expected 48",
        "length",
    ),
    "negative_counts": (
        _report(_bad_tensor(data=np.array([[1, 1, -5, 1, 1, 1]] * 2, "<i4").tobytes())),
        grpc.StatusCode.INVALID_ARGUMENT,
        "report.counts[0][2] = -5 is negative",
        "negative",
    ),
    "future_version": (
        _report(_bad_tensor(), version=5),
        grpc.StatusCode.FAILED_PRECONDITION,
        "placement_version: 5 was never issued",
        "future_version",
    ),
    "sequence_zero": (
        _report(_bad_tensor(), sequence=0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "report.sequence",
        "protocol",
    ),
    "steps_reversed": (
        _report(_bad_tensor(), steps=(9, 3)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "report.step_end: 3 < step_begin 9",
        "protocol",
    ),
    "empty_message": (
        eplb_pb2.AgentMessage(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "empty",
        "protocol",
    ),
    "second_hello": (
        eplb_pb2.AgentMessage(hello=eplb_pb2.Hello(deployment="dep")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "only the first message may be a hello",
        "protocol",
    ),
    "ack_without_status": (
        eplb_pb2.AgentMessage(plan_ack=eplb_pb2.PlanAck(version=1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "plan_ack.status",
        "protocol",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REPORTS))
def test_bad_message_aborts_only_that_stream(service, raw_agent, http, case):
    message, code, text, reason = BAD_REPORTS[case]
    bystander = connect(raw_agent, service, rank=1)
    agent = connect(raw_agent, service, rank=0)
    agent.report(counts(1))
    assert agent.recv("ack").ack.sequence == 1
    agent.send(message)
    got_code, details = agent.status()
    assert got_code == code, details
    assert text in details
    # The other rank's stream is unaffected, and the service stays healthy.
    bystander.report(counts(1))
    assert bystander.recv("ack").ack.sequence == 1
    dep = service.control.get("dep")
    assert service.call(lambda: dep.tokens_total) == 2 * L * P
    status, metrics = http("GET", f"{service.http_url}/metrics")
    assert status == 200
    assert f'eplb_reports_rejected_total{{reason="{reason}"}} 1.0' in metrics
    assert_alive(raw_agent, service, rank=0)


BAD_HELLOS = {
    "rank_out_of_range": ({"rank": 2}, "hello.rank: 2 >= world_size 2"),
    "bad_name": ({"deployment": "no spaces"}, "hello.deployment"),
    "long_name": ({"deployment": "x" * 64}, "hello.deployment"),
    "slots_not_divisible": ({"slots": 7}, "num_slots (7) must be divisible by world_size (2)"),
    "too_few_slots": ({"slots": 2}, "num_slots (2) must be >= num_experts (4)"),
    "zero_layers": ({"layers": 0}, "num_layers must be >= 1"),
    "empty_incarnation": ({"incarnation": ""}, "hello.incarnation"),
    "placement_out_of_range": (
        {"placement": np.full((L, P), 9)},
        "hello.placement: phy2log[0][0] = 9 is out of range",
    ),
    "placement_missing_expert": (
        {"placement": np.zeros((L, P), dtype=int)},
        "logical expert 1 has no replica",
    ),
    "placement_wrong_shape": (
        {"placement": np.zeros((L, P + 1), dtype=int)},
        "hello.placement.shape",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_HELLOS))
def test_bad_hello_is_invalid_argument(service, raw_agent, case):
    change, text = BAD_HELLOS[case]
    agent = raw_agent(service.grpc_target)
    hello = {"rank": 0, "world_size": R, "layers": L, "experts": E, "slots": P, **change}
    agent.hello(**hello)
    code, details = agent.status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert text in details
    assert_alive(raw_agent, service, rank=1)


def test_first_message_must_be_hello(service, raw_agent):
    agent = raw_agent(service.grpc_target)
    agent.send(_report(_bad_tensor()))
    code, details = agent.status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message must be hello, got report" in details


def test_hello_timeout(service_factory, raw_agent):
    service = service_factory(hello_timeout_s=0.2)
    agent = raw_agent(service.grpc_target)
    code, details = agent.status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello_timeout_s" in details


def test_future_hello_version_and_conflicting_placement(service, raw_agent):
    connect(raw_agent, service, rank=0)
    agent = raw_agent(service.grpc_target)
    agent.hello(rank=1, world_size=R, layers=L, experts=E, slots=P, version=3)
    code, details = agent.status()
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "hello.active_version: 3 was never issued" in details
    other = np.array([[3, 2, 1, 0, 3, 2]] * L)
    agent = raw_agent(service.grpc_target)
    agent.hello(rank=1, world_size=R, layers=L, experts=E, slots=P, placement=other)
    code, details = agent.status()
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "differs from registered version 0" in details


def test_stale_version_is_failed_precondition(service_factory, raw_agent):
    service = service_factory(versions_kept=2, rollout_timeout_s=30)
    agent = connect(raw_agent, service, rank=0)
    control = service.control
    dep = control.get("dep")
    topology = Topology(L, E, P, R)
    other = Placement(np.array([[3, 2, 1, 0, 3, 2]] * L), topology)

    async def issue_and_cancel():
        for _ in range(3):  # versions 1, 2, 3; each cancelled
            await control.rollouts.start(dep, other, trigger="test")
            await control.rollouts.cancel(dep, "test")

    service.call_async(issue_and_cancel())
    assert service.call(lambda: dep.window.versions) == [0, 3]  # active 0 is never evicted
    agent.report(counts(1), version=3)
    assert agent.recv("ack").ack.sequence == 1
    agent.report(counts(1), version=1)
    code, details = agent.status()
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "placement_version: 1 is stale" in details
    # A resend of an already counted report is acknowledged whatever its version.
    again = connect(raw_agent, service, rank=0, incarnation=agent.incarnation)
    again.report(counts(1), version=1, sequence=1)
    assert again.recv("ack").ack.sequence == 1


def test_oversize_messages_are_resource_exhausted(service_factory, raw_agent, http):
    limit = 4096
    service = service_factory(max_message_bytes=limit)
    bystander = connect(raw_agent, service, rank=1)
    # Between the limit and gRPC's hard stop (2x): refused by the service, named and counted.
    agent = connect(raw_agent, service, rank=0)
    agent.send(_report(_bad_tensor(data=b"\x00" * (limit + 100))))
    code, details = agent.status()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"max_message_bytes={limit}" in details
    _, metrics = http("GET", f"{service.http_url}/metrics")
    assert 'eplb_reports_rejected_total{reason="oversize"} 1.0' in metrics
    # Far above: gRPC refuses it before it reaches the service.
    agent = connect(raw_agent, service, rank=0)
    agent.send(_report(_bad_tensor(data=b"\x00" * (4 * limit))))
    code, _ = agent.status()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    bystander.report(counts(1))
    assert bystander.recv("ack").ack.sequence == 1
    assert_alive(raw_agent, service, rank=0)


def test_newer_stream_supersedes_older(service, raw_agent):
    old = connect(raw_agent, service, rank=0)
    connect(raw_agent, service, rank=0)
    code, details = old.status()
    assert code == grpc.StatusCode.ABORTED
    assert "superseded" in details
    assert service.call(lambda: service.control.get("dep").ranks_connected) == 1


def test_disconnect_updates_ranks_connected(service, raw_agent):
    agents = [connect(raw_agent, service, rank=r) for r in range(R)]
    dep = service.control.get("dep")
    assert service.call(lambda: dep.ranks_connected) == R
    agents[0].close()
    for _ in range(100):
        if service.call(lambda: dep.ranks_connected) == R - 1:
            break
        import time

        time.sleep(0.02)
    assert service.call(lambda: dep.ranks_connected) == R - 1
    assert service.call(lambda: dep.ranks[0].connected) is False


def test_rank_behind_gets_active_plan_on_hello(service, raw_agent):
    agents = [connect(raw_agent, service, rank=r) for r in range(R)]
    control = service.control
    dep = control.get("dep")
    new = Placement(np.array([[3, 2, 1, 0, 3, 2]] * L), Topology(L, E, P, R))
    rollout = service.call_async(control.rollouts.start(dep, new, trigger="test"))
    for agent in agents:
        plan = agent.recv("plan").plan
        assert plan.version == rollout.version == 1
        agent.ack_plan(plan, "ready")
    for agent in agents:
        agent.ack_plan(plan, "applied", step=10)
    for _ in range(100):
        if service.call(lambda: rollout.state.value) == "applied":
            break
        import time

        time.sleep(0.02)
    assert service.call(lambda: dep.active_version) == 1
    # A restarted rank that comes back at version 0 is sent the active plan.
    late = raw_agent(service.grpc_target)
    late.hello(rank=0, world_size=R, layers=L, experts=E, slots=P, version=0)
    assert late.recv().WhichOneof("body") == "settings"
    plan = late.recv("plan").plan
    assert plan.version == 1
    assert plan.rollout_id == rollout.id
    got = np.frombuffer(plan.phy2log.data, dtype="<i8").reshape(L, P)
    np.testing.assert_array_equal(got, new.phy2log)
    # Reports under the old version still count (its map is kept).
    late.report(counts(1), version=0)
    assert late.recv("ack").ack.sequence == 1
