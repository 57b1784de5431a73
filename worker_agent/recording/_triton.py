"""Triton kernels of the recorder. Imported lazily: importing this module imports Triton.

``map_and_record``: one launch maps logical expert ids to physical slots and counts them. Each
program maps ``BLOCK`` (token, k) pairs and counts its slots with a histogram in shared memory
(``tl.histogram``: warp ballots, then shared-memory atomics across warps), then adds it to the
global counters with one relaxed atomic (a fire-and-forget ``RED``) per (program, non-empty
slot). Small inputs (up to 128 tokens at top-8: in blocks of 64 pairs nearly every pair has
its own slot, nothing to merge) skip the histogram and add one ``RED`` per pair. A device-side
flag skips the counting entirely; the mapping is always done.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["launch_config", "map_and_record_triton", "record_counts_triton"]


@triton.jit
def _map_and_record_kernel(
    ids_ptr,  # [T*K] int32 or int64, logical expert ids
    out_ptr,  # [T*K] int64, physical slot ids (-1 for invalid ids)
    table_ptr,  # [L, E, W] int32: [count, replica slots...] per expert
    counters_ptr,  # [L, P] int64
    flag_ptr,  # [1] int32, counting on when != 0
    n,
    layer,
    num_experts,
    num_slots,
    table_width,
    TOP_K: tl.constexpr,
    SEED_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_BINS: tl.constexpr,
    DIRECT: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    raw = tl.load(ids_ptr + offs, mask=in_range, other=-1)
    flag = tl.load(flag_ptr)
    # per-call rotation: sum of token 0's valid ids (same in every program)
    kk = tl.arange(0, SEED_BLOCK)
    first = tl.load(ids_ptr + kk, mask=kk < TOP_K, other=0)
    first = tl.where((first >= 0) & (first < num_experts), first, 0).to(tl.int32)
    seed = tl.sum(first, axis=0)
    valid = in_range & (raw >= 0) & (raw < num_experts)
    expert = tl.where(valid, raw, 0).to(tl.int32)
    row = (layer * num_experts + expert) * table_width
    cnt = tl.load(table_ptr + row, mask=valid, other=1)
    replica = (offs // TOP_K + seed) % cnt
    phys = tl.load(table_ptr + row + 1 + replica, mask=valid, other=-1)  # same line as cnt, mostly
    tl.store(out_ptr + offs, phys.to(tl.int64), mask=in_range)
    if flag != 0:
        base = counters_ptr + layer * num_slots
        if DIRECT:
            # blocks far smaller than P: nearly every pair has its own slot, so a histogram
            # could not merge atomics; one RED per pair skips its fixed 512-bin cost
            tl.atomic_add(base + phys, tl.full([BLOCK], 1, tl.int64), mask=valid, sem="relaxed")
        else:
            # shared-memory histogram; invalid ids and out-of-range lanes go to the spare bin
            # `num_slots` (< NUM_BINS), which is never added
            hist = tl.histogram(tl.where(valid, phys, num_slots), NUM_BINS)
            bins = tl.arange(0, NUM_BINS)
            tl.atomic_add(
                base + bins, hist.to(tl.int64), mask=(bins < num_slots) & (hist > 0), sem="relaxed"
            )


@triton.jit
def _record_counts_kernel(
    src_ptr,  # [n] integer counts
    counters_ptr,  # [L, P] int64
    flag_ptr,  # [1] int32
    n,
    base,  # layer * P + slot_offset
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    flag = tl.load(flag_ptr)
    if flag != 0:
        val = tl.load(src_ptr + offs, mask=mask, other=0).to(tl.int64)
        tl.atomic_add(counters_ptr + base + offs, val, mask=mask & (val != 0), sem="relaxed")


# Tuned on an H100 (132 SMs) with `benchmarks/recording.py --sweep`; see
# docs/decisions/0003-recorder-counters.md.
_DIRECT_MAX_PAIRS = 1024  # up to this many (token, k) pairs: one RED per pair, no histogram
_WARPS = {32: 1, 64: 2, 128: 4, 256: 4, 512: 4, 1024: 8, 2048: 16, 4096: 16}


def _warps(block: int) -> int:
    return _WARPS.get(block, 8)


def launch_config(n: int, num_sms: int) -> tuple[int, int, bool]:
    """``(BLOCK, num_warps, DIRECT)`` for ``n`` (token, k) pairs.

    Up to ``_DIRECT_MAX_PAIRS`` pairs (128 tokens at top-8): programs of 64 pairs that add one
    fire-and-forget RED per pair. A block of 64 pairs spread over hundreds of slots has almost
    no repeated slot for a histogram to merge, while the histogram's fixed cost (zeroing and
    reading back the shared bins, two barriers) is ~0.45 us. Beyond: the shared-memory histogram
    with one RED per (program, non-empty slot); blocks grow with ``n`` (~64 programs up to ~33K
    pairs, ~1 per SM beyond) because REDs to one slot serialize in L2 (~15 ns each), so the
    number of programs bounds the counting time.
    """
    if n <= _DIRECT_MAX_PAIRS:
        return 64, _warps(64), True
    per_sm = -(-n // max(num_sms, 1))
    if per_sm <= 64:
        block = 64
    elif per_sm <= 256:
        block = 256
    else:
        block = min(triton.next_power_of_2(per_sm), 2048)
    return block, _warps(block), False


def map_and_record_triton(
    topk_ids: torch.Tensor,
    replica_table: torch.Tensor,
    counters: torch.Tensor,
    enabled: torch.Tensor,
    layer: int,
    *,
    block: int | None = None,
    num_warps: int | None = None,
    direct: bool | None = None,
) -> torch.Tensor:
    """Triton twin of ``map_and_record_torch`` (same arguments, same result). ``block``,
    ``num_warps`` and ``direct`` override ``launch_config`` (tests, tuning)."""
    ids = topk_ids.contiguous()
    out = torch.empty(ids.shape, dtype=torch.int64, device=ids.device)
    n = ids.numel()
    if n == 0:
        return out
    num_slots = counters.shape[1]
    if block is None:
        sms = torch.cuda.get_device_properties(ids.device).multi_processor_count
        block, warps, use_direct = launch_config(n, sms)
    else:
        warps = num_warps if num_warps is not None else _warps(block)
        use_direct = False
    if direct is not None:
        use_direct = direct
    grid = (triton.cdiv(n, block),)
    _map_and_record_kernel[grid](
        ids,
        out,
        replica_table,
        counters,
        enabled,
        n,
        layer,
        replica_table.shape[1],
        num_slots,
        replica_table.shape[2],
        TOP_K=ids.shape[1],
        SEED_BLOCK=max(2, triton.next_power_of_2(ids.shape[1])),
        BLOCK=block,
        NUM_BINS=triton.next_power_of_2(num_slots + 1),
        DIRECT=use_direct,
        num_warps=warps,
    )
    return out


def record_counts_triton(
    slot_counts: torch.Tensor,
    counters: torch.Tensor,
    enabled: torch.Tensor,
    layer: int,
    slot_offset: int,
) -> None:
    """Triton twin of ``record_counts_torch``."""
    n = slot_counts.shape[0]
    if n == 0:
        return
    src = slot_counts.contiguous()
    block = min(max(triton.next_power_of_2(n), 32), 1024)
    grid = (triton.cdiv(n, block),)
    _record_counts_kernel[grid](
        src,
        counters,
        enabled,
        n,
        layer * counters.shape[1] + slot_offset,
        BLOCK=block,
        num_warps=max(1, min(4, block // 32)),
    )
