"""Placements for the test engine (numpy): initial maps, random valid maps, balance metrics."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "balancedness",
    "greedy_placement",
    "random_placement",
    "rank_loads",
    "round_robin_placement",
]

IntArray = npt.NDArray[np.int64]


def round_robin_placement(num_layers: int, num_experts: int, num_slots: int) -> IntArray:
    """``[L, P]``: slot ``s`` holds expert ``s % E`` (the engines' default initial map)."""
    if num_slots < num_experts:
        raise ValueError(f"{num_slots} slots cannot hold {num_experts} experts")
    row = np.arange(num_slots, dtype=np.int64) % num_experts
    return np.tile(row, (num_layers, 1))


def random_placement(
    rng: np.random.Generator, num_layers: int, num_experts: int, num_slots: int
) -> IntArray:
    """``[L, P]``: every expert once plus ``P - E`` random replicas, shuffled per layer."""
    if num_slots < num_experts:
        raise ValueError(f"{num_slots} slots cannot hold {num_experts} experts")
    rows = []
    for _ in range(num_layers):
        extra = rng.integers(0, num_experts, num_slots - num_experts)
        rows.append(rng.permutation(np.concatenate([np.arange(num_experts), extra])))
    return np.asarray(rows, dtype=np.int64).reshape(num_layers, num_slots)


def rank_loads(slot_loads: npt.ArrayLike, num_ranks: int) -> npt.NDArray[np.float64]:
    """``slot_loads [L, P]`` -> ``[L, R]`` tokens per rank."""
    loads = np.asarray(slot_loads, dtype=np.float64)
    return loads.reshape(loads.shape[0], num_ranks, -1).sum(axis=2)


def balancedness(slot_loads: npt.ArrayLike, num_ranks: int) -> npt.NDArray[np.float64]:
    """``[L]`` per-layer mean rank load / max rank load (1 = perfect; 1 for an idle layer)."""
    ranks = rank_loads(slot_loads, num_ranks)
    peak = ranks.max(axis=1)
    out = np.ones(ranks.shape[0])
    busy = peak > 0
    out[busy] = ranks.mean(axis=1)[busy] / peak[busy]
    return out


def greedy_placement(loads: npt.ArrayLike, num_slots: int, num_ranks: int) -> IntArray:
    """A simple balanced ``[L, P]`` map for per-expert ``loads [L, E]`` (tests and demos; the
    service's planner is the real one).

    Per layer: every expert gets one slot, each redundant slot goes to the expert with the
    highest load per replica; then replicas (each carrying ``load / replicas``) are packed
    heaviest first onto the rank with the least load that still has a free slot.
    """
    w = np.asarray(loads, dtype=np.float64)
    num_layers, num_experts = w.shape
    if num_slots < num_experts or num_slots % num_ranks:
        raise ValueError(f"{num_slots} slots do not fit {num_experts} experts on {num_ranks} ranks")
    slots = num_slots // num_ranks
    out = np.empty((num_layers, num_slots), dtype=np.int64)
    for layer in range(num_layers):
        count = np.ones(num_experts, dtype=np.int64)
        for _ in range(num_slots - num_experts):
            count[int(np.argmax(w[layer] / count))] += 1
        replicas = [(w[layer, e] / count[e], e) for e in range(num_experts)
                    for _ in range(count[e])]
        replicas.sort(key=lambda item: (-item[0], item[1]))
        load = np.zeros(num_ranks)
        used = np.zeros(num_ranks, dtype=np.int64)
        for share, e in replicas:
            free = np.flatnonzero(used < slots)
            r = int(free[np.argmin(load[free])])
            out[layer, r * slots + used[r]] = e
            used[r] += 1
            load[r] += share
    return out
