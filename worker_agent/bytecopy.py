"""Many byte-range copies in one launch (weight migration's staging, packing and commits).

A migration step copies dozens of byte ranges (an expert's rows of each registered tensor into
a staging region, and back). One ``Tensor.copy_`` each costs ~10 us of host time, so with many
small layers the host, not the GPU, sets the pace. A :class:`ByteCopier` runs a list of ranges
``(dst, dst_offset, src, src_offset, nbytes)`` over flat ``uint8`` tensors:

- on CUDA with Triton, every range whose two addresses and length are multiples of 16 bytes
  goes into one table ``[n, 3]`` int64 (source address, destination address, 16-byte words),
  copied to the device from a reusable pinned buffer, and one kernel launch, where each program
  copies one 128 KiB chunk of one range. Other ranges use ``copy_``;
- with fewer than :data:`MIN_BATCH` ranges, on CPU, without Triton or with ``batched=False``:
  one ``copy_`` per range.

The ranges of one call must not overlap each other's destinations, nor read another's
destination: they run in any order. Everything is queued on the current stream; the tensors
must stay alive until it ran (they do: the engine's weights and the migration's staging
buffers).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["ByteCopier", "CopyRange", "batched_copy_available"]

#: ``(dst, dst_offset, src, src_offset, nbytes)``: flat uint8 tensors and byte offsets.
CopyRange = tuple[torch.Tensor, int, torch.Tensor, int, int]

_WORD = 16  # bytes per table unit
_CHUNK_WORDS = 8192  # 128 KiB per program
_SLOTS = 4  # tables in flight
#: Fewer ranges than this run as ``copy_``: building and uploading the table and launching a
#: Triton kernel costs more host time than a few ``copy_`` calls (measured on H200: a 3-range
#: pack took 0.22 ms of host time batched against 0.11 ms as three copies).
MIN_BATCH = 8


@functools.cache
def _kernel() -> Any:
    """The Triton kernel, or ``None`` when Triton is not importable."""
    try:
        import triton
        import triton.language as tl
    except Exception:
        return None

    @triton.jit
    def copy_ranges(table_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        # Program (r, c) copies 16-byte words [c * CHUNK, (c + 1) * CHUNK) of range r, as
        # int64 lanes (two per word).
        r = tl.program_id(0)
        start = tl.program_id(1).to(tl.int64) * CHUNK
        words = tl.load(table_ptr + r * 3 + 2)
        if start < words:
            src = tl.load(table_ptr + r * 3).to(tl.pointer_type(tl.int64))
            dst = tl.load(table_ptr + r * 3 + 1).to(tl.pointer_type(tl.int64))
            end = tl.minimum(start + CHUNK, words) * 2
            for i in range(0, CHUNK * 2, BLOCK):
                offs = start * 2 + i + tl.arange(0, BLOCK)
                offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
                mask = offs < end
                tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)

    return copy_ranges


def batched_copy_available() -> bool:
    """Whether the one-launch path can run here (CUDA present and Triton importable)."""
    return torch.cuda.is_available() and _kernel() is not None


def _copy(r: CopyRange) -> None:
    dst, do, src, so, n = r
    dst[do:do + n].copy_(src[so:so + n])


class _TableSlot:
    """A pinned host table, its device copy and the event after the launch that read it."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.rows = rows
        self.host = torch.empty((rows, 3), dtype=torch.int64, pin_memory=True)
        self.device = torch.empty((rows, 3), dtype=torch.int64, device=device)
        self.event: Any = None


class ByteCopier:
    """Runs lists of :data:`CopyRange` (see the module docstring). One per device user.

    Args:
        batched: use the one-launch path on CUDA when Triton is importable.
    """

    def __init__(self, batched: bool = True) -> None:
        self.batched = batched
        self._slots: list[_TableSlot | None] = [None] * _SLOTS
        self._next = 0

    def run(self, ranges: list[CopyRange]) -> None:
        """Queue every copy of ``ranges`` on the current stream."""
        if not ranges:
            return
        device = ranges[0][0].device
        kernel = _kernel() if self.batched and device.type == "cuda" else None
        if kernel is None or len(ranges) < MIN_BATCH:
            for r in ranges:
                _copy(r)
            return
        slot = self._slot(len(ranges), device)
        table = slot.host.numpy()  # written in place: pinned, uploaded below
        rows = 0
        for r in ranges:
            dst, do, src, so, n = r
            s_addr, d_addr = src.data_ptr() + so, dst.data_ptr() + do
            if (s_addr | d_addr | n) % _WORD:
                _copy(r)  # unaligned: the plain path
                continue
            table[rows] = (s_addr, d_addr, n // _WORD)
            rows += 1
        if not rows:
            return
        dev = slot.device[:rows]
        dev.copy_(slot.host[:rows], non_blocking=True)
        chunks = int(-(-int(table[:rows, 2].max()) // _CHUNK_WORDS))
        kernel[(rows, chunks)](dev, CHUNK=_CHUNK_WORDS, BLOCK=1024, num_warps=4)
        slot.event = torch.cuda.current_stream(device).record_event()

    def _slot(self, rows: int, device: torch.device) -> _TableSlot:
        """The next ring slot, once the launch that last used it has run."""
        index = self._next
        self._next = (index + 1) % _SLOTS
        slot = self._slots[index]
        if slot is not None and slot.event is not None:
            slot.event.synchronize()  # normally long done: _SLOTS launches ago
        if slot is None or slot.rows < rows or slot.device.device != device:
            slot = _TableSlot(max(rows, 256), device)
            self._slots[index] = slot
        return slot
