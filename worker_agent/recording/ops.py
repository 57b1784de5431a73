"""Custom ops ``eplb::map_and_record`` and ``eplb::record_counts`` (``torch.library``).

Registering them as custom ops makes them opaque to ``torch.compile`` (``fullgraph=True`` traces
through them with their fake implementations) and keeps them capturable in CUDA graphs (they
launch device work only, never synchronize). The implementation picks the Triton kernels when
``use_triton`` is set and the tensors are on CUDA, the pure-torch fallback otherwise.

The op registration is this package's only global state.
"""

import torch

from worker_agent.recording._reference import map_and_record_torch, record_counts_torch

__all__ = [
    "map_and_record_impl",
    "map_and_record_op",
    "record_counts_impl",
    "record_counts_op",
    "triton_available",
]


def triton_available() -> bool:
    """True when Triton imports and our kernels define (Triton is optional)."""
    try:
        from worker_agent.recording import _triton  # noqa: F401
    except Exception:
        return False
    return True


def map_and_record_impl(
    topk_ids: torch.Tensor,
    replica_table: torch.Tensor,
    counters: torch.Tensor,
    enabled: torch.Tensor,
    layer: int,
    use_triton: bool,
) -> torch.Tensor:
    """Body of ``eplb::map_and_record``: ``topk_ids [T, K]`` -> physical ids ``[T, K]`` int64."""
    if topk_ids.numel() == 0:
        return torch.empty(topk_ids.shape, dtype=torch.int64, device=topk_ids.device)
    if use_triton and topk_ids.is_cuda:
        from worker_agent.recording._triton import map_and_record_triton

        return map_and_record_triton(topk_ids, replica_table, counters, enabled, layer)
    return map_and_record_torch(topk_ids, replica_table, counters, enabled, layer)


def record_counts_impl(
    slot_counts: torch.Tensor,
    counters: torch.Tensor,
    enabled: torch.Tensor,
    layer: int,
    slot_offset: int,
    use_triton: bool,
) -> None:
    """Body of ``eplb::record_counts``: ``counters[layer, off:off+n] += slot_counts [n]``."""
    if slot_counts.numel() == 0:
        return
    if use_triton and slot_counts.is_cuda:
        from worker_agent.recording._triton import record_counts_triton

        record_counts_triton(slot_counts, counters, enabled, layer, slot_offset)
        return
    record_counts_torch(slot_counts, counters, enabled, layer, slot_offset)


@torch.library.custom_op("eplb::map_and_record", mutates_args=("counters",))
def map_and_record_op(
    topk_ids: torch.Tensor,
    replica_table: torch.Tensor,
    counters: torch.Tensor,
    enabled: torch.Tensor,
    layer: int,
    use_triton: bool,
) -> torch.Tensor:
    """Map logical ``topk_ids [T, K]`` to physical slots ``[T, K]`` int64; count into
    ``counters[layer]`` when ``enabled[0] != 0``."""
    return map_and_record_impl(topk_ids, replica_table, counters, enabled, layer, use_triton)


@map_and_record_op.register_fake
def _map_and_record_fake(
    topk_ids: torch.Tensor,
    replica_table: torch.Tensor,
    counters: torch.Tensor,
    enabled: torch.Tensor,
    layer: int,
    use_triton: bool,
) -> torch.Tensor:
    return topk_ids.new_empty(topk_ids.shape, dtype=torch.int64)


@torch.library.custom_op("eplb::record_counts", mutates_args=("counters",))
def record_counts_op(
    slot_counts: torch.Tensor,
    counters: torch.Tensor,
    enabled: torch.Tensor,
    layer: int,
    slot_offset: int,
    use_triton: bool,
) -> None:
    """``counters[layer, slot_offset : slot_offset + n] += slot_counts [n]`` when enabled."""
    record_counts_impl(slot_counts, counters, enabled, layer, slot_offset, use_triton)


@record_counts_op.register_fake
def _record_counts_fake(
    slot_counts: torch.Tensor,
    counters: torch.Tensor,
    enabled: torch.Tensor,
    layer: int,
    slot_offset: int,
    use_triton: bool,
) -> None:
    return None
