"""The REST API over real loopback sockets, with raw gRPC agents acking plans."""

from __future__ import annotations

import time

import numpy as np
import pytest

# L=2 layers, E=4 experts, P=6 slots, R=2 ranks. Identity: rank 0 = experts 0 1 2, rank 1 = 3 0 1.
L, E, P, R = 2, 4, 6, 2
IDENTITY = np.tile(np.arange(P) % E, (L, 1))
# Expert 2 (slot 2, rank 0) is hot: rank 0 carries 1010 tokens per layer, rank 1 only 20.
SKEWED = np.tile(np.array([5, 5, 1000, 10, 5, 5]), (L, 1))


def wait_for(predicate, timeout=5.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def connect_all(raw_agent, service, deployment="dep", report=SKEWED):
    agents = []
    for rank in range(R):
        agent = raw_agent(service.grpc_target)
        agent.hello(deployment, rank=rank, world_size=R, layers=L, experts=E, slots=P)
        agent.recv("settings")
        if report is not None:
            agent.report(report)
            assert agent.recv("ack").ack.sequence == 1
        agents.append(agent)
    return agents


def url(service, path=""):
    return f"{service.http_url}/v1/deployments/dep{path}"


def drive(agents, *, ready=True, applied=True, step=100):
    """Every agent receives the plan, acks READY, then APPLIED. Returns the plan."""
    plans = [agent.recv("plan").plan for agent in agents]
    if ready:
        for agent, plan in zip(agents, plans, strict=True):
            agent.ack_plan(plan, "ready")
    if applied:
        for agent, plan in zip(agents, plans, strict=True):
            agent.ack_plan(plan, "applied", step=step, bytes_moved=1000)
    return plans[0]


def rollout_state(http, service, rollout_id):
    status, body = http("GET", url(service, f"/rollouts/{rollout_id}"))
    assert status == 200, body
    return body


def test_health_docs_and_empty_list(service, http):
    assert http("GET", f"{service.http_url}/healthz") == (200, {
        "status": "ok", "version": "0.1.0", "detail": None})
    status, body = http("GET", f"{service.http_url}/readyz")
    assert (status, body["status"]) == (200, "ready")
    assert http("GET", f"{service.http_url}/v1/deployments") == (200, {"deployments": []})
    status, spec = http("GET", f"{service.http_url}/openapi.json")
    assert status == 200
    for path in (
        "/v1/deployments", "/v1/deployments/{name}", "/v1/deployments/{name}/placement",
        "/v1/deployments/{name}/load", "/v1/deployments/{name}/rebalance",
        "/v1/deployments/{name}/rollouts", "/v1/deployments/{name}/rollouts/{rollout_id}",
    ):
        assert path in spec["paths"]
    status, page = http("GET", f"{service.http_url}/docs")
    assert status == 200 and "swagger" in page.lower()


def test_readyz_reports_shutdown(service, http):
    service.service._stopping = True  # what stop() sets first
    try:
        status, body = http("GET", f"{service.http_url}/readyz")
        assert status == 503
        assert body["detail"] == "shutting down"
    finally:
        service.service._stopping = False


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "", None),
        ("GET", "/placement", None),
        ("PUT", "/placement", {"physical_to_logical_map": IDENTITY.tolist()}),
        ("GET", "/load", None),
        ("POST", "/rebalance", {}),
        ("GET", "/rollouts", None),
        ("GET", "/rollouts/ro-x", None),
    ],
)
def test_unknown_deployment_is_404(service, http, method, path, body):
    status, reply = http(method, f"{service.http_url}/v1/deployments/nope{path}", body)
    assert status == 404
    assert reply == {"detail": "unknown deployment 'nope'"}


