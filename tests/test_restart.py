"""Kill -9 and restart of ``eplb serve`` on the same Redis, under load from
``eplb simulate-agents`` (a subprocess): nothing acknowledged is lost or counted twice, history
and the active version are back, and the agents reconnect by themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def simulate(target: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from eplb_service.cli import main; sys.exit(main())",
         "simulate-agents", "--target", target, "--json", "--print-interval", "5", *args],
        cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )


def summary_of(proc: subprocess.Popen[str], timeout: float = 90) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"simulate-agents printed no summary (exit {proc.returncode}): {out[-2000:]}"
    return dict(json.loads(lines[-1]))


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def serve_flags(redis_url: str, replica: str, *extra: str) -> tuple[str, ...]:
    return ("--store", redis_url, "--lease-s", "1", "--replica-id", replica,
            "--report-interval-s", "0.05", "--agreement-period-steps", "4",
            "--rollout-timeout-s", "20", "--log-level", "warning", *extra)


SIM_ARGS = ("--deployment", "rs", "--ranks", "4", "--layers", "4", "--experts", "8",
            "--slots", "12", "--tokens-per-step", "32", "--top-k", "2", "--step-interval", "0.01",
            "--flush-timeout", "40")


@pytest.mark.slow
def test_kill_9_and_restart_under_load(serve_process, redis_server, http):
    flags = serve_flags(redis_server.url, "svc")
    service = serve_process(*flags)
    url = f"{service.http_url}/v1/deployments/rs"
    sim = simulate(service.grpc_target, *SIM_ARGS, "--duration", "8")
    try:
        wait_for(lambda: http("GET", url)[0] == 200 and http("GET", url)[1]["ranks_connected"] == 4
                 and http("GET", url)[1]["tokens_total"] > 0, 30, "the simulated ranks")
        # History before the crash: one applied rollout (a permutation of the identity map).
        new_map = [[(s + 1) % 8 if s < 8 else s % 8 for s in range(12)] for _ in range(4)]
        status, body = http("PUT", f"{url}/placement", {"physical_to_logical_map": new_map})
        assert status == 202, body
        wait_for(lambda: http("GET", url)[1]["rollout"]["state"] == "applied", 20, "the rollout")
        time.sleep(1.0)
        before = http("GET", url)[1]
        service.proc.kill()  # kill -9: no graceful anything
        service.proc.wait(10)
        time.sleep(0.5)
        restarted = serve_process(*flags, grpc_port=service.grpc_port, http_port=service.http_port)
        status, after = http("GET", url)
        assert status == 200, after
        assert after["active_version"] == before["active_version"] == 1
        assert after["latest_version"] == 1
        assert after["tokens_total"] >= before["tokens_total"]  # acked ones are all there
        assert after["window_tokens"] > 0  # the window came back from its snapshot
        _, rollouts = http("GET", f"{url}/rollouts")
        assert [r["state"] for r in rollouts["rollouts"]] == ["applied"]
        _, placement = http("GET", f"{url}/placement")
        assert placement["physical_to_logical_map"] == new_map
        summary = summary_of(sim)
    finally:
        if sim.poll() is None:
            sim.kill()
    assert summary["flushed"], summary
    assert summary["reconnects"] >= 4, summary  # every rank reconnected by itself
    assert summary["dropped_tokens"] == 0
    final = http("GET", url)[1]
    assert final["tokens_total"] == summary["tokens_sent"] == summary["tokens_acked"]
    assert summary["active_version"] == 1
    assert restarted.terminate() == 0
