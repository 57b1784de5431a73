"""A lower bound on the max rank load that counts slots: how far the plain bound is reachable.

:func:`eplb_service.balance.lower_bound` (``LB``) ignores that every rank holds exactly ``S``
replicas. With few slots per rank or heavy skew that bound cannot be reached: 224 equal experts
on 144 ranks of two slots (DeepSeek-V3 decode) put two whole experts on at least 80 ranks
whatever the replica counts. :func:`slot_lower_bound` is the smallest ``B`` that passes these
necessary conditions for a placement whose max rank load is at most ``B``:

1. ``W <= R * B``;
2. every replica carries at most ``B``: expert ``e`` needs ``c_e >= ceil(w_e / B)`` replicas,
   and these fit in ``P`` slots;
3. pigeonhole, for ``q = 1..S-1``: at most ``q * R`` replicas carry more than
   ``B / (q + 1)`` (else some rank holds ``q + 1`` of them). The fewest such replicas any
   counts can give is bounded below by a fractional knapsack: an expert above the threshold
   either keeps its ``ceil(w / B)`` large replicas or spends ``ceil(w (q + 1) / B) - ceil(w / B)``
   more slots to make them all small.

Each condition only gets easier as ``B`` grows, so bisection finds the smallest passing ``B``
(to a relative ``1e-6``); the result is a valid lower bound for every placement.

With two slots per rank, :func:`pair_lower_bound` goes further: a replica above ``B / 2``
needs a partner below ``B / 2``, and at every threshold the large replicas must not outnumber
the small enough partners, for one and the same count vector (DeepSeek-V3 EP144 decode:
zipf 1.0 at 1.041 x LB, hot at 1.219 x LB, where the slot bound is LB).
:func:`pair_lagrangian_bound` weighs all thresholds at once (a Lagrangian relaxation of the
same conditions), which closes most of the rest of the gap to the optimum (EP144 lognormal).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

__all__ = ["pair_lagrangian_bound", "pair_lower_bound", "slot_lower_bound"]

# Pigeonhole levels checked (q = 1..LEVELS); higher levels never bound the benchmark configs.
LEVELS = 8


def _feasible(weight: F64, level: F64, num_slots: int, num_ranks: int) -> npt.NDArray[np.bool_]:
    """``[X]``: whether each row passes the necessary conditions at max rank load ``level``."""
    _num_rows, _ = weight.shape
    per_rank = num_slots // num_ranks
    b = level[:, None]
    base = np.maximum(np.ceil(weight / b * (1 - 1e-12)), 1.0)  # [X, n], replicas <= level
    budget = num_slots - base.sum(axis=1)  # [X], spare slots
    ok = (budget >= 0) & (weight.sum(axis=1) <= num_ranks * level * (1 + 1e-12))
    for q in range(1, min(per_rank - 1, LEVELS) + 1):
        tau = b / (q + 1)
        large = weight / base > tau * (1 + 1e-12)  # [X, n], experts with large replicas
        value = np.where(large, base, 0.0)  # large replicas removed if made small
        small = np.maximum(np.ceil(weight / tau * (1 - 1e-12)), 1.0)
        cost = np.where(large, small - base, np.inf)  # extra slots to make them small
        ratio = np.where(large, value / np.maximum(cost, 1e-300), -np.inf)
        order = np.argsort(-ratio, axis=1)
        v = np.take_along_axis(value, order, axis=1)
        c = np.take_along_axis(cost, order, axis=1)
        c = np.where(np.isfinite(c), c, 0.0)
        spent = np.cumsum(c, axis=1)
        room = np.maximum(budget, 0.0)[:, None]
        # Whole items while they fit, then a fraction of the next (fractional knapsack).
        full = spent <= room
        before = spent - c
        part = np.clip((room - before) / np.maximum(c, 1e-300), 0.0, 1.0)
        removed = np.where(full, v, np.where(before < room, v * part, 0.0)).sum(axis=1)
        fewest = value.sum(axis=1) - removed
        ok &= fewest <= q * num_ranks + 1e-9
    return ok


def slot_lower_bound(weight: F64, num_slots: int, num_ranks: int, upper: F64) -> F64:
    """``[X]``: a lower bound on the max rank load of any placement, counting slots.

    Parameters:
        weight: [X, n], non-negative loads
        num_slots: P (a multiple of R, >= n)
        num_ranks: R
        upper: [X], a max rank load known to be reachable (e.g. a plan's); the search range's
            top

    Returns:
        [X] float64, between ``W / R`` and ``upper``
    """
    lo = weight.sum(axis=1) / num_ranks * (1 - 1e-12)
    hi = np.maximum(upper.astype(np.float64), lo)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        ok = _feasible(weight, mid, num_slots, num_ranks)
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
        if np.all(hi - lo <= 1e-6 * hi):
            break
    return lo


def _pairs_infeasible(w: F64, level: float, num_ranks: int, thresholds: int) -> bool:
    """Whether no placement of loads ``w [n]`` on ``num_ranks`` ranks of two slots has every
    rank load <= ``level`` (True is a proof; False proves nothing). See
    :func:`pair_lower_bound`."""
    start = np.maximum(np.ceil(w / level * (1 - 1e-12)), 1.0).astype(np.int64)  # [n]
    extra = 2 * num_ranks - int(start.sum())
    if extra < 0:
        return True
    steps = np.arange(extra + 1)
    count = start[:, None] + steps[None, :]  # [n, k]: start + k replicas
    value = w[:, None] / count
    u = np.linspace(level / 2, level, thresholds + 1)[1:, None, None]  # [U, 1, 1]
    # Per replica: +1 if surely >= u (it needs a partner <= level - u), -1 if <= level - u.
    big = value[None] >= u * (1 + 1e-12)
    small = value[None] <= (level - u) * (1 + 1e-12)  # [U, n, k]
    excess = count[None] * (big.astype(np.int64) - small)  # [U, n, k]
    total = excess[:, :, 0].sum(axis=1)  # [U]
    # Experts small at every count and threshold give -1 per extra replica: one pool that
    # takes whatever slots the others leave. The others: a knapsack over extra slots.
    pool = small.all(axis=(0, 2))
    best = np.full((u.shape[0], extra + 1), np.inf)  # [U, s]: least change with s slots
    best[:, 0] = 0.0
    back = np.maximum(steps[:, None] - steps[None, :], 0)  # [s, k]: s - k
    ahead = steps[:, None] >= steps[None, :]
    for e in np.flatnonzero(~pool):
        gain = (excess[:, e] - excess[:, e, :1]).astype(np.float64)  # [U, k]
        # best'[s] = min over k <= s of best[s - k] + gain[k]
        moved = np.where(ahead[None], best[:, back] + gain[:, None, :], np.inf)  # [U, s, k]
        best = moved.min(axis=2)
    least = (best - (extra - steps)).min(axis=1) if pool.any() else best[:, extra]
    return bool((total + least > 0).any())


def pair_lower_bound(
    weight: F64, num_ranks: int, lower: F64, upper: F64, *, thresholds: int = 64, steps: int = 14
) -> F64:
    """``[X]``: a lower bound on the max rank load of any placement with two slots per rank.

    With exactly two replicas per rank and every rank load <= ``B``, a replica ``a >= u >
    B / 2`` shares its rank with a partner ``<= B - a <= B - u``, so for every such ``u``:
    ``#{replicas >= u} <= #{replicas <= B - u}`` (the partners are distinct). Whether some
    replica count vector (``c_e >= ceil(w_e / B)``, summing to ``2 R``, replicas of ``e``
    carrying ``w_e / c_e``) meets one of these conditions is a knapsack over the counts,
    solved exactly per ``u`` (``thresholds`` of them in ``(B / 2, B]``); if one ``u`` fails
    for every count vector, no placement reaches ``B``. Bisection between ``lower`` (a valid
    bound, e.g. :func:`slot_lower_bound`) and ``upper`` keeps the largest ``B`` proven
    unreachable, so the result is valid whatever the test misses.

    Parameters:
        weight: [X, n], non-negative loads
        num_ranks: R (``P = 2 R`` slots)
        lower: [X], a valid lower bound
        upper: [X], a reachable max rank load (e.g. a plan's)
        thresholds: values of ``u`` tried per test
        steps: bisection steps

    Returns:
        [X] float64, between ``lower`` and ``upper``
    """
    return _bisect_refuted(
        lower, upper, steps, lambda x, b: _pairs_infeasible(weight[x], b, num_ranks, thresholds)
    )


def _bisect_refuted(
    lower: F64, upper: F64, steps: int, refuted: Callable[[int, float], bool]
) -> F64:
    """``[X]`` per row ``x``, the largest max rank load ``B`` between ``lower[x]`` and
    ``upper[x]`` that ``refuted(x, B)`` proves unreachable, by ``steps`` bisection steps. Only
    refuted values are kept, so the result is a valid bound whatever ``refuted`` misses."""
    out = lower.astype(np.float64).copy()
    for x in range(out.shape[0]):
        lo, hi = float(out[x]), float(max(upper[x], out[x]))
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            if refuted(x, mid):
                lo = mid
            else:
                hi = mid
        out[x] = lo
    return out


# Relative tolerance of the Hall counts below: always rounded toward "feasible" (fewer large
# replicas needing a partner, more small partners), so round-off can only weaken the bound.
_TOL = 1e-12


def _hall_terms(w: F64, level: float, num_slots: int, grid: int) -> tuple[F64, int] | None:
    """Per expert and extra replica, its part of the Hall excess at each threshold.

    Returns ``f [n, K, T]`` (``K = extra + 1`` counts ``ceil(w / level) + k``, ``T``
    thresholds ``t``: ``+c`` when the expert's ``c`` replicas exceed ``level / 2`` and leave
    room ``level - w / c <= t``, ``-c`` when they are at most ``level / 2`` and ``<= t``) and
    the number of extra slots, or None when the minimum counts alone exceed ``num_slots``.
    """
    base = np.maximum(np.ceil(w / level * (1 - _TOL)), 1.0).astype(np.int64)  # [n]
    extra = num_slots - int(base.sum())
    if extra < 0:
        return None
    count = base[:, None] + np.arange(extra + 1)[None, :]  # [n, K]
    value = w[:, None] / count
    big = value > level / 2 * (1 + _TOL)
    # Thresholds: a grid over (0, level / 2] plus every room a large replica can leave (the
    # excess only rises there), deduplicated.
    # (each room raised by 3 tolerances, so that the replica leaving it counts there)
    rooms = np.unique(level - value[big]) * (1 + 3 * _TOL)
    t = np.unique(np.concatenate([np.linspace(0.0, level / 2, grid + 1)[1:], rooms]))  # [T]
    needs = (level - value)[..., None] <= t * (1 - _TOL)  # [n, K, T]
    fits = value[..., None] <= t * (1 + _TOL)
    f = np.where(big[..., None], count[..., None] * needs, -count[..., None] * fits)
    return f.astype(np.float64), extra


def _least_excess(g: F64, extra: int) -> tuple[F64, I64]:
    """Exact knapsack: ``g [M, n, K]`` -> least ``sum_e g[m, e, k_e]`` over ``sum_e k_e =
    extra`` per ``m`` ``[M]``, and the minimizing ``k [M, n]``."""
    num, n, width = g.shape
    k = np.arange(width)
    back = np.maximum(k[:, None] - k[None, :], 0)  # [s, j]: s - j
    ahead = k[:, None] >= k[None, :]
    best = np.full((num, width), np.inf)
    best[:, 0] = 0.0
    choice = np.zeros((n, num, width), dtype=np.int64)
    for e in range(n):
        moved = np.where(ahead[None], best[:, back] + g[:, e][:, None, :], np.inf)  # [M, s, j]
        choice[e] = moved.argmin(axis=2)
        best = moved.min(axis=2)
    picked = np.zeros((num, n), dtype=np.int64)
    left = np.full(num, extra)
    rows = np.arange(num)
    for e in range(n - 1, -1, -1):
        picked[:, e] = choice[e][rows, left]
        left -= picked[:, e]
    return best[:, extra], picked


def _pairs_refuted(w: F64, level: float, num_slots: int, grid: int, iters: int) -> bool:
    """Whether the Lagrangian test proves no two-slot placement of ``w [n]`` on
    ``num_slots / 2`` ranks reaches max rank load ``level`` (True is a proof). See
    :func:`pair_lagrangian_bound`."""
    terms = _hall_terms(w, level, num_slots, grid)
    if terms is None:
        return True
    f, extra = terms
    n, _, num_t = f.shape
    # Single thresholds first (one knapsack each, as pair_lower_bound on a finer grid), on the
    # grid only: the best of them starts the multiplier search.
    coarse = np.linspace(0, num_t - 1, min(num_t, grid)).astype(np.int64)
    least, _ = _least_excess(np.transpose(f[:, :, coarse], (2, 0, 1)), extra)
    if (least > 1e-9).any():
        return True
    mu = np.zeros(num_t)
    mu[coarse[int(least.argmax())]] = 1.0
    for step in range(iters):
        value, picked = _least_excess((f @ mu)[None], extra)
        if value[0] > 1e-9:
            return True
        excess = f[np.arange(n), picked[0]].sum(axis=0)  # [T], the minimizer's Hall excess
        if (excess <= 0).all():
            return False  # the minimizer meets every threshold: no multiplier refutes it
        norm = float(np.linalg.norm(excess))
        mu = np.maximum(mu + 0.5 / np.sqrt(step + 1) * excess / norm, 0.0)
        mu /= mu.sum()
    return False


def pair_lagrangian_bound(
    weight: F64,
    num_ranks: int,
    lower: F64,
    upper: F64,
    *,
    grid: int = 128,
    iters: int = 60,
    steps: int = 12,
) -> F64:
    """``[X]``: a lower bound on the max rank load of any placement with two slots per rank,
    weighing every pairing threshold at once.

    Argument. Let a placement of counts ``c`` (``c_e >= 1``, ``sum c = P = 2 R``, replicas of
    ``e`` carrying ``w_e / c_e``, an expert may sit twice on a rank) have every rank load
    ``<= B``; then every replica is ``<= B``, so ``c_e >= ceil(w_e / B)``. A replica ``a > B /
    2`` shares its rank with one partner ``<= B - a`` that is itself ``<= B / 2`` (two
    replicas above ``B / 2`` exceed ``B``), a different partner for each such replica. So at
    every ``t``, the Hall excess ``F_c(t) = #{replicas > B / 2 with B - a <= t} - #{replicas
    <= B / 2 and <= t}`` is ``<= 0``, and for any multipliers ``mu_t >= 0`` so is ``sum_t mu_t
    F_c(t)``. That sum is separable over experts (each contributes ``+c_e`` or ``-c_e`` at the
    thresholds its replicas pass), so its least value over all count vectors is an exact
    knapsack over the extra replicas; if that least value is positive, no count vector, hence
    no placement, reaches ``B``. Any ``mu`` gives a valid test (a point mass is
    :func:`pair_lower_bound`'s); ``mu`` is searched by projected subgradient ascent (the
    minimizer's excess) from the best single threshold. Round-off is resolved toward
    feasibility. Bisection between ``lower`` (a valid bound) and ``upper`` keeps only ``B``
    values proven unreachable, so the result is valid however far the search is from the best
    ``mu``.

    Parameters:
        weight: [X, n], non-negative loads
        num_ranks: R (``P = 2 R`` slots)
        lower: [X], a valid lower bound (e.g. :func:`pair_lower_bound`'s)
        upper: [X], a reachable max rank load (e.g. a plan's)
        grid: thresholds on a regular grid over ``(0, B / 2]`` (besides the rooms)
        iters: subgradient steps per tested ``B``
        steps: bisection steps

    Returns:
        [X] float64, between ``lower`` and ``upper``
    """
    rows = weight.astype(np.float64)
    return _bisect_refuted(
        lower, upper, steps,
        lambda x, b: _pairs_refuted(rows[x], b, 2 * num_ranks, grid, iters),
    )
