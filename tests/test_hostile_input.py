"""Hostile input: random bytes and random field values at the agent stream, random REST bodies,
schemathesis against the service's own OpenAPI. No 5xx, no crash, no hang; every refusal names
the problem; the service keeps serving afterwards."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eplb_proto.v1 import eplb_pb2

L, E, P, R = 2, 4, 6, 2
HYPO = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED,
           grpc.StatusCode.DEADLINE_EXCEEDED}


def raw_stream(channel: grpc.Channel, frames: list[bytes]) -> tuple[grpc.StatusCode, str]:
    """Sends ``frames`` as the stream's messages without any protobuf encoding."""
    call = channel.stream_stream(
        "/eplb.v1.Eplb/Connect", request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )(iter(frames), timeout=5)
    try:
        for _ in call:
            pass
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture
def hostile_service(service_factory: Any) -> Any:
    return service_factory(hello_timeout_s=1.0, max_message_bytes=64 * 1024,
                           max_reports_per_s=1000, max_layers=64, max_experts=256,
                           max_slots=512, max_body_bytes=64 * 1024)


def alive(service: Any) -> None:
    with urllib.request.urlopen(f"{service.http_url}/readyz", timeout=5) as resp:
        assert resp.status == 200


def test_random_bytes_at_the_stream(hostile_service):
    with grpc.insecure_channel(hostile_service.grpc_target) as channel:

        @HYPO
        @given(st.lists(st.binary(max_size=300), min_size=0, max_size=4))
        def check(frames: list[bytes]) -> None:
            code, details = raw_stream(channel, frames)
            assert code in ALLOWED, (code, details)
            if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                assert details, code

        check()
    alive(hostile_service)


hellos = st.builds(
    eplb_pb2.Hello,
    deployment=st.one_of(st.just("dep"), st.text(max_size=80)),
    rank=st.integers(0, 2**32 - 1),
    world_size=st.integers(0, 2**32 - 1),
    num_layers=st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1)),
    num_experts=st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1)),
    num_slots=st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1)),
    num_nodes=st.integers(0, 3),
    incarnation=st.text(max_size=200),
    active_version=st.integers(0, 2**64 - 1),
    step=st.integers(0, 2**64 - 1),
)
tensors = st.builds(
    eplb_pb2.Tensor,
    dtype=st.integers(0, 5),
    shape=st.lists(st.integers(0, 2**32 - 1), max_size=4),
    data=st.binary(max_size=400),
)
reports = st.builds(
    eplb_pb2.LoadReport,
    sequence=st.integers(0, 2**64 - 1),
    placement_version=st.integers(0, 3),
    step_begin=st.integers(0, 2**64 - 1),
    step_end=st.integers(0, 2**64 - 1),
    counts=tensors,
)
acks = st.builds(
    eplb_pb2.PlanAck,
    version=st.integers(0, 2**64 - 1),
    rollout_id=st.text(max_size=30),
    status=st.integers(0, 6),
    step=st.integers(0, 2**64 - 1),
    reason=st.text(max_size=100),
)
bodies = st.one_of(
    reports.map(lambda r: eplb_pb2.AgentMessage(report=r)),
    acks.map(lambda a: eplb_pb2.AgentMessage(plan_ack=a)),
    hellos.map(lambda h: eplb_pb2.AgentMessage(hello=h)),
    st.just(eplb_pb2.AgentMessage()),
)


def test_random_field_values_at_the_stream(hostile_service):
    with grpc.insecure_channel(hostile_service.grpc_target) as channel:

        @HYPO
        @given(hellos, st.lists(bodies, max_size=4))
        def check(hello: eplb_pb2.Hello, rest: list[eplb_pb2.AgentMessage]) -> None:
            frames = [eplb_pb2.AgentMessage(hello=hello).SerializeToString()]
            frames += [m.SerializeToString() for m in rest]
            code, details = raw_stream(channel, frames)
            assert code in ALLOWED - {grpc.StatusCode.INTERNAL}, (code, details)
            if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                assert details and "internal error" not in details, (code, details)

        check()
    alive(hostile_service)


