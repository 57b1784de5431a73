"""Replica counts: how many slots each logical expert gets.

Every function works on rows ``X`` (layers, or (layer, node) pairs) at once. An expert's load
splits evenly over its replicas, so with ``c`` replicas each carries ``w / c``.

- :func:`water_fill` gives the counts that minimize the largest per-replica load (exact).
- :func:`adjust_counts` starts from the counts in service and changes as few of them as it must
  to bring the largest per-replica load under a level: the hysteresis that keeps plans still
  under sampling noise.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

__all__ = ["adjust_counts", "anchor_counts", "cardinality_counts", "per_replica", "water_fill"]

# Pigeonhole levels q = 1..LEVELS checked by cardinality_counts; higher levels rarely bind.
LEVELS = 4
# Experts examined per step of cardinality_counts: the ones with the largest replicas.
_CANDIDATES = 12


def per_replica(weight: F64, counts: I64) -> F64:
    """``[X, n]`` loads and counts -> ``[X, n]`` load of one replica (``inf`` where count is 0
    and the load is positive, ``0`` for an unplaced idle expert)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = weight / counts
    out[counts == 0] = np.where(weight[counts == 0] > 0, np.inf, 0.0)
    return out


def _grant(weight: F64, counts: I64, extra: I64) -> I64:
    """Gives ``extra[x]`` more replicas in row ``x``, one at a time, each to the expert with the
    largest per-replica load (an expert with no replica first; ties to the lowest index).

    Parameters:
        weight: [X, n], loads
        counts: [X, n], starting counts (>= 0), updated in place and returned
        extra: [X], replicas to add per row (>= 0)
    """
    num_rows = weight.shape[0]
    # Unplaced experts come first whatever their load: key = +inf.
    key = per_replica(weight, counts)
    key[counts == 0] = np.inf
    rows = np.arange(num_rows)
    left = extra.copy()
    for _ in range(int(left.max(initial=0))):
        active = rows[left > 0]
        best = key[active].argmax(axis=1)
        counts[active, best] += 1
        key[active, best] = weight[active, best] / counts[active, best]
        left[active] -= 1
    return counts


def water_fill(weight: F64, num_slots: int) -> I64:
    """Replica counts minimizing ``max_e weight[e] / count[e]`` with ``sum(count) = num_slots``.

    Greedy water-filling (each replica to the expert with the largest per-replica load) is exact
    for this min-max objective. It starts from ``ceil(w * K / W)`` (K = slots beyond one per
    expert), which is below every optimum: ``W / K`` bounds the optimal level from above.

    Parameters:
        weight: [X, n], non-negative loads
        num_slots: P >= n

    Returns:
        counts: [X, n] int64, every count >= 1, each row summing to P
    """
    num_rows, n = weight.shape
    spare = num_slots - n
    total = weight.sum(axis=1, keepdims=True)
    counts = np.ones((num_rows, n), dtype=np.int64)
    if spare > 0:
        level = np.divide(total, spare, out=np.full_like(total, np.inf), where=total > 0)
        start = np.ceil(weight / level * (1.0 - 1e-12))  # rounding never overshoots
        counts = np.maximum(start.astype(np.int64), 1)
        # The start can exceed P only through float round-off; fall back to ones then.
        over = counts.sum(axis=1) > num_slots
        counts[over] = 1
    return _grant(weight, counts, num_slots - counts.sum(axis=1))


