"""`eplb plan`: every input format, outputs, --json, migration from CUR, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eplb_service.balance import evaluate
from eplb_service.cli.plan import DEFAULT_POLICY
from eplb_service.loadfile import read_placement
from eplb_service.placement import Placement, Topology
from eplb_service.policy import rebalance_experts
from eplb_service.workloads import SAMPLE_PATH, zipf
from tests.helpers import run_plan_cli

LOAD = zipf(4, 16, 3, exponent=1.2, tokens=50_000)  # [4, 16]
SIZES = ["--num-slots", "24", "--num-ranks", "4", "--num-nodes", "2", "--num-groups", "4"]
TOPO = Topology(num_layers=4, num_experts=16, num_slots=24, num_ranks=4, num_nodes=2)
EXPECTED = rebalance_experts(LOAD, 24, 4, 2, 4, policy=DEFAULT_POLICY)[0]  # phy2log [4, 24]
# Tests of exact migration counts pin the deepseek policy: it ignores CUR and is deterministic.
DEEPSEEK = ["--policy", "deepseek"]
DEEPSEEK_PLAN = rebalance_experts(LOAD, 24, 4, 2, 4, policy="deepseek")[0]
REPORT_KEYS = {
    "load",
    "layers",
    "experts",
    "slots",
    "ranks",
    "nodes",
    "groups",
    "policy",
    "current",
    "before_placement",
    "before",
    "after",
    "migration",
    "time_ms",
    "out",
    "changed",
    "reason",
    "strategy",
    "strategy_reason",
}
BALANCE_KEYS = {
    "balancedness_mean",
    "balancedness_worst",
    "worst_layer",
    "imbalance_mean",
    "imbalance_max",
    "max_over_lower_bound",
}
MIGRATION_KEYS = {
    "slots_total",
    "slots_changed",
    "fraction_changed",
    "local_copies",
    "intra_node_transfers",
    "cross_node_transfers",
    "transfers",
    "bytes_moved",
    "cross_node_bytes",
}


def plan_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    code, out, err = run_plan_cli(capsys, *argv, "--json")
    assert code == 0, err
    assert err == ""
    assert len(out.strip().splitlines()) == 1  # ONE JSON object
    return json.loads(out)


@pytest.fixture
def load_npy(tmp_path: Path) -> Path:
    path = tmp_path / "load.npy"
    np.save(path, LOAD)
    return path


# --- formats ---------------------------------------------------------------------------------


def _write_load(tmp_path: Path, fmt: str) -> Path:
    if fmt == "npy":
        np.save(tmp_path / "l.npy", LOAD.astype(np.int64))
        return tmp_path / "l.npy"
    if fmt == "json-sglang":
        (tmp_path / "l.json").write_text(json.dumps({"logical_count": LOAD.tolist()}))
        return tmp_path / "l.json"
    if fmt == "json-bare":
        (tmp_path / "l.json").write_text(json.dumps(LOAD.astype(int).tolist()))
        return tmp_path / "l.json"
    if fmt == "json-steps":  # SGLang stat dump [steps, L, E]
        steps = np.stack([LOAD - LOAD // 2, LOAD // 2])
        (tmp_path / "l.json").write_text(json.dumps({"logical_count": steps.tolist()}))
        return tmp_path / "l.json"
    if fmt == "pt-tensor":
        torch.save(torch.from_numpy(LOAD), tmp_path / "l.pt")
        return tmp_path / "l.pt"
    assert fmt == "pt-dict"
    torch.save({"rank": 0, "logical_count": torch.from_numpy(LOAD[None])}, tmp_path / "l.pt")
    return tmp_path / "l.pt"


@pytest.mark.parametrize(
    "fmt", ["npy", "json-sglang", "json-bare", "json-steps", "pt-tensor", "pt-dict"]
)
def test_every_load_format_gives_the_same_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    path = _write_load(tmp_path, fmt)
    out = tmp_path / "plan.npy"
    report = plan_json(capsys, "--load", str(path), *SIZES, "--out", str(out))
    np.testing.assert_array_equal(np.load(out), EXPECTED)
    assert report["after"] == evaluate(LOAD, Placement(EXPECTED, TOPO)).to_dict()


@pytest.mark.parametrize("suffix", [".npy", ".json"])
def test_out_round_trips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], load_npy: Path, suffix: str
) -> None:
    out = tmp_path / f"plan{suffix}"
    report = plan_json(capsys, "--load", str(load_npy), *SIZES, *DEEPSEEK, "--out", str(out))
    assert report["out"] == str(out)
    placement = read_placement(out, TOPO)
    np.testing.assert_array_equal(placement.phy2log, DEEPSEEK_PLAN)
    if suffix == ".json":
        assert json.loads(out.read_text()) == {"physical_to_logical_map": DEEPSEEK_PLAN.tolist()}
    # The written plan feeds back in as CUR: nothing to move.
    again = plan_json(capsys, "--load", str(load_npy), *SIZES, *DEEPSEEK, "--current", str(out))
    assert again["migration"]["slots_changed"] == 0
    assert again["migration"]["transfers"] == 0
    assert again["before"] == again["after"]


def test_json_keys_and_values(capsys: pytest.CaptureFixture[str], load_npy: Path) -> None:
    report = plan_json(capsys, "--load", str(load_npy), *SIZES, "--expert-bytes", "1000")
    assert set(report) == REPORT_KEYS
    assert set(report["before"]) == BALANCE_KEYS
    assert set(report["after"]) == BALANCE_KEYS
    assert set(report["migration"]) == MIGRATION_KEYS
    assert report["policy"] == DEFAULT_POLICY
    assert report["before_placement"] == "identity"
    assert report["current"] is None and report["out"] is None
    assert (report["layers"], report["experts"], report["slots"]) == (4, 16, 24)
    assert (report["ranks"], report["nodes"], report["groups"]) == (4, 2, 4)
    assert report["time_ms"] >= 0
    identity = Placement.identity(TOPO)
    assert report["before"] == evaluate(LOAD, identity).to_dict()
    assert report["after"]["balancedness_mean"] > report["before"]["balancedness_mean"]
    assert 0 < report["after"]["balancedness_worst"] <= report["after"]["balancedness_mean"] <= 1
    m = report["migration"]
    assert m["slots_total"] == 4 * 24
    assert m["bytes_moved"] == 1000 * m["transfers"]
    assert m["cross_node_bytes"] == 1000 * m["cross_node_transfers"]


def test_migration_from_current(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], load_npy: Path
) -> None:
    # CUR: the plan with two slots of layer 0 swapped between ranks 0 and 3 (two nodes).
    cur = DEEPSEEK_PLAN.copy()
    cur[0, [0, 23]] = cur[0, [23, 0]]
    assert cur[0, 0] != cur[0, 23]
    (tmp_path / "cur.json").write_text(json.dumps({"physical_to_logical_map": cur.tolist()}))
    report = plan_json(
        capsys, "--load", str(load_npy), *SIZES, *DEEPSEEK, "--current", str(tmp_path / "cur.json")
    )
    current = Placement(cur, TOPO)
    plan = Placement(DEEPSEEK_PLAN, TOPO)
    assert report["before_placement"] == "current"
    assert report["current"] == str(tmp_path / "cur.json")
    assert report["before"] == evaluate(LOAD, current).to_dict()
    from eplb_service.migration import summarize_migration

    assert report["migration"] == summarize_migration(current, plan).to_dict()
    assert report["migration"]["bytes_moved"] is None
    assert report["migration"]["slots_changed"] == 2
    no_cur = plan_json(capsys, "--load", str(load_npy), *SIZES, *DEEPSEEK)
    assert no_cur["migration"] == summarize_migration(Placement.identity(TOPO), plan).to_dict()
    assert no_cur["migration"] != report["migration"]


def test_terminal_summary(capsys: pytest.CaptureFixture[str], load_npy: Path) -> None:
    code, out, err = run_plan_cli(
        capsys, "--load", str(load_npy), *SIZES, "--expert-bytes", "44040192"
    )
    assert code == 0 and err == ""
    for text in (
        "before (identity)",
        "after (plan)",
        "balancedness mean",
        "balancedness worst",
        "imbalance mean",
        "max / lower bound",
        "migration from identity",
        "bytes moved",
        "cross-node",
        "planned in",
        f"policy {DEFAULT_POLICY}",
    ):
        assert text in out
    assert "(layer " in out


def test_bundled_sample_as_make_demo_runs_it(capsys: pytest.CaptureFixture[str]) -> None:
    report = plan_json(
        capsys,
        "--load",
        str(SAMPLE_PATH),
        "--num-slots",
        "80",
        "--num-ranks",
        "8",
        "--num-nodes",
        "2",
        "--num-groups",
        "8",
        "--expert-bytes",
        "44040192",
    )
    assert report["after"]["balancedness_mean"] > report["before"]["balancedness_mean"] + 0.3


# --- bad input: exit 2, one line on stderr, no traceback --------------------------------------


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "txt": tmp_path / "load.txt",
        "corrupt_npy": tmp_path / "corrupt.npy",
        "corrupt_json": tmp_path / "corrupt.json",
        "corrupt_pt": tmp_path / "corrupt.pt",
        "wrong_key": tmp_path / "key.json",
        "one_d": tmp_path / "oned.npy",
        "negative": tmp_path / "neg.npy",
        "nan": tmp_path / "nan.npy",
        "ragged": tmp_path / "ragged.json",
        "cur_layers": tmp_path / "cur_layers.npy",
        "cur_range": tmp_path / "cur_range.json",
        "cur_missing_expert": tmp_path / "cur_missing.json",
        "cur_float": tmp_path / "cur_float.json",
    }
    files["txt"].write_text("1 2 3")
    files["corrupt_npy"].write_bytes(b"\x93NUMPY\x01\x00garbage")
    files["corrupt_json"].write_text('{"logical_count": [[1, 2]')
    files["corrupt_pt"].write_bytes(b"PK\x03\x04 not really a zip")
    files["wrong_key"].write_text(json.dumps({"load": LOAD.tolist()}))
    np.save(files["one_d"], LOAD[0])
    neg = LOAD.copy()
    neg[2, 5] = -1
    np.save(files["negative"], neg)
    nan = LOAD.copy()
    nan[1, 3] = np.nan
    np.save(files["nan"], nan)
    files["ragged"].write_text(json.dumps([[1, 2], [3]]))
    np.save(files["cur_layers"], EXPECTED[:3])
    bad_range = EXPECTED.copy()
    bad_range[1, 2] = 16
    files["cur_range"].write_text(json.dumps({"physical_to_logical_map": bad_range.tolist()}))
    missing = EXPECTED.copy()
    missing[missing == 7] = 8
    files["cur_missing_expert"].write_text(json.dumps(missing.tolist()))
    files["cur_float"].write_text(json.dumps((EXPECTED + 0.5).tolist()))
    return files


P16 = ["--num-slots", "16", "--num-ranks", "4"]
BAD_CASES: list[tuple[str, list[str], str]] = [
    ("missing file", ["--load", "{tmp}/nope.npy", *SIZES], "no such file"),
    ("unsupported suffix", ["--load", "{txt}", *SIZES], "unsupported file type"),
    ("corrupt npy", ["--load", "{corrupt_npy}", *SIZES], "not a readable .npy"),
    ("corrupt json", ["--load", "{corrupt_json}", *SIZES], "invalid JSON"),
    ("corrupt pt", ["--load", "{corrupt_pt}", *SIZES], "torch file"),
    ("json without logical_count", ["--load", "{wrong_key}", *SIZES], "'logical_count'"),
    ("load not 2-D", ["--load", "{one_d}", *SIZES], "must be 2-D"),
    ("ragged load", ["--load", "{ragged}", *SIZES], "numeric array"),
    ("negative load", ["--load", "{negative}", *SIZES], r"load\[2\]\[5\] is negative"),
    ("NaN load", ["--load", "{nan}", *SIZES], r"load\[1\]\[3\] is not finite"),
    (
        "P not divisible by R",
        ["--load", "{load}", "--num-slots", "22", "--num-ranks", "4"],
        r"--num-slots \(22\) must be divisible by --num-ranks \(4\)",
    ),
    (
        "P < E",
        ["--load", "{load}", "--num-slots", "12", "--num-ranks", "4"],
        r"--num-slots \(12\) must be >= the number of experts",
    ),
    (
        "E not divisible by G",
        ["--load", "{load}", *P16, "--num-groups", "3"],
        r"--num-groups \(3\) must divide the number of experts",
    ),
    (
        "R not divisible by N",
        ["--load", "{load}", *P16, "--num-nodes", "3"],
        r"--num-ranks \(4\) must be divisible by --num-nodes \(3\)",
    ),
    (
        "unknown policy",
        ["--load", "{load}", *P16, "--policy", "magic"],
        "unknown policy 'magic'; known policies: .*deepseek",
    ),
    ("CUR missing", ["--load", "{load}", *SIZES, "--current", "{tmp}/cur.npy"], "no such file"),
    (
        "CUR shape",
        ["--load", "{load}", *SIZES, "--current", "{cur_layers}"],
        r"shape \(3, 24\) does not match \[layers=4, slots=24\]",
    ),
    (
        "CUR slots",
        ["--load", "{load}", "--num-slots", "32", "--num-ranks", "4", "--current", "{cur_layers}"],
        "does not match",
    ),
    (
        "CUR expert out of range",
        ["--load", "{load}", *SIZES, "--current", "{cur_range}"],
        r"phy2log\[1\]\[2\] = 16 is out of range",
    ),
    (
        "CUR expert without replica",
        ["--load", "{load}", *SIZES, "--current", "{cur_missing_expert}"],
        "expert 7 has no replica",
    ),
    (
        "CUR not integers",
        ["--load", "{load}", *SIZES, "--current", "{cur_float}"],
        "must hold integers",
    ),
    (
        "OUT suffix",
        ["--load", "{load}", *SIZES, "--out", "{tmp}/plan.csv"],
        "unsupported file type '.csv'",
    ),
    ("OUT folder", ["--load", "{load}", *SIZES, "--out", "{tmp}/no/plan.json"], "does not exist"),
    # Syntax errors argparse catches: also one line, exit 2.
    (
        "P not an integer",
        ["--load", "{load}", "--num-slots", "many", "--num-ranks", "4"],
        "expected an integer, got 'many'",
    ),
    ("R zero", ["--load", "{load}", "--num-slots", "16", "--num-ranks", "0"], "must be >= 1"),
    ("negative expert bytes", ["--load", "{load}", *SIZES, "--expert-bytes", "-5"], "must be >= 0"),
    ("no --load", [*SIZES], "required: --load"),
]


@pytest.mark.parametrize(("case", "argv", "match"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    load_npy: Path,
    case: str,
    argv: list[str],
    match: str,
) -> None:
    names = {k: str(v) for k, v in _bad_files(tmp_path).items()}
    argv = [a.format(tmp=tmp_path, load=load_npy, **names) for a in argv]
    code, out, err = run_plan_cli(capsys, *argv)
    assert code == 2, (case, out, err)
    assert out == ""
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("eplb plan: error: ")
    assert "Traceback" not in err
    import re

    assert re.search(match, lines[0]), lines[0]
    assert not list(tmp_path.glob("plan.*"))  # nothing written on bad input


# --- the console script, for real ------------------------------------------------------------


def _console_script() -> str:
    script = Path(sys.executable).with_name("eplb")
    if not script.exists():
        pytest.skip("console script `eplb` not installed next to the interpreter")
    return str(script)


def test_console_script(tmp_path: Path, load_npy: Path) -> None:
    eplb = _console_script()
    ok = subprocess.run(
        [
            eplb,
            "plan",
            "--load",
            str(load_npy),
            *SIZES,
            "--json",
            "--out",
            str(tmp_path / "p.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert set(json.loads(ok.stdout)) == REPORT_KEYS
    np.testing.assert_array_equal(read_placement(tmp_path / "p.json", TOPO).phy2log, EXPECTED)

    bad = subprocess.run(
        [eplb, "plan", "--load", str(load_npy), "--num-slots", "22", "--num-ranks", "4"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert "must be divisible by --num-ranks" in bad.stderr
