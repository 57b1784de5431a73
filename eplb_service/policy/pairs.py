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
   small partners, until the replicas of ``C`` meet Hall's condition (below); then, since no
   pair may hold one expert twice, more helpers until :func:`pair_items` pairs them.

The repair is complete: it fails only when no arrangement of the row with the requested
counts pairs within the limit without an expert twice on a rank (once every rank is in ``C``
its replicas are the whole row's, and :func:`pair_items` is exact).

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
smallest) is one. That ignores duplicates: two replicas of one expert may be left with only
each other (:func:`pair_items` handles it exactly).

With few replica count vectors (Mixtral: 8 experts on 16 slots, 6,435 of them),
:func:`fewest_rewrites` replaces the greedy choice of ``C`` and the fixed counts by an exact
search: over every count vector, the arrangement within the goal that keeps the most slots
(an expert may then sit twice on a rank, as in the fresh plan there).

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

__all__ = ["SLACK", "SLOPE", "PairLimits", "fewest_rewrites", "pair_items", "repair_pairs"]

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
        item: [X, R, 2], holding exactly ``counts`` where ``ok`` (``current`` elsewhere); a
            re-paired rank never holds an expert twice (a kept rank may, as in ``current``)
        ok: [X], whether the row was repaired within its limits: False only when no
            arrangement of ``counts`` pairs within them without an expert twice on a rank
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

    # Hall's condition ignores that no pair may hold one expert twice: while that leaves no
    # pairing, add the helper that leaves the least shortfall (with every rank re-paired, the
    # replicas are the whole row's, so a row any pairing repairs is repaired).
    while (paired := pair_items(items, vals, limit)) is None:
        cand = np.flatnonzero(~broken)
        if cand.size == 0:
            return None
        score = [
            _shortfall(np.append(items, flat[2 * r : 2 * r + 2]),
                       np.append(vals, pair_val[r]), limit)
            for r in cand
        ]
        pick = int(cand[np.lexsort((hi[cand] + lo[cand], score))[0]])
        items = np.append(items, flat[2 * pick : 2 * pick + 2])
        origin = np.append(origin, [2 * pick, 2 * pick + 1])
        vals = per[items]
        broken[pick] = True
    out = cur.copy()
    _hand_out(out, np.flatnonzero(broken), items, origin, *paired)
    return out


def pair_items(items: I64, vals: F64, limit: _Limit) -> tuple[I64, I64] | None:
    """Pairs all replicas within ``limit``, never one expert twice in a pair; None iff no such
    pairing exists.

    Bigs fit only with smalls (and share no expert with one: an expert's replicas have one
    load), any two smalls fit. So a pairing matches the bigs into the smalls (nested
    neighbourhoods: the largest big takes the smallest small), and the smalls left over pair
    among themselves iff no expert holds more than half of them. A small expert with ``n_e``
    replicas must hence give the bigs at least ``n_e - left / 2`` of them (``left`` = smalls
    less bigs); those plus the smallest other smalls are the best the bigs can get (exchange
    argument). Without duplicates this is outside-in pairing (largest with smallest).

    Parameters:
        items: [m], expert of each replica (m even)
        vals: [m], its load

    Returns:
        (first, second): [m / 2] each, indices into ``items`` of each pair's replicas
    """
    order = np.lexsort((items, -vals))
    half = order.size // 2
    first, second = order[:half], order[::-1][:half]
    if (items[first] != items[second]).all() and limit.fits(vals[first], vals[second]).all():
        return first, second
    split = _big_partners(items, vals, limit)
    if split is None:
        return None
    bigs, partners, left = split
    a, b = _pair_smalls(items, vals, left)
    return np.concatenate([bigs, a]), np.concatenate([partners, b])