def test_limits_name_the_setting(hostile_service, raw_agent):
    agent = raw_agent(hostile_service.grpc_target)
    agent.hello(world_size=1, layers=65, experts=2, slots=2)
    code, details = agent.status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_layers=64" in details and "--max-layers" in details


def test_deployment_and_rate_limits(service_factory, raw_agent):
    service = service_factory(max_deployments=1, max_reports_per_s=2)
    first = raw_agent(service.grpc_target)
    first.hello("one", world_size=1, layers=1, experts=2, slots=2)
    first.recv("settings")
    second = raw_agent(service.grpc_target)
    second.hello("two", world_size=1, layers=1, experts=2, slots=2)
    code, details = second.status()
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "max_deployments=1" in details
    for _ in range(12):  # burst is 8: the rest is refused
        first.report([[1, 1]])
    code, details = first.status()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_reports_per_s=2" in details


def http_raw(method: str, url: str, data: bytes, headers: dict[str, str] | None = None
             ) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except json.JSONDecodeError:
            return exc.code, raw.decode(errors="replace")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10),
                                                                        children, max_size=5),
    max_leaves=30,
)


def test_random_rest_bodies(hostile_service, raw_agent):
    agent = raw_agent(hostile_service.grpc_target)
    agent.hello(world_size=R, layers=L, experts=E, slots=P)
    agent.recv("settings")
    base = f"{hostile_service.http_url}/v1/deployments/dep"

    @HYPO
    @given(
        st.sampled_from([("POST", "/rebalance"), ("PUT", "/placement")]),
        st.one_of(
            json_values.map(lambda v: json.dumps(v).encode()),
            st.binary(max_size=200),
            st.fixed_dictionaries({
                "dry_run": st.just(True), "policy": st.sampled_from(["deepseek", "x", ""]),
                "max_moves": st.integers(-5, 10), "min_gain": st.floats(-1, 2),
            }).map(lambda v: json.dumps(v).encode()),
            st.lists(st.lists(st.integers(-3, 2**40), max_size=8), max_size=4).map(
                lambda m: json.dumps({"physical_to_logical_map": m}).encode()),
        ),
    )
    def check(route: tuple[str, str], body: bytes) -> None:
        status, detail = http_raw(route[0], base + route[1], body)
        assert status < 500, (status, detail)
        if status >= 400:
            assert isinstance(detail, dict) and detail.get("detail"), detail

    check()
    status, detail = http_raw("PUT", base + "/placement", b"x" * (100 * 1024))
    assert status == 413 and "max_body_bytes" in detail["detail"]
    alive(hostile_service)


@pytest.mark.slow
def test_schemathesis_against_the_openapi(hostile_service, raw_agent):
    import schemathesis

    agent = raw_agent(hostile_service.grpc_target)
    agent.hello(world_size=R, layers=L, experts=E, slots=P)
    agent.recv("settings")
    agent.report(np.full((L, P), 5))
    agent.recv("ack")
    schema = schemathesis.openapi.from_url(f"{hostile_service.http_url}/openapi.json")
    failures = []
    def checker(operation: Any) -> Any:
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.data())
        def check(data: Any) -> None:
            case = data.draw(operation.as_strategy())
            if "name" in (case.path_parameters or {}) and data.draw(st.booleans()):
                case.path_parameters["name"] = "dep"  # reach the real deployment too
            response = case.call(base_url=hostile_service.http_url, timeout=10)
            if response.status_code >= 500:
                failures.append((operation.label, response.status_code, response.text[:300]))
            elif response.status_code >= 400:
                assert response.json().get("detail"), (operation.label, response.text)

        return check

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:
        checker(operation)()
    assert not failures, failures
    alive(hostile_service)
