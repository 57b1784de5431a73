"""Planning from the placement in service: keep what can stay, move what pays.

Rows ``X`` as in :mod:`eplb_service.policy.fresh`; arrangements ``[X, R, S]`` of expert ids, where
``-1`` marks a slot that must be rewritten (it holds an expert that may not stay there, e.g. one
of another node's groups in a hierarchical plan). A row's goal is the fresh plan's largest rank
load times ``1 + tolerance``; a row already within it keeps every slot, unless ``polish`` asks
for swap paths toward the fresh plan on those rows too (see :func:`replan`).

For the other rows, three attempts, each taken only by rows the previous one left above goal:

1. *Hysteresis counts*: change only the replica counts that must change
   (:func:`adjust_counts` up to the fresh plan's largest replica), drop surplus replicas from the
   most loaded ranks, put the new ones into the freed slots (the cheapest slot where it fits
   under the goal), then swap by best gain per cost until the goal (:func:`refine_swaps`).
   A row keeps its counts in service instead when swaps alone reach the goal for at most
   ``KEEP_SHARE`` of the rewrites (sampling noise: a count change raises every rank of the
   donor expert, and each then needs a swap; drift: both cost about the same, and the changed
   counts serve the next window). Rows keeping their counts swap by fewest rewrites first
   (:func:`~eplb_service.policy.packing.fewest_rewrite_swaps`: chains through slots it already
   rewrote, so k ranks can cost k + 1 rewrites where k swaps take 2k).
2. *Fresh counts*: the same with the fresh plan's counts.
3. *Aligned fresh plan*: the fresh plan itself with its ranks renumbered and its slots ordered
   to keep as many (slot, expert) pairs as possible.

With two slots per rank, rows first try the fresh plan's counts with
:func:`~eplb_service.policy.pairs.repair_pairs` (re-pair few ranks, about one rewrite each,
partners kept within the fresh plan's envelope); only rows it cannot repair take 1-3. With
few enough count vectors (``fresh.EXACT_PAIRS_LIMIT``: Mixtral's 8 experts on 16 slots), rows
before that take the exact fewest-rewrites arrangement within the goal
(:func:`~eplb_service.policy.pairs.fewest_rewrites`).

Costs of writing an expert into a slot (:class:`~eplb_service.policy.packing.SwapCosts`): a
copy inside the GPU < a copy from a GPU of the same node < a copy across nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from eplb_service.policy.assignment import max_assignment
from eplb_service.policy.fresh import count_rows, count_vectors, item_loads
from eplb_service.policy.packing import (
    SwapCosts,
    SwapLog,
    fewest_rewrite_swaps,
    held_counts,
    refine_swaps,
)
from eplb_service.policy.pairs import PairLimits, fewest_rewrites, repair_pairs
from eplb_service.policy.replication import adjust_counts, water_fill

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B8 = npt.NDArray[np.bool_]

# The swap search aims this fraction of the tolerance below it, to give choose_points options.
SEARCH = 0.5
# Heavy ranks the swap search works on per step (each with its own light partner).
SEARCH_LANES = 1
# align_to matches ranks optimally up to this many ranks per row (greedily above).
OPTIMAL_MATCH_RANKS = 64
# replan tries the lower bound's goal before any fresh plan from this many slots per rank.
STAND_IN_MIN_SLOTS = 8
# Exact two-slots-per-rank rows also offer moves toward goal + f * (peak in service - goal).
PARTIAL = (0.1,)
# ... each the best of this many count vectors (in order of the slots they could keep).
PARTIAL_TRIES = 2
# A row whose hysteresis counts change keeps its counts in service instead when swaps alone
# reach its goal for at most this fraction of the rewrites the changed counts take.
KEEP_SHARE = 0.5
# Most swaps per row of the fewest-rewrites search (rows keeping their counts; a row it leaves
# above the goal takes the gain-first search, or its changed counts).
FEWEST_MOVES = 16

__all__ = [
    "FreshFn", "Paths", "align_slots", "align_to", "materialize", "rank_overlap", "replan",
]

@dataclass
class Paths:
    """Per row, the moves from the arrangement in service toward the goal, and their effect.

    Point ``k`` of a row: ``k = 0`` is the arrangement in service, ``k = 1 .. Q`` partial
    moves (``options``; Q = 0 except for the exact two-slots-per-rank rows, see
    :data:`PARTIAL`, and copies of the staged arrangement in rows without them), ``k = Q + 1``
    the staged one (the replica counts changed, or the aligned fresh plan for rows that fell
    back to it), ``k = Q + 1 + j`` the staged one after the row's first ``j`` swaps.
    :func:`materialize` builds any choice of points; every point with ``k >= min_point`` is a
    valid arrangement of the row.

    Attributes:
        current: [X, R, S], the arrangement in service (-1: a slot that must change)
        staged: [X, R, S]
        options: [X, Q, R, S], the arrangements of points ``1 .. Q``
        swap_row, swap_a, swap_b: [M], the swaps in order (slots ``r * S + s``)
        changed: [X, K], slots differing from ``current`` at each point (padded with the last)
        arrivals: [X, K], (rank, expert) pairs held at each point but not in ``current``
        peak: [X, K], largest rank load at each point
        points: [X], number of points of each row (>= 2)
        min_point: [X], 1 where ``current`` itself is not acceptable (free slots), else 0
        goal_met: [X], whether the last point is within the goal
    """

    current: I64
    staged: I64
    options: I64
    swap_row: I64
    swap_a: I64
    swap_b: I64
    changed: I64
    arrivals: I64
    peak: F64
    points: I64
    min_point: I64
    goal_met: B8


def materialize(paths: Paths, point: I64) -> I64:
    """``[X]`` chosen points -> ``[X, R, S]`` arrangements."""
    num_rows = point.shape[0]
    num_options = paths.options.shape[1]
    out = np.where((point >= 1)[:, None, None], paths.staged, paths.current)
    partial = np.flatnonzero((point >= 1) & (point <= num_options))
    out[partial] = paths.options[partial, point[partial] - 1]
    flat = out.reshape(num_rows, -1)
    # j-th swap of its row: rank of each log entry among its row's entries.
    order = np.argsort(paths.swap_row, kind="stable")
    row_sorted = paths.swap_row[order]
    starts = np.searchsorted(row_sorted, np.arange(num_rows))
    index = np.empty_like(order)
    index[order] = np.arange(order.size) - starts[row_sorted]
    take = np.flatnonzero(index < point[paths.swap_row] - 1 - num_options)
    # The j-th swaps of all rows at once (one per row), j in order: a row's swaps stay in
    # sequence.
    j_of = index[take]
    by_j = take[np.argsort(j_of, kind="stable")]
    bounds = np.searchsorted(j_of[np.argsort(j_of, kind="stable")],
                             np.arange(int(j_of.max(initial=-1)) + 2))
    flat_all = out.reshape(-1)  # view
    for j in range(bounds.size - 1):
        m = by_j[bounds[j] : bounds[j + 1]]
        base = paths.swap_row[m] * flat.shape[1]
        fa, fb = base + paths.swap_a[m], base + paths.swap_b[m]
        flat_all[fa], flat_all[fb] = flat_all[fb], flat_all[fa]
    return out


def _reassign(weight: F64, current: I64, counts: I64, goal: F64, costs: SwapCosts) -> I64:
    """Changes ``current`` to the given counts, rewriting only the slots the counts require.

    Surplus replicas are dropped from the most loaded ranks (free slots are freed too); each
    new replica, heaviest first, goes to the freed slot of least arrival cost among those whose
    rank stays under ``goal``, else to the freed slot of the lightest rank.

    Parameters:
        weight: [X, n]; current: [X, R, S] (< 0: free); counts: [X, n], target counts
            (>= 1, rows summing to P); goal: [X]; costs: write costs of the rows

    Returns:
        item: [X, R, S] holding exactly ``counts``
    """
    num_rows, num_ranks, per_rank = current.shape
    n = weight.shape[1]
    num_slots = num_ranks * per_rank
    item = current.copy()
    flat = item.reshape(num_rows, num_slots)  # view
    before = count_rows(current, n)
    surplus = np.maximum(before - counts, 0)
    deficit = np.maximum(counts - before, 0)
    rows = np.arange(num_rows)[:, None]
    slot_rank = np.repeat(np.arange(num_ranks), per_rank)  # [P]

    # Drop: per expert, its surplus replicas on the most loaded ranks.
    rank_load = item_loads(weight, current, before).sum(axis=2)  # [X, R]
    pressure = rank_load[:, slot_rank] / np.maximum(rank_load.max(axis=1, keepdims=True), 1e-300)
    expert = np.where(flat >= 0, flat, n)  # free slots sort last
    order = np.argsort(expert * 4.0 - pressure, axis=1, kind="stable")  # by expert, hot first
    sorted_expert = expert[rows, order]
    first = np.concatenate([np.zeros((num_rows, 1), np.int64), np.cumsum(before, axis=1)], axis=1)
    position = np.arange(num_slots)[None, :] - first[rows, sorted_expert]
    surplus_pad = np.concatenate([surplus, np.zeros((num_rows, 1), np.int64)], axis=1)
    freed = np.zeros((num_rows, num_slots), dtype=bool)
    freed[rows, order] = position < surplus_pad[rows, sorted_expert]
    flat[freed] = -1

    # Add: new replicas heaviest first, each into the cheapest freed slot where it fits.
    per = weight / counts
    rank_load = _slot_loads(per, item).sum(axis=2)
    new_expert = np.repeat(np.tile(np.arange(n), num_rows), deficit.ravel())
    new_row = np.repeat(np.arange(num_rows), deficit.sum(axis=1))
    key = np.lexsort((-per[new_row, new_expert], new_row))
    new_expert, new_row = new_expert[key], new_row[key]
    starts = np.concatenate([[0], np.cumsum(deficit.sum(axis=1))])
    rank_in_row = np.arange(new_row.size) - starts[new_row]
    # Only freed slots can receive: each row's free slots in slot order (padded), so that the
    # first minimum below is the same slot as over all of the row's slots.
    free_row, free_slot = np.nonzero(flat < 0)
    num_free = np.bincount(free_row, minlength=num_rows)
    free_start = np.concatenate([[0], np.cumsum(num_free)])
    free_pos = np.arange(free_row.size) - free_start[free_row]
    width = int(num_free.max(initial=0))
    slots = np.zeros((num_rows, width), dtype=np.int64)
    slot_open = np.zeros((num_rows, width), dtype=bool)
    slots[free_row, free_pos] = free_slot
    slot_open[free_row, free_pos] = True
    for k in range(int(rank_in_row.max(initial=-1)) + 1):
        sel = rank_in_row == k
        r_ids, e_ids = new_row[sel], new_expert[sel]
        cand = slots[r_ids]  # [a, F]
        cand_rank = cand // per_rank
        r_col = r_ids[:, None]
        free_now = slot_open[r_ids] & (flat[r_col, cand] < 0)  # [a, F]
        x = per[r_ids, e_ids]  # [a]
        after = rank_load[r_col, cand_rank] + x[:, None]  # [a, F]
        cost = costs.arrival(r_col, cand_rank, e_ids[:, None])  # [a, F]
        fits = free_now & (after <= goal[r_ids, None])
        score = np.where(
            fits.any(axis=1, keepdims=True),
            np.where(fits, cost * 1e6 + after, np.inf),  # cheapest fitting, then lightest
            np.where(free_now, after, np.inf),
        )
        slot = cand[np.arange(r_ids.size), score.argmin(axis=1)]
        flat[r_ids, slot] = e_ids
        rank_load[r_ids, slot // per_rank] += x
    return item


def _slot_loads(per: F64, item: I64) -> F64:
    """``[X, n]`` per-replica loads, ``[X, R, S]`` arrangement -> slot loads (0 where free)."""
    rows = np.arange(item.shape[0])[:, None, None]
    return np.where(item >= 0, per[rows, np.maximum(item, 0)], 0.0)


Attempt = tuple[I64, SwapLog, F64]  # staged [r, R, S], its swap log, final peaks [r]


def _attempt(
    weight: F64, counts: I64, goal: F64, search_goal: F64, costs: SwapCosts, max_moves: int,
    limits: PairLimits | None = None, fewest: bool = False,
) -> Attempt:
    """Reassign to ``counts``, then swap toward ``search_goal``; returns staged, log, peaks.

    With two slots per rank (``limits`` given), rows first re-pair as few ranks as reach the
    limits (:func:`~eplb_service.policy.pairs.repair_pairs`: a swap rewrites a slot on two
    ranks, a re-paired rank one); rows it cannot repair are reassigned as with more slots.
    ``fewest``: swap by fewest rewrites (at most ``FEWEST_MOVES``) instead of largest gain.
    """
    if weight.shape[0] == 0:
        none = np.zeros(0, dtype=np.int64)
        empty = SwapLog(none, none, none, np.zeros(0), none, none)
        return costs.original.copy(), empty, np.zeros(0)
    staged = _reassign(weight, costs.original, counts, goal, costs)
    if limits is not None:
        repaired, ok = repair_pairs(weight, costs.original, counts, limits)
        staged[ok] = repaired[ok]
    load = _slot_loads(weight / counts, staged)
    if fewest:
        load, _, log = fewest_rewrite_swaps(load, staged, search_goal, costs,
                                            max_moves=min(max_moves, FEWEST_MOVES))
    else:
        load, _, log = refine_swaps(load, staged, search_goal, costs=costs,
                                    max_moves=max_moves, lanes=SEARCH_LANES)
    return staged, log, load.sum(axis=2).max(axis=1)


def _take(result: Attempt, mask: B8) -> Attempt:
    """The rows ``mask [r]`` of an :func:`_attempt` result (log rows renumbered)."""
    staged, log, last = result
    index = np.cumsum(mask) - 1
    keep = mask[log.row]
    sub = SwapLog(index[log.row[keep]], log.slot_a[keep], log.slot_b[keep], log.peak[keep],
                  log.changed[keep], log.arrivals[keep])
    return staged[mask], sub, last[mask]


def _rewrites_to_goal(weight: F64, counts: I64, current: I64, result: Attempt,
                      goal: F64) -> F64:
    """``[r]`` slots an :func:`_attempt` result has rewritten at its first point within
    ``goal`` (inf where none is).

    Parameters:
        weight: [r, n]; counts: [r, n], the attempt's counts; current: [r, R, S], the
            arrangement in service; result: the attempt on those rows; goal: [r]
    """
    staged, log, _ = result
    num_rows = staged.shape[0]
    out = np.full(num_rows, np.inf)
    hit = np.flatnonzero(log.peak <= goal[log.row] * (1 + 1e-9))
    rows, first = np.unique(log.row[hit], return_index=True)  # a row's moves keep their order
    out[rows] = log.changed[hit[first]]
    peak = _slot_loads(weight / counts, staged).sum(axis=2).max(axis=1)
    at_start = peak <= goal * (1 + 1e-9)
    out[at_start] = (staged != current).sum(axis=(1, 2))[at_start]
    return out


def align_to(fresh: I64, current: I64) -> I64:
    """Renumbers the ranks of ``fresh`` (and orders each rank's slots) to match ``current``.

    Ranks are matched to keep the most (slot, expert) pairs: an optimal assignment
    (:func:`~eplb_service.policy.assignment.max_assignment`) on the number of experts each
    fresh rank shares with each current rank when there are at most
    ``OPTIMAL_MATCH_RANKS`` ranks, else a greedy matching (:func:`_match_ranks`; the exact
    solver's search paths get long on large sparse overlaps); then :func:`align_slots` keeps
    shared experts in their current slots.

    Parameters:
        fresh: [X, R, S], a plan whose ranks may be permuted freely
        current: [X, R, S], the arrangement in service (< 0: free)

    Returns:
        [X, R, S], ``fresh`` with ranks permuted and slots ordered
    """
    num_rows, num_ranks, _ = fresh.shape
    overlap = rank_overlap(fresh, current)
    if num_ranks <= OPTIMAL_MATCH_RANKS:
        target = max_assignment(overlap)
    else:
        overlap += 1e-3  # any match beats none
        # Equal overlaps: fresh rank a prefers current ranks a, a + 1, ... (spreads the ties).
        shift = (np.arange(num_ranks)[None, :] - np.arange(num_ranks)[:, None]) % num_ranks
        overlap -= 1e-6 * shift / num_ranks
        target = _match_ranks(overlap)
    out = np.empty_like(fresh)
    out[np.arange(num_rows)[:, None], target] = fresh
    return align_slots(out, current)


def rank_overlap(fresh: I64, current: I64) -> F64:
    """``[X, R, R]``: (slot, slot) pairs of fresh rank ``a`` and current rank ``b`` holding the
    same expert (ids < 0 never match)."""
    num_rows = fresh.shape[0]
    n = int(max(fresh.max(initial=-1), current.max(initial=-1))) + 1
    held = held_counts(current, n)[:, :, :n]  # [X, R, n]
    by_expert = np.ascontiguousarray(held.transpose(0, 2, 1))  # [X, n, R]
    rows = np.arange(num_rows)[:, None, None]
    picked = by_expert[rows, np.maximum(fresh, 0)]  # [X, R, S, R]
    picked = np.where((fresh >= 0)[:, :, :, None], picked, 0)
    return picked.sum(axis=2).astype(np.float64)


def _match_ranks(overlap: F64) -> I64:
    """A one-to-one matching of fresh ranks to current ranks with large total overlap.

    Rounds of proposals: every unmatched fresh rank proposes to the free current rank it
    overlaps most; every current rank keeps its best proposer (ties to the lower index).

    Parameters:
        overlap: [X, R, R], > 0, how much fresh rank a shares with current rank b

    Returns:
        target: [X, R], the current rank of each fresh rank
    """
    num_rows, num_ranks, _ = overlap.shape
    target = np.full((num_rows, num_ranks), -1, dtype=np.int64)
    free = np.ones((num_rows, num_ranks), dtype=bool)  # current ranks not taken
    rows = np.arange(num_rows)[:, None]
    fresh_ranks = np.arange(num_ranks)[None, :]
    while (target < 0).any():
        open_f = target < 0  # [X, Rf]
        masked = np.where(open_f[:, :, None] & free[:, None, :], overlap, -np.inf)
        choice = masked.argmax(axis=2)  # [X, Rf]
        value = masked[rows, fresh_ranks, choice]  # [X, Rf], -inf where not proposing
        # offer[x, a, b]: fresh rank a's proposal value to current rank b.
        offer = np.where(choice[:, :, None] == np.arange(num_ranks)[None, None, :],
                         value[:, :, None], -np.inf)
        winner = offer.argmax(axis=1)  # [X, Rc], best proposer of each current rank
        won = np.isfinite(offer.max(axis=1))  # [X, Rc]
        x, b = np.nonzero(won)
        target[x, winner[x, b]] = b
        free[x, b] = False
    return target


def align_slots(new: I64, old: I64) -> I64:
    """Orders each rank's slots of ``new`` so that experts also in ``old`` keep their slot.

    Parameters:
        new: [X, R, S], expert ids
        old: [X, R, S], expert ids (< 0 never match)

    Returns:
        [X, R, S], ``new`` with each rank's items permuted
    """
    per_rank = new.shape[2]
    used = np.zeros(new.shape, dtype=bool)  # items of new already placed
    out = np.full_like(new, -1)
    for s in range(per_rank):
        match = (new == old[:, :, s : s + 1]) & ~used  # [X, R, S]
        hit = match.any(axis=2)
        j = match.argmax(axis=2)
        x, r = np.nonzero(hit)
        out[x, r, s] = new[x, r, j[x, r]]
        used[x, r, j[x, r]] = True
    # Remaining items fill the remaining slots in order.
    rest = np.sort(np.where(used, np.iinfo(np.int64).max, np.arange(per_rank)), axis=2)
    holes = np.sort(np.where(out < 0, np.arange(per_rank), np.iinfo(np.int64).max), axis=2)
    x, r, k = np.nonzero(holes < per_rank)
    out[x, r, holes[x, r, k]] = new[x, r, rest[x, r, k]]
    return out


FreshFn = Callable[[I64], tuple[I64, F64]]


def replan(
    weight: F64,
    current: I64,
    reference: F64,
    fresh: FreshFn,
    *,
    num_nodes: int,
    tolerance: float,
    allowance: F64 | None = None,
    search: float = SEARCH,
    max_moves: int = 256,
    stand_in: bool = False,
    polish: float | None = None,
) -> tuple[Paths, F64]:
    """Move paths for every row from its arrangement in service (see the module docstring).

    A row's goal is ``reference * (1 + tolerance) + allowance``, where ``reference`` starts as a
    cheap stand-in for the fresh plan's largest rank load (the lower bound); rows not already
    within reach of it ask ``fresh`` for their fresh plan and take its largest rank load
    instead (so a row already near the bound costs no fresh plan).
    Swaps continue toward ``reference * (1 + search * tolerance) + search * allowance`` so that
    a caller choosing points across rows (:func:`eplb_service.policy.budget.choose_points`)
    can spend moves where they pay most.

    Parameters:
        weight: [X, n], loads
        current: [X, R, S], experts in service (< 0: must be rewritten)
        reference: [X], a lower estimate of the fresh plan's largest rank load per row
        fresh: rows -> (fresh plan [r, R, S], its largest rank load [r]) of those rows
        num_nodes: nodes the ranks of a row span (for transfer costs)
        tolerance: relative max rank load above the fresh plan a row may keep
        allowance: [X], absolute load a row may keep above that too (sampling noise)
        search: fraction of the tolerance and allowance the swap search aims for
        max_moves: most swaps per row
        stand_in: ``reference`` is only a lower bound (the fresh plan is not known): with at
            least ``STAND_IN_MIN_SLOTS`` slots per rank, rows first try to reach the goal it
            sets before asking ``fresh``
        polish: when given, swaps continue down to ``reference * (1 + polish)`` (at most the
            search goal above), and rows already within their goal but above that level get
            a path too (swaps only, replica counts kept), so that a caller asking for more
            than every row's goal (a mean balancedness near the fresh plan's) can buy it
            where it costs least

    Returns:
        paths: :class:`Paths`
        goal: [X], each row's goal (with the fresh plan's load where it was needed)
    """
    num_rows, num_ranks, per_rank = current.shape
    n = weight.shape[1]
    num_slots = num_ranks * per_rank
    extra = np.zeros(num_rows) if allowance is None else allowance
    reference = reference.copy()

    def goals(rows: I64 | slice) -> tuple[F64, F64]:
        ref, more = reference[rows], extra[rows]
        searched = ref * (1 + search * tolerance) + search * more
        if polish is not None:
            searched = np.minimum(searched, ref * (1 + polish))
        return ref * (1 + tolerance) + more, searched

    if per_rank == 2 and count_vectors(num_slots, n) is not None:
        polish = None  # exact fewest-rewrites rows (Mixtral): a swap rewrites 1/8 of a layer
    goal, search_goal = goals(slice(None))
    costs = SwapCosts.in_service(current, n, num_nodes)
    before = count_rows(current, n)
    must_fix = (before == 0).any(axis=1) | (current < 0).any(axis=(1, 2))
    peak0 = item_loads(weight, current, before).sum(axis=2).max(axis=1)
    staged = current.copy()
    staged_peak = peak0.copy()
    logs: list[tuple[I64, SwapLog]] = []
    met = ~must_fix & (peak0 <= goal * (1 + 1e-9))
    touched = np.zeros(num_rows, dtype=bool)  # rows with a staged arrangement or swaps
    small = count_vectors(num_slots, n) if per_rank == 2 else None
    options = np.full((num_rows, 0 if small is None else len(PARTIAL), num_ranks, per_rank), -2)

    def attempt(rows: I64, counts: I64, limits: PairLimits | None = None,
                fewest: bool = False) -> Attempt:
        return _attempt(weight[rows], counts, goal[rows], search_goal[rows], costs.rows(rows),
                        max_moves, limits, fewest)

    def accept(rows: I64, counts: I64, got: I64, log: SwapLog, last: F64) -> I64:
        """Keeps the attempt's rows that meet their goal; returns the others."""
        ok = (last <= goal[rows] * (1 + 1e-9)) | (
            ~must_fix[rows] & (peak0[rows] <= goal[rows] * (1 + 1e-9))
        )
        staged[rows[ok]] = got[ok]
        staged_peak[rows[ok]] = _slot_loads(weight[rows[ok]] / counts[ok], got[ok]).sum(
            axis=2
        ).max(axis=1)
        met[rows[ok]] = True
        touched[rows[ok]] = True
        keep = ok[log.row]
        logs.append((rows, SwapLog(log.row[keep], log.slot_a[keep], log.slot_b[keep],
                                   log.peak[keep], log.changed[keep], log.arrivals[keep])))
        return rows[~ok]

    # Rows within their goal keep every slot (even above the search goal): touching them
    # would rewrite slots for a gain smaller than the tolerance (with ``polish`` they get a
    # path at the end, which the caller takes only to meet a mean target).
    todo = np.flatnonzero(must_fix | (peak0 > goal * (1 + 1e-9)))
    if todo.size and stand_in and per_rank >= STAND_IN_MIN_SLOTS:
        # 0. Hysteresis counts toward the stand-in's goal (water-filling's largest replica):
        # rows that reach it never need their fresh plan (whose peak is at least the bound).
        # Only with many slots per rank, where fresh plans reach the bound: with few, the
        # bound's goal is tighter than the fresh plan's and rows would move more.
        level = (weight[todo] / water_fill(weight[todo], num_slots)).max(axis=1) * (1 + tolerance)
        counts = adjust_counts(weight[todo], before[todo], level, num_slots)
        todo = accept(todo, counts, *attempt(todo, counts))
    if todo.size:
        # Rows not already near the stand-in need the fresh plan: its largest rank load is
        # their reference from here on.
        fresh_item, fresh_peak = fresh(todo)
        reference[todo] = np.maximum(reference[todo], fresh_peak)
        goal[todo], search_goal[todo] = goals(todo)
        met[todo] = ~must_fix[todo] & (peak0[todo] <= goal[todo] * (1 + 1e-9))
        busy = must_fix[todo] | (peak0[todo] > goal[todo] * (1 + 1e-9))
        todo, fresh_item, fresh_peak = todo[busy], fresh_item[busy], fresh_peak[busy]
    if todo.size and small is not None:
        # Two slots per rank and few count vectors (Mixtral): the arrangement within the goal
        # that rewrites the fewest slots, over every count vector (exact; the repair below
        # rewrote ~20% more, measured on Mixtral drift).
        got, ok = fewest_rewrites(weight[todo], current[todo], PairLimits.plain(goal[todo]),
                                  *small)
        rows = todo[ok]
        counts = count_rows(got[ok], n)
        peaks = _slot_loads(weight[rows] / counts, got[ok]).sum(axis=2).max(axis=1)
        none = np.zeros(0, dtype=np.int64)
        later = accept(rows, counts, got[ok], SwapLog(none, none, none, np.zeros(0), none, none),
                       peaks)
        keep = ~ok | np.isin(todo, later)
        # Partial moves toward looser goals: rows far above their goal can buy part of the
        # way, leaving the rest to rows where it costs fewer rewrites (choose_points).
        done = todo[~keep]
        for q, f in enumerate(PARTIAL):
            looser = goal[done] + f * np.maximum(peak0[done] - goal[done], 0.0)
            part, part_ok = fewest_rewrites(weight[done], current[done],
                                            PairLimits.plain(looser), *small, staged[done],
                                            max_tries=PARTIAL_TRIES)
            options[done[part_ok], q] = part[part_ok]
        todo, fresh_item, fresh_peak = todo[keep], fresh_item[keep], fresh_peak[keep]
    if todo.size and per_rank == 2:
        # Two slots per rank: re-pair ranks toward the fresh plan's counts and partner
        # envelope (a count change costs one rewrite here, and hysteresis counts left the
        # next window's balancedness ~0.3% lower); rows it cannot repair take steps 1-3.
        limits = PairLimits.from_fresh(weight[todo], fresh_item, goal[todo], fresh_peak)
        counts = count_rows(fresh_item, n)
        later = accept(todo, counts, *attempt(todo, counts, limits))
        keep = np.isin(todo, later)
        todo, fresh_item, fresh_peak = todo[keep], fresh_item[keep], fresh_peak[keep]
    if todo.size:
        # 1. Hysteresis counts: change only those that must change.
        level = (weight[todo] / count_rows(fresh_item, n)).max(axis=1) * (1 + tolerance)
        counts = adjust_counts(weight[todo], before[todo], level, num_slots)
        free = ~must_fix[todo]
        moved = free & (counts != before[todo]).any(axis=1)
        # A swap relieves at most one rank: rows with more than FEWEST_MOVES ranks above the
        # goal (counts kept) cannot reach it by the fewest-rewrites search.
        over = (item_loads(weight[todo], current[todo], before[todo]).sum(axis=2)
                > goal[todo, None] * (1 + 1e-9)).sum(axis=1)
        near = free & (over <= FEWEST_MOVES)
        # Rows that can keep their counts swap by fewest rewrites first; rows it leaves above
        # the goal take the gain-first search.
        same = todo[near & ~moved]
        missed = accept(same, before[same], *attempt(same, before[same], fewest=True))
        gain_first = np.sort(np.concatenate([missed, todo[free & ~moved & ~near]]))
        left = [accept(gain_first, before[gain_first], *attempt(gain_first,
                                                                before[gain_first]))]
        # Rows whose counts change keep them instead where that reaches the goal for at most
        # KEEP_SHARE of the rewrites (each rank above the goal needs a rewrite of its own).
        rows = todo[moved]
        tried = attempt(rows, counts[moved])
        cost_moved = _rewrites_to_goal(weight[rows], counts[moved], current[rows], tried,
                                       goal[rows])
        finite = np.isfinite(cost_moved)
        limit = np.where(finite, KEEP_SHARE * np.where(finite, cost_moved, 0.0), np.inf)
        trial = near[moved] & (over[moved] <= limit)
        sub = rows[trial]
        alt = attempt(sub, before[sub], fewest=True)
        cost_kept = np.full(rows.size, np.inf)
        cost_kept[trial] = _rewrites_to_goal(weight[sub], before[sub], current[sub], alt,
                                             goal[sub])
        kept = np.isfinite(cost_kept) & (cost_kept <= limit)
        accept(rows[kept], before[rows[kept]], *_take(alt, kept[trial]))
        left.append(accept(rows[~kept], counts[moved][~kept], *_take(tried, ~kept)))
        fix = ~free
        left.append(accept(todo[fix], counts[fix], *attempt(todo[fix], counts[fix])))
        later = np.sort(np.concatenate(left))
        if later.size:
            # 2. The fresh plan's counts.
            pick = np.searchsorted(todo, later)
            fresh_counts = count_rows(fresh_item[pick], n)
            final = accept(later, fresh_counts, *attempt(later, fresh_counts))
            if final.size:
                # 3. Last resort: the fresh plan, renumbered to keep what it can.
                idx = np.searchsorted(todo, final)
                staged[final] = align_to(fresh_item[idx], current[final])
                staged_peak[final] = fresh_peak[idx]
                met[final] = True
                touched[final] = True
    if polish is not None:
        # Rows within their goal keep their counts and only swap toward the polish level.
        idle = np.flatnonzero(~touched & ~must_fix & (peak0 > search_goal * (1 + 1e-9)))
        if idle.size:
            accept(idle, before[idle], *attempt(idle, before[idle]))
    options = np.where(options[:, :, :1, :1] == -2, staged[:, None], options)
    paths = _assemble(weight, current, staged, staged_peak, options, logs, peak0, must_fix, met,
                      costs)
    return paths, goal


