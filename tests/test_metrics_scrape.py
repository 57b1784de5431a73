"""Metrics on a live service: ``promtool check metrics`` on a scrape, a real Prometheus server
scraping the service over loopback, the issue-8 metrics (stalled rollouts, window age, per-layer
series only behind the setting, never per-expert labels), the per-expert REST endpoint, the alert
rules (``promtool check rules``) and the README metrics table.

promtool and prometheus come from Debian's ``prometheus`` package, which ``make test`` installs;
without them these tests fail (never skip) saying so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from eplb_service.telemetry import REBALANCE_RESULTS, exported_names, metrics_table
from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent
L, E, P, R = 2, 4, 6, 2
SKEWED = np.array([[50, 1, 1, 1, 1, 1], [1, 30, 1, 1, 1, 1]], dtype=np.int64)
ALLOWED_LABELS = {"deployment", "reason", "result", "policy", "transport", "layer", "le"}


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is missing: `make test` installs Debian's `prometheus` package "
            "(apt-get install prometheus), which ships promtool and prometheus"
        )
    return path


def fetch(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


def feed(raw_agent, target: str, deployment: str = "demo", reports: int = 3) -> list:
    """Both ranks of a small deployment connect and send skewed reports (acknowledged)."""
    agents = []
    for rank in range(R):
        agent = raw_agent(target)
        agent.hello(deployment, rank=rank, world_size=R, layers=L, experts=E, slots=P)
        agent.recv("settings")
        for _ in range(reports):
            seq = agent.report(SKEWED)
            assert agent.recv("ack").ack.sequence == seq
        agents.append(agent)
    return agents


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        assert m, line
        labels = dict(re.findall(r'(\w+)="((?:\\.|[^"\\])*)"', m.group(2) or ""))
        out.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    for got, v in samples(text).get(name, []):
        if all(got.get(k) == x for k, x in labels.items()):
            return v
    return None


def test_promtool_checks_a_live_scrape(serve_process, raw_agent):
    promtool = binary("promtool")
    proc = serve_process("--per-layer-metrics", "true", "--window-s", "30")
    feed(raw_agent, proc.grpc_target)
    text = fetch(f"{proc.http_url}/metrics")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Everything the issue lists, on the wire.
    for name in (
        "eplb_balancedness", "eplb_balancedness_worst", "eplb_imbalance_ratio",
        "eplb_agents_connected", "eplb_reports_received_total", "eplb_reports_rejected_total",
        "eplb_last_report_age_seconds", "eplb_window_age_seconds", "eplb_rollouts_stalled",
        "eplb_rollout_age_seconds", "eplb_report_ingest_seconds_count",
        "eplb_rank_silence_max_seconds", "eplb_window_tokens", "eplb_layer_balancedness",
        "eplb_slots_moved_total", "eplb_bytes_moved_total",
    ):
        assert name in samples(text), name
    for result_label in REBALANCE_RESULTS:
        assert value(text, "eplb_rebalances_total", deployment="demo", result=result_label) == 0
    assert value(text, "eplb_report_ingest_seconds_count") == 2 * 3
    assert value(text, "eplb_agents_connected", deployment="demo") == 2
    assert 0 < value(text, "eplb_window_age_seconds", deployment="demo") <= 30
    assert value(text, "eplb_rollouts_stalled", deployment="demo") == 0
    assert value(text, "eplb_layer_balancedness", deployment="demo", layer="1") is not None
    # Bounded label vocabulary: never a per-expert or per-rank label.
    for name, series in samples(text).items():
        for labels, _ in series:
            assert set(labels) <= ALLOWED_LABELS, (name, labels)
    # Every series is one the telemetry module declares (dashboards and alerts rely on it).
    assert set(samples(text)) <= exported_names() | {
        n for n in samples(text) if n.startswith(("python_", "process_"))
    }


def test_prometheus_server_scrapes_the_service(serve_process, raw_agent, tmp_path):
    prometheus = binary("prometheus")
    proc = serve_process()
    feed(raw_agent, proc.grpc_target)
    web_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: eplb\n"
        "    scrape_interval: 1s\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{proc.http_port}']}}]\n"
        f"rule_files: ['{REPO / 'deploy' / 'prometheus' / 'alerts.yaml'}']\n"
    )
    server = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web_port}", "--log.level=warn"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        api = f"http://127.0.0.1:{web_port}/api/v1"
        query = urllib.parse.quote('eplb_balancedness{deployment="demo"}')
        deadline = time.monotonic() + 40
        result: list = []
        while time.monotonic() < deadline and not result:
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            try:
                body = json.loads(fetch(f"{api}/query?query={query}", timeout=2))
                result = body["data"]["result"] if body["status"] == "success" else []
            except OSError:
                pass
            if not result:
                time.sleep(0.5)
        assert result, "Prometheus never returned eplb_balancedness for the demo deployment"
        (series,) = result
        assert series["metric"]["job"] == "eplb" and series["metric"]["deployment"] == "demo"
        assert 0 < float(series["value"][1]) <= 1
        targets = json.loads(fetch(f"{api}/targets"))["data"]["activeTargets"]
        assert targets[0]["health"] == "up"
        rules = json.loads(fetch(f"{api}/rules"))["data"]["groups"]
        assert rules and all(r["health"] != "err" for g in rules for r in g["rules"])
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


def test_alert_rules_pass_promtool():
    result = subprocess.run(
        [binary("promtool"), "check", "rules", str(REPO / "deploy" / "prometheus" / "alerts.yaml")],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_per_layer_series_only_behind_the_setting(service_factory, raw_agent, http):
    service = service_factory()
    feed(raw_agent, service.grpc_target)
    _, text = http("GET", f"{service.http_url}/metrics")
    assert "eplb_layer_balancedness{" not in text
    assert value(text, "eplb_balancedness", deployment="demo") is not None


def test_stalled_rollout_and_rollout_age(service_factory, raw_agent, http):
    service = service_factory(rollout_timeout_s=1.0)
    agents = feed(raw_agent, service.grpc_target)
    swapped = [[1, 0, 2, 3, 1, 0], [0, 1, 2, 3, 0, 1]]
    status, body = http(
        "PUT", f"{service.http_url}/v1/deployments/demo/placement",
        {"physical_to_logical_map": swapped},
    )
    assert status == 202, body
    _, text = http("GET", f"{service.http_url}/metrics")
    assert value(text, "eplb_rollouts_stalled", deployment="demo") == 0
    time.sleep(0.6)  # past half the timeout, nobody acknowledged the plan
    _, text = http("GET", f"{service.http_url}/metrics")
    assert value(text, "eplb_rollouts_stalled", deployment="demo") == 1
    assert value(text, "eplb_rollout_age_seconds", deployment="demo") >= 0.5
    deadline = time.monotonic() + 5  # the timeout cancels it: no longer stalled
    while time.monotonic() < deadline:
        _, text = http("GET", f"{service.http_url}/metrics")
        if value(text, "eplb_rebalances_total", deployment="demo", result="cancelled") == 1:
            break
        time.sleep(0.1)
    assert value(text, "eplb_rollouts_stalled", deployment="demo") == 0
    assert value(text, "eplb_rollout_age_seconds", deployment="demo") == 0
    del agents


def test_experts_endpoint(service_factory, raw_agent, http):
    service = service_factory()
    feed(raw_agent, service.grpc_target, reports=1)
    status, body = http("GET", f"{service.http_url}/v1/deployments/demo/experts")
    assert status == 200, body
    assert body["layers"] == [0, 1] and body["active_version"] == 0
    # identity placement: slots 0..5 -> experts 0 1 2 3 0 1; both ranks sent SKEWED once
    expected = np.zeros((L, E), dtype=np.int64)
    for slot in range(P):
        expected[:, slot % E] += 2 * SKEWED[:, slot]
    assert body["load"] == expected.tolist()
    assert body["replicas"] == [[2, 2, 1, 1], [2, 2, 1, 1]]
    assert body["slots"][0] == [[0, 4], [1, 5], [2], [3]]
    assert body["load_per_replica"][0][0] == pytest.approx(expected[0, 0] / 2)
    assert len(body["balancedness_per_layer"]) == L
    status, one = http("GET", f"{service.http_url}/v1/deployments/demo/experts?layer=1")
    assert status == 200 and one["layers"] == [1] and one["load"] == [expected[1].tolist()]
    status, bad = http("GET", f"{service.http_url}/v1/deployments/demo/experts?layer=2")
    assert status == 422 and "layer" in bad["detail"]
    status, _ = http("GET", f"{service.http_url}/v1/deployments/nope/experts")
    assert status == 404


def test_metrics_table_lists_every_metric():
    table = metrics_table()
    rows = [line for line in table.splitlines()[2:]]
    names = {re.match(r"\| `([^`]+)`", row).group(1) for row in rows}  # type: ignore[union-attr]
    base = {n for n in exported_names() if not n.endswith(("_created", "_bucket", "_count",
                                                             "_sum"))}
    histograms = {n[: -len("_bucket")] for n in exported_names() if n.endswith("_bucket")}
    assert names == base | histograms
    for row in rows:
        assert row.count("|") == 5 and not row.endswith("|  |"), row
    # The README carries this table verbatim: tests/test_readme.py checks it.
