"""worker_agent.bytecopy: many byte-range copies, one launch on CUDA (Triton), copy_ elsewhere."""

from __future__ import annotations

import pytest
import torch

from worker_agent.bytecopy import ByteCopier, batched_copy_available


def _ranges(device: torch.device, seed: int) -> tuple[list, torch.Tensor, torch.Tensor]:
    """Random disjoint ranges from ``src`` into ``dst``, aligned and unaligned, tiny and
    multi-chunk; returns (ranges, src, the expected dst)."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=gen).to(device)
    dst = torch.zeros(3 << 20, dtype=torch.uint8, device=device)
    expected = dst.clone()
    ranges = []
    at = 0
    for i, n in enumerate([16, 4096, 1 << 20, 300, 17, 128 * 1024 + 16, 48, 1]):
        so = int(torch.randint(0, (2 << 20) - n, (1,), generator=gen)) & ~(15 if i % 3 else 0)
        do = at + (0 if i % 4 else 5)  # some destinations unaligned
        ranges.append((dst, do, src, so, n))
        expected[do:do + n] = src[so:so + n]
        at = do + n + 64
    return ranges, dst, expected


def test_copies_every_range_with_copy_on_cpu() -> None:
    ranges, dst, expected = _ranges(torch.device("cpu"), 0)
    ByteCopier().run(ranges)
    assert torch.equal(dst, expected)
    ByteCopier().run([])  # nothing to do
    ranges, dst, expected = _ranges(torch.device("cpu"), 1)
    ByteCopier().run(ranges, max_programs=3)  # the cap only shapes the CUDA launch
    assert torch.equal(dst, expected)


def test_compiled_programs_copy_every_range_on_cpu() -> None:
    copier = ByteCopier()
    batches = [_ranges(torch.device("cpu"), seed) for seed in (2, 3)]
    programs = copier.compile([ranges for ranges, _, _ in batches] + [[]])
    assert all(p.table is None for p in programs)  # copy_ per range off CUDA
    for program, (_, dst, expected) in zip(programs, batches, strict=False):
        copier.launch(program)
        assert torch.equal(dst, expected)
    copier.launch(programs[-1])  # an empty program: nothing to do


def test_max_programs_must_be_positive() -> None:
    ranges, dst, _ = _ranges(torch.device("cpu"), 0)
    with pytest.raises(ValueError, match="max_programs"):
        ByteCopier().run(ranges, max_programs=0)
    assert not dst.any()  # refused before copying anything


@pytest.mark.gpu
@pytest.mark.skipif(not batched_copy_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("max_programs", [None, 1, 3, 64, 10_000])
def test_one_launch_equals_copy_on_cuda(batched: bool, max_programs: int | None) -> None:
    """Every range copied whatever the grid: one program per chunk, a capped grid looping over
    the chunks (1 program: all of them; 3: ranges split across programs), or a cap above the
    number of chunks; ranges include empty-chunk tails and multi-chunk ranges."""
    copier = ByteCopier(batched=batched)
    device = torch.device("cuda")
    for seed in range(6):  # more launches than table slots: slots are reused
        ranges, dst, expected = _ranges(device, seed)
        extra = [(dst, (3 << 20) - 4096, dst, 0, 0)] * 8  # empty aligned ranges: no chunk
        copier.run(ranges + extra, max_programs=max_programs)
        torch.cuda.synchronize()
        assert torch.equal(dst, expected), seed


@pytest.mark.gpu
@pytest.mark.skipif(not batched_copy_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("max_programs", [None, 1, 3])
def test_compiled_programs_equal_copy_on_cuda(max_programs: int | None) -> None:
    """Tables compiled ahead (one upload for several programs), launched later on another
    stream, capped or not: the same bytes as ``copy_``; a program is reusable."""
    copier = ByteCopier()
    device = torch.device("cuda")
    batches = [_ranges(device, seed) for seed in range(5)]
    programs = copier.compile([ranges for ranges, _, _ in batches])
    assert all(p.table is not None and p.plain for p in programs)  # both paths in each
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):  # the launch orders itself after the upload
        for program in programs:
            copier.launch(program, max_programs=max_programs)
    torch.cuda.synchronize()
    for seed, (_, dst, expected) in enumerate(batches):
        assert torch.equal(dst, expected), seed
        dst.zero_()
    copier.launch(programs[0], max_programs=max_programs)
    torch.cuda.synchronize()
    assert torch.equal(batches[0][1], batches[0][2])