def test_deployment_views(service_factory, raw_agent, http):
    service = service_factory(expert_bytes=1000, window_s=30)
    connect_all(raw_agent, service)
    status, listing = http("GET", f"{service.http_url}/v1/deployments")
    assert status == 200
    (summary,) = listing["deployments"]
    assert summary["name"] == "dep"
    assert summary["shape"] == {"layers": L, "experts": E, "slots": P, "ranks": R, "nodes": 1}
    assert summary["ranks_connected"] == R
    assert summary["active_version"] == 0
    assert summary["rollout"] is None
    assert summary["tokens_total"] == 2 * int(SKEWED.sum())
    assert 0 <= summary["last_report_age_s"] < 5
    balance = summary["balancedness"]
    assert balance["mean"] == pytest.approx(515 / 1010)
    assert balance["worst"] == pytest.approx(515 / 1010)
    assert balance["worst_layer"] in (0, 1)

    status, detail = http("GET", url(service))
    assert status == 200
    assert detail["latest_version"] == 0
    assert detail["versions_kept"] == [0]
    assert detail["window_s"] == 30
    assert detail["window_tokens"] == detail["tokens_total"]
    assert detail["options"] == {"expert_bytes": 1000, "num_groups": 1}
    assert [r["rank"] for r in detail["ranks"]] == [0, 1]
    assert all(r["connected"] and r["active_version"] == 0 for r in detail["ranks"])

    status, placement = http("GET", url(service, "/placement"))
    assert status == 200
    assert placement == {"version": 0, "physical_to_logical_map": IDENTITY.tolist()}

    status, load = http("GET", url(service, "/load"))
    assert status == 200
    # Logical load: expert 0 = slots 0 + 4, expert 1 = slots 1 + 5, two ranks reported.
    assert load["load"] == [[20, 20, 2000, 20]] * L
    assert load["tokens"] == 2 * int(SKEWED.sum())
    assert load["balancedness_per_layer"] == pytest.approx([515 / 1010] * L)
    assert load["active_version"] == 0


def test_dry_run_then_rollout_to_applied(service_factory, raw_agent, http):
    service = service_factory(expert_bytes=1000, rollout_timeout_s=10)
    agents = connect_all(raw_agent, service)

    status, dry = http("POST", url(service, "/rebalance"), {"dry_run": True})
    assert status == 200, dry
    assert dry["dry_run"] is True and dry["rollout_id"] is None and dry["version"] is None
    assert dry["before"]["mean"] == pytest.approx(515 / 1010)
    assert dry["after"]["mean"] > dry["before"]["mean"] + 0.1
    assert dry["gain"] == pytest.approx(dry["after"]["mean"] - dry["before"]["mean"])
    assert dry["worth_it"] is True and dry["reason"] is None
    assert dry["moves"] > 0
    assert dry["bytes"] == dry["migration"]["transfers"] * 1000
    proposal = np.array(dry["physical_to_logical_map"])
    assert proposal.shape == (L, P)
    assert service.call(lambda: service.control.get("dep").rollout) is None  # nothing started

    status, started = http("POST", url(service, "/rebalance"), {})
    assert status == 202, started
    rollout_id, version = started["rollout_id"], started["version"]
    assert version == 1
    assert started["physical_to_logical_map"] is None
    state = rollout_state(http, service, rollout_id)
    assert state["state"] == "preparing"
    assert state["trigger"] == "rebalance"
    assert state["from_version"] == 0 and state["version"] == 1
    assert state["ranks_ready"] == [] and state["ranks_not_ready"] == [0, 1]

    # One at a time: 409 for another rebalance or a PUT while it runs.
    status, body = http("POST", url(service, "/rebalance"), {})
    assert status == 409 and rollout_id in body["detail"]
    status, body = http("PUT", url(service, "/placement"),
                        {"physical_to_logical_map": proposal[:, ::-1].tolist()})
    assert status == 409 and rollout_id in body["detail"]
    # A dry run is still fine.
    assert http("POST", url(service, "/rebalance"), {"dry_run": True})[0] == 200

    plans = [agent.recv("plan").plan for agent in agents]
    assert {p.version for p in plans} == {1} and {p.rollout_id for p in plans} == {rollout_id}
    agents[0].ack_plan(plans[0], "ready")
    wait_for(lambda: rollout_state(http, service, rollout_id)["ranks_ready"] == [0])
    agents[1].ack_plan(plans[1], "ready")
    state = wait_for(
        lambda: (s := rollout_state(http, service, rollout_id))["state"] == "committed" and s
    )
    assert state["committed_at"] is not None
    for agent, plan in zip(agents, plans, strict=True):
        agent.ack_plan(plan, "applied", step=123, bytes_moved=500)
    state = wait_for(
        lambda: (s := rollout_state(http, service, rollout_id))["state"] == "applied" and s
    )
    assert state["ranks_applied"] == [0, 1] and state["ranks_not_applied"] == []
    assert state["switch_step"] == 123
    assert state["bytes_moved"] == 1000
    assert state["duration_s"] >= 0
    assert state["plan"]["after"]["mean"] == pytest.approx(dry["after"]["mean"])

    status, detail = http("GET", url(service))
    assert detail["active_version"] == 1
    assert detail["rollout"]["id"] == rollout_id
    # The same window under the new placement: what the plan predicted.
    assert detail["balancedness"]["mean"] == pytest.approx(dry["after"]["mean"])
    status, placement = http("GET", url(service, "/placement"))
    assert placement["version"] == 1
    np.testing.assert_array_equal(np.array(placement["physical_to_logical_map"]), proposal)

    status, listing = http("GET", url(service, "/rollouts"))
    assert status == 200 and [r["id"] for r in listing["rollouts"]] == [rollout_id]
    status, body = http("GET", url(service, "/rollouts/ro-unknown"))
    assert status == 404 and "ro-unknown" in body["detail"]

    status, metrics = http("GET", f"{service.http_url}/metrics")
    assert 'eplb_rebalances_total{deployment="dep",result="applied"} 1.0' in metrics
    assert 'eplb_active_version{deployment="dep"} 1.0' in metrics
    assert 'eplb_agents_connected{deployment="dep"} 2.0' in metrics
    assert 'eplb_balancedness{deployment="dep"}' in metrics
    assert 'eplb_planner_seconds_count{policy="default"}' in metrics
    assert 'eplb_bytes_moved_total{deployment="dep"} 1000.0' in metrics


def test_rollout_times_out_and_is_cancelled(service_factory, raw_agent, http):
    service = service_factory(rollout_timeout_s=0.3)
    agents = connect_all(raw_agent, service)
    status, started = http("POST", url(service, "/rebalance"), {})
    assert status == 202
    plans = [agent.recv("plan").plan for agent in agents]
    agents[0].ack_plan(plans[0], "ready")  # rank 1 never gets ready
    state = wait_for(
        lambda: (s := rollout_state(http, service, started["rollout_id"]))["state"]
        == "cancelled" and s
    )
    assert "timed out after 0.3s waiting for READY from ranks [1]" in state["reason"]
    for agent in agents:
        cancel = agent.recv("cancel").cancel
        assert cancel.version == 1 and cancel.rollout_id == started["rollout_id"]
        assert "timed out" in cancel.reason
    status, detail = http("GET", url(service))
    assert detail["active_version"] == 0 and detail["latest_version"] == 1
    assert detail["rollout"]["state"] == "cancelled"
    _, metrics = http("GET", f"{service.http_url}/metrics")
    assert 'eplb_rebalances_total{deployment="dep",result="cancelled"} 1.0' in metrics
    # The next rollout gets a fresh version: 1 is burnt (ranks may have staged it).
    status, again = http("POST", url(service, "/rebalance"), {})
    assert status == 202 and again["version"] == 2


