"""Two slots per rank: repair the placement in service by re-pairing as few ranks as possible.

With two slots per rank a rank's load is the sum of two replica loads, and a swap between two
ranks rewrites a slot on each of them. Any plan that changes a set ``C`` of ranks re-pairs
exactly the replicas held by ``C`` (plus new replicas, less dropped ones) among ``C``, and each
rank of ``C`` rewrites at least one slot. Conversely, once the replicas of ``C`` are paired,
the new pairs can be handed to the ranks of ``C`` so that nearly every rank keeps one of its
replicas (pairs and ranks form paths and cycles: see :func:`_hand_out`), i.e. one rewrite per
rank of ``C``. So the repair is about choosing a small ``C``:

1. ranks that must change: a slot freed by a replica-count decrease (surplus replicas leave
   the most loaded ranks) or holding nothing valid, and ranks whose pair breaks the limit;
2. helpers: unbroken ranks added one at a time, each the one leaving the least shortage of
   small partners, until the replicas of ``C`` can be paired within the limit.

The limit (:class:`PairLimits`) on a pair of replica loads ``a >= b``: ``a + b <= goal``, and,
from the fresh plan, ``b <= envelope(a) + slack + SLOPE * (a_max - a)`` where ``envelope(a)``
is the largest partner the fresh plan gives a replica at least as large as ``a``. The second
part is about the *next* window: its largest rank load is mostly a large replica whose expert
surged, plus its partner, and a fresh plan gives large replicas the smallest partners
(outside-in). Without it, kept pairs drift toward large partners and the next window's
balancedness fell ~2% short of a fresh plan's (DeepSeek-V3 EP144 drift); replicas further
below the largest are less likely to be that surging one, hence the slope.

``room(a)``, the largest partner ``a`` may take, is non-increasing in ``a``, so compatibility
is a threshold graph: a replica is *big* when it does not fit with a copy of itself, two bigs
never fit together, a big ``a`` fits with any ``b <= room(a)``, and any two smalls fit. A
pairing exists iff at every big's room ``t`` the bigs with room <= t do not outnumber the
smalls <= t (Hall's condition on nested neighbourhoods), and then outside-in (largest with
smallest) is one.

Rows ``X`` (layers, or (layer, node) pairs); arrangements ``[X, R, 2]`` of expert ids, ``-1``
marking a slot that must be rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from eplb_service.policy.fresh import item_loads

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B8 = npt.NDArray[np.bool_]

__all__ = ["SLACK", "SLOPE", "PairLimits", "repair_pairs"]

# Share of the row's allowance above the fresh plan's peak (goal - fresh peak) that a partner
# may exceed the fresh plan's envelope by.
SLACK = 0.5
# ... plus this fraction of how far the replica is below the row's largest one.
SLOPE = 0.12


@dataclass(frozen=True)
class PairLimits:
    """Per row, what a pair of replica loads ``a >= b`` may carry (see the module docstring).

    Attributes:
        goal: [X], largest pair sum
        slack: [X], partner allowance above the envelope
        hi: [X, K], larger replica of each fresh-plan rank, ascending (K = 0: no envelope)
        lo: [X, K], largest smaller replica among fresh ranks whose larger one is >= ``hi``
    """

    goal: F64
    slack: F64
    hi: F64
    lo: F64

    @classmethod
    def plain(cls, goal: F64) -> PairLimits:
        """Only the pair sum is limited."""
        num_rows = goal.shape[0]
        return cls(goal, np.zeros(num_rows), np.zeros((num_rows, 0)), np.zeros((num_rows, 0)))

    @classmethod
    def from_fresh(cls, weight: F64, fresh: I64, goal: F64, fresh_peak: F64) -> PairLimits:
        """Limits shaped after the fresh plan ``fresh [X, R, 2]`` of the loads ``weight [X, n]``
        (largest rank load ``fresh_peak [X]``)."""
        val = item_loads(weight, fresh)  # [X, R, 2]
        hi, lo = val.max(axis=2), val.min(axis=2)
        order = np.argsort(hi, axis=1, kind="stable")
        hi = np.take_along_axis(hi, order, axis=1)
        lo = np.take_along_axis(lo, order, axis=1)
        lo = np.maximum.accumulate(lo[:, ::-1], axis=1)[:, ::-1]
        slack = SLACK * np.maximum(goal - fresh_peak, 0.0)
        return cls(goal, slack, hi, lo)

    def row(self, x: int) -> _Limit:
        return _Limit(float(self.goal[x]), float(self.slack[x]), self.hi[x], self.lo[x])


@dataclass(frozen=True)
class _Limit:
    """One row of :class:`PairLimits`."""

    goal: float
    slack: float
    hi: F64
    lo: F64

    def room(self, a: Any) -> Any:
        """Largest partner a replica of load ``a`` may take (non-increasing in ``a``)."""
        if self.hi.size == 0:
            return self.goal - a
        k = np.minimum(np.searchsorted(self.hi, a, side="left"), self.hi.size - 1)
        shaped = self.lo[k] + self.slack + SLOPE * np.maximum(self.hi[-1] - a, 0.0)
        return np.minimum(self.goal - a, shaped)

    def fits(self, a: Any, b: Any) -> Any:
        """Whether replicas ``a >= b`` may share a rank."""
        return b <= self.room(a)

    def big(self, a: F64) -> B8:
        return ~self.fits(a, a)


def repair_pairs(
    weight: F64, current: I64, counts: I64, limits: PairLimits
) -> tuple[I64, B8]:
    """Changes ``current`` to ``counts`` with every pair within its row's limits, re-pairing
    few ranks (see the module docstring).

    Parameters:
        weight: [X, n], loads
        current: [X, R, 2], experts in service (< 0: must be rewritten)
        counts: [X, n], target replica counts (>= 1, rows summing to 2 R)
        limits: what a pair may carry, per row

    Returns:
        item: [X, R, 2], holding exactly ``counts`` where ``ok`` (``current`` elsewhere)
        ok: [X], whether the row was repaired within its limits
    """
    num_rows, _, per_rank = current.shape
    if per_rank != 2:
        raise ValueError(f"repair_pairs needs two slots per rank, got {per_rank}")
    out = current.copy()
    ok = np.zeros(num_rows, dtype=bool)
    for x in range(num_rows):
        got = _repair_row(weight[x], current[x], counts[x], limits.row(x))
        if got is not None:
            out[x] = got
            ok[x] = True
    return out, ok


def _repair_row(w: F64, cur: I64, counts: I64, limit: _Limit) -> I64 | None:
    """One row of :func:`repair_pairs`: ``[R, 2]`` arrangement, or None when it fails."""
    num_ranks = cur.shape[0]
    n = w.shape[0]
    per = w / counts
    flat = cur.reshape(-1)
    valid = flat >= 0
    expert = np.where(valid, flat, 0)
    before = np.bincount(flat[valid], minlength=n)
    value = np.where(valid, per[expert], 0.0)
    slot_rank = np.arange(2 * num_ranks) // 2
    rank_load = value.reshape(num_ranks, 2).sum(axis=1)

    # Surplus replicas leave the most loaded ranks.
    hole = ~valid
    surplus = np.maximum(before - counts, 0)
    if surplus.any():
        key = np.where(valid, flat, n)
        order = np.lexsort((-rank_load[slot_rank], key))
        sorted_key = key[order]
        first = np.concatenate([[0], np.cumsum(before)])
        position = np.arange(order.size) - first[np.minimum(sorted_key, n)]
        drop = (sorted_key < n) & (position < np.append(surplus, 0)[sorted_key])
        hole[order[drop]] = True
    value[hole] = 0.0
    pair_val = value.reshape(num_ranks, 2)
    hi, lo = pair_val.max(axis=1), pair_val.min(axis=1)
    broken = hole.reshape(num_ranks, 2).any(axis=1) | ~limit.fits(hi, lo)

    # The replicas to pair: those of broken ranks and the new ones (origin slot -1).
    deficit = np.maximum(counts - before, 0)
    in_broken = np.flatnonzero(broken[slot_rank] & ~hole)
    items = np.concatenate([flat[in_broken], np.repeat(np.arange(n), deficit)])
    origin = np.concatenate([in_broken, np.full(int(deficit.sum()), -1)])
    vals = per[items]
    if vals.size and not limit.fits(vals.max(), 0.0):
        return None

    # Helpers: unbroken ranks whose replicas make the pairing feasible, fewest first.
    used = _helpers(vals, hi, lo, broken, limit)
    if used is None:
        return None
    if used.size:
        slots = np.concatenate([2 * used, 2 * used + 1])
        items = np.concatenate([items, flat[slots]])
        origin = np.concatenate([origin, slots])
        vals = per[items]
        broken[used] = True

    # Outside-in pairing (largest with smallest).
    order = np.lexsort((items, -vals))
    m = order.size
    paired = _no_duplicates(items, vals, order[: m // 2], order[::-1][: m // 2], limit)
    if paired is None:
        return None
    out = cur.copy()
    _hand_out(out, np.flatnonzero(broken), items, origin, *paired)
    return out


def _no_duplicates(
    items: I64, vals: F64, first: I64, second: I64, limit: _Limit
) -> tuple[I64, I64] | None:
    """Pairs (``first[i]``, ``second[i]``) with the same expert trade partners with another
    pair when both stay within ``limit``; None when one cannot."""
    first, second = first.copy(), second.copy()
    for i in np.flatnonzero(items[first] == items[second]):
        if items[first[i]] != items[second[i]]:
            continue  # fixed by an earlier trade
        for j in sorted(range(first.size), key=lambda j: abs(j - i)):
            a, b, c, d = first[i], second[i], first[j], second[j]
            if (len({items[a], items[d]}) == 2 and len({items[c], items[b]}) == 2
                    and limit.fits(max(vals[a], vals[d]), min(vals[a], vals[d]))
                    and limit.fits(max(vals[c], vals[b]), min(vals[c], vals[b]))):
                second[i], second[j] = d, b
                break
        else:
            return None
    return first, second


def _hand_out(
    out: I64, ranks: I64, items: I64, origin: I64, first: I64, second: I64
) -> None:
    """Gives each pair to a rank of ``ranks`` (in place in ``out [R, 2]``), keeping as many
    replicas in their slots as possible.

    A pair may go to a rank one of its replicas came from. Every rank and every pair has at
    most two such links, so they form paths and cycles, where matching leaves first (a node
    with one open link) and then any link of a cycle is a maximum matching. Unmatched pairs go
    to the remaining ranks in order; a kept replica stays in its slot.
    """
    num_pairs = first.size
    links_of_rank: dict[int, set[int]] = {int(r): set() for r in ranks}
    links_of_pair: list[set[int]] = [set() for _ in range(num_pairs)]
    for p in range(num_pairs):
        for k in (first[p], second[p]):
            if origin[k] >= 0:
                r = int(origin[k]) // 2
                links_of_pair[p].add(r)
                links_of_rank[r].add(p)
    owner: dict[int, int] = {}  # pair -> rank
    taken: set[int] = set()

    def match(p: int, r: int) -> None:
        owner[p] = r
        taken.add(r)
        for q in links_of_rank[r]:
            if q != p:
                links_of_pair[q].discard(r)
        for s in links_of_pair[p]:
            if s != r:
                links_of_rank[s].discard(p)
        links_of_rank[r] = {p}
        links_of_pair[p] = {r}

    # Pairs re-formed whole on their own rank first.
    for p in range(num_pairs):
        a, b = origin[first[p]], origin[second[p]]
        if a >= 0 and b >= 0 and a // 2 == b // 2 and int(a) // 2 not in taken:
            match(p, int(a) // 2)
    while True:
        leaf = next(
            ((p, next(iter(links_of_pair[p]))) for p in range(num_pairs)
             if p not in owner and len(links_of_pair[p]) == 1),
            None,
        )
        if leaf is None:
            leaf_rank = next(
                (r for r in links_of_rank if r not in taken and len(links_of_rank[r]) == 1),
                None,
            )
            if leaf_rank is not None:
                leaf = (next(iter(links_of_rank[leaf_rank])), leaf_rank)
        if leaf is None:
            leaf = next(
                ((p, min(links_of_pair[p])) for p in range(num_pairs)
                 if p not in owner and links_of_pair[p]),
                None,
            )
        if leaf is None:
            break
        match(*leaf)
    free_ranks = iter(r for r in (int(r) for r in ranks) if r not in taken)
    for p in range(num_pairs):
        r = owner[p] if p in owner else next(free_ranks)
        a, b = first[p], second[p]
        if origin[b] >= 0 and int(origin[b]) // 2 == r:
            a, b = b, a
        if origin[a] >= 0 and int(origin[a]) // 2 == r:
            s = int(origin[a]) % 2
            out[r, s], out[r, 1 - s] = items[a], items[b]
        else:
            out[r, 0], out[r, 1] = items[a], items[b]


def _shortage(rooms: F64, small: F64, at: F64) -> I64:
    """Bigs with room <= t less smalls <= t, at each ``t`` of ``at`` (sorted inputs)."""
    return np.searchsorted(rooms, at, side="right") - np.searchsorted(small, at, side="right")


def _helpers(vals: F64, hi: F64, lo: F64, broken: B8, limit: _Limit) -> I64 | None:
    """Unbroken ranks to re-pair too so that ``vals`` plus their replicas pair within ``limit``.

    Hall's condition: at every big replica's room ``t``, the bigs with room <= t must not
    outnumber the smalls <= t. Ranks are added one at a time, each the one leaving the least
    total shortage over all rooms (ties: the lighter rank); an unbroken rank holds at most one
    big replica (two bigs never fit together).

    Parameters:
        vals: [m], replica loads already to be paired
        hi, lo: [R], the larger and smaller replica load of each rank (0 in a freed slot)
        broken: [R], ranks already re-paired
        limit: what a pair may carry

    Returns:
        the helper ranks in the order added, or None when even all ranks do not suffice
    """
    big_val = limit.big(vals)
    rooms = np.sort(limit.room(vals[big_val]))
    small = np.sort(vals[~big_val])
    cand = np.flatnonzero(~broken)
    hi, lo = hi[cand], lo[cand]
    big = limit.big(hi)
    hi_room = np.where(big, limit.room(hi), np.inf)  # [U]
    chosen: list[int] = []
    while True:
        need = _shortage(rooms, small, rooms)
        if rooms.size == 0 or need.max() <= 0:
            return np.array(chosen, dtype=np.int64)
        if cand.size == 0:
            return None
        # Shortage at the existing rooms after adding each candidate: [U, B].
        delta = (hi_room[:, None] <= rooms[None, :]).astype(np.int64)
        delta -= (~big[:, None] & (hi[:, None] <= rooms[None, :]))
        delta -= lo[:, None] <= rooms[None, :]
        score = np.maximum(need[None, :] + delta, 0).sum(axis=1)
        # The candidate's own big: its room's shortage with it and its small replica added.
        own = np.where(
            big,
            _shortage(rooms, small, np.where(big, hi_room, 0.0)) + 1 - (lo <= hi_room),
            0,
        )
        score = score + np.maximum(own, 0)
        pick = int(np.lexsort((hi + lo, score))[0])
        chosen.append(int(cand[pick]))
        if big[pick]:
            rooms = np.sort(np.append(rooms, hi_room[pick]))
        else:
            small = np.sort(np.append(small, hi[pick]))
        small = np.sort(np.append(small, lo[pick]))
        keep = np.arange(cand.size) != pick
        cand, hi, lo, big, hi_room = cand[keep], hi[keep], lo[keep], big[keep], hi_room[keep]
