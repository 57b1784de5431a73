"""``eplb serve`` as a subprocess: flags, environment, config file, errors, graceful SIGTERM."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from eplb_service.config import FIELDS, env_var

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30):
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", "import sys; from eplb_service.cli import main; sys.exit(main())",
         *args],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def test_serve_flags_env_config_and_sigterm(serve_process, raw_agent, http, tmp_path):
    config = tmp_path / "eplb.json"
    config.write_text(json.dumps({"agreement_period_steps": 3, "report_interval_s": 9}))
    proc = serve_process(
        "--config", str(config), "--layers-per-step", "2", "--shutdown-grace-s", "1",
        env={"EPLB_REPORT_INTERVAL_S": "0.1"},
    )
    agent = raw_agent(proc.grpc_target)
    agent.hello(world_size=1, layers=1, experts=2, slots=2)
    settings = agent.recv("settings").settings
    assert settings.report_interval_s == pytest.approx(0.1)  # env beats the file
    assert settings.agreement_period_steps == 3  # from the file
    assert settings.layers_per_step == 2  # flag
    agent.report([[5, 6]])
    assert agent.recv("ack").ack.sequence == 1
    status, detail = http("GET", f"{proc.http_url}/v1/deployments/dep")
    assert status == 200 and detail["tokens_total"] == 11
    assert proc.terminate() == 0
    code, details = agent.status()
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in details


def test_bad_setting_exits_2_with_one_line():
    result = run_cli("serve", "--window-s", "-3")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["eplb serve: error: window_s must be > 0, got -3.0 (from flag --window-s)"]
    result = run_cli("serve", env={"EPLB_POLICY": "nope"})
    assert result.returncode == 2
    assert "policy must be one of" in result.stderr and "EPLB_POLICY" in result.stderr


@pytest.mark.parametrize("which", ["--http-port", "--grpc-port"])
def test_port_in_use_exits_1(which):
    other = "--grpc-port" if which == "--http-port" else "--http-port"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_cli("serve", which, str(port), other, "0")
    assert result.returncode == 1
    assert "eplb serve: error:" in result.stderr
    assert str(port) in result.stderr or "Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_documents_every_flag_and_env_var():
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for f in FIELDS:
        if f.metadata["cli"]:
            assert f"--{f.name.replace('_', '-')}" in text
        else:  # secrets (the bearer token) are never a flag
            assert f"--{f.name.replace('_', '-')} " not in text
        assert env_var(f.name) in text
    assert "--config" in text and "EPLB_CONFIG" in text