def anchor_counts(
    weight: F64, num_slots: int, num_ranks: int, level: F64, threshold: float = 0.5
) -> tuple[I64, npt.NDArray[np.bool_]]:
    """Replica counts for "one anchor per rank, fillers around it" under a target ``level``.

    A few experts can carry most of a layer (zipf 1.5: the top one ~40%). Water-filling, and
    :func:`cardinality_counts`'s per-threshold limits, then give them many mid-sized replicas
    (e.g. 59 of 0.7-0.8 x level on 64 ranks) and leave a score of mid-sized experts
    (0.3-0.6 x level) that fit beside none of them, so some rank holds two. Here instead:

    - *anchors*, the experts above ``threshold * level``, get the fewest replicas that each
      leave room for ``S - 1`` typical fillers (the mean load of the lighter half of experts):
      ``ceil(w / (level - (S - 1) * filler))``; when that makes more than ``R`` anchor
      replicas, exactly ``R`` instead, water-filled over the anchors (one per rank);
    - every other expert is a filler, and the spare slots split the largest fillers first
      (water-filling over the fillers only), so that they fit into the anchors' leftover room.

    Parameters:
        weight: [X, n], loads
        num_slots: P
        num_ranks: R
        level: [X], target largest rank load (e.g. the lower bound)
        threshold: experts above ``threshold * level`` are anchors

    Returns:
        counts: [X, n] int64, every count >= 1, rows summing to P (water-filling where not
            feasible)
        feasible: [X] bool, whether the anchors fit in ``R`` replicas and ``P`` slots
    """
    n = weight.shape[1]
    per_rank = num_slots // num_ranks
    filler = np.sort(weight, axis=1)[:, : max(n // 2, 1)].mean(axis=1)
    room = level - (per_rank - 1) * filler  # [X], the largest anchor replica
    anchor = weight > (threshold * level)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(anchor & (room > 0)[:, None], weight / room[:, None], 1.0)
    need = np.minimum(need * (1.0 - 1e-12), num_slots + 1)  # finite before the cast
    counts = np.maximum(np.ceil(need).astype(np.int64), 1)
    # More anchor replicas than ranks (several hot experts of similar size): exactly R of them
    # instead, water-filled over the anchors; the split fillers then even out the ranks whose
    # anchor is larger than its room.
    over = ((room > 0) & (np.where(anchor, counts, 0).sum(axis=1) > num_ranks)
            & (anchor.sum(axis=1) <= num_ranks))
    if over.any():
        counts[over] = _grant(np.where(anchor[over], weight[over], 0.0),
                              np.ones((int(over.sum()), n), dtype=np.int64),
                              num_ranks - anchor[over].sum(axis=1))
    feasible = ((room > 0) & (np.where(anchor, counts, 0).sum(axis=1) <= num_ranks)
                & (counts.sum(axis=1) <= num_slots))
    counts[~feasible] = 1
    extra = np.where(feasible, num_slots - counts.sum(axis=1), 0)
    # Anchors weigh nothing for the grants: the spare slots go to fillers only.
    counts = _grant(np.where(anchor, 0.0, weight), counts, extra)
    if not feasible.all():
        counts[~feasible] = water_fill(weight[~feasible], num_slots)
    return counts, feasible


def adjust_counts(weight: F64, counts: I64, level: F64, num_slots: int) -> I64:
    """Moves as few replicas as it must so that no replica carries more than ``level``.

    First every unplaced expert (count 0) and every free slot is settled: free slots (when the
    counts sum to less than P) go by water-filling. Then, while a row's largest per-replica
    load exceeds its level, that expert takes a replica from the donor whose remaining replicas
    stay lightest (``w / (c - 1)`` smallest, count >= 2), provided the donor then stays below
    the expert's current per-replica load (otherwise no exchange can help).

    Parameters:
        weight: [X, n], loads
        counts: [X, n], counts in service (>= 0, each row summing to at most P)
        level: [X], largest acceptable per-replica load per row
        num_slots: P

    Returns:
        counts: [X, n] int64, every count >= 1 when P >= n, each row summing to P
    """
    counts = counts.copy()
    # Free slots first, by water-filling (unplaced experts take them before anyone else).
    counts = _grant(weight, counts, num_slots - counts.sum(axis=1))
    # An expert still unplaced takes a slot from the donor that suffers least.
    for _ in range(weight.shape[1]):
        missing = counts == 0
        rows = np.flatnonzero(missing.any(axis=1))
        if rows.size == 0:
            break
        expert = missing[rows].argmax(axis=1)
        c = counts[rows]
        donor_key = np.where(c >= 2, weight[rows] / np.maximum(c - 1, 1), np.inf)
        donor = donor_key.argmin(axis=1)
        counts[rows, donor] -= 1
        counts[rows, expert] += 1

    num_rows = weight.shape[0]
    limit = weight.shape[1] * 4 + 16  # far above what any row needs; guards the loop
    active = np.arange(num_rows)
    for _ in range(limit):
        load = weight[active] / counts[active]
        hot = load.argmax(axis=1)
        hot_load = load[np.arange(active.size), hot]
        c = counts[active]
        donor_key = np.where(c >= 2, weight[active] / np.maximum(c - 1, 1), np.inf)
        donor_key[np.arange(active.size), hot] = np.inf
        donor = donor_key.argmin(axis=1)
        donor_after = donor_key[np.arange(active.size), donor]
        hot_after = weight[active, hot] / (counts[active, hot] + 1)
        go = (hot_load > level[active]) & (np.maximum(donor_after, hot_after) < hot_load)
        if not go.any():
            break
        active = active[go]
        counts[active, hot[go]] += 1
        counts[active, donor[go]] -= 1
    return counts


def cardinality_counts(
    weight: F64, num_slots: int, num_ranks: int, level: F64, filler: F64
) -> tuple[I64, npt.NDArray[np.bool_]]:
    """Replica counts shaped for packing ``S = P / R`` replicas per rank under a target ``level``.

    Water-filling makes the largest replica as small as possible, but a rank holds exactly S
    replicas: if water-filling makes more mid-sized replicas than ranks, some rank must take two,
    plus ``S - 2`` fillers. This rule assumes each rank's other slots carry at least ``filler``
    each and grants replicas greedily (largest replica first) under pigeonhole limits:

    - ``q = 0``: every replica at most ``level - (S - 1) * filler`` (the start counts);
    - ``q = 1..LEVELS``: at most ``q * R`` replicas above
      ``tau_q = (level - (S - q - 1) * filler) / (q + 1)`` (else some rank holds q + 1 of them).

    A grant that would break a limit goes to the next largest replica instead; when no grant
    fits, the largest replica gets it anyway. With no binding limit this is water-filling.

    Parameters:
        weight: [X, n], loads
        num_slots: P
        num_ranks: R
        level: [X], target largest rank load
        filler: [X], typical load of a filler replica

    Returns:
        counts: [X, n] int64, every count >= 1, rows summing to P
        feasible: [X] bool, whether the ``q = 0`` start fit in P slots (else plain water-filling)
    """
    num_rows, n = weight.shape
    per_rank = num_slots // num_ranks
    cap0 = np.maximum(level - (per_rank - 1) * filler, 1e-300)
    # Counts beyond P cannot fit anyway; clipping keeps the cast finite.
    need = np.minimum(weight / cap0[:, None] * (1.0 - 1e-12), num_slots + 1)
    start = np.maximum(np.ceil(need).astype(np.int64), 1)
    feasible = start.sum(axis=1) <= num_slots
    counts = np.where(feasible[:, None], start, 1)
    q = np.arange(1, min(per_rank - 1, LEVELS) + 1)
    if q.size == 0:
        return _grant(weight, counts, num_slots - counts.sum(axis=1)), feasible
    tau = (level[:, None] - (per_rank - q[None, :] - 1) * filler[:, None]) / (q[None, :] + 1)
    limit = (q * num_ranks)[None, :]  # [1, Q]
    m = min(_CANDIDATES, n)
    rows = np.arange(num_rows)
    # big[x, q]: replicas above tau_q, kept current as grants change counts.
    item = weight / counts
    big = np.stack(
        [np.where(item > tau[:, k : k + 1], counts, 0).sum(axis=1) for k in range(q.size)],
        axis=1,
    )
    left = num_slots - counts.sum(axis=1)
    steps = int(left.max(initial=0))
    if steps == 0:
        return counts, feasible
    # Replicas only shrink, so after k grants the m largest are among the m + k largest at
    # the start: every step works on that fixed pool of experts.
    pool_size = min(n, m + steps)
    if pool_size < n:
        pool = np.argpartition(-item, pool_size - 1, axis=1)[:, :pool_size]
    else:
        pool = np.tile(np.arange(n), (num_rows, 1))
    pool_w = weight[rows[:, None], pool]  # [X, M]
    pool_c = counts[rows[:, None], pool]  # [X, M]
    m = min(m, pool_size)
    for _ in range(steps):
        active = rows[left > 0]
        if active.size == 0:
            break
        a = active.size
        cur = pool_w[active] / pool_c[active]  # [a, M]
        top = np.argsort(-cur, axis=1, kind="stable")[:, :m]  # largest replica first
        c = pool_c[active[:, None], top]
        w = pool_w[active[:, None], top]
        t = tau[active][:, None, :]  # [a, 1, Q]
        was = (w / c)[:, :, None] > t
        now = (w / (c + 1))[:, :, None] > t
        change = now * (c + 1)[:, :, None] - was * c[:, :, None]  # [a, m, Q]
        b = big[active][:, None, :]
        fits = (b + change <= np.maximum(limit, b)).all(axis=2)  # [a, m]
        pick = np.where(fits.any(axis=1), fits.argmax(axis=1), 0)
        col = top[np.arange(a), pick]
        pool_c[active, col] += 1
        big[active] += change[np.arange(a), pick]
        left[active] -= 1
    counts[rows[:, None], pool] = pool_c
    return counts, feasible
