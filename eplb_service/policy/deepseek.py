"""DeepSeek's expert-parallel load balancer (EPLB), vectorized over layers and nodes.

Computes the same maps as ``eplb.rebalance_experts`` of github.com/deepseek-ai/EPLB, the greedy
policy every engine ships, but runs every layer (and every node) at once with numpy: the only
Python loops are over the items of one pack-assignment or the redundant replicas of one row.

The greedy choices are fully specified, so results never depend on a sort implementation:

- loads are float32, as in the reference;
- items are taken in descending load order, equal loads in ascending index order (stable sort);
- each redundant replica goes to the expert with the largest ``load / replica_count``, ties to
  the lowest expert index;
- each item goes to the lightest pack that still has room, ties to the lowest pack index; pack
  loads accumulate in float32 in item order.

The reference meets these rules wherever no two compared loads are equal.

Preconditions (checked by :func:`eplb_service.policy.rebalance_experts`): ``weight`` is float32,
finite and non-negative; ``num_replicas >= num_experts``; ``num_replicas % num_gpus == 0``;
``num_experts % num_groups == 0``; ``num_gpus % num_nodes == 0``.
"""

from __future__ import annotations

import numpy as np

from eplb_service.policy._common import (
    FloatArray,
    IntArray,
    Placement,
    inverse_permutation,
    log2phy_from_ranks,
)

__all__ = [
    "balanced_packing",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "replicate_experts",
]


def balanced_packing(weight: FloatArray, num_packs: int) -> tuple[IntArray, IntArray]:
    """Packs n weighted items of every row into m packs of exactly n/m items each.

    Greedy: items in descending weight order (stable), each to the lightest pack with room
    (ties to the lowest pack index).

    Parameters:
        weight: [X, n], float32 weight of each item
        num_packs: m, must divide n

    Returns:
        pack_index: [X, n], the pack of each item
        rank_in_pack: [X, n], the position of each item in its pack (assignment order)
    """
    num_rows, num_items = weight.shape
    capacity = num_items // num_packs
    if capacity == 1:
        pack_index = np.broadcast_to(np.arange(num_items, dtype=np.int64), weight.shape).copy()
        return pack_index, np.zeros_like(pack_index)

    order = np.argsort(-weight, axis=1, kind="stable")  # [X, n]
    # Row k holds the k-th heaviest item of every row: contiguous per step.
    item_weight = np.ascontiguousarray(np.take_along_axis(weight, order, axis=1).T)  # [n, X]
    pack_load = np.zeros(num_rows * num_packs, dtype=np.float32)  # [X * m], full packs: +inf
    pack_size = np.zeros(num_rows * num_packs, dtype=np.int64)  # [X * m]
    pack_load_2d = pack_load.reshape(num_rows, num_packs)  # view
    row_offset = np.arange(num_rows, dtype=np.int64) * num_packs  # [X]
    sorted_pack = np.empty((num_items, num_rows), dtype=np.int64)  # [n, X]
    sorted_rank = np.empty((num_items, num_rows), dtype=np.int64)  # [n, X]
    flat = np.empty(num_rows, dtype=np.int64)
    for k in range(num_items):
        pack = pack_load_2d.argmin(axis=1)  # first minimum: lowest pack index
        np.add(pack, row_offset, out=flat)
        size = pack_size[flat]
        sorted_pack[k] = pack
        sorted_rank[k] = size
        pack_load[flat] += item_weight[k]
        size += 1
        pack_size[flat] = size
        pack_load[flat[size == capacity]] = np.inf

    pack_index = np.empty((num_rows, num_items), dtype=np.int64)
    rank_in_pack = np.empty((num_rows, num_items), dtype=np.int64)
    np.put_along_axis(pack_index, order, sorted_pack.T, axis=1)
    np.put_along_axis(rank_in_pack, order, sorted_rank.T, axis=1)
    return pack_index, rank_in_pack


def replicate_experts(weight: FloatArray, num_phy: int) -> tuple[IntArray, IntArray, IntArray]:
    """Replicates num_log experts of every row into num_phy replicas, minimizing the max load.

    Slots ``0..num_log-1`` hold one replica of each expert in order; each further slot goes to
    the expert with the largest ``weight / count`` (ties to the lowest expert index).

    Parameters:
        weight: [X, num_log], float32 load of each expert
        num_phy: number of replicas, >= num_log

    Returns:
        phy2log: [X, num_phy], the expert of each replica
        replica_rank: [X, num_phy], the replica's rank among its expert's replicas
        logcnt: [X, num_log], the number of replicas of each expert
    """
    num_rows, num_log = weight.shape
    phy2log = np.empty((num_rows, num_phy), dtype=np.int64)
    phy2log[:, :num_log] = np.arange(num_log, dtype=np.int64)
    replica_rank = np.zeros((num_rows, num_phy), dtype=np.int64)
    logcnt = np.ones((num_rows, num_log), dtype=np.int64)
    if num_phy == num_log:
        return phy2log, replica_rank, logcnt

    weight_flat = weight.reshape(-1)
    logcnt_flat = logcnt.reshape(-1)  # view
    per_replica = weight.copy()  # [X, num_log], weight / logcnt, updated in place
    per_replica_flat = per_replica.reshape(-1)  # view
    row_offset = np.arange(num_rows, dtype=np.int64) * num_log
    flat = np.empty(num_rows, dtype=np.int64)
    for slot in range(num_log, num_phy):
        best = per_replica.argmax(axis=1)  # first maximum: lowest expert index
        np.add(best, row_offset, out=flat)
        count = logcnt_flat[flat]
        phy2log[:, slot] = best
        replica_rank[:, slot] = count
        count += 1
        logcnt_flat[flat] = count
        per_replica_flat[flat] = weight_flat[flat] / count.astype(np.float32)
    return phy2log, replica_rank, logcnt


