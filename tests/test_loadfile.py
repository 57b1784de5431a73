"""Reading loads and placements from .npy/.json/.pt, writing placements, and the errors."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from eplb_service.loadfile import (
    LoadFileError,
    check_writable,
    read_load,
    read_phy2log,
    read_placement,
    write_placement,
)
from eplb_service.placement import Placement, PlacementError, Topology

LOAD = np.array([[3.0, 0.0, 5.0, 1.0], [2.0, 2.0, 7.0, 9.0]])
TOPO = Topology(num_layers=2, num_experts=4, num_slots=6, num_ranks=3, num_nodes=1)
MAP = np.array([[0, 1, 2, 3, 2, 0], [3, 2, 1, 0, 3, 3]])


def _write_json(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


# --- loads -----------------------------------------------------------------------------------


def test_load_npy(tmp_path: Path) -> None:
    np.save(tmp_path / "l.npy", LOAD.astype(np.int32))
    out = read_load(tmp_path / "l.npy")
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, LOAD)


def test_load_json_sglang_and_bare(tmp_path: Path) -> None:
    sglang = _write_json(tmp_path / "s.json", {"logical_count": LOAD.tolist(), "rank": 0})
    bare = _write_json(tmp_path / "b.json", LOAD.tolist())
    np.testing.assert_array_equal(read_load(sglang), LOAD)
    np.testing.assert_array_equal(read_load(str(bare)), LOAD)


def test_load_3d_is_summed_over_steps(tmp_path: Path) -> None:
    steps = np.stack([LOAD, 2 * LOAD, np.zeros_like(LOAD)])  # SGLang stat dump [steps, L, E]
    _write_json(tmp_path / "s.json", {"logical_count": steps.tolist()})
    np.testing.assert_array_equal(read_load(tmp_path / "s.json"), 3 * LOAD)


def test_load_pt_tensor_and_dict(tmp_path: Path) -> None:
    torch.save(torch.tensor(LOAD, dtype=torch.int64), tmp_path / "t.pt")
    torch.save(
        {
            "rank": 0,
            "logical_count": torch.tensor(LOAD[None]),
            "average_utilization_rate_over_window": None,
        },
        tmp_path / "d.pth",
    )
    np.testing.assert_array_equal(read_load(tmp_path / "t.pt"), LOAD)
    np.testing.assert_array_equal(read_load(tmp_path / "d.pth"), LOAD)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.npy", None, "no such file"),
        ("l.txt", "1 2 3", "unsupported file type '.txt'"),
        ("l", "1 2 3", "unsupported file type '\\(no suffix\\)'"),
        ("l.npy", "not numpy", "not a .npy file"),
        ("l.json", "{not json", "invalid JSON"),
        ("l.json", json.dumps({"counts": [[1]]}), "expected the key 'logical_count'"),
        ("l.json", json.dumps(5), "expected a nested list"),
        ("l.json", json.dumps([[1, 2], [3]]), "numeric array"),
        ("l.json", json.dumps([["a", "b"]]), "numeric array"),
        ("l.json", json.dumps([1, 2, 3]), "must be 2-D"),
        ("l.json", json.dumps([[[[1]]]]), "must be 2-D"),
        ("l.json", json.dumps([[]]), "empty"),
        ("l.json", json.dumps([[1, -1]]), r"load\[0\]\[1\] is negative"),
        ("l.json", "[[1, NaN]]", r"load\[0\]\[1\] is not finite"),
        ("l.json", "[[1, Infinity]]", "not finite"),
        ("l.pt", "garbage", "torch file"),
    ],
)
def test_bad_loads_name_the_file(
    tmp_path: Path, name: str, content: str | None, match: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(LoadFileError, match=match) as info:
        read_load(path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_bad_load_folder_and_object_npy(tmp_path: Path) -> None:
    (tmp_path / "dir.npy").mkdir()
    with pytest.raises(LoadFileError, match="not a regular file"):
        read_load(tmp_path / "dir.npy")
    np.save(tmp_path / "o.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    with pytest.raises(LoadFileError, match=r"not a readable \.npy"):
        read_load(tmp_path / "o.npy")


def test_pt_with_objects_is_refused(tmp_path: Path) -> None:
    torch.save({"logical_count": Fraction(1, 2)}, tmp_path / "x.pt")
    with pytest.raises(LoadFileError, match=r"x\.pt"):
        read_load(tmp_path / "x.pt")


# --- placements ------------------------------------------------------------------------------


def test_map_formats(tmp_path: Path) -> None:
    np.save(tmp_path / "m.npy", MAP)
    _write_json(tmp_path / "m.json", {"physical_to_logical_map": MAP.tolist()})
    _write_json(tmp_path / "bare.json", MAP.tolist())
    torch.save({"physical_to_logical_map": torch.tensor(MAP)}, tmp_path / "m.pt")
    for name in ("m.npy", "m.json", "bare.json", "m.pt"):
        out = read_phy2log(tmp_path / name)
        assert out.dtype == np.int64
        np.testing.assert_array_equal(out, MAP)
        assert read_placement(tmp_path / name, TOPO) == Placement(MAP, TOPO)


@pytest.mark.parametrize(
    ("doc", "error", "match"),
    [
        ({"phy2log": MAP.tolist()}, LoadFileError, "expected the key 'physical_to_logical_map'"),
        ([[0.5, 1]], LoadFileError, "must hold integers"),
        ([0, 1, 2], LoadFileError, "must be 2-D"),
        (MAP[:1].tolist(), PlacementError, r"shape \(1, 6\) does not match"),
        ([[0, 1, 2, 3, 2, 9], MAP[1].tolist()], PlacementError, r"phy2log\[0\]\[5\] = 9"),
        ([[0, 1, 2, 2, 2, 0], MAP[1].tolist()], PlacementError, "expert 3 has no replica"),
    ],
)
def test_bad_maps(tmp_path: Path, doc: object, error: type, match: str) -> None:
    path = _write_json(tmp_path / "cur.json", doc)
    with pytest.raises(error, match=match) as info:
        read_placement(path, TOPO)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize("suffix", [".npy", ".json"])
def test_write_round_trip(tmp_path: Path, suffix: str) -> None:
    placement = Placement(MAP, TOPO)
    path = write_placement(tmp_path / f"out{suffix}", placement)
    assert read_placement(path, TOPO) == placement


def test_written_json_is_exactly_sglang_form(tmp_path: Path) -> None:
    write_placement(tmp_path / "o.json", Placement(MAP, TOPO))
    doc = json.loads((tmp_path / "o.json").read_text())
    assert doc == {"physical_to_logical_map": MAP.tolist()}  # SGLang passes every key on


def test_write_npy_keeps_other_suffix_case(tmp_path: Path) -> None:
    path = write_placement(tmp_path / "O.NPY", Placement(MAP, TOPO))
    assert path.exists()
    np.testing.assert_array_equal(np.load(path), MAP)


def test_check_writable(tmp_path: Path) -> None:
    with pytest.raises(LoadFileError, match=r"unsupported file type '\.pt'"):
        check_writable(tmp_path / "o.pt")
    with pytest.raises(LoadFileError, match="does not exist"):
        check_writable(tmp_path / "nope" / "o.json")
    (tmp_path / "d.json").mkdir()
    with pytest.raises(LoadFileError, match="is a folder"):
        check_writable(tmp_path / "d.json")
