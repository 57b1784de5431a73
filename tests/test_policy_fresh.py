"""``eplb_service.policy.fresh``: single-replica count moves on rows with few slots per rank."""

from __future__ import annotations

import numpy as np
import pytest

from eplb_service import workloads
from eplb_service.balance import lower_bound
from eplb_service.policy import fresh
from eplb_service.policy.fresh import count_rows, item_loads, plan_fresh


def test_count_moves_lower_poor_rows_and_never_raise_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hot loads, 48 experts on 12 ranks of five slots: with ``count_moves`` no row's largest
    rank load rises, the poorest row (5% above the bound) falls below 2%, the mean gap falls
    by at least a third, and the plan is a valid arrangement (every expert placed, the peak
    reported is the arrangement's)."""
    weight = workloads.hot(8, 48, 3).astype(np.float64)
    num_ranks, num_slots = 12, 60
    bound = lower_bound(weight, num_slots, num_ranks)
    monkeypatch.setattr(fresh, "COUNT_MOVE_SLOTS", 0)
    _, before = plan_fresh(weight, num_slots, num_ranks)
    monkeypatch.setattr(fresh, "COUNT_MOVE_SLOTS", 5)
    item, after = plan_fresh(weight, num_slots, num_ranks)
    assert item.shape == (8, num_ranks, 5)
    assert (count_rows(item, 48) >= 1).all()
    np.testing.assert_allclose(item_loads(weight, item).sum(axis=2).max(axis=1), after)
    assert (after <= before * (1 + 1e-12)).all()
    assert before.max() / bound[before.argmax()] > 1.05
    assert after[before.argmax()] < 1.02 * bound[before.argmax()]
    assert (after / bound - 1).mean() < (2 / 3) * (before / bound - 1).mean()


def test_count_moves_leave_rows_near_the_bound_alone() -> None:
    """Rows within ``POOR`` of the bound are returned unchanged (same arrays' contents)."""
    weight = workloads.uniform(4, 40, 0).astype(np.float64)
    item, _ = plan_fresh(weight, 50, 10)
    load = item_loads(weight, item)
    bound = load.sum(axis=2).max(axis=1)  # every row counts as within POOR of it
    new_item, new_load = fresh.count_moves(weight, item, load, bound, 10)
    np.testing.assert_array_equal(new_item, item)
    np.testing.assert_array_equal(new_load, load)
