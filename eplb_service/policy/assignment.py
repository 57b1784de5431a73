"""Optimal assignment (the Hungarian method), batched over rows.

:func:`max_assignment` solves, for every row ``x`` of a ``[X, n, n]`` benefit array at once,
``max over permutations pi of sum_a benefit[x, a, pi(a)]``. It is the shortest augmenting path
form of the Hungarian method (Kuhn-Munkres with potentials, O(n^3) per row). Row and column
reductions give feasible start potentials and a greedy matching on the edges they make tight;
each agent still unmatched is then added by Dijkstra-like steps over the columns until a free
column is reached (among columns of equal slack a free one is taken first, which keeps paths
short when many benefits tie). Every step is a few numpy operations over all rows still
searching; Python loops run over added agents and path steps only.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

__all__ = ["max_assignment"]


def max_assignment(benefit: F64) -> I64:
    """Maximum-benefit one-to-one assignment of agents to columns, per row.

    Parameters:
        benefit: [X, n, n], finite; ``benefit[x, a, b]`` is the value of giving column ``b``
            to agent ``a`` in row ``x``

    Returns:
        target: [X, n] int64, the column of each agent (a permutation per row) maximizing
            ``sum_a benefit[x, a, target[x, a]]``
    """
    benefit = np.asarray(benefit, dtype=np.float64)
    num_rows, n, n2 = benefit.shape
    if n != n2:
        raise ValueError(f"benefit must be square per row, got {benefit.shape}")
    if num_rows == 0 or n == 0:
        return np.zeros((num_rows, n), dtype=np.int64)
    # Minimize cost = -benefit. Column n is the virtual start column of every search.
    cost = -benefit
    inf = np.inf
    rows = np.arange(num_rows)
    # Feasible start potentials (row, then column reduction) and a greedy matching on the
    # edges they make tight: agents matched here need no search.
    u = np.zeros((num_rows, n + 1))  # agent potentials (index n unused)
    v = np.zeros((num_rows, n + 1))  # column potentials (column n: the virtual one)
    u[:, :n] = cost.min(axis=2)
    v[:, :n] = (cost - u[:, :n, None]).min(axis=1)
    owner = np.full((num_rows, n + 1), -1, dtype=np.int64)  # agent holding each column
    tight = cost - u[:, :n, None] - v[:, None, :n] <= 0  # [X, n agents, n columns]
    matched = np.zeros((num_rows, n), dtype=bool)
    for _ in range(4):
        # Each open agent claims its first tight open column; the lowest agent wins.
        open_t = tight & ~matched[:, :, None] & (owner[:, None, :n] < 0)
        has = open_t.any(axis=2)
        x, a = np.nonzero(has)
        if x.size == 0:
            break
        col = open_t[x, a].argmax(axis=1)
        key = x * n + col
        _, first = np.unique(key, return_index=True)  # x-major, lowest agent first
        owner[x[first], col[first]] = a[first]
        matched[x[first], a[first]] = True
    # queue[x, k]: the k-th agent of row x still to add (-1: none), in index order.
    open_count = (~matched).sum(axis=1)
    steps = int(open_count.max(initial=0))
    order = np.argsort(matched, axis=1, kind="stable")[:, :steps]
    queue = np.where(np.arange(steps)[None, :] < open_count[:, None], order, -1)
    for k in range(steps):
        adding = queue[:, k] >= 0
        owner[adding, n] = queue[adding, k]
        j0 = np.full(num_rows, n, dtype=np.int64)
        min_to = np.full((num_rows, n + 1), inf)  # slack of each column
        way = np.full((num_rows, n + 1), n, dtype=np.int64)  # previous column on the path
        used = np.zeros((num_rows, n + 1), dtype=bool)
        searching = adding.copy()
        while True:
            r = rows[searching]
            if r.size == 0:
                break
            jr = j0[r]
            used[r, jr] = True
            i0 = owner[r, jr]  # [s], the agent whose column was just reached
            reduced = cost[r, i0] - u[r, i0][:, None] - v[r, :n]  # [s, n]
            free = ~used[r, :n]
            mt = min_to[r, :n]
            better = free & (reduced < mt)
            mt = np.where(better, reduced, mt)
            min_to[r, :n] = mt
            way[r, :n] = np.where(better, jr[:, None], way[r, :n])
            candidates = np.where(free, mt, inf)
            j1 = candidates.argmin(axis=1)
            delta = candidates[np.arange(r.size), j1]  # [s]
            # Among the columns at the least slack, a free one ends the search at once.
            ends = (candidates <= delta[:, None]) & (owner[r, :n] < 0)
            j1 = np.where(ends.any(axis=1), ends.argmax(axis=1), j1)
            # Potentials: reached columns (and their agents) shift by delta, slacks drop.
            used_r = used[r]  # [s, n + 1]
            hit_row, hit_col = np.nonzero(used_r)
            u[r[hit_row], owner[r[hit_row], hit_col]] += delta[hit_row]
            v[r] -= np.where(used_r, delta[:, None], 0.0)
            min_to[r] = np.where(used_r, min_to[r], min_to[r] - delta[:, None])
            j0[r] = j1
            done = owner[r, j1] < 0
            searching[r[done]] = False
        # Augment every row along its path back to the virtual column.
        cur = j0.copy()
        active = adding.copy()
        while active.any():
            r = rows[active]
            prev = way[r, cur[r]]
            owner[r, cur[r]] = owner[r, prev]
            cur[r] = prev
            active[r] = prev != n
    target = np.empty((num_rows, n), dtype=np.int64)
    cols = np.broadcast_to(np.arange(n), (num_rows, n))
    target[rows[:, None], owner[:, :n]] = cols
    return target
