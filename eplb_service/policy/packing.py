"""Packing replicas onto ranks: a greedy start and a swap local search.

A row ``x`` (a layer, or a (layer, node) pair) has ``R`` ranks of ``S`` slots each; the state
is kept rank-major as ``[X, R, S]`` arrays of item loads and item ids (expert ids). Every
function works on all rows at once; Python loops run over items or moves, never over rows.

:func:`refine_swaps` repeatedly swaps one item of a row's most loaded rank with one item of a
lighter rank. Without costs it takes the swap that lowers that rank the most (a steepest
descent to a local optimum); with costs it takes the swap with the best gain per cost, where
gain stops counting at the row's target, so it stops as soon as the target is met.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from eplb_service.policy.deepseek import balanced_packing

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

__all__ = [
    "COST_CROSS_NODE",
    "COST_INTRA_NODE",
    "COST_LOCAL",
    "SwapCosts",
    "SwapLog",
    "balance_pairs",
    "fewest_rewrite_swaps",
    "held_counts",
    "lpt_pack",
    "refine_swaps",
]

# Partner ranks examined per step: the lightest ones (where a swap can help most).
PARTNERS = 4
# Heavy ranks a row works on per step (each with its own partner).
LANES = 1
_REL_EPS = 1e-9
# Added to the key of an invalid candidate in the costed swap search (finite keys are far below).
_OFF = 1e300
# With costs, a move's value is its gain minus this fraction of the gap to the target per unit
# of cost: the biggest step toward the target first, the cheaper of nearly equal steps.
COST_WEIGHT = 0.05


def lpt_pack(load: F64, num_ranks: int) -> I64:
    """Greedy packing: items in descending load, each to the lightest rank with a free slot.

    Parameters:
        load: [X, P], item loads (P a multiple of ``num_ranks``)
        num_ranks: R

    Returns:
        order: [X, R, S] int64, the item (column of ``load``) in each slot of each rank
    """
    num_rows, num_items = load.shape
    per_rank = num_items // num_ranks
    pack, rank_in_pack = balanced_packing(load.astype(np.float32), num_ranks)
    position = pack * per_rank + rank_in_pack  # [X, P], slot of each item
    order = np.empty_like(position)
    np.put_along_axis(order, position, np.arange(num_items)[None, :].repeat(num_rows, 0), axis=1)
    return order.reshape(num_rows, num_ranks, per_rank)


# Relative cost of writing an expert into a slot, by where its weights come from.
COST_LOCAL = 1.0  # the rank already holds the expert (a copy inside the GPU)
COST_INTRA_NODE = 1.2  # another GPU of the same node holds it (NVLink)
COST_CROSS_NODE = 1.5  # only other nodes hold it (the network)


_COST_OF_TIER = np.array([COST_LOCAL, COST_INTRA_NODE, COST_CROSS_NODE])


@dataclass
class SwapCosts:
    """What a slot write costs (for migration-aware search).

    Writing expert ``e`` into slot ``(r, s)`` of row ``x`` costs nothing when the slot held
    ``e`` in the placement in service (``original``), else :meth:`arrival`: ``COST_LOCAL`` when
    rank ``r`` held ``e``, ``COST_INTRA_NODE`` when a rank of its node did, else
    ``COST_CROSS_NODE``. Every write also rewrites a slot, hence the small spread of the costs:
    fewer rewrites first, nearer sources second.

    Attributes:
        original: [X, R, S], the expert each slot held in service (-1: none may stay)
        tier: [X, R, n] int8, where expert ``e`` would come from for rank ``r``: 0 the rank
            itself, 1 its node, 2 another node
    """

    original: I64
    tier: npt.NDArray[np.int8]

    @classmethod
    def in_service(cls, current: I64, num_experts: int, num_nodes: int) -> SwapCosts:
        """Costs relative to the arrangement ``current [X, R, S]`` (ids < 0: free slots) whose
        ``R`` ranks span ``num_nodes`` nodes."""
        num_rows, num_ranks, _ = current.shape
        held = held_counts(current, num_experts)[:, :, :num_experts] > 0  # [X, R, n]
        node_held = np.any(held.reshape(num_rows, num_nodes, -1, num_experts), axis=2)
        near = np.repeat(node_held, num_ranks // num_nodes, axis=1)  # [X, R, n]
        tier = (2 - held.view(np.int8) - near.view(np.int8)).astype(np.int8)
        return cls(current, tier)

    def rows(self, index: I64) -> SwapCosts:
        """The costs of a subset of rows."""
        return SwapCosts(self.original[index], self.tier[index])

    @property
    def held(self) -> npt.NDArray[np.bool_]:
        """[X, R, n]: whether each rank held each expert in service."""
        return self.tier == 0

    def arrival(self, rows: I64, ranks: I64, experts: I64) -> F64:
        """Cost of bringing ``experts`` to ``ranks`` of ``rows`` (broadcast index arrays)."""
        _, num_ranks, num_experts = self.tier.shape
        flat = (rows * num_ranks + ranks) * num_experts + experts
        return _COST_OF_TIER[self.tier.reshape(-1)[flat]]

    def slot_cost(self, item: I64) -> F64:
        """``[X, R, S]`` experts -> ``[X, R, S]`` cost of each slot holding them."""
        num_rows, num_ranks, _ = item.shape
        rows = np.arange(num_rows)[:, None, None]
        ranks = np.arange(num_ranks)[None, :, None]
        cost = self.arrival(rows, ranks, np.maximum(item, 0))
        cost[item == self.original] = 0.0
        return cost


def held_counts(item: I64, num_experts: int) -> I64:
    """``[X, R, S]`` -> ``[X, R, n + 1]`` replicas of each expert per rank (column n: free)."""
    num_rows, num_ranks, _ = item.shape
    width = num_experts + 1
    base = (np.arange(num_rows * num_ranks, dtype=np.int64) * width).reshape(
        num_rows, num_ranks, 1
    )
    index = base + np.where(item >= 0, item, num_experts)
    counts = np.bincount(index.ravel(), minlength=num_rows * num_ranks * width)
    return counts.reshape(num_rows, num_ranks, width)


@dataclass
class SwapLog:
    """The moves :func:`refine_swaps` made, in order (a row's moves keep their order).

    Attributes (one entry per move, all ``[M]``):
        row: the row
        slot_a, slot_b: the two slots swapped (``r * S + s``)
        peak: the row's largest rank load after the move
        changed: with costs, slots differing from ``costs.original`` after the move
        arrivals: with costs, (rank, expert) pairs held after the move but not in
            ``costs.original`` (weight transfers)
    """

    row: I64
    slot_a: I64
    slot_b: I64
    peak: F64
    changed: I64
    arrivals: I64


class _Holdings:
    """Replicas each rank holds, and how many (rank, expert) pairs are new vs the original."""

    def __init__(self, item: I64, costs: SwapCosts) -> None:
        num_rows = item.shape[0]
        num_experts = costs.held.shape[2]
        self.held = held_counts(item, num_experts)  # [X, R, n + 1]
        orig = np.ones(self.held.shape, dtype=bool)  # the free column never counts
        orig[:, :, :num_experts] = costs.held
        self.orig = orig
        self.arrivals = ((self.held > 0) & ~orig).sum(axis=(1, 2))
        self.changed = (item != costs.original).reshape(num_rows, -1).sum(axis=1)

    def move(self, rows: I64, rank: I64, out: I64, into: I64) -> I64:
        """Rank ``rank`` of each row gives up one ``out`` replica and takes one ``into``
        (``(row, rank)`` pairs distinct); returns each entry's change of arrivals (not yet
        added to ``self.arrivals``)."""
        _, num_ranks, width = self.held.shape
        held, orig = self.held.reshape(-1), self.orig.reshape(-1)  # views
        base = (rows * num_ranks + rank) * width
        at_out, at_into = base + out, base + into
        gone = (held[at_out] == 1) & ~orig[at_out]
        held[at_out] -= 1
        new = (held[at_into] == 0) & ~orig[at_into]
        held[at_into] += 1
        return new.astype(np.int64) - gone.astype(np.int64)


def refine_swaps(
    load: F64,
    item: I64,
    target: F64,
    *,
    costs: SwapCosts | None = None,
    max_moves: int = 256,
    lanes: int = LANES,
) -> tuple[F64, I64, SwapLog]:
    """Swaps items between ranks until each row's largest rank load is at most its target.

    Each step takes a row's ``LANES`` most loaded ranks that are above the target and its
    ``PARTNERS`` lightest ranks, and for each heavy rank ``h`` considers every swap of one of
    its items ``i`` with an item ``j`` of a partner ``p``: ``h`` drops by ``d = x_i - x_j`` and
    ``p`` rises by ``d``; the swap helps when both end below ``h``'s load and neither rank
    gets a second replica of an expert. Heavy ranks take their best swaps heaviest first, each
    partner serving one heavy rank per step. A row stops when it meets its target or its
    heaviest rank has no helpful swap.

    Parameters:
        load: [X, R, S], item loads (not modified)
        item: [X, R, S], item ids moved along with the loads (not modified)
        target: [X], stop a row once its largest rank load is at most this
        costs: when given, take the swap with the largest gain (counted down to the target
            only), less ``COST_WEIGHT`` of the remaining gap per unit of cost; else the swap
            lowering ``h`` the most
        max_moves: most moves per row (a step with several lanes may pass it by lanes - 1)
        lanes: heavy ranks worked on per step (fewer steps, slightly different moves)

    Returns:
        load: [X, R, S], after the swaps
        item: [X, R, S], after the swaps
        log: the moves in order (a row's moves in the order applied)
    """
    load = load.copy()
    item = item.copy()
    num_rows, num_ranks, per_rank = load.shape
    rank_load = load.sum(axis=2)  # [X, R]
    slot_cost = costs.slot_cost(item) if costs is not None else None
    holdings = _Holdings(item, costs) if costs is not None else None
    logs: dict[str, list[npt.NDArray[np.generic]]] = {
        k: [] for k in ("row", "slot_a", "slot_b", "peak", "changed", "arrivals")
    }
    lanes = max(1, min(lanes, num_ranks // 4))
    num_partners = min(PARTNERS, num_ranks - lanes)
    moves = np.zeros(num_rows, dtype=np.int64)
    active = np.arange(num_rows)
    if per_rank < 1 or num_partners < 1:
        active = active[:0]

    if lanes == 1 and costs is not None and slot_cost is not None and holdings is not None:
        _costed_steps(load, item, rank_load, target, active, moves, max_moves, num_partners,
                      costs, slot_cost, holdings, logs)
        active = active[:0]
    while active.size:
        rl = rank_load[active]  # [a, R]
        order = np.argsort(-rl, axis=1)
        heavy = order[:, :lanes]  # [a, T], heaviest first
        partners = order[:, num_ranks - num_partners :]  # [a, K], lightest ranks
        a = active.size
        ar = np.arange(a)[:, None]
        h_load = rl[ar, heavy]  # [a, T]
        t = target[active]
        keep = (h_load[:, 0] > t * (1 + _REL_EPS)) & (moves[active] < max_moves)
        if not keep.all():
            active, rl, heavy, partners, h_load, t = (
                active[keep], rl[keep], heavy[keep], partners[keep], h_load[keep], t[keep]
            )
            a = active.size
            ar = np.arange(a)[:, None]
            if a == 0:
                break
        rows = active[:, None]
        x_h = load[rows, heavy]  # [a, T, S]
        x_p = load[rows, partners]  # [a, K, S]
        p_load = rl[ar, partners]  # [a, K]
        ks = num_partners * per_rank
        # Candidates (i, k, j) along [a, T, S, K * S] (long inner rows run faster): rank h
        # ends at h - x_i + x_j, partner k at p_k + x_i - x_j.
        x_pf = x_p.reshape(a, 1, 1, ks)
        h_after = (h_load[:, :, None] - x_h)[:, :, :, None] + x_pf
        p_after = x_h[:, :, :, None] + (np.repeat(p_load, per_rank, axis=1)[:, None, None, :]
                                        - x_pf)
        score = np.maximum(h_after, p_after)  # [a, T, S, KS]
        h4 = h_load[:, :, None, None]
        # Never give a rank a second replica of an expert it holds: that concentrates the
        # expert's load on one GPU (and is what a pure cost model would call cheapest).
        e_h = item[rows, heavy]  # [a, T, S]
        e_p = item[rows, partners]  # [a, K, S]
        lane_open = (h_load > t[:, None] * (1 + _REL_EPS))[:, :, None, None]
        if costs is None or slot_cost is None or holdings is None:
            same = e_h[:, :, :, None, None] == e_p[:, None, None, :, :]  # [a, T, S, K, S]
            clash = (same.any(axis=2, keepdims=True) | same.any(axis=4, keepdims=True))
            helps = (score < h4 * (1 - _REL_EPS)) & lane_open & ~clash.reshape(a, lanes, -1, ks)
            flat = np.where(helps, -score, -np.inf).reshape(a, lanes, -1)
        else:
            held = holdings.held
            # Slot (h, i) receives e_p[k, j] and slot (p_k, j) receives e_h[i]: the arrival
            # costs, less what the two slots cost now. (A write that restores a slot's
            # expert in service would cost nothing; it is charged as an arrival here.) A
            # clash costs +inf. The move's value is its gain counted down to the target,
            # max(h - score, ...) - COST_WEIGHT * (h - t) * cost: the best move minimizes
            # max(score, t) + COST_WEIGHT * (h - t) * cost.
            weight_c = (COST_WEIGHT * (h_load - t[:, None]))[:, :, None]  # [a, T, 1]
            width = held.shape[2]
            base_h = (rows * num_ranks + heavy) * width  # [a, T]
            base_p = (rows * num_ranks + partners) * width  # [a, K]
            held_flat = held.reshape(-1)
            e_pf = e_p.reshape(a, 1, ks)
            dup_h = held_flat[base_h[:, :, None] + e_pf] > 0  # [a, T, KS]
            dup_p = held_flat[base_p[:, None, None, :] + e_h[:, :, :, None]] > 0  # [a, T, S, K]
            arr_h = costs.arrival(rows[:, :, None], heavy[:, :, None], e_pf)  # [a, T, KS]
            arr_p = costs.arrival(rows[:, :, None, None], partners[:, None, None, :],
                                  e_h[:, :, :, None])  # [a, T, S, K]
            c_h = slot_cost[rows, heavy]  # [a, T, S]
            c_p = slot_cost[rows, partners].reshape(a, 1, ks)
            into_h = np.where(dup_h, np.inf, (arr_h - c_p) * weight_c)  # [a, T, KS]
            into_p = np.where(dup_p, np.inf,
                              (arr_p - c_h[:, :, :, None]) * weight_c[:, :, :, None])
            key = np.maximum(score, t[:, None, None, None])
            key += into_h[:, :, None, :]
            key += np.repeat(into_p, per_rank, axis=3)
            valid = score < h4 * (1 - _REL_EPS)
            if lanes > 1:
                valid &= lane_open
            flat = np.where(valid, -key, -np.inf).reshape(a, lanes, -1)
        best = flat.argmax(axis=2)  # [a, T]
        ok = np.isfinite(np.take_along_axis(flat, best[:, :, None], axis=2)[:, :, 0])
        # A row whose heaviest rank cannot be helped is done.
        stuck = ~ok[:, 0]
        i, rest = np.divmod(best, num_partners * per_rank)
        pk, j = np.divmod(rest, per_rank)
        used = np.zeros((a, num_partners), dtype=bool)
        picked: list[tuple[I64, I64, I64, I64, I64]] = []  # per lane: rows (of a), h, i, p, j
        for lane in range(lanes):
            if lane and used.any():
                # A later lane takes its best swap with a partner no earlier lane took (the
                # ranks of different lanes are disjoint, so their swaps are independent).
                lane_flat = flat[:, lane].reshape(a, per_rank, num_partners, per_rank)
                lane_flat = np.where(used[:, None, :, None], -np.inf, lane_flat)
                b = lane_flat.reshape(a, -1).argmax(axis=1)
                ok[:, lane] = np.isfinite(lane_flat.reshape(a, -1)[ar[:, 0], b])
                i[:, lane], rest_l = np.divmod(b, num_partners * per_rank)
                pk[:, lane], j[:, lane] = np.divmod(rest_l, per_rank)
            go = ok[:, lane] & ~used[ar[:, 0], pk[:, lane]] & ~stuck
            if not go.any():
                continue
            g = np.flatnonzero(go)
            used[g, pk[g, lane]] = True
            picked.append((g, heavy[g, lane], i[g, lane], partners[g, pk[g, lane]], j[g, lane]))
        if picked:
            _apply_lanes(picked, active, load, item, rank_load, moves, per_rank, logs,
                         costs, slot_cost, holdings)
        active = active[~stuck]

    return load, item, _swap_log(logs)


def _costed_steps(
    load: F64, item: I64, rank_load: F64, target: F64, active: I64, moves: I64, max_moves: int,
    num_partners: int, costs: SwapCosts, slot_cost: F64, holdings: _Holdings,
    logs: dict[str, list[npt.NDArray[np.generic]]],
) -> None:
    """:func:`refine_swaps` with costs and one lane: the same moves, fewer array passes.

    Works on flat views (slot, holding and tier indices computed once per step; the swap and
    its bookkeeping as :func:`_swap` and :meth:`_Holdings.move` do them) and keeps the candidate
    keys in reused ``[a, S, K * S]`` buffers. Invalid candidates get ``+_OFF``; the best is the
    first minimum, the same choice as the general loop's first maximum of ``-key`` (loads are
    finite).
    """
    _, num_ranks, per_rank = load.shape
    num_experts = costs.tier.shape[2]
    width = holdings.held.shape[2]
    ks = num_partners * per_rank
    load_f, item_f, cost_f = load.reshape(-1), item.reshape(-1), slot_cost.reshape(-1)
    held_f = holdings.held.reshape(-1)
    tier_f = costs.tier.reshape(-1)
    orig_f, orig_held_f = costs.original.reshape(-1), holdings.orig.reshape(-1)
    rank_f = rank_load.reshape(-1)  # views
    slot_index = np.arange(per_rank)
    # Candidate buffers, reused by every step (allocating them each step costs page faults).
    buf_a = np.empty(active.size * per_rank * ks)
    buf_b = np.empty_like(buf_a)
    buf_c = np.empty(buf_a.size, dtype=bool)
    while active.size:
        rl = rank_load[active]  # [a, R]
        order = np.argsort(-rl, axis=1)
        heavy = order[:, 0]
        ar = np.arange(active.size)
        h_load = rl[ar, heavy]
        t = target[active]
        keep = (h_load > t * (1 + _REL_EPS)) & (moves[active] < max_moves)
        if not keep.all():
            active, rl, order, heavy, h_load, t = (
                active[keep], rl[keep], order[keep], heavy[keep], h_load[keep], t[keep]
            )
            if active.size == 0:
                break
            ar = np.arange(active.size)
        a = active.size
        partners = order[:, num_ranks - num_partners :]  # [a, K], lightest ranks
        p_load = rl[ar[:, None], partners]  # [a, K]
        h_rank = active * num_ranks + heavy  # [a]
        p_rank = active[:, None] * num_ranks + partners  # [a, K]
        fh = h_rank[:, None] * per_rank + slot_index  # [a, S]
        fp = (p_rank[:, :, None] * per_rank + slot_index).reshape(a, ks)  # [a, KS]
        x_h, x_p = load_f[fh], load_f[fp]
        e_h, e_p = item_f[fh], item_f[fp]
        size = a * per_rank * ks
        h_after = buf_a[:size].reshape(a, per_rank, ks)  # [a, S, KS]
        p_after = buf_b[:size].reshape(a, per_rank, ks)
        invalid = buf_c[:size].reshape(a, per_rank, ks)
        np.add((h_load[:, None] - x_h)[:, :, None], x_p[:, None, :], out=h_after)
        np.add(x_h[:, :, None], (np.repeat(p_load, per_rank, axis=1) - x_p)[:, None, :],
               out=p_after)
        score = np.maximum(h_after, p_after, out=h_after)
        key = np.maximum(score, t[:, None, None], out=p_after)
        weight_c = COST_WEIGHT * (h_load - t)  # [a]
        dup_h = held_f[(h_rank * width)[:, None] + e_p] > 0  # [a, KS]
        dup_p = held_f[(p_rank * width)[:, None, :] + e_h[:, :, None]] > 0  # [a, S, K]
        arr_h = _COST_OF_TIER[tier_f[(h_rank * num_experts)[:, None] + e_p]]
        arr_p = _COST_OF_TIER[tier_f[(p_rank * num_experts)[:, None, :] + e_h[:, :, None]]]
        into_h = np.where(dup_h, np.inf, (arr_h - cost_f[fp]) * weight_c[:, None])
        into_p = np.where(dup_p, np.inf,
                          (arr_p - cost_f[fh][:, :, None]) * weight_c[:, None, None])
        key += into_h[:, None, :]
        split = key.reshape(a, per_rank, num_partners, per_rank)  # view
        split += into_p[:, :, :, None]
        # Swaps that do not lower the heavy rank get +_OFF (adding 0.0 leaves the others
        # exact; a masked fill costs twice as much): the first minimum is the general loop's
        # choice, and a row is stuck when even that is off or +inf (finite keys << _OFF).
        np.greater_equal(score, (h_load * (1 - _REL_EPS))[:, None, None], out=invalid)
        np.multiply(invalid, _OFF, out=score)
        key += score
        flat = key.reshape(a, -1)
        best = flat.argmin(axis=1)
        ok = flat[ar, best] < 0.5 * _OFF
        if ok.any():
            g = np.flatnonzero(ok)
            i, rest = np.divmod(best[g], ks)
            pk, j = np.divmod(rest, per_rank)
            r, h, p = active[g], heavy[g], partners[g, pk]
            # The swap (as _swap does it, on the flat indices at hand).
            fa, fb = fh[g, i], fp[g, rest]
            la, lb = load_f[fa], load_f[fb]
            load_f[fa], load_f[fb] = lb, la
            ea, eb = item_f[fa], item_f[fb]
            item_f[fa], item_f[fb] = eb, ea
            ra, rb = h_rank[g], p_rank[g, pk]
            rank_f[ra] += lb - la
            rank_f[rb] += la - lb
            oa, ob = orig_f[fa], orig_f[fb]
            cost_f[fa] = np.where(oa == eb, 0.0, _COST_OF_TIER[tier_f[ra * num_experts + eb]])
            cost_f[fb] = np.where(ob == ea, 0.0, _COST_OF_TIER[tier_f[rb * num_experts + ea]])
            # Holdings: rank a gives up ea and takes eb, rank b the reverse (ranks differ).
            out_f = np.concatenate([ra * width + ea, rb * width + eb])
            into_f = np.concatenate([ra * width + eb, rb * width + ea])
            gone = (held_f[out_f] == 1) & ~orig_held_f[out_f]
            held_f[out_f] -= 1
            new = (held_f[into_f] == 0) & ~orig_held_f[into_f]
            held_f[into_f] += 1
            d_arr = new.astype(np.int64) - gone
            holdings.changed[r] += ((oa != eb).astype(np.int64) - (oa != ea) + (ob != ea)
                                    - (ob != eb))
            holdings.arrivals[r] += d_arr[: r.size] + d_arr[r.size :]
            moves[r] += 1
            logs["row"].append(r)
            logs["slot_a"].append(h * per_rank + i)
            logs["slot_b"].append(p * per_rank + j)
            logs["peak"].append(rank_load[r].max(axis=1))
            logs["changed"].append(holdings.changed[r])
            logs["arrivals"].append(holdings.arrivals[r])
        active = active[ok]


def _apply_lanes(
    picked: list[tuple[I64, I64, I64, I64, I64]], active: I64, load: F64, item: I64,
    rank_load: F64, moves: I64, per_rank: int, logs: dict[str, list[npt.NDArray[np.generic]]],
    costs: SwapCosts | None, slot_cost: F64 | None, holdings: _Holdings | None,
) -> None:
    """Applies one step's swaps (lane by lane, in one batch) and logs them lane by lane.

    The ranks of different lanes are disjoint, so a row's swaps of one step commute; the log
    records each after the swaps of the lanes before it (peaks, rewrites and arrivals).
    """
    g = np.concatenate([p[0] for p in picked])
    h, i, p, j = (np.concatenate([q[k] for q in picked]) for k in range(1, 5))
    r = active[g]
    if len(picked) == 1:
        _swap(load, item, rank_load, r, h, i, p, j, costs, slot_cost, holdings)
        moves[r] += 1
        logs["row"].append(r)
        logs["slot_a"].append(h * per_rank + i)
        logs["slot_b"].append(p * per_rank + j)
        logs["peak"].append(rank_load[r].max(axis=1))
        if holdings is not None:
            logs["changed"].append(holdings.changed[r].copy())
            logs["arrivals"].append(holdings.arrivals[r].copy())
        return
    running = rank_load[active]  # [a, R], updated lane by lane
    if holdings is not None:
        run_changed = holdings.changed[active]
        run_arrivals = holdings.arrivals[active]
    deltas = _swap(load, item, rank_load, r, h, i, p, j, costs, slot_cost, holdings)
    np.add.at(moves, r, 1)
    start = 0
    for lane_rows, *_ in picked:
        stop = start + lane_rows.size
        sl = slice(start, stop)
        running[lane_rows, h[sl]] = rank_load[r[sl], h[sl]]
        running[lane_rows, p[sl]] = rank_load[r[sl], p[sl]]
        logs["row"].append(r[sl])
        logs["slot_a"].append(h[sl] * per_rank + i[sl])
        logs["slot_b"].append(p[sl] * per_rank + j[sl])
        logs["peak"].append(running[lane_rows].max(axis=1))
        if holdings is not None and deltas is not None:
            run_changed[lane_rows] += deltas[0][sl]
            run_arrivals[lane_rows] += deltas[1][sl]
            logs["changed"].append(run_changed[lane_rows].copy())
            logs["arrivals"].append(run_arrivals[lane_rows].copy())
        start = stop


def _swap(
    load: F64, item: I64, rank_load: F64, rows: I64, ra: I64, ia: I64, rb: I64, ib: I64,
    costs: SwapCosts | None, slot_cost: F64 | None, holdings: _Holdings | None,
) -> tuple[I64, I64] | None:
    """Swaps slot ``(ra, ia)`` with ``(rb, ib)`` in each of ``rows`` (in place; a row may
    repeat when its ranks differ). With costs, returns each entry's change of rewritten slots
    and of arrivals (already added to ``holdings``)."""
    _, num_ranks, per_rank = load.shape
    fa = (rows * num_ranks + ra) * per_rank + ia  # flat slot indices
    fb = (rows * num_ranks + rb) * per_rank + ib
    load_f, item_f = load.reshape(-1), item.reshape(-1)  # views
    la, lb = load_f[fa], load_f[fb]
    load_f[fa], load_f[fb] = lb, la
    ea, eb = item_f[fa], item_f[fb]
    item_f[fa], item_f[fb] = eb, ea
    rank_f = rank_load.reshape(-1)
    rank_f[rows * num_ranks + ra] += lb - la
    rank_f[rows * num_ranks + rb] += la - lb
    if costs is None or slot_cost is None or holdings is None:
        return None
    orig_f = costs.original.reshape(-1)
    oa, ob = orig_f[fa], orig_f[fb]
    cost_f = slot_cost.reshape(-1)
    cost_f[fa] = np.where(oa == eb, 0.0, costs.arrival(rows, ra, eb))
    cost_f[fb] = np.where(ob == ea, 0.0, costs.arrival(rows, rb, ea))
    d_changed = (oa != eb).astype(np.int64) - (oa != ea) + (ob != ea) - (ob != eb)
    d_arrivals = holdings.move(rows, ra, ea, eb) + holdings.move(rows, rb, eb, ea)
    np.add.at(holdings.changed, rows, d_changed)
    np.add.at(holdings.arrivals, rows, d_arrivals)
    return d_changed, d_arrivals


def fewest_rewrite_swaps(
    load: F64, item: I64, target: F64, costs: SwapCosts, *, max_moves: int = 256
) -> tuple[F64, I64, SwapLog]:
    """Swaps toward ``target`` that rewrite as few slots as they can (migration-aware polish).

    Each step relieves a row's most loaded rank ``h``: it swaps one of ``h``'s items with a
    slot of one of the ``PARTNERS`` lightest ranks or with any slot already rewritten (against
    ``costs.original``; never giving a rank a second replica of an expert). Among the swaps
    that take both ranks below the row's second largest rank load it takes the one adding the
    fewest rewritten slots, then the lowest of the two loads; when none gets that low, the
    swap lowering ``h`` the most. A rewritten slot can be rewritten again at no extra cost, so
    chains form on their own: ``h1`` gives ``x1`` to a light rank for ``y``, then ``h2`` gives
    ``x2`` to that same slot for ``x1``: three rewrites relieve two ranks (two swaps: four).
    :func:`refine_swaps` with costs instead takes the largest gain first, cost second.

    Parameters:
        load: [X, R, S], item loads (not modified)
        item: [X, R, S], expert ids (>= 0; not modified)
        target: [X], stop a row once its largest rank load is at most this
        costs: the arrangement in service (rewrites and arrivals count against it)
        max_moves: most swaps per row

    Returns:
        load, item: [X, R, S], after the swaps
        log: the swaps in order, with exact rewrites and arrivals after each
    """
    load = load.copy()
    item = item.copy()
    num_rows, num_ranks, per_rank = load.shape
    num_partners = min(PARTNERS, num_ranks - 1)
    rank_load = load.sum(axis=2)  # [X, R]
    slot_cost = costs.slot_cost(item)
    holdings = _Holdings(item, costs)
    logs: dict[str, list[npt.NDArray[np.generic]]] = {
        k: [] for k in ("row", "slot_a", "slot_b", "peak", "changed", "arrivals")
    }
    moves = np.zeros(num_rows, dtype=np.int64)
    active = np.arange(num_rows) if num_partners >= 1 and per_rank >= 1 else np.zeros(0, np.int64)
    width = holdings.held.shape[2]
    load_f, item_f, rank_f = load.reshape(-1), item.reshape(-1), rank_load.reshape(-1)  # views
    orig_f, held_f = costs.original.reshape(-1), holdings.held.reshape(-1)
    row_slots = num_ranks * per_rank
    slot_index = np.arange(per_rank)
    while active.size:
        rl = rank_load[active]  # [a, R]
        order = np.argsort(-rl, axis=1)
        ar = np.arange(active.size)
        heavy = order[:, 0]
        h_load = rl[ar, heavy]
        keep = (h_load > target[active] * (1 + _REL_EPS)) & (moves[active] < max_moves)
        if not keep.all():
            active, rl, order, heavy, h_load = (
                active[keep], rl[keep], order[keep], heavy[keep], h_load[keep]
            )
            ar = np.arange(active.size)
            if active.size == 0:
                break
        a = active.size
        second = rl[ar, order[:, 1]]
        h_rank = active * num_ranks + heavy  # [a], global rank ids
        fh = h_rank[:, None] * per_rank + slot_index  # [a, S]
        # Candidate slots [a, C]: the lightest ranks' slots, then every rewritten slot.
        light = ((active[:, None] * num_ranks + order[:, num_ranks - num_partners :])[:, :, None]
                 * per_rank + slot_index).reshape(a, -1)
        rewritten = (item_f[active[:, None] * row_slots + np.arange(row_slots)]
                     != orig_f[active[:, None] * row_slots + np.arange(row_slots)])  # [a, RS]
        count = rewritten.sum(axis=1)
        most = int(count.max(initial=0))
        where = np.argsort(~rewritten, axis=1, kind="stable")[:, :most]
        cand = np.concatenate([light, active[:, None] * row_slots + where], axis=1)
        open_ = np.concatenate(
            [np.ones(light.shape, dtype=bool), np.arange(most)[None, :] < count[:, None]], axis=1
        )
        c_rank = cand // per_rank  # [a, C], global rank ids
        open_ &= c_rank != h_rank[:, None]
        x_h, e_h, o_h = load_f[fh], item_f[fh], orig_f[fh]  # [a, S]
        x_c, e_c, o_c = load_f[cand], item_f[cand], orig_f[cand]  # [a, C]
        h_after = (h_load[:, None] - x_h)[:, :, None] + x_c[:, None, :]  # [a, S, C]
        r_after = x_h[:, :, None] + (rank_f[c_rank] - x_c)[:, None, :]
        score = np.maximum(h_after, r_after)
        valid = score < (h_load * (1 - _REL_EPS))[:, None, None]
        valid &= open_[:, None, :]
        valid &= (held_f[(h_rank * width)[:, None] + e_c] == 0)[:, None, :]
        valid &= held_f[(c_rank * width)[:, None, :] + e_h[:, :, None]] == 0
        # Slots rewritten after the swap, less before it.
        added = ((e_c[:, None, :] != o_h[:, :, None]).astype(np.int64)
                 + (e_h[:, :, None] != o_c[:, None, :])
                 - (e_h != o_h)[:, :, None] - (e_c != o_c)[:, None, :])
        relative = score / h_load[:, None, None]  # < 1 where valid
        key = np.where(score <= second[:, None, None], 4.0 * added + relative, 16.0 + relative)
        key[~valid] = np.inf
        flat = key.reshape(a, -1)
        best = flat.argmin(axis=1)
        ok = np.isfinite(flat[ar, best])
        if ok.any():
            g = np.flatnonzero(ok)
            i, c = np.divmod(best[g], cand.shape[1])
            target_slot = cand[g, c]
            r, h = active[g], heavy[g]
            p = target_slot // per_rank - r * num_ranks
            _swap(load, item, rank_load, r, h, i, p, target_slot % per_rank, costs, slot_cost,
                  holdings)
            moves[r] += 1
            logs["row"].append(r)
            logs["slot_a"].append(h * per_rank + i)
            logs["slot_b"].append(target_slot - r * row_slots)
            logs["peak"].append(rank_load[r].max(axis=1))
            logs["changed"].append(holdings.changed[r].copy())
            logs["arrivals"].append(holdings.arrivals[r].copy())
        active = active[ok]

    return load, item, _swap_log(logs)


def _swap_log(logs: dict[str, list[npt.NDArray[np.generic]]]) -> SwapLog:
    """The :class:`SwapLog` of per-step lists (``row``, ``slot_a``, ..., one array per step)."""

    def cat(name: str, dtype: type) -> npt.NDArray[np.generic]:
        parts = logs[name]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

    return SwapLog(
        row=cat("row", np.int64),  # type: ignore[arg-type]
        slot_a=cat("slot_a", np.int64),  # type: ignore[arg-type]
        slot_b=cat("slot_b", np.int64),  # type: ignore[arg-type]
        peak=cat("peak", np.float64),  # type: ignore[arg-type]
        changed=cat("changed", np.int64),  # type: ignore[arg-type]
        arrivals=cat("arrivals", np.int64),  # type: ignore[arg-type]
    )


def balance_pairs(load: F64, item: I64, rounds: int = 8) -> tuple[F64, I64]:
    """Pairs the i-th heaviest rank with the i-th lightest and makes the best swap in each pair.

    One round moves up to ``R / 2`` items per row at once (the pairs are disjoint), so a few
    rounds even out a greedy packing far faster than one move at a time. A pair swaps items
    ``i`` (heavy) and ``j`` (light) when that lowers the heavier of the two; it picks the swap
    whose load difference ``x_i - x_j`` is nearest half the pair's gap.

    Parameters:
        load: [X, R, S], item loads (not modified)
        item: [X, R, S], item ids moved along with the loads (not modified)
        rounds: passes over all pairs

    Returns:
        load, item: [X, R, S] each, after the swaps
    """
    load = load.copy()
    item = item.copy()
    num_rows, num_ranks, per_rank = load.shape
    half = num_ranks // 2
    if half == 0 or per_rank < 1 or num_rows == 0:
        return load, item
    rows = np.arange(num_rows)[:, None]
    for _ in range(rounds):
        rank_load = load.sum(axis=2)  # [X, R]
        order = np.argsort(rank_load, axis=1)
        heavy = order[:, ::-1][:, :half]  # [X, H], heaviest first
        light = order[:, :half]  # [X, H], lightest first
        gap = rank_load[rows, heavy] - rank_load[rows, light]  # [X, H]
        x_h = load[rows, heavy]  # [X, H, S]
        x_l = load[rows, light] + 0.5 * gap[:, :, None]
        # Heavier side after the swap, relative to the light rank's load: max(gap - d, d)
        # = gap / 2 + |d - gap / 2| with d = x_i - x_j.
        off = x_h[:, :, :, None] - x_l[:, :, None, :]  # [X, H, S, S]
        np.abs(off, out=off)
        flat = off.reshape(num_rows, half, -1)
        best = flat.argmin(axis=2)  # [X, H]
        best_after = 0.5 * gap + np.take_along_axis(flat, best[:, :, None], axis=2)[:, :, 0]
        go = best_after < gap * (1 - _REL_EPS)
        if not go.any():
            break
        r, h = np.nonzero(go)
        i, j = np.divmod(best[r, h], per_rank)
        rh, rl = heavy[r, h], light[r, h]
        lh, ll = load[r, rh, i], load[r, rl, j]
        load[r, rh, i], load[r, rl, j] = ll, lh
        eh, el = item[r, rh, i], item[r, rl, j]
        item[r, rh, i], item[r, rl, j] = el, eh
    return load, item
