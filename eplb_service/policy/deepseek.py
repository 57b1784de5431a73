"""DeepSeek's expert-parallel load balancer (EPLB), vectorized over layers and nodes.

Computes the same maps as ``eplb.rebalance_experts`` of github.com/deepseek-ai/EPLB, the greedy
policy every engine ships, but runs all layers (and nodes) at once with numpy: the only Python
loops step through the items to pack and the redundant replicas to place, all rows together.

The greedy choices are fully specified, so results never depend on a sort implementation:

- loads are float32, as in the reference; a group's load is summed in float64 and rounded to
  float32 once, so it does not depend on a summation order;
- items are taken in descending load order, equal loads in ascending index order (stable sort);
- each redundant replica goes to the expert with the largest ``load / replica_count``, ties to
  the lowest expert index;
- each item goes to the lightest pack that still has room, ties to the lowest pack index; pack
  loads accumulate in float32 in item order.

The reference meets these rules wherever no two compared loads are equal and every group total
is an integer below 2**24 (then its float32 sum is exact). Its ``torch.sort`` is not stable (on
CPU, for rows longer than 16), so where loads tie, as the replicas of one expert always do, the
reference's replica order (``log2phy``), and for ties between experts its ``phy2log``, depend on
torch's sort implementation.

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
    gather_rows,
    inverse_permutation,
    log2phy_from_ranks,
    scatter_rows,
)

__all__ = [
    "balanced_packing",
    "descending_order",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "replicate_experts",
]

_INT32_MAX = np.int64(2**31 - 1)
_INT32_MASK = np.int64(2**32 - 1)


def descending_order(weight: FloatArray) -> IntArray:
    """Stable descending argsort of every row: equal loads keep ascending index order.

    Sorts one int64 key per item instead of running a (slow) stable float argsort: the high 32
    bits order the loads (the bits of a non-negative float32, read as an integer, grow with
    its value), the low 32 bits hold the item index and break ties.

    Parameters:
        weight: [X, n], non-negative float32 (no NaN)

    Returns:
        order: [X, n], order[x, k] is the index of the k-th heaviest item of row x
    """
    bits = (weight + np.float32(0.0)).view(np.int32).astype(np.int64)  # -0.0 -> +0.0
    key = ((_INT32_MAX - bits) << 32) | np.arange(weight.shape[1], dtype=np.int64)
    key.sort(axis=1)
    return key & _INT32_MASK


def balanced_packing(weight: FloatArray, num_packs: int) -> tuple[IntArray, IntArray]:
    """Packs n weighted items of every row into m packs of exactly n/m items each.

    Greedy: items in descending weight order (stable), each to the lightest pack with room
    (ties to the lowest pack index). All rows advance together, one item per step.

    Parameters:
        weight: [X, n], non-negative float32 weight of each item
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

    order = descending_order(weight)  # [X, n]
    item_weight = np.ascontiguousarray(gather_rows(weight, order).T)  # [n, X], step k: row k
    # Adding full_penalty[size] makes a pack's load +inf once it holds `capacity` items, so
    # argmin skips it; adding 0.0 otherwise leaves the float32 accumulation exact.
    full_penalty = np.zeros(capacity + 1, dtype=np.float32)
    full_penalty[capacity] = np.inf
    pack_load = np.zeros(num_rows * num_packs, dtype=np.float32)  # [X * m]
    pack_load_2d = pack_load.reshape(num_rows, num_packs)  # view
    pack_size = np.zeros(num_rows * num_packs, dtype=np.int64)  # [X * m]
    row_offset = np.arange(num_rows, dtype=np.int64) * num_packs  # [X]
    flat = np.empty(num_rows, dtype=np.int64)  # [X], index of the chosen pack in pack_load
    sorted_pack = np.empty((num_items, num_rows), dtype=np.int64)  # [n, X]
    sorted_rank = np.empty((num_items, num_rows), dtype=np.int64)  # [n, X]
    for k in range(num_items):
        pack = pack_load_2d.argmin(axis=1)  # first minimum: lowest pack index
        np.add(pack, row_offset, out=flat)
        size = pack_size[flat]
        sorted_pack[k] = pack
        sorted_rank[k] = size
        size += 1
        pack_size[flat] = size
        pack_load[flat] += item_weight[k] + full_penalty[size]

    pack_index = scatter_rows(order, sorted_pack.T)
    rank_in_pack = scatter_rows(order, sorted_rank.T)
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

    # Step 1: pack groups onto nodes. Group loads are summed in float64 and rounded once.
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(-1, dtype=np.float64)
    group_pack, group_rank = balanced_packing(group_load.astype(np.float32), num_nodes)  # [L, G]
    group_start = (group_pack * groups_per_node + group_rank) * group_size  # [L, G]
    log2mlog = (group_start[:, :, None] + np.arange(group_size)).reshape(num_layers, -1)
    mlog2log = inverse_permutation(log2mlog)  # [L, E]

    # Step 2: replicate experts within each node. Rows are (layer, node) pairs.
    mlog_load = gather_rows(weight, mlog2log).reshape(-1, log_per_node)
    phy2mlog, phy_rank, mlogcnt = replicate_experts(mlog_load, phy_per_node)  # [L*N, P/N]

    # Step 3: pack each node's replicas onto its GPUs.
    replica_load = mlog_load / mlogcnt.astype(np.float32)  # [L*N, E/N]
    phy_load = gather_rows(replica_load, phy2mlog)  # [L*N, P/N]
    pack_index, rank_in_pack = balanced_packing(phy_load, num_gpus // num_nodes)
    phy2pphy = pack_index * phy_per_gpu + rank_in_pack  # [L*N, P/N], slot within the node
    pphy2phy = inverse_permutation(phy2pphy)

    # Map back: node-local replica ids -> global mlog ids -> logical ids.
    pphy2mlog = gather_rows(phy2mlog, pphy2phy).reshape(num_layers, num_nodes, -1)
    pphy2mlog += (np.arange(num_nodes, dtype=np.int64) * log_per_node)[:, None]
    pphy2log = gather_rows(mlog2log, pphy2mlog.reshape(num_layers, -1))
    pphy_rank = gather_rows(phy_rank, pphy2phy).reshape(num_layers, -1)
    logcnt = gather_rows(mlogcnt.reshape(num_layers, -1), log2mlog)
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
