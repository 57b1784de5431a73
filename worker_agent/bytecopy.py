"""Many byte-range copies in one launch (weight migration's staging, packing and commits).

A migration step copies dozens of byte ranges (an expert's rows of each registered tensor into
a staging region, and back). One ``Tensor.copy_`` each costs ~10 us of host time, so with many
small layers the host, not the GPU, sets the pace. A :class:`ByteCopier` runs a list of ranges
``(dst, dst_offset, src, src_offset, nbytes)`` over flat ``uint8`` tensors:

- on CUDA with Triton, every range whose two addresses and length are multiples of 16 bytes
  goes into one table ``[n, 4]`` int64 (source address, destination address, 16-byte words,
  first chunk), copied to the device from a reusable pinned buffer, and one kernel launch, where
  each program copies one 128 KiB chunk of one range. Other ranges use ``copy_``. With
  ``max_programs``, at most that many programs run, each looping over every ``max_programs``-th
  chunk: a copy that runs beside a transfer then takes a bounded share of the GPU's SMs and
  memory bandwidth instead of bursting over all of it (decision 0011, session 4);
- with fewer than :data:`MIN_BATCH` ranges, on CPU, without Triton or with ``batched=False``:
  one ``copy_`` per range.

:meth:`ByteCopier.compile` does the host part ahead of time: it turns lists of ranges known
early (a migration's, when its plan arrives) into :class:`CopyProgram` objects whose tables are
already on the device, so that :meth:`ByteCopier.launch` later costs one kernel launch.

The ranges of one call must not overlap each other's destinations, nor read another's
destination: they run in any order. Everything is queued on the current stream; the tensors
must stay alive until it ran (they do: the engine's weights and the migration's staging
buffers).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["ByteCopier", "CopyProgram", "CopyRange", "batched_copy_available"]

#: ``(dst, dst_offset, src, src_offset, nbytes)``: flat uint8 tensors and byte offsets.
CopyRange = tuple[torch.Tensor, int, torch.Tensor, int, int]

_WORD = 16  # bytes per table unit
_CHUNK_WORDS = 8192  # 128 KiB per program (per loop step of a capped program)
_COLS = 4  # source address, destination address, words, first chunk
_SLOTS = 4  # tables in flight
#: Fewer ranges than this run as ``copy_``: building and uploading the table and launching a
#: Triton kernel costs more host time than a few ``copy_`` calls (measured on H200: a 3-range
#: pack took 0.22 ms of host time batched against 0.11 ms as three copies).
MIN_BATCH = 8


@functools.cache
def _kernels() -> Any:
    """``(one program per chunk, capped grid)`` Triton kernels, or ``None`` without Triton."""
    try:
        import triton
        import triton.language as tl
    except Exception:
        return None

    @triton.jit
    def _copy_chunk(table_ptr, r, chunk, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        # 16-byte words [chunk * CHUNK, (chunk + 1) * CHUNK) of range r, as int64 lanes (two
        # per word), BLOCK lanes per step
        start = chunk.to(tl.int64) * CHUNK
        words = tl.load(table_ptr + r * 4 + 2)
        if start < words:
            src = tl.load(table_ptr + r * 4).to(tl.pointer_type(tl.int64))
            dst = tl.load(table_ptr + r * 4 + 1).to(tl.pointer_type(tl.int64))
            end = tl.minimum(start + CHUNK, words) * 2
            for i in range(0, CHUNK * 2, BLOCK):
                offs = start * 2 + i + tl.arange(0, BLOCK)
                offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
                mask = offs < end
                tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)

    @triton.jit
    def copy_ranges(table_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        # program (r, c): chunk c of range r
        _copy_chunk(table_ptr, tl.program_id(0), tl.program_id(1), CHUNK, BLOCK)

    @triton.jit
    def copy_ranges_capped(table_ptr, rows, chunks, programs, CHUNK: tl.constexpr,
                           BLOCK: tl.constexpr):
        # program p: chunks p, p + programs, ... in table order. The range of chunk g is the
        # last row whose first chunk is <= g; g only grows, so the row only moves forward.
        r = tl.program_id(0) * 0  # an int32 scalar (loop-carried)
        nxt = tl.load(table_ptr + 7, mask=rows > 1, other=chunks)  # row 1's first chunk
        for g in range(tl.program_id(0), chunks, programs):
            while nxt <= g:
                r += 1
                nxt = tl.load(table_ptr + (r + 1) * 4 + 3, mask=r + 1 < rows, other=chunks)
            _copy_chunk(table_ptr, r, g - tl.load(table_ptr + r * 4 + 3), CHUNK, BLOCK)

    return copy_ranges, copy_ranges_capped


def batched_copy_available() -> bool:
    """Whether the one-launch path can run here (CUDA present and Triton importable)."""
    return torch.cuda.is_available() and _kernels() is not None


def _copy(r: CopyRange) -> None:
    dst, do, src, so, n = r
    dst[do:do + n].copy_(src[so:so + n])


def _check_cap(max_programs: int | None) -> None:
    if max_programs is not None and max_programs < 1:
        raise ValueError(f"max_programs must be >= 1 or None, got {max_programs}")


def _fill(table: np.ndarray, ranges: list[CopyRange]) -> tuple[int, int, int, list[CopyRange]]:
    """Write the aligned ``ranges`` into ``table [>= len(ranges), 4]`` (source address,
    destination address, words, first chunk). Returns (rows, chunks, longest range in chunks,
    the unaligned ranges, left for ``copy_``)."""
    rows = 0
    chunks = 0  # chunks of the rows so far: the next row's first chunk
    longest = 0
    plain: list[CopyRange] = []
    for r in ranges:
        dst, do, src, so, n = r
        s_addr, d_addr = src.data_ptr() + so, dst.data_ptr() + do
        if (s_addr | d_addr | n) % _WORD:
            plain.append(r)
            continue
        words = n // _WORD
        table[rows] = (s_addr, d_addr, words, chunks)
        own = -(-words // _CHUNK_WORDS)
        chunks += own
        longest = max(longest, own)
        rows += 1
    return rows, chunks, longest, plain


def _launch(kernels: Any, table: torch.Tensor, rows: int, chunks: int, longest: int,
            max_programs: int | None) -> None:
    """One launch over ``table [rows, 4]`` (on the device) on the current stream."""
    copy_ranges, copy_ranges_capped = kernels
    if max_programs is None or max_programs >= chunks:
        copy_ranges[(rows, longest)](table, CHUNK=_CHUNK_WORDS, BLOCK=1024, num_warps=4)
    else:
        # few programs: each moves 64 KiB per step with 8 warps, to keep enough bytes in
        # flight per SM (a 4-warp, 8 KiB step waits on memory latency)
        copy_ranges_capped[(max_programs,)](
            table, rows, chunks, max_programs, CHUNK=_CHUNK_WORDS, BLOCK=8192, num_warps=8
        )


@dataclass(eq=False)
class CopyProgram:
    """Ranges compiled by :meth:`ByteCopier.compile`: on the one-launch path, ``table``
    ``[rows, 4]`` is on the device and ``plain`` holds the unaligned ranges; otherwise
    ``table`` is ``None`` and :meth:`ByteCopier.launch` runs ``copy_`` per range."""

    ranges: list[CopyRange]
    table: torch.Tensor | None = None
    rows: int = 0
    chunks: int = 0
    longest: int = 0
    plain: list[CopyRange] = field(default_factory=list)
    _host: Any = None  # the pinned table
    _uploaded: Any = None  # CUDA event after the table's upload


class _TableSlot:
    """A pinned host table, its device copy and the event after the launch that read it."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.rows = rows
        self.host = torch.empty((rows, _COLS), dtype=torch.int64, pin_memory=True)
        self.device = torch.empty((rows, _COLS), dtype=torch.int64, device=device)
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

    def run(self, ranges: list[CopyRange], max_programs: int | None = None) -> None:
        """Queue every copy of ``ranges`` on the current stream. ``max_programs`` caps the
        programs of the one-launch path (``None``: one per 128 KiB chunk)."""
        _check_cap(max_programs)
        if not ranges:
            return
        device = ranges[0][0].device
        kernels = self._kernels(ranges)
        if kernels is None:
            for r in ranges:
                _copy(r)
            return
        slot = self._slot(len(ranges), device)
        # written in place: pinned, uploaded below
        rows, chunks, longest, plain = _fill(slot.host.numpy(), ranges)
        for r in plain:
            _copy(r)  # unaligned: the plain path
        if not chunks:  # no aligned range, or only empty ones
            return
        dev = slot.device[:rows]
        dev.copy_(slot.host[:rows], non_blocking=True)
        _launch(kernels, dev, rows, chunks, longest, max_programs)
        slot.event = torch.cuda.current_stream(device).record_event()

    def compile(self, batches: list[list[CopyRange]]) -> list[CopyProgram]:
        """One :class:`CopyProgram` per list of ranges, for :meth:`launch` later. On the
        one-launch path every table goes to the device now, in one upload queued on the current
        stream; :meth:`launch` orders its stream after that upload. The programs hold the
        ranges' tensors: their memory stays valid while a program lives.
        """
        programs = [CopyProgram(list(ranges)) for ranges in batches]
        batched = [p for p in programs if p.ranges and self._kernels(p.ranges) is not None]
        if not batched:
            return programs
        device = batched[0].ranges[0][0].device
        total = sum(len(p.ranges) for p in batched)
        host = torch.empty((total, _COLS), dtype=torch.int64, pin_memory=True)
        table = host.numpy()
        at = 0
        spans = []
        for p in batched:
            rows, p.chunks, p.longest, p.plain = _fill(table[at:], p.ranges)
            spans.append((p, at, rows))
            at += rows
        dev = torch.empty((max(at, 1), _COLS), dtype=torch.int64, device=device)
        dev[:at].copy_(host[:at], non_blocking=True)
        for p, lo, rows in spans:
            p.rows = rows
            p.table = dev[lo:lo + rows]
        # the pinned table must outlive its upload: the programs hold it
        event = torch.cuda.current_stream(device).record_event()
        for p, _, _ in spans:
            p._host = host
            p._uploaded = event
        return programs

    def launch(self, program: CopyProgram, max_programs: int | None = None) -> None:
        """Queue ``program``'s copies on the current stream (see :meth:`run`)."""
        _check_cap(max_programs)
        if program.table is None:
            for r in program.ranges:
                _copy(r)
            return
        for r in program.plain:
            _copy(r)
        if program.chunks:
            if program._uploaded is not None:  # the table's upload, if queued on another stream
                torch.cuda.current_stream(program.table.device).wait_event(program._uploaded)
            kernels = _kernels()
            assert kernels is not None  # a table was built
            _launch(kernels, program.table, program.rows, program.chunks, program.longest,
                    max_programs)

    def _kernels(self, ranges: list[CopyRange]) -> Any:
        """The Triton kernels if ``ranges`` take the one-launch path, else ``None``."""
        if not self.batched or len(ranges) < MIN_BATCH or ranges[0][0].device.type != "cuda":
            return None
        return _kernels()

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
