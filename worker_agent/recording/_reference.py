"""Pure-torch map-and-record: the fallback (CPU, or CUDA without Triton) and the kernels' oracle.

Same results as the Triton kernels, bit for bit: the physical ids are the same function of the
inputs, and counts are integers (atomic order does not matter). No host synchronization: every
step is a device op, so it is also CUDA-graph capturable.
"""

from __future__ import annotations

import torch

__all__ = ["map_and_record_torch", "record_counts_torch"]


def map_and_record_torch(
    topk_ids: torch.Tensor,
    replica_table: torch.Tensor,
    counters: torch.Tensor,
    enabled: torch.Tensor,
    layer: int,
) -> torch.Tensor:
    """Map ``topk_ids [T, K]`` (logical) to physical slots ``[T, K]`` int64 and count them.

    ``replica_table [L, E, 1 + X]``: ``[count, replica slots...]`` per expert (see
    ``PlacementView.replica_table``). Replica rule: token ``t`` sends logical expert ``e`` to
    replica ``(t + s) % count`` where ``s`` is the sum of token 0's valid ids (a per-call
    rotation). Ids outside ``[0, E)`` (padding, ``-1``) map to ``-1`` and are not counted.
    ``counters[layer, slot] += 1`` per (token, k) when ``enabled[0] != 0``.
    """
    num_tokens = topk_ids.shape[0]
    table = replica_table[layer]  # [E, 1 + X]
    num_experts = table.shape[0]
    ids = topk_ids.to(torch.int64)
    valid = (ids >= 0) & (ids < num_experts)
    experts = torch.where(valid, ids, 0)
    cnt = table[experts, 0].to(torch.int64)  # [T, K]
    seed = experts[:1].sum()  # 0-d: valid ids of token 0 (0 when T == 0); stays on the device
    pos = torch.arange(num_tokens, device=ids.device, dtype=torch.int64)[:, None] + seed
    phys = table[experts, 1 + pos % cnt].to(torch.int64)
    phys = torch.where(valid, phys, -1)
    weight = valid.to(torch.int64) * enabled.to(torch.int64)
    counters[layer].index_add_(0, torch.where(valid, phys, 0).reshape(-1), weight.reshape(-1))
    return phys


def record_counts_torch(
    slot_counts: torch.Tensor,
    counters: torch.Tensor,
    enabled: torch.Tensor,
    layer: int,
    slot_offset: int,
) -> None:
    """``counters[layer, slot_offset : slot_offset + n] += slot_counts`` when enabled."""
    n = slot_counts.shape[0]
    counters[layer, slot_offset : slot_offset + n].add_(
        slot_counts.to(torch.int64) * enabled.to(torch.int64)
    )
