"""Smoke test of benchmarks/planner.py: the quick run works and its numbers are sane."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import planner

ROOT = Path(__file__).resolve().parent.parent
STATIC_HEAD = [
    "config",
    "workload",
    "policy",
    "ms",
    "runs",
    "ref/this",
    "bal mean",
    "bal worst",
    "max/LB",
    "= ref",
]
SEQUENCE_HEAD = [
    "config",
    "workload",
    "policy",
    "ms",
    "ref/this",
    "rewritten",
    "x-node",
    "GB",
    "planned bal",
    "next bal mean",
    "next bal worst",
    "vs None planned / next",
    "= ref",
]


def _tables(markdown: str) -> list[list[dict[str, str]]]:
    """Markdown tables of the output, each as a list of {column: cell} rows."""
    tables: list[list[dict[str, str]]] = []
    head: list[str] | None = None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            head = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if head is None:
            head = cells
            tables.append([])
        elif set(line) <= {"|", "-"}:
            continue
        else:
            tables[-1].append(dict(zip(head, cells, strict=True)))
    return tables


@pytest.mark.slow
def test_quick_run_in_a_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "planner.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Command: `.venv/bin/python benchmarks/planner.py --quick`" in out
    static, seqs = _tables(out)
    assert list(static[0]) == STATIC_HEAD
    assert list(seqs[0]) == SEQUENCE_HEAD
    policies = {row["policy"] for row in static}
    assert {"deepseek-reference", "deepseek"} <= policies
    assert {(r["config"], r["workload"]) for r in static} == {
        (c, w) for c in planner.QUICK_CONFIGS for w in ("zipf 1.0", "hot 5-20x")
    }
    for row in static + seqs:
        assert float(row["ms"]) > 0
        bal_mean = float(row["bal mean" if "bal mean" in row else "next bal mean"])
        bal_worst = float(row["bal worst" if "bal worst" in row else "next bal worst"])
        assert 0 < bal_worst <= bal_mean <= 1
        if row["policy"] == "deepseek-reference":
            assert row["ref/this"] == "" and row["= ref"] == ""
        else:
            assert float(row["ref/this"].rstrip("x")) > 0
        if row["policy"] == "deepseek":
            assert float(row["ref/this"].rstrip("x")) > 1  # faster than the loop version
            assert row["= ref"] == "yes"  # exact drop-in
    for row in static:
        assert float(row["max/LB"]) >= 0.999
        assert 1 <= int(row["runs"]) <= 3
    for row in seqs:
        assert 0 <= float(row["rewritten"].rstrip("%")) <= 100
        assert float(row["GB"]) >= 0
        assert row["x-node"] == "0"  # the quick configs are single-node


def test_json_output_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--quick",
        "--json",
        "--configs",
        "Mixtral EP8",
        "--workloads",
        "uniform",
        "drift",
        "--windows",
        "3",
        "--repeats",
        "2",
        "--tokens",
        "10000",
    ]
    assert planner.main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"meta", "static", "sequences"}
    assert doc["meta"]["windows"] == 3 and doc["meta"]["tokens"] == 10000
    assert [r["workload"] for r in doc["static"]] == ["uniform"] * len(doc["static"])
    assert {r["policy"] for r in doc["sequences"]} >= {"deepseek-reference", "deepseek"}
    for row in doc["sequences"]:
        assert row["plans"] == 2  # windows 0 and 1 are planned; 1 and 2 judge them
        assert 0 <= row["rewritten"] <= 1
    for row in doc["static"]:
        assert row["runs"] <= 2
        assert set(row) == {
            "config",
            "workload",
            "policy",
            "time_ms",
            "runs",
            "speedup",
            "balancedness_mean",
            "balancedness_worst",
            "max_over_lb",
            "same_as_reference",
        }


def test_every_registered_policy_is_benchmarked() -> None:
    from eplb_service.policy import POLICIES

    policies = planner.all_policies()
    assert [p.name for p in policies[:2]] == ["deepseek-reference", "deepseek"]
    # Every registered name is benchmarked; aliases of one function run once ("a (= b)").
    assert len(policies) == 1 + len({id(fn) for fn in POLICIES.values()})
    for name in POLICIES:
        assert any(name in (p.key, *p.name.split()) or f"{name})" in p.name for p in policies)
    assert [p.name for p in planner.all_policies(["deepseek"])] == ["deepseek"]


def test_configs_are_valid_topologies() -> None:
    for config in planner.CONFIGS:
        topology = config.topology
        assert config.experts % config.groups == 0
        assert topology.num_slots % topology.num_ranks == 0
    names = {c.name for c in planner.CONFIGS}
    assert set(planner.QUICK_CONFIGS) <= names
    ep144 = next(c for c in planner.CONFIGS if "EP144" in c.name)
    assert ep144.slots // ep144.ranks == 2
