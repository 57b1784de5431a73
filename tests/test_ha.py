"""Two ``eplb serve`` replicas on one Redis: one leads, the other is not ready and refuses agents
with UNAVAILABLE naming the leader; after ``kill -9`` of the leader the follower takes over
within two lease periods, resumes the rollout in flight (never starts it twice) and the agents
(behind a readiness-routing TCP proxy, as behind a Kubernetes Service) lose and double nothing."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from tests.redis_server import start_replica
from tests.test_restart import SIM_ARGS, serve_flags, simulate, summary_of, wait_for

L, E, P, R = 2, 4, 6, 2


def ready(http_url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(f"{http_url}/readyz", timeout=1) as r:
        return r.status == 200
    return False


class ReadyProxy:
    """TCP proxy to whichever backend's ``/readyz`` answers 200 (checked per connection)."""

    def __init__(self, backends: list[tuple[int, str]]) -> None:
        self.backends = backends  # (grpc port, http url)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.target = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        port = next((p for p, url in self.backends if ready(url)), None)
        if port is None:
            client.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)

        def pipe(a: socket.socket, b: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := a.recv(65536):
                    b.sendall(data)
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def test_follower_is_not_ready_and_refuses_agents_naming_the_leader(
    serve_process, redis_server, raw_agent, http
):
    leader = serve_process(*serve_flags(redis_server.url, "alpha"))
    follower_proc = start_replica(*serve_flags(redis_server.url, "beta"))
    try:
        wait_for(lambda: http("GET", f"{follower_proc.http_url}/readyz")[0] == 503, 20,
                 "the follower's readyz")
        status, body = http("GET", f"{follower_proc.http_url}/readyz")
        assert "not the leader" in body["detail"] and "alpha" in body["detail"]
        assert str(leader.grpc_port) in body["detail"]
        _, metrics = http("GET", f"{follower_proc.http_url}/metrics")
        assert "eplb_leader 0.0" in metrics
        assert "eplb_leader 1.0" in http("GET", f"{leader.http_url}/metrics")[1]
        agent = raw_agent(follower_proc.grpc_target)
        agent.hello(world_size=1, layers=1, experts=2, slots=2)
        code, details = agent.status()
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "not the leader" in details and "alpha" in details
        status, body = http("POST", f"{follower_proc.http_url}/v1/deployments/x/rebalance", {})
        assert status == 503 and "not the leader" in body["detail"]
    finally:
        follower_proc.terminate()


@pytest.mark.slow
def test_leader_killed_mid_run_follower_takes_over(serve_process, redis_server, http):
    lease_s = 1.0
    a = serve_process(*serve_flags(redis_server.url, "alpha"))

    b = start_replica(*serve_flags(redis_server.url, "beta"))
    proxy = ReadyProxy([(a.grpc_port, a.http_url), (b.grpc_port, b.http_url)])
    sim = simulate(proxy.target, *SIM_ARGS, "--duration", "9")
    try:
        url_a = f"{a.http_url}/v1/deployments/rs"
        wait_for(lambda: http("GET", url_a)[0] == 200
                 and http("GET", url_a)[1]["ranks_connected"] == 4, 30, "ranks on the leader")
        new_map = [[(s + 1) % 8 if s < 8 else s % 8 for s in range(12)] for _ in range(4)]
        status, body = http("PUT", f"{url_a}/placement", {"physical_to_logical_map": new_map})
        assert status == 202, body
        wait_for(lambda: http("GET", url_a)[1]["rollout"]["state"] == "applied", 20, "rollout")
        time.sleep(1.0)
        a.proc.kill()
        killed = time.monotonic()
        wait_for(lambda: ready(b.http_url), 2 * lease_s + 1.5, "the follower to take over")
        took = time.monotonic() - killed
        assert took <= 2 * lease_s + 0.5, f"takeover took {took:.2f}s"
        summary = summary_of(sim)
        assert summary["flushed"] and summary["dropped_tokens"] == 0, summary
        final = http("GET", f"{b.http_url}/v1/deployments/rs")[1]
        assert final["tokens_total"] == summary["tokens_sent"]
        _, rollouts = http("GET", f"{b.http_url}/v1/deployments/rs/rollouts")
        assert [(r["version"], r["state"]) for r in rollouts["rollouts"]] == [(1, "applied")]
        assert summary["versions_seen"] == [0, 1]
    finally:
        if sim.poll() is None:
            sim.kill()
        proxy.close()
        b.terminate()


def test_rollout_in_flight_is_resumed_by_the_new_leader_not_repeated(
    serve_process, redis_server, raw_agent, http
):
    a = serve_process(*serve_flags(redis_server.url, "alpha"))

    b = start_replica(*serve_flags(redis_server.url, "beta"))
    try:
        agents = []
        for rank in range(R):
            agent = raw_agent(a.grpc_target)
            agent.hello(rank=rank, world_size=R, layers=L, experts=E, slots=P)
            agent.recv("settings")
            agents.append(agent)
        new_map = np.array([[3, 2, 1, 0, 3, 2], [0, 0, 1, 2, 3, 3]]).tolist()
        status, started = http("PUT", f"{a.http_url}/v1/deployments/dep/placement",
                               {"physical_to_logical_map": new_map})
        assert status == 202
        plan = agents[0].recv("plan").plan
        agents[0].ack_plan(plan, "ready")  # rank 1 never answers before the crash
        time.sleep(0.3)
        a.proc.kill()
        for agent in agents:
            assert agent.status()[0] == grpc.StatusCode.UNAVAILABLE
        wait_for(lambda: ready(b.http_url), 5, "the follower to take over")
        _, detail = http("GET", f"{b.http_url}/v1/deployments/dep")
        assert detail["rollout"]["id"] == started["rollout_id"]
        assert detail["rollout"]["state"] == "preparing"
        assert set(detail["rollout"]["ranks_ready"]) <= {0}  # READY is re-acked on reconnect
        again = []
        for rank, old in enumerate(agents):
            agent = raw_agent(b.grpc_target)
            agent.hello(rank=rank, world_size=R, layers=L, experts=E, slots=P,
                        incarnation=old.incarnation)
            replan = agent.recv("plan").plan  # the same rollout, sent again
            assert (replan.rollout_id, replan.version) == (plan.rollout_id, plan.version)
            again.append(agent)
        again[1].ack_plan(replan, "ready")
        for agent in again:
            agent.ack_plan(replan, "applied", step=40)
        wait_for(lambda: http("GET", f"{b.http_url}/v1/deployments/dep")[1]["rollout"]["state"]
                 == "applied", 10, "the resumed rollout to apply")
        _, rollouts = http("GET", f"{b.http_url}/v1/deployments/dep/rollouts")
        assert [r["id"] for r in rollouts["rollouts"]] == [started["rollout_id"]]
        _, detail = http("GET", f"{b.http_url}/v1/deployments/dep")
        assert detail["active_version"] == detail["latest_version"] == 1
    finally:
        b.terminate()