def rebalance_experts_hierarchical(
    weight: FloatArray,
    num_physical_experts: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[IntArray, IntArray, IntArray]:
    """Places replicas node-aware: groups onto nodes, replicas within nodes, replicas onto GPUs.

    1. Pack each layer's expert groups onto nodes by group load (num_groups / num_nodes each).
    2. Relabel experts node-major ("mlog": node n owns mlog ids ``[n*E/N, (n+1)*E/N)``) and
       replicate each node's experts into its P/N slots.
    3. Pack each node's replicas onto its GPUs (P/R each) by per-replica load.

    Parameters:
        weight: [L, E], float32 load of each logical expert
        num_physical_experts: P, number of slots (replicas)
        num_groups: G, number of expert groups; must be divisible by num_nodes
        num_nodes: N, number of nodes
        num_gpus: R, number of GPUs (ranks), a multiple of num_nodes

    Returns:
        phy2log: [L, P], the logical expert of each slot
        phy_rank: [L, P], the replica rank of each slot among its expert's replicas
        logcnt: [L, E], the number of replicas of each logical expert
    """
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = num_logical // num_nodes
    phy_per_node = num_physical_experts // num_nodes
    phy_per_gpu = num_physical_experts // num_gpus

    # Step 1: pack groups onto nodes. Group loads are summed in float64 and rounded once, so
    # they do not depend on a summation order (exact for integer loads below 2**24).
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(-1, dtype=np.float64)
    group_pack, group_rank = balanced_packing(group_load.astype(np.float32), num_nodes)  # [L, G]
    group_start = (group_pack * groups_per_node + group_rank) * group_size  # [L, G]
    log2mlog = (group_start[:, :, None] + np.arange(group_size)).reshape(num_layers, -1)
    mlog2log = inverse_permutation(log2mlog)  # [L, E]

    # Step 2: replicate experts within each node. Rows are (layer, node) pairs.
    mlog_load = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, log_per_node)
    phy2mlog, phy_rank, mlogcnt = replicate_experts(mlog_load, phy_per_node)  # [L*N, P/N]

    # Step 3: pack each node's replicas onto its GPUs.
    replica_load = mlog_load / mlogcnt.astype(np.float32)  # [L*N, E/N]
    phy_load = np.take_along_axis(replica_load, phy2mlog, axis=1)  # [L*N, P/N]
    pack_index, rank_in_pack = balanced_packing(phy_load, num_gpus // num_nodes)
    phy2pphy = pack_index * phy_per_gpu + rank_in_pack  # [L*N, P/N], slot within the node
    pphy2phy = inverse_permutation(phy2pphy)

    # Map back: node-local replica ids -> global mlog ids -> logical ids.
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1).reshape(num_layers, num_nodes, -1)
    pphy2mlog += (np.arange(num_nodes, dtype=np.int64) * log_per_node)[:, None]
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog.reshape(num_layers, -1), axis=1)
    pphy_rank = np.take_along_axis(phy_rank, pphy2phy, axis=1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, axis=1)
    return pphy2log, pphy_rank, logcnt


def rebalance_experts(
    weight: FloatArray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> Placement:
    """Entry point: DeepSeek's EPLB on a checked float32 load.

    Hierarchical when ``num_groups % num_nodes == 0``, else global (one group, one node).

    Parameters:
        weight: [L, E], float32 load of each logical expert (finite, non-negative)
        num_replicas: P, number of slots, a multiple of num_gpus and >= E
        num_groups: G, number of expert groups, divides E
        num_nodes: N, number of nodes, divides num_gpus
        num_gpus: R, number of GPUs (ranks)

    Returns:
        phy2log: [L, P], int64, the logical expert of each slot
        log2phy: [L, E, P - E + 1], int64, log2phy[l, e, k] is the slot of replica k of
            expert e (replicas ranked in creation order), -1 padded
        logcnt: [L, E], int64, the number of replicas of each logical expert
    """
    if num_groups % num_nodes != 0:
        num_groups, num_nodes = 1, 1
    phy2log, phy_rank, logcnt = rebalance_experts_hierarchical(
        weight, num_replicas, num_groups, num_nodes, num_gpus
    )
    log2phy = log2phy_from_ranks(phy2log, phy_rank, weight.shape[1])
    return phy2log, log2phy, logcnt
