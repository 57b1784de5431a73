"""Loop-based torch EPLB, as the engines run DeepSeek's ``eplb.rebalance_experts``.

The exactness oracle for :mod:`eplb_service.policy.deepseek` and the speed baseline of the
benchmarks. Written from the algorithm's description: per-row Python loops in packing, one
vectorized step per redundant replica in replication, all on CPU in float32.

The tie rules are explicit here (the engines' code leaves some to the sort implementation):

- items are taken in descending load order, equal loads in ascending index order (stable sort);
- each redundant replica goes to the expert with the largest ``load / count``, ties to the
  lowest expert index (``argmax`` returns the first maximum);
- each item goes to the lightest pack with room, ties to the lowest pack index (``min`` returns
  the first minimum); pack loads accumulate in float32 in item order.
"""

from __future__ import annotations

import torch


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packs n weighted items of every row into m packs of exactly n/m items each.

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
        pack_index = torch.arange(num_items, dtype=torch.int64).expand(num_rows, -1).clone()
        return pack_index, torch.zeros_like(pack_index)

    order = weight.sort(dim=-1, descending=True, stable=True).indices
    pack_index = torch.full((num_rows, num_items), -1, dtype=torch.int64)
    rank_in_pack = torch.full((num_rows, num_items), -1, dtype=torch.int64)
    for row in range(num_rows):
        pack_loads = [torch.zeros((), dtype=torch.float32) for _ in range(num_packs)]
        pack_sizes = [0] * num_packs
        for item in order[row].tolist():
            open_packs = (p for p in range(num_packs) if pack_sizes[p] < capacity)
            pack = min(open_packs, key=pack_loads.__getitem__)
            pack_index[row, item] = pack
            rank_in_pack[row, item] = pack_sizes[pack]
            pack_loads[pack] += weight[row, item]
            pack_sizes[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(
    weight: torch.Tensor, num_phy: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replicates num_log experts of every row into num_phy replicas, minimizing the max load.

    Parameters:
        weight: [X, num_log], float32 load of each expert
        num_phy: number of replicas, >= num_log

    Returns:
        phy2log: [X, num_phy], the expert of each replica
        replica_rank: [X, num_phy], the replica's rank among its expert's replicas
        logcnt: [X, num_log], the number of replicas of each expert
    """
    num_rows, num_log = weight.shape
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(num_rows, 1)
    replica_rank = torch.zeros(num_rows, num_phy, dtype=torch.int64)
    logcnt = torch.ones(num_rows, num_log, dtype=torch.int64)
    rows = torch.arange(num_rows)
    for slot in range(num_log, num_phy):
        best = (weight / logcnt).argmax(dim=-1)
        phy2log[:, slot] = best
        replica_rank[:, slot] = logcnt[rows, best]
        logcnt[rows, best] += 1
    return phy2log, replica_rank, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """Inverts a permutation of every row: [X, n] -> [X, n]."""
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.size(1), dtype=torch.int64).expand_as(perm))
    return inv


def rebalance_experts_hierarchical(
    weight: torch.Tensor,
    num_physical_experts: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups onto nodes, replicas within nodes, replicas onto GPUs.

    Parameters:
        weight: [L, E], float32 load
        num_physical_experts: P
        num_groups: G, divisible by num_nodes
        num_nodes: N
        num_gpus: R, a multiple of num_nodes

    Returns:
        phy2log: [L, P], phy_rank: [L, P], logcnt: [L, E]
    """
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = num_logical // num_nodes
    phy_per_gpu = num_physical_experts // num_gpus

    # Step 1: pack groups onto nodes.
    group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    group_start = (group_pack * groups_per_node + group_rank) * group_size
    log2mlog = (group_start.unsqueeze(-1) + torch.arange(group_size)).flatten(-2)
    mlog2log = _inverse(log2mlog)

    # Step 2: replicate within nodes; rows are (layer, node) pairs.
    mlog_load = weight.gather(-1, mlog2log).view(-1, log_per_node)
    phy2mlog, phy_rank, mlogcnt = replicate_experts(mlog_load, num_physical_experts // num_nodes)

    # Step 3: pack each node's replicas onto its GPUs.
    phy_load = (mlog_load / mlogcnt).gather(-1, phy2mlog)
    pack_index, rank_in_pack = balanced_packing(phy_load, num_gpus // num_nodes)
    pphy2phy = _inverse(pack_index * phy_per_gpu + rank_in_pack)

    pphy2mlog = phy2mlog.gather(-1, pphy2phy).view(num_layers, num_nodes, -1)
    pphy2mlog = (pphy2mlog + torch.arange(num_nodes).view(1, -1, 1) * log_per_node).flatten(-2)
    pphy2log = mlog2log.gather(-1, pphy2mlog)
    pphy_rank = phy_rank.gather(-1, pphy2phy).view(num_layers, -1)
    logcnt = mlogcnt.view(num_layers, -1).gather(-1, log2mlog)
    return pphy2log, pphy_rank, logcnt


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry point, as in the engines. Hierarchical if num_groups % num_nodes == 0, else global.

    Parameters:
        weight: [L, E], load of each logical expert
        num_replicas: P, a multiple of num_gpus
        num_groups: G
        num_nodes: N
        num_gpus: R

    Returns:
        phy2log: [L, P], log2phy: [L, E, P - E + 1] (-1 padded, by replica rank),
        logcnt: [L, E]; int64 CPU tensors
    """
    num_layers, num_logical = weight.shape
    weight = weight.float().cpu()
    if num_groups % num_nodes != 0:
        num_groups, num_nodes = 1, 1
    phy2log, phy_rank, logcnt = rebalance_experts_hierarchical(
        weight, num_replicas, num_groups, num_nodes, num_gpus
    )
    width = num_replicas - num_logical + 1
    log2phy = torch.full((num_layers, num_logical * width), -1, dtype=torch.int64)
    slots = torch.arange(num_replicas, dtype=torch.int64).expand(num_layers, -1)
    log2phy.scatter_(-1, phy2log * width + phy_rank, slots)
    return phy2log, log2phy.view(num_layers, num_logical, width), logcnt
