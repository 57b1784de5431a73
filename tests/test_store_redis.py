"""RedisStore against a real redis-server: the Store protocol, atomic dedup, fencing, the lease,
and a service that comes back from Redis with its deployments, history, window and counts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from eplb_service.config import DeploymentOptions
from eplb_service.placement import Topology
from eplb_service.redis_store import RedisStore, parse_lease, redact_url
from eplb_service.store import DeploymentRecord, StoreFenced, StoreUnavailable

L, E, P, R = 2, 4, 6, 2
IDENTITY = np.tile(np.arange(P) % E, (L, 1))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def record(name: str = "dep", active: int = 0, latest: int = 0) -> DeploymentRecord:
    return DeploymentRecord(
        name=name, topology=Topology(L, E, P, R, 1), options=DeploymentOptions(expert_bytes=7),
        created_at=123.5, active_version=active, latest_version=latest,
    )


async def leader_store(url: str, **kwargs: Any) -> RedisStore:
    store = RedisStore(url, **kwargs)
    token = await store.acquire_lease("test", "127.0.0.1:1", 30)
    assert token is not None
    store.fence_token = token
    return store


def test_store_protocol_round_trip(redis_server):
    async def main() -> None:
        store = await leader_store(redis_server.url, rollouts_kept=3)
        await store.save_deployment(record(active=1, latest=2))
        await store.save_placement("dep", 0, IDENTITY)
        await store.save_placement("dep", 2, IDENTITY[:, ::-1])
        for i in range(5):
            await store.save_rollout("dep", {"id": f"r{i}", "created_at": float(i), "version": i})
        await store.save_rollout("dep", {"id": "r4", "created_at": 4.0, "version": 4, "x": 1})
        assert await store.commit_report("dep", "inc-a", 1, 10) is True
        assert await store.commit_report("dep", "inc-a", 1, 10) is False  # a resend
        assert await store.commit_report("dep", "inc-a", 2, 5) is True
        assert await store.commit_report("dep", "inc-b", 7, 2**40) is True
        await store.forget_incarnations("dep", ["inc-b"])
        window = [(100, np.arange(L * E).reshape(L, E)), (99, np.ones((L, E), dtype=np.int64))]
        await store.save_window("dep", window)
        await store.close()

        again = RedisStore(redis_server.url)  # a reader: no lease needed
        (rec,) = await again.load_deployments()
        assert rec == record(active=1, latest=2)
        assert await again.placement_versions("dep") == [0, 2]
        np.testing.assert_array_equal(await again.load_placement("dep", 2), IDENTITY[:, ::-1])
        assert await again.load_placement("dep", 5) is None
        rollouts = await again.load_rollouts("dep")
        assert [r["id"] for r in rollouts] == ["r2", "r3", "r4"]  # oldest trimmed
        assert rollouts[-1]["x"] == 1
        ingest = await again.load_ingest("dep")
        assert ingest.last_sequence == {"inc-a": 2}
        assert ingest.tokens_total == 15 + 2**40
        loaded = await again.load_window("dep")
        assert [i for i, _ in loaded] == [99, 100]
        np.testing.assert_array_equal(loaded[1][1], window[0][1])
        await again.close()

    run(main())


def test_writes_are_fenced_by_the_lease(redis_server):
    async def main() -> None:
        a = RedisStore(redis_server.url)
        b = RedisStore(redis_server.url)
        with pytest.raises(StoreFenced, match="not the leader"):
            await a.save_deployment(record())  # no lease at all
        token_a = await a.acquire_lease("a", "host-a:1", 0.3)
        assert token_a and parse_lease(token_a)[0] == "a"
        a.fence_token = token_a
        assert await b.acquire_lease("b", "host-b:1", 0.3) is None  # held
        assert (await b.lease_holder())[2] == "host-a:1"
        await a.save_deployment(record())
        assert await a.renew_lease(token_a, 0.3)
        await asyncio.sleep(0.45)  # a stops renewing: the lease expires
        token_b = await b.acquire_lease("b", "host-b:1", 5)
        assert token_b is not None
        assert parse_lease(token_b)[1] > parse_lease(token_a)[1]  # a new fence number
        b.fence_token = token_b
        with pytest.raises(StoreFenced, match="no longer holds"):
            await a.commit_report("dep", "x", 1, 1)  # the stale leader cannot count
        with pytest.raises(StoreFenced):
            await a.save_window("dep", [])
        assert not await a.renew_lease(token_a, 5)
        assert await b.commit_report("dep", "x", 1, 1)
        # The same replica id (a restarted process) takes its own lease back at once.
        c = RedisStore(redis_server.url)
        token_c = await c.acquire_lease("b", "host-b:2", 5)
        assert token_c is not None and token_c != token_b
        await c.release_lease(token_c)
        assert await c.lease_holder() is None
        for s in (a, b, c):
            await s.close()

    run(main())


def test_unreachable_redis_raises_store_unavailable_quickly():
    async def main() -> None:
        store = RedisStore("redis://:secret@127.0.0.1:1/0", timeout_s=0.5)
        with pytest.raises(StoreUnavailable) as err:
            await store.acquire_lease("a", "x", 1)
        assert "secret" not in str(err.value)
        assert "127.0.0.1:1" in str(err.value)
        await store.close()

    run(main())
    assert redact_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"


def redis_service(factory: Any, url: str, **settings: Any) -> Any:
    """An in-process service on a RedisStore (the fixture's ``store`` argument is the object)."""
    return factory(RedisStore(url, timeout_s=1.0), **settings)


def test_service_state_comes_back_from_redis(service_factory, raw_agent, redis_server, http):
    settings = dict(lease_s=1.0, report_interval_s=0.1, rollout_timeout_s=20, replica_id="one")
    first = redis_service(service_factory, redis_server.url, **settings)
    agents = []
    for rank in range(R):
        agent = raw_agent(first.grpc_target)
        agent.hello(rank=rank, world_size=R, layers=L, experts=E, slots=P)
        agent.recv("settings")
        agents.append(agent)
    for agent in agents:
        agent.report(np.full((L, P), 3))
        assert agent.recv("ack").ack.sequence == 1
    new_map = np.array([[3, 2, 1, 0, 3, 2], [0, 0, 1, 2, 3, 3]])
    status, body = http("PUT", f"{first.http_url}/v1/deployments/dep/placement",
                        {"physical_to_logical_map": new_map.tolist()})
    assert status == 202, body
    for agent in agents:
        plan = agent.recv("plan").plan
        agent.ack_plan(plan, "ready")
    for agent in agents:
        agent.ack_plan(plan, "applied", step=10)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        _, detail = http("GET", f"{first.http_url}/v1/deployments/dep")
        if detail["rollout"]["state"] == "applied":
            break
        time.sleep(0.05)
    assert detail["active_version"] == 1 and detail["tokens_total"] == 2 * L * P * 3
    first.call_async(first.control.save_windows())
    for agent in agents:
        agent.close()
    first.stop()  # graceful: releases the lease

    second = redis_service(service_factory, redis_server.url, **{**settings, "replica_id": "two"})
    status, detail = http("GET", f"{second.http_url}/v1/deployments/dep")
    assert status == 200, detail
    assert detail["active_version"] == 1 and detail["latest_version"] == 1
    assert detail["tokens_total"] == 2 * L * P * 3
    assert detail["window_tokens"] == 2 * L * P * 3
    assert detail["rollout"]["state"] == "applied"
    status, placement = http("GET", f"{second.http_url}/v1/deployments/dep/placement")
    assert placement["physical_to_logical_map"] == new_map.tolist()
    # A resend of an already counted report is acknowledged, not counted again.
    agent = raw_agent(second.grpc_target)
    agent.hello(rank=0, world_size=R, layers=L, experts=E, slots=P, version=1,
                incarnation=agents[0].incarnation)
    agent.recv("settings")
    agent.report(np.full((L, P), 3), sequence=1)
    assert agent.recv("ack").ack.sequence == 1
    _, detail = http("GET", f"{second.http_url}/v1/deployments/dep")
    assert detail["tokens_total"] == 2 * L * P * 3
