"""The placement model: topology checks, validation errors, derived maps, properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_service.placement import Placement, PlacementError, Topology, as_int_array
from tests.helpers import placements_of

# DeepSeek EPLB README example: 12 experts, 16 slots, 8 GPUs, 2 nodes; its first plan row.
README_ROW = [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]
README_TOPO = Topology(num_layers=1, num_experts=12, num_slots=16, num_ranks=8, num_nodes=2)


# --- Topology --------------------------------------------------------------------------------


def test_topology_derived_sizes() -> None:
    t = Topology(num_layers=3, num_experts=6, num_slots=12, num_ranks=4, num_nodes=2)
    assert (t.slots_per_rank, t.ranks_per_node, t.max_replicas) == (3, 2, 7)
    np.testing.assert_array_equal(t.rank_of_slot(), [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(t.node_of_rank(), [0, 0, 1, 1])
    assert Topology(1, 4, 4, 2).num_nodes == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_layers": 0}, "num_layers must be >= 1, got 0"),
        ({"num_experts": -1}, "num_experts must be >= 1"),
        ({"num_ranks": 2.0}, "num_ranks must be an integer"),
        ({"num_nodes": True}, "num_nodes must be an integer"),
        ({"num_slots": "8"}, "num_slots must be an integer"),
        ({"num_slots": 6}, r"num_slots \(6\) must be >= num_experts \(8\)"),
        ({"num_slots": 10}, r"num_slots \(10\) must be divisible by num_ranks \(4\)"),
        ({"num_nodes": 3}, r"num_ranks \(4\) must be divisible by num_nodes \(3\)"),
    ],
)
def test_topology_errors_name_the_field(kwargs: dict, match: str) -> None:
    sizes = {"num_layers": 2, "num_experts": 8, "num_slots": 12, "num_ranks": 4, "num_nodes": 2}
    sizes.update(kwargs)
    with pytest.raises(PlacementError, match=match):
        Topology(**sizes)


def test_topology_accepts_numpy_integers() -> None:
    t = Topology(np.int64(2), np.int32(4), 8, 2)
    assert t == Topology(2, 4, 8, 2)


# --- as_int_array ----------------------------------------------------------------------------


def test_as_int_array_inputs() -> None:
    expected = np.array([[1, 2], [3, 0]])
    for value in (
        [[1, 2], [3, 0]],
        np.array([[1, 2], [3, 0]], dtype=np.int32),
        np.array([[1.0, 2.0], [3.0, 0.0]]),
        torch.tensor([[1, 2], [3, 0]]),
    ):
        out = as_int_array(value, "m")
        assert out.dtype == np.int64
        np.testing.assert_array_equal(out, expected)
    source = np.array([1, 2])
    as_int_array(source, "m")[0] = 9
    assert source[0] == 1  # a fresh copy


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([[1, 2], [3]], "cur must be a rectangular array of integers"),
        ([[0.5, 1.0]], "cur must hold integers, got dtype float64"),
        ([[np.nan, 1.0]], "cur must hold integers"),
        ([["a", "b"]], "cur must hold integers"),
    ],
)
def test_as_int_array_errors(value: object, match: str) -> None:
    with pytest.raises(PlacementError, match=match):
        as_int_array(value, "cur")


# --- Placement validation --------------------------------------------------------------------


def test_readme_row_is_a_valid_placement() -> None:
    p = Placement(np.array([README_ROW]), README_TOPO)
    np.testing.assert_array_equal(p.logcnt, [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1]])
    assert p.logcnt.sum() == 16
    assert p.log2phy.shape == (1, 12, 5)
    np.testing.assert_array_equal(p.log2phy[0, 5], [0, 2, -1, -1, -1])
    np.testing.assert_array_equal(p.log2phy[0, 1], [13, 15, -1, -1, -1])
    np.testing.assert_array_equal(p.log2phy[0, 0], [12, -1, -1, -1, -1])


@pytest.mark.parametrize(
    ("phy2log", "match"),
    [
        (np.zeros(16, dtype=int), r"phy2log must be 2-D \[layers, slots\], got 1-D"),
        (np.zeros((2, 16), dtype=int), r"shape \(2, 16\) does not match \[layers=1, slots=16\]"),
        (np.zeros((1, 8), dtype=int), "does not match"),
        ([[*README_ROW[:-1], 12]], r"phy2log\[0\]\[15\] = 12 is out of range 0..11"),
        ([[-1, *README_ROW[1:]]], r"phy2log\[0\]\[0\] = -1 is out of range"),
        ([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 11, 11, 11]], "layer 0: logical expert 1 "),
        ([[0.5] * 16], "phy2log must hold integers"),
    ],
)
def test_placement_errors_name_the_field(phy2log: object, match: str) -> None:
    with pytest.raises(PlacementError, match=match):
        Placement(phy2log, README_TOPO)  # type: ignore[arg-type]


def test_placement_error_is_a_value_error() -> None:
    assert issubclass(PlacementError, ValueError)


def test_missing_expert_reports_count() -> None:
    t = Topology(2, 3, 3, 1)
    with pytest.raises(PlacementError, match=r"layer 1: logical expert 0 has no replica \(1 "):
        Placement([[0, 1, 2], [1, 1, 2]], t)  # type: ignore[arg-type]
    with pytest.raises(PlacementError, match=r"\(2 \(layer, expert\) pairs"):
        Placement([[0, 1, 2], [1, 1, 1]], t)  # type: ignore[arg-type]


# --- derived maps ----------------------------------------------------------------------------


def test_derived_maps_by_hand() -> None:
    t = Topology(num_layers=2, num_experts=3, num_slots=6, num_ranks=3, num_nodes=1)
    p = Placement(np.array([[0, 1, 2, 0, 1, 0], [2, 2, 2, 2, 1, 0]]), t)
    np.testing.assert_array_equal(p.logcnt, [[3, 2, 1], [1, 1, 4]])
    assert p.log2phy.shape == (2, 3, 4)  # X = P - E + 1
    np.testing.assert_array_equal(
        p.log2phy,
        [
            [[0, 3, 5, -1], [1, 4, -1, -1], [2, -1, -1, -1]],
            [[5, -1, -1, -1], [4, -1, -1, -1], [0, 1, 2, 3]],
        ],
    )
    has = p.rank_experts()
    assert has.shape == (2, 3, 3)
    np.testing.assert_array_equal(
        has[0], [[True, True, False], [True, False, True], [True, True, False]]
    )
    np.testing.assert_array_equal(
        has[1], [[False, False, True], [False, False, True], [True, True, False]]
    )


def test_identity_and_from_map() -> None:
    t = Topology(num_layers=2, num_experts=4, num_slots=6, num_ranks=2)
    ident = Placement.identity(t)
    np.testing.assert_array_equal(ident.phy2log, [[0, 1, 2, 3, 0, 1]] * 2)
    np.testing.assert_array_equal(ident.logcnt, [[2, 2, 1, 1]] * 2)
    same = Placement.from_map([[0, 1, 2, 3, 0, 1]] * 2, num_experts=4, num_ranks=2)
    assert same == ident and hash(same) == hash(ident)
    assert (same.num_layers, same.num_experts, same.num_slots) == (2, 4, 6)
    with pytest.raises(PlacementError, match="2-D"):
        Placement.from_map([0, 1, 2, 3], num_experts=4, num_ranks=2)
    with pytest.raises(PlacementError, match="divisible by num_ranks"):
        Placement.from_map([[0, 1, 2, 3, 0]], num_experts=4, num_ranks=2)


def test_placement_is_immutable_and_copies_input() -> None:
    source = np.array([README_ROW])
    p = Placement(source, README_TOPO)
    source[0, 0] = 0
    assert p.phy2log[0, 0] == 5
    with pytest.raises(ValueError):
        p.phy2log[0, 0] = 1
    other = Placement(np.array([README_ROW]), README_TOPO)
    assert p == other
    assert p != Placement.identity(README_TOPO)
    assert p.__eq__("x") is NotImplemented


def test_to_json() -> None:
    p = Placement(np.array([README_ROW]), README_TOPO)
    assert p.to_json() == {"physical_to_logical_map": [README_ROW]}
    assert p.to_json(version=7) == {"physical_to_logical_map": [README_ROW], "version": 7}


# --- properties ------------------------------------------------------------------------------


@st.composite
def placements(draw: st.DrawFn) -> Placement:
    """Any valid placement: every expert once, the remaining slots random experts, shuffled."""
    num_layers = draw(st.integers(1, 4))
    num_experts = draw(st.integers(1, 12))
    num_nodes = draw(st.integers(1, 3))
    num_ranks = num_nodes * draw(st.integers(1, 3))
    per_rank = draw(st.integers(-(-num_experts // num_ranks), -(-num_experts // num_ranks) + 3))
    num_slots = num_ranks * per_rank
    t = Topology(num_layers, num_experts, num_slots, num_ranks, num_nodes)
    return draw(placements_of(t))


@settings(max_examples=150, deadline=None)
@given(placements())
def test_log2phy_consistent_with_phy2log(p: Placement) -> None:
    t = p.topology
    log2phy = p.log2phy
    assert log2phy.shape == (t.num_layers, t.num_experts, t.max_replicas)
    assert (p.logcnt >= 1).all()
    assert (p.logcnt.sum(axis=1) == t.num_slots).all()
    valid = log2phy >= 0
    np.testing.assert_array_equal(valid.sum(axis=2), p.logcnt)
    # Replicas first, padding after; slots ascending; each slot listed exactly once.
    assert (np.sort(~valid, axis=2, kind="stable") == ~valid).all()
    for layer in range(t.num_layers):
        listed = []
        for expert in range(t.num_experts):
            slots = log2phy[layer, expert][valid[layer, expert]]
            assert (np.diff(slots) > 0).all()
            assert (p.phy2log[layer, slots] == expert).all()
            listed += slots.tolist()
        assert sorted(listed) == list(range(t.num_slots))
    # rank_experts agrees with the slot map.
    has = p.rank_experts()
    per_rank = p.phy2log.reshape(t.num_layers, t.num_ranks, -1)
    for layer in range(t.num_layers):
        for rank in range(t.num_ranks):
            assert set(np.flatnonzero(has[layer, rank])) == set(per_rank[layer, rank].tolist())


@settings(max_examples=50, deadline=None)
@given(placements())
def test_round_trip_through_json_form(p: Placement) -> None:
    doc = p.to_json()
    again = Placement.from_map(
        doc["physical_to_logical_map"],
        num_experts=p.num_experts,
        num_ranks=p.topology.num_ranks,
        num_nodes=p.topology.num_nodes,
    )
    assert again == p