def _demand(items: I64, num_left: int) -> B8:
    """``[m]`` smalls ascending by load -> whether each must go to a big: the first
    ``n_e - num_left / 2`` replicas of each expert ``e`` (``n_e`` of them in ``items``)."""
    _, inverse, count = np.unique(items, return_inverse=True, return_counts=True)
    grouped = np.argsort(inverse, kind="stable")
    rank_in = np.empty(items.size, dtype=np.int64)
    rank_in[grouped] = np.arange(items.size) - np.repeat(np.cumsum(count) - count, count)
    return rank_in < (count - num_left // 2)[inverse]


def _big_partners(items: I64, vals: F64, limit: _Limit) -> tuple[I64, I64, I64] | None:
    """Bigs ``[B]`` (descending), the small each takes ``[B]`` and the smalls left
    ``[m - 2B]`` (indices into ``items``), or None when no pairing exists (see
    :func:`pair_items`)."""
    big = limit.big(vals)
    smalls = np.flatnonzero(~big)
    smalls = smalls[np.lexsort((items[smalls], vals[smalls]))]  # ascending
    bigs = np.flatnonzero(big)
    bigs = bigs[np.lexsort((items[bigs], -vals[bigs]))]  # descending: rooms ascending
    num_left = smalls.size - bigs.size
    if num_left < 0:
        return None
    forced = _demand(items[smalls], num_left)
    spare = bigs.size - int(forced.sum())
    if spare < 0:
        return None
    take = forced.copy()
    take[np.flatnonzero(~forced)[:spare]] = True
    partners = smalls[take]
    if not limit.fits(vals[bigs], vals[partners]).all():
        return None
    return bigs, partners, smalls[~take]


def _pair_smalls(items: I64, vals: F64, left: I64) -> tuple[I64, I64]:
    """Pairs the smalls ``left`` (no expert holding more than half of them) outside-in,
    except that a replica of an expert holding exactly half of those remaining is taken
    first (else it would end up paired with itself)."""
    rest = [int(k) for k in left[np.lexsort((items[left], -vals[left]))]]  # descending
    first: list[int] = []
    second: list[int] = []
    while rest:
        x = rest.pop(0)
        expert, count = np.unique(items[[x, *rest]], return_counts=True)
        tight = expert[(2 * count == len(rest) + 1) & (expert != items[x])]
        want = tight[0] if tight.size else -1
        y = next(k for k in reversed(rest)
                 if (items[k] == want if want >= 0 else items[k] != items[x]))
        rest.remove(y)
        first.append(x)
        second.append(y)
    return np.array(first, dtype=np.int64), np.array(second, dtype=np.int64)


def _shortfall(items: I64, vals: F64, limit: _Limit) -> int:
    """How far replicas are from having a pairing (0 iff :func:`pair_items` finds one): bigs
    without a small, else forced smalls beyond the bigs, else bigs above their partner's
    room in the nested matching, each tier above the next."""
    big = limit.big(vals)
    num_left = int((~big).sum() - big.sum())
    if num_left < 0:
        return 4 * vals.size - num_left
    smalls = np.flatnonzero(~big)
    smalls = smalls[np.lexsort((items[smalls], vals[smalls]))]
    excess = int(_demand(items[smalls], num_left).sum() - big.sum())
    if excess > 0:
        return 2 * vals.size + excess
    if _big_partners(items, vals, limit) is not None:
        return 0
    rooms = np.sort(limit.room(vals[big]))
    return 1 + int(np.maximum(_shortage(rooms, np.sort(vals[smalls]), rooms), 0).sum())


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


def fewest_rewrites(
    weight: F64, current: I64, limits: PairLimits, counts: I64, experts: I64,
    known: I64 | None = None, max_tries: float = np.inf,
) -> tuple[I64, B8]:
    """The arrangements within their rows' limits that rewrite the fewest slots of ``current``,
    over every replica count vector: exact, for small rows (Mixtral: 6,435 count vectors).

    Per count vector, the replica loads are fixed and a pairing within the limit exists iff
    outside-in pairing is one (nested neighbourhoods; an expert may sit twice on a rank, as in
    the fresh plan's :func:`~eplb_service.policy.fresh.exact_pairs`). Candidates go in
    decreasing order of an upper bound on the slots they could keep (:func:`_kept_bound`),
    each solved exactly by dynamic programming over ranks (:func:`_max_kept`), until the bound
    cannot beat the best found. Within a count vector, among equally few rewrites the smallest
    sum of squared rank loads wins (so the plan stays as even as it can); across count
    vectors, the first found.

    Parameters:
        weight: [X, n], loads
        current: [X, R, 2], experts in service (< 0: must be rewritten)
        limits: what a pair may carry, per row
        counts: [V, n], every count vector (>= 1, summing to 2 R)
        experts: [V, 2 R], the expert of each replica of each count vector
        known: [X, R, 2], optional arrangements within the limits (every expert placed): the
            search only looks for better ones (what it returns where none is)
        max_tries: most count vectors solved per row once one arrangement is known (the
            result is then the best found, not necessarily the fewest)

    Returns:
        item: [X, R, 2], the arrangement where ``ok`` (``current`` elsewhere)
        ok: [X], whether some arrangement is within the row's limits
    """
    num_rows, num_ranks, _ = current.shape
    out = current.copy()
    ok = np.zeros(num_rows, dtype=bool)
    per = weight[:, :, None] / np.ascontiguousarray(counts.T)[None]  # [X, n, V]: fast over n
    # The largest replica must fit with the smallest: a cheap first cut (rooms per row).
    top, bottom = per.max(axis=1), per.min(axis=1)  # [X, V]
    first = np.stack([limits.row(x).fits(top[x], bottom[x] * (1 - 1e-12))
                      for x in range(num_rows)])
    row_of, cand = np.nonzero(first)
    replica = np.sort(np.take_along_axis(per[row_of, :, cand], experts[cand], axis=1), axis=1)
    for x in range(num_rows):
        mine = np.flatnonzero(row_of == x)  # ascending by count vector
        limit = limits.row(x)
        small = replica[mine]  # [v, 2R] ascending
        fits = limit.fits(small[:, ::-1][:, :num_ranks], small[:, :num_ranks] * (1 - 1e-12))
        keep = fits.all(axis=1)
        start = None if known is None else known[x]
        got = _fewest_row(weight[x], current[x], limit, counts, cand[mine[keep]],
                          small[keep, 0], start, max_tries)
        if got is not None:
            out[x] = got
            ok[x] = True
    return out, ok


def _fewest_row(
    w: F64, cur: I64, limit: _Limit, counts: I64, cand: I64, smallest: F64,
    start: I64 | None, max_tries: float,
) -> I64 | None:
    """One row of :func:`fewest_rewrites` over the count vectors ``cand`` that pair within
    the limit (smallest replica ``smallest``): ``[R, 2]``, or None when there are none."""
    num_ranks = cur.shape[0]
    if cand.size == 0:
        return None
    per = w[None, :] / counts[cand]  # [v, n]
    bound = _kept_bound(per, smallest, counts[cand], cur, limit)
    order = np.argsort(-bound, kind="stable")
    # Rank loads are within the goal, so the tie-break costs < 0.4 slots in all; a row with
    # (next to) no load has nothing to break ties on.
    goal = float(limit.goal)
    scale = 0.4 / (num_ranks * goal**2) if goal > 1e-150 else 0.0
    best: tuple[float, I64] | None = None
    if start is not None:
        load = (w / np.bincount(start.ravel(), minlength=w.size))[start].sum(axis=1)  # [R]
        best = (float(2 * num_ranks - (start != cur).sum()) - scale * float((load**2).sum()),
                start)
    for tries, (v, most) in enumerate(zip(order, bound[order], strict=True)):
        if best is not None and (most <= best[0] + 0.5 or tries >= max_tries):
            break  # not more slots kept (ties keep the first found), or out of tries
        got = _max_kept(counts[cand[v]], per[v], cur, limit, scale)
        if got is not None and (best is None or got[0] > best[0]):
            best = got
    return None if best is None else best[1]


def _kept_bound(per: F64, smallest: F64, counts: I64, cur: I64, limit: _Limit) -> I64:
    """``[V]`` most slots of ``cur [R, 2]`` an arrangement with ``counts [V, n]`` replicas of
    loads ``per [V, n]`` keeps within ``limit``: a cut of the flow from ranks to experts.

    A slot can stay only if its replica fits with the smallest one (``smallest [V]``); a rank
    keeps both only if its old pair fits; expert ``e`` keeps at most ``c_e`` slots. For a set
    ``A`` of experts, kept <= sum over ``A`` of ``c_e`` + sum over ranks of min(the rank's
    cap, its keepable slots outside ``A``); ``A`` = none, and ``A`` = the experts with fewer
    replicas than keepable slots.
    """
    held = cur >= 0
    x = np.maximum(cur, 0)  # [R, 2]
    v = per[:, x]  # [V, R, 2]
    keep = held[None] & limit.fits(v, smallest[:, None, None] * (1 - 1e-12))
    both = keep.all(axis=2) & limit.fits(v.max(axis=2), v.min(axis=2) * (1 - 1e-12))
    cap = np.where(both, 2, keep.any(axis=2).astype(np.int64))  # [V, R]
    rows = np.arange(per.shape[0])[:, None]
    keepable = np.zeros(per.shape, dtype=np.int64)  # [V, n]
    for s in range(2):
        np.add.at(keepable, (np.broadcast_to(rows, keep[:, :, s].shape), x[None, :, s]),
                  keep[:, :, s].astype(np.int64))
    scarce = counts < keepable  # [V, n]
    outside = (keep & ~scarce[rows[:, :, None], x[None]]).sum(axis=2)  # [V, R]
    none = np.minimum(cap, keep.sum(axis=2)).sum(axis=1)
    cut = np.where(scarce, counts, 0).sum(axis=1) + np.minimum(cap, outside).sum(axis=1)
    return np.minimum(none, cut)


def _layout(c: I64, num_ranks: int) -> tuple[int, I64, I64, I64, I64]:
    """The dynamic program's states for counts ``c [n]`` (see :func:`_max_kept`), by pair.

    Returns:
        size: number of states (digit ``d_e`` in ``0..c_e`` per expert, mixed radix, expert 0
            the lowest digit)
        ids: [E], the states that occur (an even number of replicas left), by that number
        edges: [2 R + 2], where each number of replicas left starts in ``ids``
        where: [size], position of each state in ``ids``
        src: [n (n + 1) / 2, E], the state each pair (``np.triu_indices(n)`` order) moves
            from into each of ``ids``, ``size`` where that would overflow a digit
    """
    n = c.size
    radix = np.concatenate([[1], np.cumprod(c[:-1] + 1)]).astype(np.int64)
    size = int(np.prod(c + 1))
    col = np.indices(tuple(int(k) + 1 for k in c[::-1])).reshape(n, -1)[::-1]  # [n, states]
    level = col.sum(axis=0)
    ids = np.flatnonzero(level % 2 == 0)
    ids = ids[np.argsort(level[ids], kind="stable")]
    edges = np.searchsorted(level[ids], np.arange(2 * num_ranks + 2))
    where = np.empty(size, dtype=np.int64)
    where[ids] = np.arange(ids.size)
    digit = col[:, ids]
    one, two = digit < c[:, None], digit < (c - 1)[:, None]  # room for one / two more
    e, f = np.triu_indices(n)
    ok = one[e] & one[f]
    same = e == f
    ok[same] = two[e[same]]
    src = np.where(ok, ids[None, :] + (radix[e] + radix[f])[:, None], size)
    return size, ids, edges, where, src


def _max_kept(
    c: I64, val: F64, cur: I64, limit: _Limit, scale: float
) -> tuple[float, I64] | None:
    """Most slots of ``cur [R, 2]`` kept (less ``scale`` x the sum of squared rank loads) by
    an arrangement of exactly ``c [n]`` replicas of loads ``val [n]``, every pair within
    ``limit``; with the arrangement, or None.

    Dynamic programming over ranks; a state is the replicas still to place (digit ``d_e`` of a
    mixed-radix number), and after ``r`` ranks only states with ``2 (R - r)`` replicas left
    occur (:func:`_layout`)."""
    num_ranks = cur.shape[0]
    size, ids, edges, where, src_all = _layout(c, num_ranks)
    e, f = np.triu_indices(c.size)
    good = limit.fits(np.maximum(val[e], val[f]), np.minimum(val[e], val[f]) * (1 - 1e-12))
    e, f, src = e[good], f[good], src_all[good]  # [T], the pairs a rank may take
    if e.size == 0:
        return None
    penalty = scale * (val[e] + val[f]) ** 2
    score = np.full(size + 1, -np.inf)
    score[size - 1] = 0.0
    history = [score]
    adds = []
    for r in range(num_ranks):
        a, b = int(cur[r, 0]), int(cur[r, 1])
        # Slots kept: the multiset intersection of the new pair and the rank's old one.
        if a == b:
            kept = (e == a).astype(np.float64) + (f == a)
        else:
            kept = ((e == a) | (f == a)).astype(np.float64) + ((e == b) | (f == b))
        adds.append(kept - penalty)
        # After r + 1 ranks, 2 (R - r - 1) replicas are left.
        left = 2 * (num_ranks - r - 1)
        at = slice(int(edges[left]), int(edges[left + 1]))
        gain = score[src[:, at]]  # [T, states at that level]
        gain += adds[-1][:, None]
        score = np.full(size + 1, -np.inf)
        score[ids[at]] = gain.max(axis=0)
        history.append(score)
    if not np.isfinite(score[0]):
        return None
    # Walk back: at each rank, a pair whose source score plus its gain gives the score.
    out = np.empty_like(cur)
    state = 0
    for r in range(num_ranks - 1, -1, -1):
        col_src = src[:, where[state]]
        t = int(np.argmax(history[r][col_src] + adds[r] == history[r + 1][state]))
        pair = [int(e[t]), int(f[t])]
        if pair[1] == cur[r, 0] or pair[0] == cur[r, 1]:
            pair = pair[::-1]
        out[r] = pair
        state = int(col_src[t])
    return float(score[0]), out
