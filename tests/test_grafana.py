"""The Grafana dashboard (deploy/grafana/eplb.json) loads as a dashboard, and every PromQL query in
it (and in deploy/prometheus/alerts.yaml) names only metrics the service exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from eplb_service.telemetry import exported_names

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "eplb.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels and strings out)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][\w:]*)\s*(\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_metric_name_parser():
    assert metric_names(
        'histogram_quantile(0.9, sum by (le, result) (rate(eplb_rollout_seconds_bucket'
        '{deployment=~"$deployment"}[$__rate_interval])))'
    ) == {"eplb_rollout_seconds_bucket"}
    assert metric_names("eplb_agents_connected == 0 or eplb_x > 120") == {
        "eplb_agents_connected", "eplb_x"
    }
    assert metric_names("max(eplb_leader) == 0 or absent(eplb_leader)") == {"eplb_leader"}


def walk_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(walk_panels(panel.get("panels", [])))
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_schema(dashboard):
    assert isinstance(dashboard["title"], str) and dashboard["title"]
    assert isinstance(dashboard["uid"], str) and re.fullmatch(r"[\w-]{1,40}", dashboard["uid"])
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 30
    assert {"from", "to"} <= set(dashboard["time"])
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    dep = variables["deployment"]
    assert dep["type"] == "query" and dep["multi"] and dep["includeAll"]
    assert metric_names(dep["definition"].replace("label_values(", "f(").split(",")[0] + ")") \
        <= exported_names()
    ids = set()
    panels = walk_panels(dashboard["panels"])
    for panel in panels:
        assert isinstance(panel["id"], int) and panel["id"] not in ids, panel.get("title")
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= set(grid) and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        assert panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "gauge", "heatmap", "table", "bargauge"}
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs)
        for target in panel["targets"]:
            assert target["expr"].strip()
            assert target["datasource"]["uid"] == "${datasource}"


def test_dashboard_covers_the_issue(dashboard):
    exprs = " ".join(
        t["expr"] for p in walk_panels(dashboard["panels"]) for t in p.get("targets", [])
    )
    for metric in (
        "eplb_balancedness", "eplb_predicted_balancedness", "eplb_balancedness_worst",
        "eplb_rebalances_total", "eplb_slots_moved_total", "eplb_bytes_moved_total",
        "eplb_rollouts_stalled", "eplb_agents_connected", "eplb_reports_received_total",
        "eplb_layer_balancedness",
    ):
        assert re.search(rf"\b{metric}\b", exprs), metric
    per_layer = [p for p in walk_panels(dashboard["panels"]) if p["type"] == "row"]
    assert any("per_layer_metrics" in row["title"] and row["collapsed"] for row in per_layer)
    # Every per-deployment query honours the $deployment variable.
    for panel in walk_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            if "deployment" in target["legendFormat"]:
                assert '$deployment' in target["expr"], target["expr"]


def test_every_query_names_an_exported_metric(dashboard):
    exported = exported_names()
    for panel in walk_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            names = metric_names(target["expr"])
            assert names, target["expr"]
            unknown = names - exported
            assert not unknown, f"{panel['title']}: {sorted(unknown)} not exported"


def test_alert_rules_name_exported_metrics():
    try:
        import yaml
    except ImportError:
        pytest.fail("pyyaml is missing; `make test` installs the dev extra")
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert {"EplbBalancednessLow", "EplbRolloutStalled", "EplbAgentsMissing", "EplbStoreDown"} \
        <= {r["alert"] for r in rules}
    for rule in rules:
        unknown = metric_names(rule["expr"]) - exported_names()
        assert not unknown, f"{rule['alert']}: {sorted(unknown)}"
