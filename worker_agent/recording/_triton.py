"""Triton kernels of the recorder. Imported lazily: importing this module imports Triton.

``map_and_record`` maps logical expert ids to physical slots and counts them in one launch.
Shapes: ``topk_ids [T, K]`` (int32 or int64) -> ``out [T, K]`` int64; ``replica_table [L, E, W]``
int32 with ``W = 2 + P - E`` (``[count, replica slots...]`` per expert); ``counters [L, P]`` int64,
any strides (the recorder's keep one 128-byte line per counter, see ``COUNTER_STRIDE``).
Each program maps ``BLOCK`` consecutive (token, k) pairs (flat index ``i``, token ``i // K``):

1. Reads: its ids, token 0's ids (the rotation ``s``), the device flag; then, for each pair, the
   count and the first ``EAGER`` replica slots of its expert's table row in one batch.
2. Replica ``(t + s) % count``; the slot comes from the batch, or from one more (dependent) read
   when the replica index is ``>= EAGER``. The int64 ids are stored.
3. Counting, when the flag is set. ``COUNT_DIRECT``: one relaxed ``RED`` per pair (small inputs,
   where a block has almost no repeated slot). ``COUNT_WARP``: the lanes of a warp holding the same
   slot find each other (``match.any``) and the lowest of them adds their number: one ``RED`` per
   (warp, slot), no shared memory, no barrier (mid-sized inputs, NVIDIA only). ``COUNT_HIST``: a
   shared-memory histogram (``tl.histogram``: warp ballots, then shared-memory atomics across
   warps) over two power-of-two bin ranges that cover ``P`` (288 = 256 + 32: nine bins per lane
   instead of the sixteen of a 512-bin histogram), then one ``RED`` per (program, non-empty slot).

All index arithmetic is int32 (``PlacementView``/``ExpertLoadRecorder`` check that the table and
the counters fit); only the ids' range check and the stored slots are 64-bit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

__all__ = ["LaunchConfig", "launch_config", "map_and_record_triton", "record_counts_triton"]

COUNT_DIRECT = 0  # one RED per valid pair
COUNT_HIST = 1  # split shared-memory histogram, one RED per (program, non-empty slot)
COUNT_WARP = 2  # match.any within each warp, one RED per (warp, slot); NVIDIA only


class LaunchConfig(NamedTuple):
    """One launch of ``_map_and_record_kernel``."""

    block: int  # (token, k) pairs per program, a power of two
    num_warps: int
    mode: int  # COUNT_DIRECT, COUNT_HIST or COUNT_WARP (needs block >= 32 * num_warps)
    eager: int  # replica slots read together with the count: 0, 1 or 3


@triton.jit
def _seed(ids_ptr, num_experts, TOP_K: tl.constexpr, SEED_BLOCK: tl.constexpr):
    # per-call rotation: sum of token 0's valid ids (the same in every program)
    kk = tl.arange(0, SEED_BLOCK)
    first = tl.load(ids_ptr + kk, mask=kk < TOP_K, other=0)
    first = tl.where((first >= 0) & (first < num_experts), first, 0).to(tl.int32)
    return tl.sum(first, axis=0)


@triton.jit
def _map_ids(
    raw, token, seed, table_ptr, layer, num_experts, table_width, zero, EAGER: tl.constexpr
):
    """Logical ids ``raw`` -> ``(valid, slot)``, int32 slots, -1 where invalid."""
    valid = (raw >= 0) & (raw < num_experts)
    expert = tl.where(valid, raw, 0).to(tl.int32)
    entry = table_ptr + (layer * num_experts + expert) * table_width
    cnt = tl.load(entry, mask=valid, other=1)
    if EAGER >= 1:
        r0 = tl.load(entry + 1, mask=valid, other=-1)
        dep = r0
        if EAGER >= 3:
            r1 = tl.load(entry + 2, mask=valid & (table_width > 2), other=-1)
            r2 = tl.load(entry + 3, mask=valid & (table_width > 3), other=-1)
            dep = dep | r1 | r2
        # `zero` is a run-time 0: the division below now waits on these reads, so ptxas issues
        # them together with the count's read instead of after the division (a round trip)
        cnt = cnt | (dep & zero)
    replica = (token + seed) % cnt
    if EAGER >= 1:
        slot = r0
        if EAGER >= 3:
            slot = tl.where(replica == 1, r1, slot)
            slot = tl.where(replica == 2, r2, slot)
        far = valid & (replica >= EAGER)
        slot = tl.where(far, tl.load(entry + 1 + replica, mask=far, other=-1), slot)
    else:
        slot = tl.load(entry + 1 + replica, mask=valid, other=-1)
    return valid, slot


@triton.jit
def _flush(base, stride, hist, first, NBINS: tl.constexpr, num_slots):
    # one RED per non-empty bin; bins past the last slot are always empty
    bins = first + tl.arange(0, NBINS)
    tl.atomic_add(
        base + bins * stride,
        hist.to(tl.int64),
        mask=(hist > 0) & (bins < num_slots),
        sem="relaxed",
    )


@triton.jit
def _lane_id(like):
    # the lane of the thread holding each element (PTX %laneid)
    return tl.inline_asm_elementwise(
        "mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True, pack=1
    )


@triton.jit
def _peers(slot):
    # lanes of this warp whose element holds the same value (sm_70+). Every lane of the warp runs
    # it together: the caller is not under divergent control flow (the flag branch is uniform).
    return tl.inline_asm_elementwise(
        "match.any.sync.b32 $0, $1, 0xffffffff;",
        "=r,r",
        [slot],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit(do_not_specialize=["layer", "zero"])
def _map_and_record_kernel(
    ids_ptr,  # [T*K] int32 or int64, logical expert ids
    out_ptr,  # [T*K] int64, physical slot ids (-1 for invalid ids)
    table_ptr,  # [L, E, W] int32: [count, replica slots...] per expert
    counters_ptr,  # [L, P] int64, strides (stride_layer, stride_slot)
    flag_ptr,  # [1] int32, counting on when != 0
    zero,  # 0, passed at run time (see _map_ids)
    n,  # T*K
    layer,
    num_experts,
    num_slots,
    table_width,
    stride_layer,
    stride_slot,
    TOP_K: tl.constexpr,
    SEED_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
    BINS_LO: tl.constexpr,  # bins [0, BINS_LO): largest power of two <= P (>= 32)
    BINS_HI: tl.constexpr,  # bins [BINS_LO, BINS_LO + BINS_HI); 0 if the first range covers P
    COUNT: tl.constexpr,
    EAGER: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    flag = tl.load(flag_ptr)
    # `flag & zero` (= 0) makes the address math wait on the flag: it is read with the ids
    # rather than last, after the table reads
    raw = tl.load(ids_ptr + offs, mask=in_range, other=-1) | (flag & zero)
    seed = _seed(ids_ptr, num_experts, TOP_K, SEED_BLOCK)
    valid, slot = _map_ids(
        raw, offs // TOP_K, seed, table_ptr, layer, num_experts, table_width, zero, EAGER
    )
    tl.store(out_ptr + offs, slot.to(tl.int64), mask=in_range)
    if flag != 0:
        base = counters_ptr + layer * stride_layer
        if COUNT == 0:
            tl.atomic_add(
                base + slot * stride_slot, tl.full([BLOCK], 1, tl.int64), mask=valid, sem="relaxed"
            )
        elif COUNT == 2:
            # invalid pairs (slot -1) match each other but never count
            peers = _peers(slot)
            leader = (peers & -peers) == (1 << _lane_id(slot))
            tl.atomic_add(
                base + slot * stride_slot,
                libdevice.popc(peers).to(tl.int64),
                mask=valid & leader,
                sem="relaxed",
            )
        else:
            hist_lo = tl.histogram(slot, BINS_LO, mask=valid & (slot < BINS_LO))
            _flush(base, stride_slot, hist_lo, 0, BINS_LO, num_slots)
            if BINS_HI > 0:
                hist_hi = tl.histogram(slot - BINS_LO, BINS_HI, mask=valid & (slot >= BINS_LO))
                _flush(base, stride_slot, hist_hi, BINS_LO, BINS_HI, num_slots)


@triton.jit
def _record_counts_kernel(
    src_ptr,  # [n] integer counts
    counters_ptr,  # [L, P] int64
    flag_ptr,  # [1] int32
    n,
    base,  # layer * stride_layer + slot_offset * stride_slot
    stride_slot,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    flag = tl.load(flag_ptr)
    if flag != 0:
        val = tl.load(src_ptr + offs, mask=mask, other=0).to(tl.int64)
        tl.atomic_add(
            counters_ptr + base + offs * stride_slot, val, mask=mask & (val != 0), sem="relaxed"
        )


# Tuned on an H100 (132 SMs) with `benchmarks/recording.py --sweep`, counters one 128-byte line
# apart; see docs/decisions/0003-recorder-counters.md.
_EAGER = 3  # [count, r0, r1, r2]: one table round trip for experts with up to 3 replicas


def launch_config(n: int, num_sms: int, *, warp_match: bool = True) -> LaunchConfig:
    """Launch configuration for ``n`` (token, k) pairs on a GPU with ``num_sms`` SMs.

    - ``n <= 1024`` (128 tokens at top-8): direct REDs, 32 pairs per 1-warp program up to 256
      pairs, then 64 pairs per 2-warp program. A block this small spread over hundreds of slots
      has few repeated slots, and any aggregation's latency is not worth paying.
    - up to about 64 pairs per SM (512 tokens on an H100): ``COUNT_WARP`` in 128-pair, 4-warp
      programs. Hot slots repeat across the block, so one RED per pair would queue on their
      counters, while the shared-memory histogram's ballots and barriers cost ~0.37 us here
      (more than the REDs it saves). ``warp_match=False`` (not NVIDIA) uses the histogram.
    - beyond: the split histogram, one RED per (program, non-empty slot); 128-pair programs up to
      256 pairs per SM, then 512 and 1024 pairs with 8 warps.
    """
    if n <= 256:
        return LaunchConfig(32, 1, COUNT_DIRECT, _EAGER)
    if n <= 1024:
        return LaunchConfig(64, 2, COUNT_DIRECT, _EAGER)
    per_sm = -(-n // max(num_sms, 1))
    if per_sm <= 64:
        return LaunchConfig(128, 4, COUNT_WARP if warp_match else COUNT_HIST, _EAGER)
    if per_sm <= 256:
        return LaunchConfig(128, 4, COUNT_HIST, _EAGER)
    if per_sm <= 512:
        return LaunchConfig(512, 8, COUNT_HIST, _EAGER)
    return LaunchConfig(1024, 8, COUNT_HIST, _EAGER)


def split_bins(num_slots: int) -> tuple[int, int]:
    """``(BINS_LO, BINS_HI)``: two power-of-two bin ranges covering ``[0, num_slots)``, each of
    at least 32 bins (one per lane); ``BINS_HI`` is 0 when one range suffices."""
    if num_slots <= 32:
        return 32, 0
    lo = 1 << (num_slots.bit_length() - 1)
    return lo, (max(32, triton.next_power_of_2(num_slots - lo)) if num_slots > lo else 0)


def map_and_record_triton(
    topk_ids: torch.Tensor,
    replica_table: torch.Tensor,
    counters: torch.Tensor,
    enabled: torch.Tensor,
    layer: int,
    *,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Triton twin of ``map_and_record_torch`` (same arguments, same result). ``config``
    overrides ``launch_config`` (tests, tuning)."""
    ids = topk_ids.contiguous()
    out = torch.empty(ids.shape, dtype=torch.int64, device=ids.device)
    n = ids.numel()
    if n == 0:
        return out
    num_slots = counters.shape[1]
    nvidia = torch.version.hip is None
    if config is None:
        sms = torch.cuda.get_device_properties(ids.device).multi_processor_count
        config = launch_config(n, sms, warp_match=nvidia)
    if config.mode == COUNT_WARP:
        if not nvidia:
            raise ValueError("COUNT_WARP uses NVIDIA PTX (match.any); use COUNT_HIST here")
        if config.block < 32 * config.num_warps:
            # fewer pairs than threads would replicate pairs across lanes and count them twice
            raise ValueError(
                f"COUNT_WARP needs block >= 32 * num_warps, got {config.block} pairs for "
                f"{config.num_warps} warps"
            )
    bins_lo, bins_hi = split_bins(num_slots)
    top_k = ids.shape[1]
    _map_and_record_kernel[(triton.cdiv(n, config.block),)](
        ids,
        out,
        replica_table,
        counters,
        enabled,
        0,
        n,
        layer,
        replica_table.shape[1],
        num_slots,
        replica_table.shape[2],
        counters.stride(0),
        counters.stride(1),
        TOP_K=top_k,
        SEED_BLOCK=max(2, triton.next_power_of_2(top_k)),
        BLOCK=config.block,
        BINS_LO=bins_lo,
        BINS_HI=bins_hi,
        COUNT=config.mode,
        EAGER=config.eager,
        num_warps=config.num_warps,
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
        layer * counters.stride(0) + slot_offset * counters.stride(1),
        counters.stride(1),
        BLOCK=block,
        num_warps=max(1, min(4, block // 32)),
    )
