"""Smoke test of benchmarks/migration.py: a tiny gloo run works and its figures add up."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import migration


def test_quick_run_reports_both_tables(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    md = tmp_path / "m.md"
    args = ["--quick", "--hidden", "64", "--ffn", "32", "--iters", "2", "--warmup", "1",
            "--json", str(out), "--markdown", str(md)]
    assert migration.main(args) == 0
    res = json.loads(out.read_text())
    assert res["backend"] == "gloo" and res["world_size"] == 2
    assert res["expert_bytes"] == 3 * 64 * 32
    assert [r["moves"] for r in res["throughput"]] == [1, 4]
    for row in res["throughput"]:
        assert row["mib_each_way"] * migration.MiB == row["moves"] * res["expert_bytes"]
        for key in ("plain_ms", "layer_ms", "layer_prepared_ms", "migrate_all_ms",
                    "migrate_all_prepared_ms"):
            assert row[key] > 0, key
        assert abs(row["layer_ratio"] - row["plain_ms"] / row["layer_ms"]) < 1e-9
    steps = {r["layers_per_step"]: r["steps"] for r in res["pause"]}
    # 4 layers: a preparation step, then all at once or one per step
    assert steps == {0: 2, 1: 5}
    for row in res["pause"]:
        assert row["transfers"] > 0 and row["mib_received_rank"] > 0
        assert 0 < row["prepare_ms"] <= row["max_pause_ms"] <= row["total_ms"] + 1e-9
        assert abs(row["prepare_ms"] + row["move_ms"] - row["total_ms"]) < 0.05 * row["total_ms"]
        assert row["plain_ms"] > 0 and row["ratio"] > 0
        assert row["move_ratio"] > row["ratio"]
    text = md.read_text()
    assert "prepared ms" in text and "longest pause ms" in text and "move ratio" in text
