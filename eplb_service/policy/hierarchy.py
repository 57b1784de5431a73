"""Hierarchical plans: each expert group's replicas on one node.

A hierarchical plan splits into one row per (layer, node): the node's experts (the groups it
hosts, ``E / N`` experts under local ids ``0..E/N-1``) packed into its ``P / N`` slots on its
``R / N`` ranks. These helpers choose group-to-node assignments and convert arrangements
between the global form ``[L, R, S]`` and the per-node form ``[L * N, R / N, S]``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from eplb_service.policy.deepseek import balanced_packing
from eplb_service.policy.packing import refine_swaps

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

__all__ = [
    "assign_groups",
    "groups_in_service",
    "node_experts",
    "node_loads",
    "regroup",
    "to_global",
    "to_local",
]


def assign_groups(weight: F64, num_groups: int, num_nodes: int) -> I64:
    """Packs each layer's groups onto nodes (``G / N`` each), balancing node loads.

    Greedy (heaviest group to the lightest node with room), then swaps of groups between the
    most loaded node and the others down to the mean.

    Parameters:
        weight: [L, E], loads (E divisible by G)
        num_groups: G, a multiple of N
        num_nodes: N

    Returns:
        group_node: [L, G], the node of each group
    """
    num_layers = weight.shape[0]
    group_load = weight.reshape(num_layers, num_groups, -1).sum(axis=2)  # [L, G]
    per_node = num_groups // num_nodes
    pack, rank_in_pack = balanced_packing(group_load.astype(np.float32), num_nodes)
    order = np.empty((num_layers, num_groups), dtype=np.int64)
    rows = np.arange(num_layers)[:, None]
    order[rows, pack * per_node + rank_in_pack] = np.arange(num_groups)[None, :]
    groups = order.reshape(num_layers, num_nodes, per_node)
    load = group_load[rows[:, :, None], groups]
    target = group_load.sum(axis=1) / num_nodes
    _, groups, _ = refine_swaps(load, groups, target * (1 + 1e-6))
    group_node = np.empty((num_layers, num_groups), dtype=np.int64)
    group_node[rows[:, :, None], groups] = np.arange(num_nodes)[None, :, None]
    return group_node


def regroup(weight: F64, group_node: I64, num_nodes: int, target: F64) -> I64:
    """Swaps groups between nodes, starting from ``group_node``, until each layer's most loaded
    node carries at most ``target`` (or no swap helps): few group moves, not a re-pack.

    Parameters:
        weight: [L, E], loads
        group_node: [L, G], the assignment to start from (``G / N`` groups per node)
        num_nodes: N
        target: [L], largest acceptable node load

    Returns:
        group_node: [L, G]
    """
    num_layers, num_groups = group_node.shape
    group_load = weight.reshape(num_layers, num_groups, -1).sum(axis=2)
    order = np.argsort(group_node, axis=1, kind="stable")  # groups by node
    groups = order.reshape(num_layers, num_nodes, -1)  # [L, N, G / N]
    rows = np.arange(num_layers)[:, None, None]
    _, groups, _ = refine_swaps(group_load[rows, groups], groups, target)
    out = np.empty_like(group_node)
    out[rows, groups] = np.arange(num_nodes)[None, :, None]
    return out


def groups_in_service(current: I64, num_groups: int, num_nodes: int, num_experts: int) -> I64:
    """The group-to-node assignment closest to a placement in service.

    Each node takes ``G / N`` groups, greedily by how many slots of the group it holds.

    Parameters:
        current: [L, P], expert per slot
        num_groups: G; num_nodes: N; num_experts: E

    Returns:
        group_node: [L, G]
    """
    num_layers, num_slots = current.shape
    group_size = num_experts // num_groups
    node = np.arange(num_slots) // (num_slots // num_nodes)  # [P]
    held = np.zeros((num_layers, num_groups, num_nodes))
    np.add.at(held, (np.arange(num_layers)[:, None], current // group_size, node[None, :]), 1.0)
    return _match(held + 1e-6 * np.arange(num_nodes)[::-1], num_groups // num_nodes)


def _match(score: F64, capacity: int) -> I64:
    """Greedy assignment of rows' items to bins with ``capacity`` each, largest score first.

    Parameters:
        score: [L, G, N], how much item g wants bin n
        capacity: items per bin

    Returns:
        [L, G], the bin of each item
    """
    num_layers, num_items, num_bins = score.shape
    score = score.copy()
    out = np.full((num_layers, num_items), -1, dtype=np.int64)
    room = np.full((num_layers, num_bins), capacity)
    rows = np.arange(num_layers)
    for _ in range(num_items):
        flat = score.reshape(num_layers, -1)
        best = flat.argmax(axis=1)
        g, n = np.divmod(best, num_bins)
        out[rows, g] = n
        score[rows, g, :] = -np.inf
        room[rows, n] -= 1
        full = room[rows, n] == 0
        score[rows[full], :, n[full]] = -np.inf
    return out


def node_loads(weight: F64, group_node: I64, num_nodes: int) -> F64:
    """``[L, E]`` loads and ``[L, G]`` assignment -> ``[L, N]`` load of each node."""
    num_layers, num_groups = group_node.shape
    group_load = weight.reshape(num_layers, num_groups, -1).sum(axis=2)
    out = np.zeros((num_layers, num_nodes))
    np.add.at(out, (np.arange(num_layers)[:, None], group_node), group_load)
    return out


def node_experts(group_node: I64, num_experts: int, num_nodes: int) -> I64:
    """``[L, G]`` assignment -> ``[L, N, E / N]``: node n's experts (global ids, ascending).

    Local expert id ``k`` of node ``n`` is ``node_experts[l, n, k]``.
    """
    num_layers, num_groups = group_node.shape
    group_size = num_experts // num_groups
    # Sort groups by node (stable: ascending group id within a node).
    order = np.argsort(group_node, axis=1, kind="stable")  # [L, G]
    experts = order[:, :, None] * group_size + np.arange(group_size)[None, None, :]
    return experts.reshape(num_layers, num_nodes, -1)


def to_local(item: I64, experts: I64) -> I64:
    """Global ``[L, R, S]`` -> per-node ``[L * N, R / N, S]`` with local ids (-1: foreign).

    Parameters:
        item: [L, R, S], global expert ids
        experts: [L, N, E / N], from :func:`node_experts`
    """
    num_layers, num_ranks, per_rank = item.shape
    num_nodes, per_node = experts.shape[1], experts.shape[2]
    num_experts = num_nodes * per_node
    # local[l, n, e] = local id of global expert e on node n, or -1.
    local = np.full((num_layers, num_nodes, num_experts), -1, dtype=np.int64)
    rows = np.arange(num_layers)[:, None, None]
    nodes = np.arange(num_nodes)[None, :, None]
    local[rows, nodes, experts] = np.arange(per_node)[None, None, :]
    node_item = item.reshape(num_layers, num_nodes, num_ranks // num_nodes, per_rank)
    out = local[rows[..., None], nodes[..., None], node_item]
    return out.reshape(num_layers * num_nodes, num_ranks // num_nodes, per_rank)


def to_global(item: I64, experts: I64) -> I64:
    """Per-node ``[L * N, R / N, S]`` local ids -> global ``[L, R, S]``."""
    num_layers, _, per_node = experts.shape
    rows = item.shape[0]
    flat = experts.reshape(rows, per_node)
    out = flat[np.arange(rows)[:, None, None], item]
    return out.reshape(num_layers, -1, item.shape[2])