def test_switch_right_after_a_timeout_is_adopted_from_applied_acks(
    service_factory, raw_agent, http
):
    """Ranks switch only together: if they switched just as the rollout timed out, the APPLIED
    acks that follow the cancel make the service adopt the version the fleet routes with."""
    service = service_factory(rollout_timeout_s=0.3)
    agents = connect_all(raw_agent, service)
    status, started = http("POST", url(service, "/rebalance"), {})
    assert status == 202
    plans = [agent.recv("plan").plan for agent in agents]
    wait_for(
        lambda: rollout_state(http, service, started["rollout_id"])["state"] == "cancelled"
    )
    assert http("GET", url(service))[1]["active_version"] == 0
    for agent, plan in zip(agents, plans, strict=True):
        agent.ack_plan(plan, "applied")
    detail = wait_for(
        lambda: (d := http("GET", url(service))[1])["active_version"] == plans[0].version and d
    )
    assert detail["active_version"] == 1
    status, placement = http("GET", url(service, "/placement"))
    assert status == 200 and placement["version"] == 1


def test_failed_ack_fails_and_cancels(service, raw_agent, http):
    agents = connect_all(raw_agent, service)
    status, started = http("POST", url(service, "/rebalance"), {})
    assert status == 202
    plans = [agent.recv("plan").plan for agent in agents]
    agents[0].ack_plan(plans[0], "ready")
    agents[1].ack_plan(plans[1], "failed", reason="out of memory staging layer 3")
    state = wait_for(
        lambda: (s := rollout_state(http, service, started["rollout_id"]))["state"]
        == "failed" and s
    )
    assert state["reason"] == "rank 1 failed: out of memory staging layer 3"
    for agent in agents:
        assert agent.recv("cancel").cancel.rollout_id == started["rollout_id"]
    assert http("GET", url(service))[1]["active_version"] == 0


def test_reconnect_during_rollout_gets_the_plan(service, raw_agent, http):
    agents = connect_all(raw_agent, service)
    _, started = http("POST", url(service, "/rebalance"), {})
    plans = [agent.recv("plan").plan for agent in agents]
    agents[0].ack_plan(plans[0], "ready")
    wait_for(lambda: rollout_state(http, service, started["rollout_id"])["ranks_ready"] == [0])
    # Rank 0 restarts (new incarnation): its READY is void, it gets the plan again.
    agents[0].close()
    fresh = raw_agent(service.grpc_target)
    fresh.hello(rank=0, world_size=R, layers=L, experts=E, slots=P)
    fresh.recv("settings")
    plan = fresh.recv("plan").plan
    assert plan.rollout_id == started["rollout_id"]
    wait_for(lambda: rollout_state(http, service, started["rollout_id"])["ranks_ready"] == [])
    fresh.ack_plan(plan, "ready")
    agents[1].ack_plan(plans[1], "ready")
    fresh.ack_plan(plan, "applied", step=7)
    wait_for(lambda: rollout_state(http, service, started["rollout_id"])["ranks_applied"] == [0])
    # Rank 1 says so in a heartbeat instead of an APPLIED ack.
    from eplb_proto.v1 import eplb_pb2

    agents[1].send(eplb_pb2.AgentMessage(heartbeat=eplb_pb2.Heartbeat(step=8, active_version=1)))
    state = wait_for(
        lambda: (s := rollout_state(http, service, started["rollout_id"]))["state"]
        == "applied" and s
    )
    assert state["switch_step"] == 7


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({"dry_run": "maybe"}, "dry_run"),
        ({"policy": "nope"}, "unknown policy 'nope'"),
        ({"policy": 3}, "policy"),
        ({"max_moves": -1}, "max_moves"),
        ({"max_moves": "x"}, "max_moves"),
        ({"min_gain": 2}, "min_gain"),
        ({"min_gain": -0.1}, "min_gain"),
        ({"bogus": 1}, "bogus"),
        ([1, 2], "body"),
    ],
)
def test_rebalance_bad_body_is_422(service, raw_agent, http, body, text):
    connect_all(raw_agent, service)
    status, reply = http("POST", url(service, "/rebalance"), body)
    assert status == 422
    assert text in str(reply["detail"])


