"""Fault injection: an agent dropped mid-prepare, one rank's acks delayed, 256 agents
reconnecting at once, and Redis restarted under the service."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import grpc
import numpy as np
import pytest

from eplb_proto.v1 import eplb_pb2, eplb_pb2_grpc
from eplb_service.redis_store import RedisStore
from tests.conftest import tensor

L, E, P, R = 2, 4, 6, 2
NEW_MAP = [[3, 2, 1, 0, 3, 2], [0, 0, 1, 2, 3, 3]]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.02)


def connect_all(raw_agent: Any, target: str, **hello: Any) -> list[Any]:
    agents = []
    for rank in range(R):
        agent = raw_agent(target)
        agent.hello(rank=rank, world_size=R, layers=L, experts=E, slots=P, **hello)
        agent.recv("settings")
        agents.append(agent)
    return agents


def test_agent_dropped_mid_prepare_cancels_and_nobody_switches(service_factory, raw_agent, http):
    service = service_factory(rollout_timeout_s=1.0)
    agents = connect_all(raw_agent, service.grpc_target)
    status, _ = http("PUT", f"{service.http_url}/v1/deployments/dep/placement",
                     {"physical_to_logical_map": NEW_MAP})
    assert status == 202
    plan = agents[0].recv("plan").plan
    agents[1].recv("plan")
    agents[0].ack_plan(plan, "ready")
    agents[1].close()  # rank 1 dies while preparing
    cancel = agents[0].recv("cancel", timeout=5).cancel
    assert cancel.rollout_id == plan.rollout_id and "READY from ranks [1]" in cancel.reason
    _, detail = http("GET", f"{service.http_url}/v1/deployments/dep")
    assert detail["active_version"] == 0
    assert detail["rollout"]["state"] == "cancelled"


def test_delayed_acks_of_one_rank_still_apply(service_factory, raw_agent, http):
    service = service_factory(rollout_timeout_s=5.0)
    agents = connect_all(raw_agent, service.grpc_target)
    http("PUT", f"{service.http_url}/v1/deployments/dep/placement",
         {"physical_to_logical_map": NEW_MAP})
    plans = [agent.recv("plan").plan for agent in agents]
    agents[0].ack_plan(plans[0], "ready")
    time.sleep(1.0)  # rank 1 is slow
    assert http("GET", f"{service.http_url}/v1/deployments/dep")[1]["rollout"]["state"] == \
        "preparing"
    agents[1].ack_plan(plans[1], "ready")
    for agent, plan in zip(agents, plans, strict=True):
        agent.ack_plan(plan, "applied", step=8)
    wait_for(lambda: http("GET", f"{service.http_url}/v1/deployments/dep")[1]["rollout"]["state"]
             == "applied", 5, "applied")
    rollout = http("GET", f"{service.http_url}/v1/deployments/dep")[1]["rollout"]
    assert rollout["duration_s"] >= 1.0


async def _agent_session(stub: Any, rank: int, ranks: int, incarnation: str, seqs: range,
                         ) -> int:
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def messages() -> Any:
        while (item := await queue.get()) is not None:
            yield item

    call = stub.Connect(messages(), timeout=60)
    await queue.put(eplb_pb2.AgentMessage(hello=eplb_pb2.Hello(
        deployment="many", rank=rank, world_size=ranks, num_layers=1, num_experts=ranks,
        num_slots=ranks, num_nodes=1, incarnation=incarnation)))
    first = await call.read()
    assert first.WhichOneof("body") == "settings"
    last = 0
    for seq in seqs:
        await queue.put(eplb_pb2.AgentMessage(report=eplb_pb2.LoadReport(
            sequence=seq, counts=tensor(np.ones((1, ranks)), "int32"))))
    while last < seqs[-1]:
        message = await call.read()
        assert message is not grpc.aio.EOF
        if message.WhichOneof("body") == "ack":
            last = message.ack.sequence
    await queue.put(None)
    call.cancel()
    return last


@pytest.mark.slow
def test_256_agents_reconnect_at_once(service_factory, http):
    ranks = 256
    service = service_factory(rollout_timeout_s=5.0)
    incarnations = [uuid.uuid4().hex for _ in range(ranks)]

    async def wave(seqs: range) -> list[int]:
        async with grpc.aio.insecure_channel(service.grpc_target) as channel:
            stub = eplb_pb2_grpc.EplbStub(channel)
            return await asyncio.wait_for(asyncio.gather(*(
                _agent_session(stub, r, ranks, incarnations[r], seqs) for r in range(ranks)
            )), timeout=60)

    assert asyncio.run(wave(range(1, 3))) == [2] * ranks
    # Every stream drops and all 256 come back at once, resending 2 (a duplicate) and sending 3.
    assert asyncio.run(wave(range(2, 4))) == [3] * ranks
    _, detail = http("GET", f"{service.http_url}/v1/deployments/many")
    assert detail["tokens_total"] == 3 * ranks * ranks  # each report: ranks slots x 1
    _, metrics = http("GET", f"{service.http_url}/metrics")
    assert 'eplb_reports_duplicate_total{deployment="many"} 256.0' in metrics


@pytest.mark.slow
def test_redis_restarted_under_the_service(service_factory, raw_agent, redis_server, http):
    service = service_factory(RedisStore(redis_server.url, timeout_s=0.5), lease_s=1.0,
                              replica_id="solo", report_interval_s=0.1)
    agent = raw_agent(service.grpc_target)
    agent.hello(world_size=1, layers=1, experts=2, slots=2)
    agent.recv("settings")
    agent.report([[1, 2]])
    assert agent.recv("ack").ack.sequence == 1
    redis_server.stop()
    agent.report([[10, 20]])  # cannot be committed: not acknowledged, stream ends
    code, details = agent.status()
    assert code == grpc.StatusCode.UNAVAILABLE and "store unavailable" in details
    status, body = http("GET", f"{service.http_url}/readyz")
    assert status == 503 and "store unavailable" in body["detail"]
    _, metrics = http("GET", f"{service.http_url}/metrics")
    assert "eplb_store_up 0.0" in metrics
    retry = raw_agent(service.grpc_target)
    retry.hello(world_size=1, layers=1, experts=2, slots=2, incarnation=agent.incarnation)
    assert retry.status()[0] == grpc.StatusCode.UNAVAILABLE  # clients retry later
    redis_server.start()
    wait_for(lambda: http("GET", f"{service.http_url}/readyz")[0] == 200, 10, "recovery")
    again = raw_agent(service.grpc_target)
    again.hello(world_size=1, layers=1, experts=2, slots=2, incarnation=agent.incarnation)
    again.recv("settings")
    again.report([[1, 2]], sequence=1)  # the agent resends what was not acknowledged...
    again.report([[10, 20]], sequence=2)
    assert again.recv("ack").ack.sequence >= 1
    wait_for(lambda: http("GET", f"{service.http_url}/v1/deployments/dep")[1]["tokens_total"]
             == 33, 5, "exact count")
    _, metrics = http("GET", f"{service.http_url}/metrics")
    assert "eplb_store_up 1.0" in metrics and "eplb_leader 1.0" in metrics