def _assemble(
    weight: F64, current: I64, staged: I64, staged_peak: F64, options: I64,
    logs: list[tuple[I64, SwapLog]], peak0: F64, must_fix: B8, met: B8, costs: SwapCosts,
) -> Paths:
    """Collects the attempts' logs into padded per-row point arrays."""
    num_rows = current.shape[0]
    n = weight.shape[1]
    rows = np.concatenate([r[log.row] for r, log in logs]) if logs else np.zeros(0, np.int64)
    def cat(name: str) -> npt.NDArray[np.generic]:
        if not logs:
            return np.zeros(0, dtype=np.float64 if name == "peak" else np.int64)
        return np.concatenate([getattr(log, name) for _, log in logs])
    slot_a, slot_b = cat("slot_a").astype(np.int64), cat("slot_b").astype(np.int64)
    peak, changed, arrivals = cat("peak"), cat("changed"), cat("arrivals")
    moves = np.bincount(rows, minlength=num_rows)
    num_options = options.shape[1]
    width = 2 + num_options + int(moves.max(initial=0))
    order = np.argsort(rows, kind="stable")
    starts = np.concatenate([[0], np.cumsum(moves)])
    index = np.empty_like(order)
    index[order] = np.arange(order.size) - starts[rows[order]]
    col = 2 + num_options + index

    staged_changed = (staged != current).reshape(num_rows, -1).sum(axis=1)
    staged_arrivals = ((held_counts(staged, n)[:, :, :n] > 0) & ~costs.held).sum(axis=(1, 2))
    out_changed = np.zeros((num_rows, width), dtype=np.int64)
    out_arrivals = np.zeros((num_rows, width), dtype=np.int64)
    out_peak = np.zeros((num_rows, width))
    out_peak[:, 0] = peak0
    out_changed[:, 1:] = staged_changed[:, None]
    out_arrivals[:, 1:] = staged_arrivals[:, None]
    out_peak[:, 1:] = staged_peak[:, None]
    if num_options:
        item = options.reshape(num_rows * num_options, *current.shape[1:])
        counts = count_rows(item, n)
        per = np.repeat(weight, num_options, axis=0) / np.maximum(counts, 1)
        held = held_counts(item, n)[:, :, :n] > 0
        new = held.reshape(num_rows, num_options, -1) & ~costs.held.reshape(num_rows, 1, -1)
        span = slice(1, 1 + num_options)
        out_changed[:, span] = (item.reshape(num_rows, num_options, -1)
                                != current.reshape(num_rows, 1, -1)).sum(axis=2)
        out_arrivals[:, span] = new.sum(axis=2)
        out_peak[:, span] = _slot_loads(per, item).sum(axis=2).max(axis=1).reshape(num_rows, -1)
    out_changed[rows, col] = changed
    out_arrivals[rows, col] = arrivals
    out_peak[rows, col] = peak
    points = 2 + num_options + moves
    # Pad each row with its last point.
    pad = np.arange(width)[None, :] >= points[:, None]
    last = points - 1
    r_idx = np.arange(num_rows)
    out_changed = np.where(pad, out_changed[r_idx, last][:, None], out_changed)
    out_arrivals = np.where(pad, out_arrivals[r_idx, last][:, None], out_arrivals)
    out_peak = np.where(pad, out_peak[r_idx, last][:, None], out_peak)
    return Paths(
        current=current, staged=staged, options=options, swap_row=rows, swap_a=slot_a,
        swap_b=slot_b, changed=out_changed, arrivals=out_arrivals, peak=out_peak, points=points,
        min_point=must_fix.astype(np.int64), goal_met=met,
    )