def test_rebalance_gates(service, raw_agent, http):
    agents = connect_all(raw_agent, service, report=None)
    # Empty window: nothing to gain, nothing started (200, reason given).
    status, body = http("POST", url(service, "/rebalance"))
    assert status == 200, body
    assert body["rollout_id"] is None and body["worth_it"] is False
    assert body["reason"]
    for agent in agents:
        agent.report(SKEWED)
        agent.recv("ack")
    status, body = http("POST", url(service, "/rebalance"), {"max_moves": 0})
    assert status == 200 and body["rollout_id"] is None
    assert "> max_moves 0" in body["reason"]
    status, body = http("POST", url(service, "/rebalance"), {"min_gain": 0.9})
    assert status == 200 and "< min_gain 0.9" in body["reason"]
    _, metrics = http("GET", f"{service.http_url}/metrics")
    assert 'eplb_rebalances_total{deployment="dep",result="skipped_no_gain"} 3.0' in metrics
    status, body = http("POST", url(service, "/rebalance"), {"policy": "deepseek", "min_gain": 0})
    assert status == 202 and body["rollout_id"]


def test_put_placement_rolls_out(service, raw_agent, http):
    agents = connect_all(raw_agent, service)
    new = np.array([[2, 0, 3, 2, 1, 2]] * L)
    # SGLang's --init-expert-location JSON (no version; extra keys ignored).
    status, body = http("PUT", url(service, "/placement"),
                        {"physical_to_logical_map": new.tolist(), "logical_count": None})
    assert status == 202, body
    assert body["version"] == 1 and body["state"] == "preparing"
    plan = drive(agents)
    np.testing.assert_array_equal(np.frombuffer(plan.phy2log.data, "<i8").reshape(L, P), new)
    state = wait_for(
        lambda: (s := rollout_state(http, service, body["rollout_id"]))["state"] == "applied"
        and s
    )
    assert state["trigger"] == "placement"
    assert state["slots_changed"] == int((new != IDENTITY).sum())
    assert http("GET", url(service, "/placement"))[1] == {
        "version": 1, "physical_to_logical_map": new.tolist()}
    # The GET form (with version) works too; putting the active map changes nothing.
    status, body = http("PUT", url(service, "/placement"),
                        {"version": 1, "physical_to_logical_map": new.tolist()})
    assert status == 200 and body["rollout_id"] is None and body["state"] == "unchanged"


@pytest.mark.parametrize(
    ("doc", "text"),
    [
        (
            {"physical_to_logical_map": [[0, 1, 2, 3, 0, 9]] * L},
            "phy2log[0][5] = 9 is out of range",
        ),
        ({"physical_to_logical_map": [[0, 1, 2, 0, 1, 2]] * L}, "logical expert 3 has no replica"),
        ({"physical_to_logical_map": [[0, 1, 2, 3]] * L}, "phy2log shape (2, 4) does not match"),
        ({"physical_to_logical_map": [[0, 1, 2, 3, 0, 1]]}, "phy2log shape (1, 6) does not match"),
        ({"physical_to_logical_map": [[0, 1, 2, 3, 0, 1], [0, 1]]}, "rectangular"),
        ({"physical_to_logical_map": [[0, 1, 2, 3, 0, "a"]] * L}, "physical_to_logical_map"),
        ({"version": 3}, "physical_to_logical_map"),
    ],
)
def test_put_invalid_placement_is_422(service, raw_agent, http, doc, text):
    connect_all(raw_agent, service, report=None)
    status, reply = http("PUT", url(service, "/placement"), doc)
    assert status == 422
    assert text in str(reply["detail"])
    assert http("GET", url(service))[1]["latest_version"] == 0


