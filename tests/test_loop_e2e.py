"""The loop end to end over real sockets: ``eplb serve`` + simulated ranks (real agents).

The issue's acceptance test: 8 simulated ranks on a skewed load; a REST rebalance moves every
rank to the new version at one step and the window balancedness under the new placement rises
from < 0.7 to > 0.95; after forced disconnects of every agent, the service's ``tokens_total``
equals the simulator's ``tokens_sent`` exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from eplb_service.cli import main as eplb_main
from eplb_service.cli.simulate_agents import SimConfig, Simulation

REPO = Path(__file__).resolve().parent.parent
SERVE_FLAGS = ("--report-interval-s", "0.05", "--agreement-period-steps", "4",
               "--rollout-timeout-s", "20", "--log-level", "warning")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.02)


def get(http: Any, url: str) -> dict[str, Any]:
    status, body = http("GET", url)
    assert status == 200, body
    return dict(body)


def run_steps(sim: Simulation, steps: int, pause_s: float = 0.002) -> None:
    for _ in range(steps):
        sim.step()
        time.sleep(pause_s)  # let the clients' loop thread run


def test_rebalance_switches_every_rank_balances_the_load_and_counts_exactly_once(
    serve_process: Any, http: Any
) -> None:
    service = serve_process(*SERVE_FLAGS)
    deployment_url = f"{service.http_url}/v1/deployments/e2e"
    config = SimConfig(
        target=service.grpc_target, deployment="e2e", ranks=8, layers=4, experts=16, slots=24,
        skew="zipf:1.2", tokens_per_step=64, top_k=2, steps=1, seed=3,
    )
    sim = Simulation(config)
    try:
        run_steps(sim, 40)
        wait_for(lambda: get(http, deployment_url)["ranks_connected"] == 8, 20, "8 ranks")
        wait_for(lambda: get(http, deployment_url)["tokens_total"] > 0, 20, "first reports")
        before, _, tokens = sim.window_balance()
        assert tokens > 0 and before < 0.7, before
        assert get(http, deployment_url)["balancedness"]["mean"] < 0.7

        status, body = http("POST", f"{deployment_url}/rebalance", {})
        assert status == 202, body
        version = body["version"]
        deadline = time.monotonic() + 20
        while sim.active_version != version:
            assert time.monotonic() < deadline, "ranks did not switch"
            run_steps(sim, 1)
            # One map per step: lockstep ranks always agree on the active version.
            assert len({agent.active_version for agent in sim.agents}) == 1
        assert sim.stats.versions_seen == [0, version]

        run_steps(sim, 60)  # a window entirely under the new placement
        after, worst, _ = sim.window_balance()
        assert after > 0.95 and worst > 0.9, (after, worst)

        # Forced disconnects of every agent while load keeps flowing.
        for _ in range(3):
            for agent in sim.agents:
                agent.client.disconnect()
            run_steps(sim, 15)
            wait_for(lambda: all(a.stats().client.connected for a in sim.agents), 20,
                     "every agent reconnected")
        assert sim.flush(20.0), "not every delta was acknowledged"
    finally:
        sim.close()

    stats = [agent.stats() for agent in sim.agents]
    assert all(s.client.connects >= 4 for s in stats)
    assert all(s.client.dropped_tokens == 0 for s in stats)
    summary = get(http, deployment_url)
    assert summary["active_version"] == version
    assert summary["balancedness"]["mean"] > 0.95
    assert summary["tokens_total"] == sim.stats.tokens_sent  # exactly once
    rollout = get(http, f"{deployment_url}/rollouts/{body['rollout_id']}")
    assert rollout["state"] == "applied" and rollout["ranks_applied"] == list(range(8))
    assert rollout["switch_step"] == sim.stats.switch_steps[0]


@pytest.mark.slow
def test_simulate_agents_cli_prints_one_json_summary(serve_process: Any, http: Any) -> None:
    service = serve_process(*SERVE_FLAGS)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from eplb_service.cli import main; sys.exit(main())",
         "simulate-agents",
         "--target", service.grpc_target, "--deployment", "cli", "--ranks", "4",
         "--layers", "3", "--experts", "8", "--slots", "12", "--nodes", "2",
         "--skew", "lognormal:1.0", "--tokens-per-step", "32", "--top-k", "2",
         "--steps", "80", "--print-interval", "0.2", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["steps"] == 80 and summary["flushed"] is True
    assert summary["tokens_sent"] == 80 * 4 * 3 * 32 * 2
    assert "balancedness" in proc.stderr  # progress goes to stderr in --json mode
    total = get(http, f"{service.http_url}/v1/deployments/cli")["tokens_total"]
    assert total == summary["tokens_sent"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--slots", "30"], "divisible by --ranks"),
        (["--slots", "8"], "must be >= --experts"),
        (["--nodes", "3"], "divisible by --nodes"),
        (["--top-k", "17"], "--top-k"),
        (["--skew", "pareto:2"], "unknown kind"),
        (["--skew", "zipf:-1"], "must be > 0"),
        (["--target", "no-port"], "HOST:PORT"),
        (["--deployment", "bad name"], "--deployment"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_simulate_agents_refuses_bad_flags(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = {"--target": "127.0.0.1:1", "--deployment": "d", "--ranks": "8", "--layers": "2",
            "--experts": "16", "--slots": "24"}
    for key, value in zip(flags[::2], flags[1::2], strict=True):
        args[key] = value
    argv = ["simulate-agents", *[x for kv in args.items() for x in kv]]
    assert eplb_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_simulate_agents_parse_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        eplb_main(["simulate-agents", "--target", "h:1", "--deployment", "d", "--ranks", "x"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_simulate_agents_module_imports_without_torch() -> None:
    code = ("import sys, eplb_service.cli.simulate_agents; "
            "print('torch' in sys.modules, 'grpc' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr
