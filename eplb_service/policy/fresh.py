"""Planning from scratch: replica counts and a packing that gets close to the lower bound.

Works on rows ``X`` (layers for a global plan, (layer, node) pairs inside a hierarchical one),
each with ``n`` experts, ``P`` slots and ``R`` ranks of ``S = P / R`` slots. An arrangement is
``item [X, R, S]``: the expert in each slot of each rank.

1. Start from DeepSeek's own greedy (water-filling counts, greedy packing), so that no row is
   ever worse than the deepseek policy; even it out with :func:`balance_pairs` and polish with
   :func:`refine_swaps`.
2. Rows still more than ``POOR`` above the lower bound are count-limited (a rank holds exactly
   ``S`` replicas, so water-filling can make too many mid-sized ones). For them, with 3+ slots
   per rank, first try :func:`anchor_counts` (one anchor replica per rank, fillers around it);
   rows still poor try :func:`cardinality_counts` at a few target levels; each is packed the
   same way, and the best arrangement per row is kept.
3. With few slots per rank (``3 <= S <= COUNT_MOVE_SLOTS``), rows still poor try
   :func:`count_moves`: one replica moved between experts at a time, repacked, kept only where
   the polished peak drops.
"""

from __future__ import annotations

import math
from functools import lru_cache
from itertools import combinations

import numpy as np
import numpy.typing as npt

from eplb_service.policy import deepseek
from eplb_service.policy.packing import balance_pairs, lpt_pack, refine_swaps
from eplb_service.policy.replication import anchor_counts, cardinality_counts, water_fill

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

__all__ = [
    "COUNT_MOVE_SLOTS",
    "LEVEL_FACTORS",
    "POOR",
    "count_moves",
    "count_rows",
    "count_vectors",
    "exact_pairs",
    "greedy_pack",
    "item_loads",
    "lower_bound",
    "plan_fresh",
]

# A row whose max rank load exceeds the lower bound by more than this tries other counts.
POOR = 0.005
# Target levels (x lower bound) at which cardinality_counts is tried for rows still poor after
# anchor_counts (1.08 bought at most 0.0005 x LB on any benchmark row then; decision 0013).
LEVEL_FACTORS = (1.0, 1.04)
# With 3+ slots per rank, poor rows first try anchor_counts at the lower bound: experts above
# this share of it anchor one rank per replica (decision 0013, addendum).
ANCHOR_THRESHOLD = 0.5
# Two slots per rank: every count vector is tried when there are at most this many.
EXACT_PAIRS_LIMIT = 20_000
# Rounds of balance_pairs after a greedy packing, and when ranking count candidates.
PAIR_ROUNDS = 4
CANDIDATE_PAIR_ROUNDS = 0
# Swaps stop this close above the lower bound: closer is invisible in balancedness.
SETTLE = 2e-4
# Heavy ranks the polishing swaps work on per step.
FRESH_LANES = 1
# Most polishing swaps per row (a count-limited row can creep on for dozens of tiny gains).
POLISH_MOVES = 16
# count_moves runs on rows with 3..COUNT_MOVE_SLOTS slots per rank (DeepSeek-V3 EP64's 5): it
# costs ~60 ms on 58 poor rows, more than the 30 ms target of EP32 (9 slots) allows.
COUNT_MOVE_SLOTS = 5
# Rounds of count_moves, and donors tried per receiving expert and round.
COUNT_MOVE_ROUNDS = 3
COUNT_MOVE_DONORS = 2


def count_rows(item: I64, num_experts: int) -> I64:
    """``[X, R, S]`` arrangement -> ``[X, n]`` replicas per expert (ids < 0 are free slots)."""
    num_rows = item.shape[0]
    flat = item.reshape(num_rows, -1)
    valid = flat >= 0
    offset = (np.arange(num_rows, dtype=np.int64) * num_experts)[:, None]
    index = np.where(valid, flat + offset, num_rows * num_experts)
    counts = np.bincount(index.ravel(), minlength=num_rows * num_experts + 1)
    return counts[:-1].reshape(num_rows, num_experts).astype(np.int64)


def item_loads(weight: F64, item: I64, counts: I64 | None = None) -> F64:
    """``[X, R, S]`` arrangement -> ``[X, R, S]`` load of each slot (0 for a free slot).

    Parameters:
        weight: [X, n], loads
        item: [X, R, S], expert per slot (< 0: free)
        counts: [X, n], replica counts (derived from ``item`` when omitted)
    """
    if counts is None:
        counts = count_rows(item, weight.shape[1])
    per = np.divide(weight, counts, out=np.zeros_like(weight), where=counts > 0)
    rows = np.arange(item.shape[0])[:, None, None]
    return np.where(item >= 0, per[rows, np.maximum(item, 0)], 0.0)


def lower_bound(weight: F64, num_slots: int, num_ranks: int) -> F64:
    """``[X]``: ``max(W / R, min over counts of max_e w_e / min(c_e, R))`` (see
    :func:`eplb_service.balance.lower_bound`; computed here from water-filling counts)."""
    counts = water_fill(weight, num_slots)
    replica = (weight / np.minimum(counts, num_ranks)).max(axis=1)
    return np.maximum(weight.sum(axis=1) / num_ranks, replica)


def greedy_pack(
    weight: F64, counts: I64, num_ranks: int, rounds: int = PAIR_ROUNDS
) -> tuple[I64, F64]:
    """Greedy packing of given counts, evened out by :func:`balance_pairs`.

    Parameters:
        weight: [X, n], loads
        counts: [X, n], replica counts, rows summing to P
        num_ranks: R

    Returns:
        item: [X, R, S], the expert in each slot
        load: [X, R, S], the load of each slot
    """
    num_rows, n = weight.shape
    num_slots = int(counts[0].sum())
    experts = np.repeat(
        np.tile(np.arange(n, dtype=np.int64), num_rows), counts.ravel()
    ).reshape(num_rows, num_slots)
    rows = np.arange(num_rows)[:, None]
    load = (weight / counts)[rows, experts]  # [X, P]
    order = lpt_pack(load, num_ranks).reshape(num_rows, num_slots)
    item = experts[rows, order].reshape(num_rows, num_ranks, -1)
    slot_load = load[rows, order].reshape(num_rows, num_ranks, -1)
    slot_load, item = balance_pairs(slot_load, item, rounds)
    return item, slot_load


@lru_cache(maxsize=8)
def _count_vectors(num_slots: int, num_experts: int) -> I64:
    """``[C, n]``: every way to give ``n`` experts >= 1 replica each, ``P`` in all."""
    cuts = np.array(list(combinations(range(1, num_slots), num_experts - 1)), dtype=np.int64)
    cuts = cuts.reshape(-1, num_experts - 1) if num_experts > 1 else np.zeros((1, 0), np.int64)
    counts = np.diff(cuts, prepend=0, append=num_slots, axis=1)
    counts.setflags(write=False)
    return counts


def count_vectors(num_slots: int, num_experts: int) -> tuple[I64, I64] | None:
    """Every count vector ``[C, n]`` and the expert of each replica ``[C, P]`` (ascending ids),
    or None when there are more than ``EXACT_PAIRS_LIMIT``."""
    if math.comb(num_slots - 1, num_experts - 1) > EXACT_PAIRS_LIMIT:
        return None
    return _count_vectors(num_slots, num_experts), _count_experts(num_slots, num_experts)


@lru_cache(maxsize=8)
def _count_experts(num_slots: int, num_experts: int) -> I64:
    """``[C, P]``: the expert of each replica for every count vector, ascending ids."""
    counts = _count_vectors(num_slots, num_experts)
    ids = np.repeat(np.tile(np.arange(num_experts), counts.shape[0]), counts.ravel())
    out = ids.reshape(counts.shape[0], num_slots)
    out.setflags(write=False)
    return out


def exact_pairs(weight: F64, num_slots: int, upper: F64) -> tuple[I64, F64]:
    """The optimum for two slots per rank, by trying every replica count vector.

    With two replicas per rank, pairing the sorted replicas outside-in (largest with smallest)
    minimizes the largest pair for given counts, so the best count vector gives the optimum.
    Count vectors are tried in order of their largest plus smallest replica (a lower bound on
    their best pairing) and the search stops once that bound reaches the best found.
    Only for small problems: ``C(P - 1, n - 1)`` count vectors (see ``EXACT_PAIRS_LIMIT``).

    Parameters:
        weight: [X, n], loads
        num_slots: P = 2 R
        upper: [X], a peak already reached (rows that cannot beat it keep ``peak = upper``)

    Returns:
        item: [X, R, 2], the expert in each slot (undefined where ``peak == upper``)
        peak: [X], the largest rank load: the optimum where below ``upper``
    """
    num_rows, n = weight.shape
    half = num_slots // 2
    counts = _count_vectors(num_slots, n)  # [C, n]
    # [n, X, C], C-ordered so that reducing the leading axis runs over contiguous rows.
    per_t = np.ascontiguousarray(weight.T)[:, :, None] / np.ascontiguousarray(counts.T)[:, None]
    # The first outside-in pair (largest + smallest replica) bounds each vector from below;
    # vectors are tried in order of that bound, a chunk at a time, until it passes the best.
    bound = per_t.max(axis=0) + per_t.min(axis=0)  # [X, C]
    order = np.argsort(bound, axis=1, kind="stable")
    item = np.zeros((num_rows, half, 2), dtype=np.int64)
    peak = upper.astype(np.float64).copy()
    rows = np.arange(num_rows)
    chunk = 64
    for start in range(0, counts.shape[0], chunk):
        cand = order[rows, start : start + chunk]  # [r, k]
        open_rows = bound[rows, cand[:, 0]] < peak[rows] * (1 - 1e-12)
        rows, cand = rows[open_rows], cand[open_rows]
        if rows.size == 0:
            break
        experts = _count_experts(num_slots, n)[cand]  # [r, k, P]
        loads = per_t[experts, rows[:, None, None], cand[:, :, None]]  # [r, k, P]
        rank = np.argsort(loads, axis=2, kind="stable")
        ranked = np.take_along_axis(loads, rank, axis=2)
        value = (ranked[:, :, :half] + ranked[:, :, ::-1][:, :, :half]).max(axis=2)  # [r, k]
        best = value.argmin(axis=1)
        best_value = value[np.arange(rows.size), best]
        better = best_value < peak[rows]
        r, b = rows[better], best[better]
        peak[r] = best_value[better]
        by_load = np.take_along_axis(experts[better, b], rank[better, b], axis=1)  # [r, P]
        item[r] = np.stack([by_load[:, :half], by_load[:, ::-1][:, :half]], axis=2)
    return item, peak


def count_moves(
    weight: F64, item: I64, load: F64, bound: F64, num_ranks: int
) -> tuple[I64, F64]:
    """Moves single replicas between experts on rows more than ``POOR`` above ``bound``.

    Per round and row, the receiving expert is the one of the heaviest rank's largest or
    smallest replica (a smaller replica on that rank, or one more small filler), and the donors
    are the ``COUNT_MOVE_DONORS`` experts whose remaining replicas stay lightest (``w / (c -
    1)`` smallest, ``c >= 2``). Every candidate count vector is packed by :func:`greedy_pack`;
    the best one per row is polished by swaps and kept only if its largest rank load is lower.
    Rows that gain nothing stop.

    Parameters:
        weight: [X, n], loads
        item: [X, R, S], the current arrangement
        load: [X, R, S], its slot loads
        bound: [X], the lower bound (rows within ``POOR`` of it are left alone)
        num_ranks: R

    Returns:
        item: [X, R, S], the arrangement (a new array)
        load: [X, R, S], its slot loads
    """
    item, load = item.copy(), load.copy()
    n = weight.shape[1]
    peak = load.sum(axis=2).max(axis=1)
    rows = np.flatnonzero(peak > bound * (1 + POOR))
    for _ in range(COUNT_MOVE_ROUNDS):
        if rows.size == 0:
            break
        r = np.arange(rows.size)
        counts = count_rows(item[rows], n)  # [r, n]
        slots = load[rows]  # [r, R, S]
        top = slots.sum(axis=2).argmax(axis=1)
        top_load, top_item = slots[r, top], item[rows][r, top]  # [r, S]
        receivers = (top_item[r, top_load.argmax(axis=1)], top_item[r, top_load.argmin(axis=1)])
        key = np.where(counts >= 2, weight[rows] / np.maximum(counts - 1, 1), np.inf)  # [r, n]
        cands = []
        for receiver in receivers:
            own = key.copy()
            own[r, receiver] = np.inf
            donors = np.argsort(own, axis=1, kind="stable")[:, :COUNT_MOVE_DONORS]
            for d in range(donors.shape[1]):
                donor = donors[:, d]
                moved = counts.copy()
                ok = np.isfinite(own[r, donor])
                moved[r[ok], receiver[ok]] += 1
                moved[r[ok], donor[ok]] -= 1
                cands.append(moved)
        tries = len(cands)
        cand_item, cand_load = greedy_pack(
            np.tile(weight[rows], (tries, 1)), np.concatenate(cands), num_ranks
        )
        best = cand_load.sum(axis=2).max(axis=1).reshape(tries, rows.size).argmin(axis=0)
        pick = best * rows.size + r
        new_load, new_item, _ = refine_swaps(
            cand_load[pick], cand_item[pick], bound[rows] * (1 + SETTLE), lanes=FRESH_LANES,
            max_moves=POLISH_MOVES,
        )
        better = new_load.sum(axis=2).max(axis=1) < peak[rows] * (1 - 1e-9)
        won = rows[better]
        item[won], load[won] = new_item[better], new_load[better]
        peak[won] = load[won].sum(axis=2).max(axis=1)
        rows = won[peak[won] > bound[won] * (1 + POOR)]
    return item, load


def plan_fresh(weight: F64, num_slots: int, num_ranks: int) -> tuple[I64, F64]:
    """Plans every row from scratch.

    Parameters:
        weight: [X, n], non-negative loads
        num_slots: P, a multiple of ``num_ranks``, >= n
        num_ranks: R

    Returns:
        item: [X, R, S] int64, the expert in each slot of each rank
        peak: [X] float64, each row's largest rank load
    """
    num_rows, n = weight.shape
    per_rank = num_slots // num_ranks

    # 1. DeepSeek's greedy as the start: never worse than the deepseek policy.
    phy2log, _, counts = deepseek.rebalance_experts_hierarchical(
        weight.astype(np.float32), num_slots, 1, 1, num_ranks
    )
    bound = np.maximum(
        weight.sum(axis=1) / num_ranks, (weight / np.minimum(counts, num_ranks)).max(axis=1)
    )
    item = phy2log.reshape(num_rows, num_ranks, per_rank)
    load = item_loads(weight, item, counts)
    load, item = balance_pairs(load, item, PAIR_ROUNDS)
    peak = load.sum(axis=2).max(axis=1)

    # 2. Count-limited rows: other replica counts, repacked, kept per row where better.
    poor = np.flatnonzero(peak > bound * (1 + POOR))
    if poor.size and per_rank >= 3:
        # 2a. Anchor counts at the lower bound (one anchor replica per rank, fillers around).
        anchored, ok = anchor_counts(weight[poor], num_slots, num_ranks, bound[poor],
                                     ANCHOR_THRESHOLD)
        rows = poor[ok]
        if rows.size:
            a_item, a_load = greedy_pack(weight[rows], anchored[ok], num_ranks)
            better = a_load.sum(axis=2).max(axis=1) < peak[rows]
            won = rows[better]
            item[won], load[won] = a_item[better], a_load[better]
            peak[won] = load[won].sum(axis=2).max(axis=1)
            poor = np.flatnonzero(peak > bound * (1 + POOR))
    if poor.size and per_rank >= 2:
        # 2b. Cardinality-shaped counts at a few levels for the rows still poor.
        w = weight[poor]
        filler = np.median(w / counts[poor], axis=1)
        tries = len(LEVEL_FACTORS)
        stacked_w = np.tile(w, (tries, 1))  # [tries * p, n], try-major
        level = np.concatenate([bound[poor] * f for f in LEVEL_FACTORS])
        new_counts, _ = cardinality_counts(
            stacked_w, num_slots, num_ranks, level, np.tile(filler, tries)
        )
        # A level whose counts repeat a lower level's (or the start's) needs no packing.
        by_try = new_counts.reshape(tries, poor.size, n)
        fresh_try = ~(by_try == counts[poor][None]).all(axis=2)  # [tries, p]
        for k in range(1, tries):
            fresh_try[k] &= ~(by_try[:k] == by_try[k][None]).all(axis=2).any(axis=0)
        keep = np.flatnonzero(fresh_try.ravel())
        cand = np.zeros((tries * poor.size, num_ranks, per_rank), dtype=np.int64)
        cand_load = np.zeros(cand.shape)
        if keep.size:
            cand[keep], cand_load[keep] = greedy_pack(
                stacked_w[keep], new_counts[keep], num_ranks, CANDIDATE_PAIR_ROUNDS
            )
        cand_peak = np.where(
            fresh_try.ravel(), cand_load.sum(axis=2).max(axis=1), np.inf
        ).reshape(tries, poor.size)
        best = cand_peak.argmin(axis=0)  # [p]
        best_peak = cand_peak[best, np.arange(poor.size)]
        better = best_peak < peak[poor]
        chosen = (best * poor.size + np.arange(poor.size))[better]
        item[poor[better]] = cand[chosen]
        load[poor[better]] = cand_load[chosen]
        if CANDIDATE_PAIR_ROUNDS < PAIR_ROUNDS:
            won = poor[better]
            load[won], item[won] = balance_pairs(load[won], item[won], PAIR_ROUNDS)

    # 3. Polish every row by swaps, down to (just above) the lower bound.
    load, item, _ = refine_swaps(load, item, bound * (1 + SETTLE), lanes=FRESH_LANES,
                                 max_moves=POLISH_MOVES)
    # Few slots per rank: rows still poor move single replicas between experts.
    if 3 <= per_rank <= COUNT_MOVE_SLOTS:
        item, load = count_moves(weight, item, load, bound, num_ranks)
    peak = load.sum(axis=2).max(axis=1)

    # 4. Two slots per rank and few count vectors: the exact optimum where it is better.
    if per_rank == 2 and math.comb(num_slots - 1, n - 1) <= EXACT_PAIRS_LIMIT:
        exact, exact_peak = exact_pairs(weight, num_slots, peak)
        better = exact_peak < peak
        item[better] = exact[better]
        peak[better] = exact_peak[better]
    return item, peak