def test_auto_rebalance(service_factory, raw_agent, http):
    service = service_factory(rebalance_interval_s=0.1, cooldown_s=0.0, min_gain=0.05)
    agents = connect_all(raw_agent, service)
    plans = [agent.recv("plan", timeout=5).plan for agent in agents]
    rollout_id = plans[0].rollout_id
    assert rollout_state(http, service, rollout_id)["trigger"] == "auto"
    for agent, plan in zip(agents, plans, strict=True):
        agent.ack_plan(plan, "ready")
        agent.ack_plan(plan, "applied", step=1)
    wait_for(lambda: rollout_state(http, service, rollout_id)["state"] == "applied")
    # Balanced now: later rounds find no gain and start nothing.

    def skipped() -> bool:
        _, metrics = http("GET", f"{service.http_url}/metrics")
        return 'eplb_rebalances_total{deployment="dep",result="skipped_no_gain"}' in metrics

    wait_for(skipped)
    assert len(http("GET", url(service, "/rollouts"))[1]["rollouts"]) == 1


def test_auto_rebalance_waits_for_every_rank(service_factory, raw_agent, http):
    service = service_factory(rebalance_interval_s=0.05, cooldown_s=0.0)
    agent = raw_agent(service.grpc_target)
    agent.hello(rank=0, world_size=R, layers=L, experts=E, slots=P)
    agent.recv("settings")
    agent.report(SKEWED)
    agent.recv("ack")
    time.sleep(0.3)
    assert http("GET", url(service, "/rollouts"))[1]["rollouts"] == []


def test_metrics_text(service, raw_agent, http):
    connect_all(raw_agent, service)
    status, text = http("GET", f"{service.http_url}/metrics")
    assert status == 200
    for line in (
        'eplb_deployments 1.0',
        'eplb_agents_connected{deployment="dep"} 2.0',
        'eplb_reports_received_total{deployment="dep"} 2.0',
        f'eplb_tokens_total{{deployment="dep"}} {float(2 * SKEWED.sum())}',
        'eplb_rollouts_in_progress 0.0',
    ):
        assert line in text, line
    assert f'eplb_balancedness{{deployment="dep"}} {515 / 1010}' in text
    assert 'eplb_last_report_age_seconds{deployment="dep"}' in text


@pytest.mark.slow
def test_planner_in_worker_process(service_factory, raw_agent, http):
    service = service_factory(planner_processes=1)
    connect_all(raw_agent, service)
    status, dry = http("POST", url(service, "/rebalance"), {"dry_run": True})
    assert status == 200, dry
    assert dry["after"]["mean"] > dry["before"]["mean"]


def test_restart_on_the_same_store_restores_state(service_factory, raw_agent, http):
    from eplb_service.store import MemoryStore

    store = MemoryStore()
    first = service_factory(store=store)
    agents = connect_all(raw_agent, first)
    status, started = http("POST", url(first, "/rebalance"), {})
    assert status == 202
    drive(agents)
    wait_for(lambda: rollout_state(http, first, started["rollout_id"])["state"] == "applied")
    before = http("GET", url(first))[1]
    incarnation = agents[0].incarnation
    first.stop()

    second = service_factory(store=store)
    status, after = http("GET", url(second))
    assert status == 200
    for key in ("active_version", "latest_version", "tokens_total", "shape", "versions_kept"):
        assert after[key] == before[key], key
    assert after["ranks_connected"] == 0
    assert [r["id"] for r in http("GET", url(second, "/rollouts"))[1]["rollouts"]] == [
        started["rollout_id"]]
    assert http("GET", url(second, "/placement"))[1]["version"] == 1
    # Deduplication survived: a resend of sequence 1 is acked but not counted again.
    agent = raw_agent(second.grpc_target)
    agent.hello(rank=0, world_size=R, layers=L, experts=E, slots=P, version=1,
                incarnation=incarnation)
    agent.recv("settings")
    agent.report(SKEWED, sequence=1, version=0)
    assert agent.recv("ack").ack.sequence == 1
    agent.report(SKEWED, sequence=2, version=0)  # version 0's map is still kept
    assert agent.recv("ack").ack.sequence == 2
    assert http("GET", url(second))[1]["tokens_total"] == before["tokens_total"] + SKEWED.sum()
