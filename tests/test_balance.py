"""Balance metrics: hand-computed cases and properties over any valid placement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_service.balance import (
    as_load,
    balancedness,
    evaluate,
    imbalance_ratio,
    lower_bound,
    rank_loads,
    slot_loads,
)
from eplb_service.placement import Placement, Topology
from tests.helpers import placements_of

# DeepSeek EPLB README example load: 2 layers x 12 experts; 16 slots, 8 GPUs, 2 nodes.
README_LOAD = np.array(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ],
    dtype=np.float64,
)
README_TOPO = Topology(num_layers=2, num_experts=12, num_slots=16, num_ranks=8, num_nodes=2)
README_ROW0 = [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]  # the README's first plan row


# --- as_load ---------------------------------------------------------------------------------


def test_as_load_inputs() -> None:
    for value in (README_LOAD.tolist(), README_LOAD.astype(np.int32), torch.tensor(README_LOAD)):
        out = as_load(value)
        assert out.dtype == np.float64
        np.testing.assert_array_equal(out, README_LOAD)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([1.0, 2.0], r"load must be 2-D \[layers, experts\], got shape \(2,\)"),
        ([[1.0, np.nan]], r"load\[0\]\[1\] is not finite \(nan\)"),
        ([[1.0], [np.inf]], r"load\[1\]\[0\] is not finite"),
        ([[1.0, -2.0]], r"load\[0\]\[1\] is negative \(-2.0\)"),
        ([[1.0, 2.0], [3.0]], "load must be a numeric"),
        ([["a"]], "load must be a numeric"),
    ],
)
def test_as_load_errors_name_the_field(value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        as_load(value, "load")


# --- hand-computed ---------------------------------------------------------------------------


def test_identity_on_readme_load_by_hand() -> None:
    # Identity: slot s holds s % 12, so experts 0..3 have 2 replicas and split their load.
    ident = Placement.identity(README_TOPO)
    loads = rank_loads(README_LOAD, ident)
    np.testing.assert_allclose(
        loads,
        [
            [111.0, 50.5, 269.0, 43.0, 129.0, 269.0, 111.0, 50.5],
            [63.5, 84.0, 216.0, 344.0, 258.0, 43.0, 63.5, 84.0],
        ],
    )
    np.testing.assert_allclose(slot_loads(README_LOAD, ident)[0, :4], [45.0, 66.0, 20.0, 30.5])
    np.testing.assert_allclose(balancedness(loads), [129.125 / 269.0, 144.5 / 344.0])
    np.testing.assert_allclose(imbalance_ratio(loads), [269.0 / 129.125 - 1, 344.0 / 144.5 - 1])
    # Water-filling: 4 extra replicas; the replica bound (91.5, 107) is below W/R in both layers.
    np.testing.assert_allclose(lower_bound(README_LOAD, 16, 8), [1033 / 8, 1156 / 8])
    report = evaluate(README_LOAD, ident)
    assert report.worst_layer == 1
    assert report.balancedness_worst == pytest.approx(144.5 / 344.0)
    assert report.balancedness_mean == pytest.approx((129.125 / 269.0 + 144.5 / 344.0) / 2)
    assert report.imbalance_max == pytest.approx(344.0 / 144.5 - 1)
    assert report.max_over_lower_bound == pytest.approx((269 / 129.125 + 344 / 144.5) / 2)
    assert set(report.to_dict()) == {
        "balancedness_mean",
        "balancedness_worst",
        "worst_layer",
        "imbalance_mean",
        "imbalance_max",
        "max_over_lower_bound",
    }


def test_readme_plan_row_by_hand() -> None:
    t = Topology(num_layers=1, num_experts=12, num_slots=16, num_ranks=8, num_nodes=2)
    plan = Placement(np.array([README_ROW0]), t)
    loads = rank_loads(README_LOAD[:1], plan)
    np.testing.assert_allclose(loads, [[121.5, 86.5, 125.0, 113.0, 147.5, 131.5, 156.0, 152.0]])
    assert evaluate(README_LOAD[:1], plan).balancedness_worst == pytest.approx(129.125 / 156.0)


@pytest.mark.parametrize(
    ("weight", "slots", "ranks", "expected"),
    [
        ([[12, 1, 1, 1, 1, 1, 1, 1]], 8, 4, 12.0),  # P == E: the hottest expert alone
        ([[12, 1, 1, 1, 1, 1, 1, 1]], 12, 4, 19 / 4),  # 4 extra replicas: 12/4 = 3 < W/R
        ([[10, 1, 1, 1]], 8, 4, 13 / 4),  # capped at R replicas: 10/4 = 2.5 < W/R
        ([[10, 0]], 6, 2, 5.0),  # one expert spans both ranks
        ([[9, 9, 1, 1]], 6, 3, 20 / 3),  # 2 extras: 9/2, 9/2 -> 4.5 < W/R
        ([[0, 0, 0]], 3, 3, 0.0),
        ([[8, 2], [2, 8]], 3, 1, 10.0),  # one rank carries everything
    ],
)
def test_lower_bound_by_hand(weight: list, slots: int, ranks: int, expected: float) -> None:
    arr = np.array(weight, dtype=np.float64)
    np.testing.assert_allclose(lower_bound(arr, slots, ranks), expected)


def test_lower_bound_replica_bound_dominates() -> None:
    # 2 experts, 3 slots, 3 ranks: the extra replica halves the hot one, 100/2 = 50 > W/R = 40.
    np.testing.assert_allclose(lower_bound(np.array([[100.0, 20.0]]), 3, 3), 50.0)


def test_lower_bound_rejects_too_few_slots() -> None:
    with pytest.raises(ValueError, match="num_slots"):
        lower_bound(np.ones((1, 4)), 3, 1)


def test_zero_load_layer_is_perfect() -> None:
    t = Topology(num_layers=2, num_experts=2, num_slots=2, num_ranks=2)
    load = np.array([[0.0, 0.0], [1.0, 3.0]])
    report = evaluate(load, Placement.identity(t))
    np.testing.assert_allclose(balancedness(rank_loads(load, Placement.identity(t))), [1.0, 2 / 3])
    assert report.worst_layer == 1
    assert report.imbalance_max == pytest.approx(0.5)


def test_equal_loads_give_exactly_one() -> None:
    loads = np.full((1, 3), 0.8132702392002724)  # the mean rounds one ulp above the max
    assert balancedness(loads)[0] == 1.0
    assert imbalance_ratio(loads)[0] == 0.0


def test_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"load shape \(2, 11\) does not match"):
        rank_loads(README_LOAD[:, :11], Placement.identity(README_TOPO))


# --- properties ------------------------------------------------------------------------------


@st.composite
def loaded_placements(draw: st.DrawFn) -> tuple[np.ndarray, Placement]:
    """A non-negative load and any valid placement for it."""
    num_layers = draw(st.integers(1, 3))
    num_experts = draw(st.integers(1, 10))
    num_ranks = draw(st.integers(1, 5))
    per_rank = -(-num_experts // num_ranks) + draw(st.integers(0, 3))
    num_slots = num_ranks * per_rank
    placement = draw(placements_of(Topology(num_layers, num_experts, num_slots, num_ranks)))
    values = st.one_of(
        st.integers(0, 1000).map(float),
        st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False),
    )
    load = draw(
        st.lists(values, min_size=num_layers * num_experts, max_size=num_layers * num_experts)
    )
    return np.array(load).reshape(num_layers, num_experts), placement


@settings(max_examples=200, deadline=None)
@given(loaded_placements())
def test_metric_properties(case: tuple[np.ndarray, Placement]) -> None:
    load, placement = case
    t = placement.topology
    loads = rank_loads(load, placement)
    assert loads.shape == (t.num_layers, t.num_ranks)
    # Rank loads sum to the total load of each layer.
    np.testing.assert_allclose(loads.sum(axis=1), load.sum(axis=1), rtol=1e-9, atol=1e-9)
    bal = balancedness(loads)
    assert ((bal > 0) & (bal <= 1)).all()
    assert (imbalance_ratio(loads) >= 0).all()
    # No placement beats the lower bound (up to rounding).
    bound = lower_bound(load, t.num_slots, t.num_ranks)
    assert (loads.max(axis=1) >= bound * (1 - 1e-12) - 1e-12).all()
    assert (bound >= load.sum(axis=1) / t.num_ranks * (1 - 1e-12)).all()
    report = evaluate(load, placement)
    assert 0 < report.balancedness_worst <= report.balancedness_mean <= 1
    assert report.max_over_lower_bound >= 1 - 1e-9
    assert 0 <= report.worst_layer < t.num_layers


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 100), min_size=2, max_size=9),
    st.integers(1, 4),
    st.integers(0, 6),
)
def test_lower_bound_one_rank_and_monotone_in_slots(weights: list, ranks: int, extra: int) -> None:
    # With R = 1 the only rank carries everything: LB == W.
    arr = np.array([weights], dtype=np.float64)
    np.testing.assert_allclose(lower_bound(arr, len(weights) + extra, 1), arr.sum())
    # More slots never raise the bound.
    assert lower_bound(arr, len(weights) + extra + 1, ranks)[0] <= (
        lower_bound(arr, len(weights) + extra, ranks)[0] + 1e-9
    )
