"""Choosing how far each row goes along its move path: best gain per cost first.

Each row (a layer, or a (layer, node) pair) comes with points along its move path
(:class:`~eplb_service.policy.incremental.Paths`): slots changed, weight transfers and the largest
rank load after each. Per row, the points are reduced to the upper concave hull of
(cost, balancedness); hull segments of all rows are then taken in order of gain per cost while

- the total gain is short of ``needed`` (the tolerance: stop as soon as the plan is good
  enough), and
- the moves and bytes taken stay within the budget (a segment that does not fit closes its
  row).

Costs are exact as :func:`eplb_service.migration.summarize_migration` counts them, row by row:
slots whose expert differs from the placement in service, and (rank, expert) arrivals.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from eplb_service.policy.incremental import Paths

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

__all__ = ["Budget", "choose_points"]


@dataclass(frozen=True)
class Budget:
    """Limits on one plan; ``None`` means no limit."""

    max_moves: int | None = None
    max_bytes: int | None = None
    expert_bytes: int | None = None

    @property
    def limited(self) -> bool:
        return self.max_moves is not None or self.max_bytes is not None


def _next_hull_point(cost: F64, value: F64, points: I64) -> tuple[I64, F64]:
    """For each row and point k: the later point with the steepest rise, and that slope.

    Parameters:
        cost, value: [X, K]
        points: [X], valid points per row

    Returns:
        nxt: [X, K], the next hull point after k (-1: none rises)
        slope: [X, K], (value gain) / (cost increase) to it (inf for a free gain)
    """
    width = cost.shape[1]
    dc = cost[:, None, :] - cost[:, :, None]  # [X, k, j]
    dv = value[:, None, :] - value[:, :, None]
    later = np.arange(width)[None, None, :] > np.arange(width)[None, :, None]
    valid = later & (np.arange(width)[None, None, :] < points[:, None, None]) & (dv > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(dc > 0, dv / np.where(dc > 0, dc, 1.0), np.inf)
    # Among equal slopes prefer the farther point (one segment instead of several).
    slope = np.where(valid, slope, -np.inf)
    best = slope.shape[2] - 1 - np.argmax(slope[:, :, ::-1], axis=2)
    best_slope = np.take_along_axis(slope, best[:, :, None], axis=2)[:, :, 0]
    nxt = np.where(best_slope == -np.inf, -1, best)
    return nxt, best_slope


def choose_points(
    paths: Paths,
    row_mean: F64,
    row_weight: F64,
    *,
    needed: float | None,
    budget: Budget,
    more: float | None = None,
    more_moves: float = np.inf,
) -> I64:
    """Picks a point per row: the cheapest way to gain ``needed`` balancedness within budget.

    Parameters:
        paths: the rows' move paths
        row_mean: [X], each row's mean rank load (balancedness = mean / peak)
        row_weight: [X], weight of each row's balancedness in the objective
        needed: total weighted balancedness gain to reach (None: as much as the budget allows)
        budget: limits on slots changed and bytes moved
        more: once ``needed`` is reached, go on (same order, same budget) toward this total
            gain (None or <= needed: stop at ``needed``) ...
        more_moves: ... changing at most this many slots beyond those taken to reach
            ``needed``

    Returns:
        point: [X], the chosen point of each row (>= ``paths.min_point``)
    """
    num_rows = paths.peak.shape[0]
    value = row_weight[:, None] * np.divide(
        row_mean[:, None], paths.peak, out=np.ones_like(paths.peak), where=paths.peak > 0
    )
    max_moves = np.inf if budget.max_moves is None else float(budget.max_moves)
    max_bytes = np.inf if budget.max_bytes is None else float(budget.max_bytes)
    expert_bytes = float(budget.expert_bytes or 0)
    moves = paths.changed.astype(np.float64)
    sent = paths.arrivals.astype(np.float64) * expert_bytes
    # One cost scale: slots changed, or the share of each limit used when there are limits.
    cost = moves.copy()
    if budget.limited:
        cost = np.zeros_like(moves)
        if np.isfinite(max_moves):
            cost += moves / max(max_moves, 1.0)
        if np.isfinite(max_bytes):
            cost += sent / max(max_bytes, 1.0)
    # Unusable points (before min_point) are dropped by starting each row at min_point.
    point = paths.min_point.copy()
    nxt, slope = _next_hull_point(cost, value, paths.points)
    r_idx = np.arange(num_rows)
    used_moves = float(moves[r_idx, point].sum())
    used_bytes = float(sent[r_idx, point].sum())
    gained = float((value[r_idx, point] - value[:, 0]).sum())
    heap = [(-float(slope[r, point[r]]), int(r)) for r in range(num_rows) if nxt[r, point[r]] >= 0]
    heapq.heapify(heap)
    cap = max_moves  # slots changed allowed so far (lowered once ``needed`` is reached)
    while heap:
        if needed is not None and gained >= needed:
            if more is None or gained >= more:
                break
            if cap == max_moves:
                cap = min(max_moves, used_moves + more_moves)
        _, r = heapq.heappop(heap)
        k = int(point[r])
        j = int(nxt[r, k])
        dm = moves[r, j] - moves[r, k]
        db = sent[r, j] - sent[r, k]
        if used_moves + dm > cap or used_bytes + db > max_bytes:
            continue  # this row is closed: its later segments are no steeper
        used_moves += dm
        used_bytes += db
        gained += float(value[r, j] - value[r, k])
        point[r] = j
        if nxt[r, j] >= 0:
            heapq.heappush(heap, (-float(slope[r, j]), r))
    return point
