"""Safe switch and weight migration end to end: ``eplb serve`` + the real 4-rank engine, each rank
an ``EplbAgent`` with a ``MigratingSwitcher`` (:class:`eplb_engine.served.ServedAgents`).

The engine compares every step's outputs with the dense single-process computation, so "no rank
ever routes to a half-moved layer" is checked at every step, transitions included.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eplb_engine import EngineRun, MoEConfig, random_placement, run_engine
from eplb_engine.served import Faults, ServedAgents

RANKS, LAYERS, EXPERTS, SLOTS = 4, 3, 8, 12
CONFIG = MoEConfig(num_layers=LAYERS, num_experts=EXPERTS, skew=1.2, seed=5)
TOL = 1e-5
DEPLOYMENT = "e2e"


def serve_flags(*extra: str) -> tuple[str, ...]:
    return ("--report-interval-s", "0.1", "--agreement-period-steps", "2",
            "--log-level", "warning", "--shutdown-grace-s", "1", *extra)


class Driver:
    """REST actions against one deployment, run on a thread while the engine runs."""

    def __init__(self, http: Any, http_url: str) -> None:
        self.http = http
        self.url = f"{http_url}/v1/deployments/{DEPLOYMENT}"

    def get(self, suffix: str = "") -> dict[str, Any]:
        status, body = self.http("GET", self.url + suffix)
        assert status == 200, body
        return dict(body)

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
            time.sleep(0.05)

    def connected(self) -> None:
        def ok() -> bool:
            status, body = self.http("GET", self.url)
            return status == 200 and body["ranks_connected"] == RANKS
        self.wait(ok, 30, "every rank connected")

    def finished(self, rollout_id: str, timeout: float = 30) -> dict[str, Any]:
        self.wait(lambda: self.get(f"/rollouts/{rollout_id}")["state"]
                  not in ("preparing", "committed"), timeout, f"rollout {rollout_id}")
        return self.get(f"/rollouts/{rollout_id}")

    def put(self, phy2log: np.ndarray) -> str:
        status, body = self.http("PUT", f"{self.url}/placement",
                                 {"physical_to_logical_map": phy2log.tolist()})
        assert status == 202, body
        return str(body["rollout_id"])

    def rebalance(self) -> str:
        status, body = self.http("POST", f"{self.url}/rebalance", {})
        assert status == 202, body
        return str(body["rollout_id"])


def drive(
    service: Any, http: Any, tmp_path: Path, script: Callable[[Driver], Any],
    faults: Faults | None = None, timeout_s: float = 150,
) -> tuple[EngineRun, Any]:
    """Run the engine (main thread) until ``script(driver)`` (a thread) returns; its result."""
    stop = tmp_path / "stop"
    driver = Driver(http, service.http_url)
    outcome: dict[str, Any] = {}

    def run_script() -> None:
        try:
            outcome["value"] = script(driver)
        except BaseException as exc:  # re-raised on the main thread
            outcome["error"] = exc
        finally:
            stop.touch()

    hooks = ServedAgents(service.grpc_target, DEPLOYMENT, period_steps=2, timeout_s=20.0,
                         step_interval_s=0.01, stop_path=os.fspath(stop), faults=faults)
    thread = threading.Thread(target=run_script, daemon=True)
    thread.start()
    try:
        run = run_engine(RANKS, 100_000, config=CONFIG, hooks=hooks, num_slots=SLOTS,
                         tokens_per_step=24, timeout_s=timeout_s)
    finally:
        stop.touch()
        thread.join(10)
    if "error" in outcome:
        raise outcome["error"]
    return run, outcome.get("value")


def versions_per_rank(run: EngineRun) -> list[list[int]]:
    return [[s.version for s in r.steps] for r in run.ranks]


def assert_exact_every_step(run: EngineRun) -> None:
    errors = [s.rel_error for s in run.ranks[0].steps]
    assert errors and all(e is not None and e <= TOL for e in errors), max(
        e for e in errors if e is not None)
    assert all(r.weights_ok for r in run.ranks)
    per_rank = versions_per_rank(run)
    assert all(v == per_rank[0] for v in per_rank)  # one map per step


@pytest.mark.slow
def test_outputs_equal_dense_before_and_after_service_rebalances(
    serve_process: Any, http: Any, tmp_path: Path
) -> None:
    service = serve_process(*serve_flags("--layers-per-step", "1", "--rollout-timeout-s", "20"))
    rng = np.random.default_rng(1)

    def script(d: Driver) -> list[dict[str, Any]]:
        d.connected()
        d.wait(lambda: d.get()["tokens_total"] > 0, 20, "load reports")
        done = [d.finished(d.rebalance())]                         # the planner's map
        done.append(d.finished(d.put(random_placement(rng, LAYERS, EXPERTS, SLOTS))))
        done.append(d.finished(d.put(random_placement(rng, LAYERS, EXPERTS, SLOTS))))
        d.wait(lambda: d.get()["tokens_total"] > 0, 5, "reports")
        done.append(d.finished(d.rebalance()))                     # back to a balanced map
        time.sleep(0.5)  # a few steps on the last map
        return done

    run, rollouts = drive(service, http, tmp_path, script)
    assert [r["state"] for r in rollouts] == ["applied"] * 4, rollouts
    assert all(r["bytes_moved"] > 0 for r in rollouts)  # migration stats in APPLIED acks
    assert_exact_every_step(run)
    steps = run.ranks[0].steps
    assert sorted({s.version for s in steps}) == [0, 1, 2, 3, 4]
    for version in range(5):  # outputs checked on every map, before and after each switch
        assert sum(1 for s in steps if s.version == version and s.rel_error is not None) >= 2
    for rank in run.ranks:
        switches = rank.extra["switches"]
        assert [s["version"] for s in switches] == [1, 2, 3, 4]
        assert all(s["error"] is None and s["stats"]["steps"] >= 1 for s in switches)
    # The service's byte count is the sum of what the ranks report.
    engine_bytes = [sum(r.extra["switches"][i]["stats"]["bytes_moved"] for r in run.ranks)
                    for i in range(4)]
    assert engine_bytes == [r["bytes_moved"] for r in rollouts]


@pytest.mark.slow
def test_one_map_per_step_through_20_rollouts_with_delayed_plans_and_acks(
    serve_process: Any, http: Any, tmp_path: Path
) -> None:
    service = serve_process(*serve_flags("--layers-per-step", "1", "--rollout-timeout-s", "20"))
    rng = np.random.default_rng(2)
    maps = [random_placement(rng, LAYERS, EXPERTS, SLOTS) for _ in range(20)]
    faults = Faults(delay_ranks=(1, 3), max_delay_s=0.15, seed=7)

    def script(d: Driver) -> list[dict[str, Any]]:
        d.connected()
        return [d.finished(d.put(m)) for m in maps]

    run, rollouts = drive(service, http, tmp_path, script, faults=faults, timeout_s=200)
    assert [r["state"] for r in rollouts] == ["applied"] * 20, [
        (r["state"], r["reason"]) for r in rollouts]
    assert_exact_every_step(run)
    versions = versions_per_rank(run)[0]
    assert versions == sorted(versions) and sorted(set(versions)) == list(range(21))
    switch_steps = [[(s["step"], s["version"]) for s in r.extra["switches"]] for r in run.ranks]
    assert all(s == switch_steps[0] for s in switch_steps) and len(switch_steps[0]) == 20
    assert all(r.extra["active_version"] == 20 for r in run.ranks)


@pytest.mark.slow
def test_a_rank_that_never_becomes_ready_holds_everyone_back_and_the_rollout_is_cancelled(
    serve_process: Any, http: Any, tmp_path: Path
) -> None:
    service = serve_process(*serve_flags("--rollout-timeout-s", "2"))
    phy2log = random_placement(np.random.default_rng(3), LAYERS, EXPERTS, SLOTS)

    def script(d: Driver) -> dict[str, Any]:
        d.connected()
        rollout = d.finished(d.put(phy2log), timeout=15)
        time.sleep(0.5)  # the ranks go on after the cancel
        return rollout

    run, rollout = drive(service, http, tmp_path, script, faults=Faults(stall_rank=2))
    assert rollout["state"] == "cancelled", rollout
    assert "READY from ranks [2]" in rollout["reason"], rollout["reason"]
    assert rollout["ranks_ready"] == [0, 1, 3] and rollout["ranks_applied"] == []
    assert_exact_every_step(run)
    assert all(v == 0 for v in versions_per_rank(run)[0])  # nobody switched
    assert all(r.extra["switches"] == [] and r.extra["active_version"] == 0 for r in run.ranks)
    assert all(r.extra["agent"]["mismatches"] == 0 for r in run.ranks)


@pytest.mark.slow
def test_a_transfer_failure_on_one_rank_rolls_back_everywhere_and_fails_the_rollout(
    serve_process: Any, http: Any, tmp_path: Path
) -> None:
    service = serve_process(*serve_flags("--layers-per-step", "1", "--rollout-timeout-s", "20"))
    rng = np.random.default_rng(4)
    # Every layer changes, so layers 0 and 1 are moved and switched before layer 2 fails.
    first = random_placement(rng, LAYERS, EXPERTS, SLOTS)
    while (first == np.tile(np.arange(SLOTS) % EXPERTS, (LAYERS, 1))).all(axis=1).any():
        first = random_placement(rng, LAYERS, EXPERTS, SLOTS)
    second = random_placement(rng, LAYERS, EXPERTS, SLOTS)
    faults = Faults(fail_rank=1, fail_versions=(1,), fail_layer=LAYERS - 1)

    def script(d: Driver) -> list[dict[str, Any]]:
        d.connected()
        failed = d.finished(d.put(first))
        applied = d.finished(d.put(second))  # the group recovers: the next rollout goes through
        time.sleep(0.3)
        return [failed, applied]

    run, (failed, applied) = drive(service, http, tmp_path, script, faults=faults)
    assert failed["state"] == "failed" and "rank" in failed["reason"], failed
    assert applied["state"] == "applied" and applied["version"] == 2, applied
    assert_exact_every_step(run)  # never routed to a half-moved layer, rollback included
    versions = versions_per_rank(run)[0]
    assert 1 not in versions and versions[0] == 0 and versions[-1] == 2
    for rank in run.ranks:
        bad, good = rank.extra["switches"]
        assert bad["version"] == 1 and bad["error"] and good == {**good, "version": 2,
                                                                 "error": None}
        assert bad["stats"]["rolled_back"] == LAYERS - 1  # the two switched layers went back
    reasons = [r.extra["switches"][0]["error"] for r in run.ranks]
    assert ["injected" in reason for reason in reasons] == [False, True, False, False]
