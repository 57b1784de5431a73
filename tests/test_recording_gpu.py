"""GPU tests of worker_agent.recording (run on the device machine; skipped without CUDA/Triton)."""

from __future__ import annotations

import importlib.util
import threading
import time

import numpy as np
import pytest
import torch

from worker_agent.recording import ExpertLoadRecorder, LoadDelta, PlacementView, Snapshotter
from worker_agent.recording._reference import map_and_record_torch, record_counts_torch
from worker_agent.recording.recorder import COUNTER_STRIDE

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton"),
]


def random_placement(gen: np.random.Generator, layers: int, experts: int, slots: int):
    out = np.empty((layers, slots), dtype=np.int64)
    for layer in range(layers):
        weights = gen.pareto(1.5, experts) + 1e-3
        extra = gen.choice(experts, size=slots - experts, p=weights / weights.sum())
        out[layer] = gen.permutation(np.concatenate([np.arange(experts), extra]))
    return out


def random_topk(tokens: int, experts: int, top_k: int, dtype, invalid: float = 0.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bias = torch.linspace(3.0, 0.0, experts, device="cuda")
    logits = torch.randn(tokens, experts, device="cuda", generator=g) + bias
    ids = logits.topk(top_k, dim=1).indices
    if invalid:
        drop = torch.rand(ids.shape, device="cuda", generator=g) < invalid
        ids = torch.where(drop, -1, ids)
    return ids.to(dtype)


def _triton():
    from worker_agent.recording import _triton

    return _triton


CASES = [
    # (layers, experts, slots, tokens, top_k, dtype)
    (2, 8, 8, 1, 1, torch.int64),
    (3, 16, 20, 7, 4, torch.int32),
    (2, 64, 72, 33, 6, torch.int64),
    (4, 256, 288, 1, 8, torch.int64),
    (4, 256, 288, 16, 8, torch.int32),
    (4, 256, 288, 128, 8, torch.int64),
    (4, 256, 288, 512, 8, torch.int32),
    (2, 256, 288, 2048, 8, torch.int64),
    (2, 256, 320, 8192, 8, torch.int64),
    (2, 256, 320, 32768, 8, torch.int32),
    (2, 128, 256, 3000, 16, torch.int64),  # P a power of two: one bin range
    (2, 160, 160, 999, 9, torch.int32),
    (2, 32, 64, 100000, 2, torch.int64),
    (2, 512, 600, 777, 16, torch.int64),
    (2, 64, 72, 300, 16, torch.int32),  # COUNT_WARP with top-16
    (3, 16, 20, 200, 6, torch.int64),  # COUNT_WARP, few slots: most lanes of a warp match
]


def strided_counters(layers: int, slots: int, stride: int) -> torch.Tensor:
    """``[L, P]`` random counters, ``stride`` int64 apart (the recorder's layout for 16); the
    gaps hold a sentinel that no kernel may touch."""
    buf = torch.full((layers, slots, stride), -7, dtype=torch.int64, device="cuda")
    out = buf[:, :, 0]
    out.copy_(torch.randint(0, 2**40, (layers, slots), device="cuda"))
    return out


def gaps_untouched(counters: torch.Tensor) -> bool:
    stride = counters.stride(1)
    if stride == 1:
        return True
    buf = torch.as_strided(counters, (*counters.shape, stride), (*counters.stride(), 1))
    return bool((buf[:, :, 1:] == -7).all())


@pytest.mark.parametrize("case", CASES, ids=lambda c: "L{}E{}P{}T{}K{}{}".format(*c[:5], c[5]))
@pytest.mark.parametrize("enabled", [1, 0])
@pytest.mark.parametrize("stride", [1, COUNTER_STRIDE])
def test_triton_equals_fallback_bit_for_bit(case, enabled, stride):
    layers, experts, slots, tokens, top_k, dtype = case
    gen = np.random.default_rng(tokens + slots)
    view = PlacementView(random_placement(gen, layers, experts, slots), experts, device="cuda")
    ids = random_topk(tokens, experts, top_k, dtype, invalid=0.02, seed=tokens)
    start = strided_counters(layers, slots, stride)
    flag = torch.tensor([enabled], dtype=torch.int32, device="cuda")
    layer = layers - 1
    c_tri, c_ref = start, start.clone()
    before = start.clone()
    out_tri = _triton().map_and_record_triton(ids, view.replica_table, c_tri, flag, layer)
    out_ref = map_and_record_torch(ids, view.replica_table, c_ref, flag, layer)
    assert out_tri.dtype == torch.int64 and out_tri.shape == (tokens, top_k)
    assert torch.equal(out_tri, out_ref)
    assert torch.equal(c_tri, c_ref)
    assert gaps_untouched(c_tri)
    assert int((c_tri - before).sum()) == enabled * int((ids >= 0).sum())


def _warps(block: int) -> int:
    return max(1, min(16, block // 64))


def _config_cases():
    cases = []
    for mode in (0, 1, 2):
        for block in (16, 32, 64, 256, 512, 4096):
            if mode == 2 and block < 32 * _warps(block):
                continue  # refused, see test_warp_mode_needs_a_lane_per_pair
            for eager in (0, 1, 3):
                cases.append((block, mode, eager, 288))
            cases.append((block, mode, 3, 600))  # 512 + 128 bins
            cases.append((block, mode, 3, 256))  # one bin range
    return cases


@pytest.mark.parametrize("case", _config_cases(), ids=lambda c: "B{}m{}e{}P{}".format(*c))
def test_every_launch_config(case):
    """Every block size, counting mode and number of eagerly read replicas; the pareto placement
    gives hot experts many replicas, so the dependent read of far replicas is exercised too."""
    block, mode, eager, slots = case
    tri = _triton()
    experts = 128 if slots == 256 else 256
    view = PlacementView(
        random_placement(np.random.default_rng(1), 2, experts, slots), experts, device="cuda"
    )
    ids = random_topk(1000, experts, 8, torch.int64, invalid=0.01, seed=block)
    c_tri = strided_counters(2, slots, COUNTER_STRIDE)
    c_ref = c_tri.clone()
    flag = torch.ones(1, dtype=torch.int32, device="cuda")
    cfg = tri.LaunchConfig(block, _warps(block), mode, eager)
    out = tri.map_and_record_triton(ids, view.replica_table, c_tri, flag, 1, config=cfg)
    assert torch.equal(out, map_and_record_torch(ids, view.replica_table, c_ref, flag, 1))
    assert torch.equal(c_tri, c_ref)
    assert gaps_untouched(c_tri)


def test_warp_mode_needs_a_lane_per_pair():
    """Fewer pairs than threads would put one pair in several lanes: refused, nothing counted."""
    tri = _triton()
    view = PlacementView(random_placement(np.random.default_rng(3), 1, 16, 24), 16, device="cuda")
    ids = random_topk(50, 16, 4, torch.int64)
    counters = torch.zeros(1, 24, dtype=torch.int64, device="cuda")
    flag = torch.ones(1, dtype=torch.int32, device="cuda")
    for block, warps in ((16, 1), (64, 4)):
        with pytest.raises(ValueError, match="block >= 32 \\* num_warps"):
            tri.map_and_record_triton(
                ids,
                view.replica_table,
                counters,
                flag,
                0,
                config=tri.LaunchConfig(block, warps, tri.COUNT_WARP, 3),
            )
    assert int(counters.sum()) == 0


def test_launch_config_covers_sizes():
    tri = _triton()
    for n in (1, 7, 8, 100, 1024, 1025, 4096, 8448, 8449, 65536, 262144, 10**6):
        for warp_match in (True, False):
            cfg = tri.launch_config(n, 132, warp_match=warp_match)
            assert cfg.block & (cfg.block - 1) == 0 and 1 <= cfg.num_warps <= 16
            assert cfg.mode in (tri.COUNT_DIRECT, tri.COUNT_HIST, tri.COUNT_WARP)
            assert cfg.eager in (0, 1, 3)
            if cfg.mode == tri.COUNT_WARP:
                assert warp_match and cfg.block >= 32 * cfg.num_warps
    assert tri.launch_config(4096, 132).mode == tri.COUNT_WARP  # 512 tokens, top-8
    assert tri.launch_config(4096, 132, warp_match=False).mode == tri.COUNT_HIST
    assert tri.split_bins(288) == (256, 32) and tri.split_bins(256) == (256, 0)
    assert tri.split_bins(600) == (512, 128) and tri.split_bins(260) == (256, 32)
    assert tri.split_bins(20) == (32, 0) and tri.split_bins(33) == (32, 32)


def test_empty_and_record_counts():
    view = PlacementView(random_placement(np.random.default_rng(2), 3, 16, 24), 16, device="cuda")
    rec = ExpertLoadRecorder(view)
    assert rec.backend == "triton"
    for dtype in (torch.int32, torch.int64):
        out = rec.map_and_record(1, torch.empty(0, 8, dtype=dtype, device="cuda"))
        assert out.shape == (0, 8) and out.dtype == torch.int64
    assert int(rec.counters.sum()) == 0
    # one 128-byte line per counter; record_counts must respect the strides
    assert rec.counters.shape == (3, 24)
    assert rec.counters.stride() == (24 * COUNTER_STRIDE, COUNTER_STRIDE)
    ref = torch.zeros_like(rec.counters)
    flag = torch.ones(1, dtype=torch.int32, device="cuda")
    for layer, n, offset, dtype in [
        (0, 8, 0, torch.int32),
        (2, 24, 0, torch.int64),
        (1, 5, 19, torch.int32),
    ]:
        counts = torch.randint(0, 1000, (n,), device="cuda", dtype=dtype)
        rec.record_counts(layer, counts, offset)
        record_counts_torch(counts, ref, flag, layer, offset)
    assert torch.equal(rec.counters, ref)
    rec.enabled(False)
    rec.record_counts(0, torch.ones(24, dtype=torch.int32, device="cuda"))
    assert torch.equal(rec.counters, ref)


def test_cuda_graph_capture_and_replay_with_new_inputs():
    layers, experts, slots, tokens, top_k = 3, 256, 288, 512, 8
    gen = np.random.default_rng(3)
    maps = [random_placement(gen, layers, experts, slots) for _ in range(2)]
    view = PlacementView(maps[0], experts, device="cuda")
    rec = ExpertLoadRecorder(view)
    static_ids = [random_topk(tokens, experts, top_k, torch.int32, seed=i) for i in range(layers)]
    static_local = torch.zeros(slots // 8, dtype=torch.int32, device="cuda")

    def forward() -> list[torch.Tensor]:
        outs = [rec.map_and_record(layer, static_ids[layer]) for layer in range(layers)]
        rec.record_counts(0, static_local, slot_offset=slots // 8)
        return outs

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()  # warm up (Triton compile) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward()
    rec.counters.zero_()  # fixed address: zero_ is in place

    ref_view = PlacementView(maps[0], experts)  # CPU oracle
    ref = ExpertLoadRecorder(ref_view)
    for it in range(6):
        if it == 2:  # switch maps in place: the captured graph must follow
            view.update_(maps[1], 1)
            ref_view.update_(maps[1], 1)
        if it == 4:
            rec.enabled(False)
            ref.enabled(False)
        new_ids = [
            random_topk(tokens, experts, top_k, torch.int32, seed=100 + 10 * it + layer)
            for layer in range(layers)
        ]
        new_local = torch.randint(0, 50, (slots // 8,), dtype=torch.int32, device="cuda")
        for layer in range(layers):
            static_ids[layer].copy_(new_ids[layer])
        static_local.copy_(new_local)
        graph.replay()
        for layer in range(layers):
            want = ref.map_and_record(layer, new_ids[layer].cpu())
            assert torch.equal(static_out[layer].cpu(), want)
        ref.record_counts(0, new_local.cpu(), slot_offset=slots // 8)
        assert torch.equal(rec.counters.cpu(), ref.counters)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    layers, experts, slots = 2, 256, 288
    phy2log = random_placement(np.random.default_rng(4), layers, experts, slots)
    rec = ExpertLoadRecorder(PlacementView(phy2log, experts, device="cuda"))
    ref = ExpertLoadRecorder(PlacementView(phy2log, experts, device="cuda"), backend="torch")

    def moe_routing(r: ExpertLoadRecorder, logits: torch.Tensor, local: torch.Tensor):
        ids = logits.topk(8, dim=-1).indices
        phys = r.map_and_record(1, ids)
        r.record_counts(0, local, 0)
        return phys * 2 + 1

    compiled = torch.compile(moe_routing, fullgraph=True)
    for it in range(4):
        if it == 2:
            rec.enabled(False)
            ref.enabled(False)
        logits = torch.randn(300, experts, device="cuda")
        local = torch.randint(0, 9, (slots,), device="cuda", dtype=torch.int32)
        assert torch.equal(compiled(rec, logits, local), moe_routing(ref, logits, local))
        assert torch.equal(rec.counters, ref.counters)


def test_no_host_sync_in_forward_path():
    layers, experts, slots = 4, 256, 288
    gen = np.random.default_rng(5)
    maps = [random_placement(gen, layers, experts, slots) for _ in range(2)]
    view = PlacementView(maps[0], experts, device="cuda")
    recs = [ExpertLoadRecorder(view), ExpertLoadRecorder(view, backend="torch")]
    snap = Snapshotter(recs[0])
    ids32 = random_topk(1000, experts, 8, torch.int32)
    ids64 = random_topk(1000, experts, 8, torch.int64)
    local = torch.ones(36, dtype=torch.int32, device="cuda")
    for rec in recs:  # warm up (compilation, allocator)
        rec.map_and_record(0, ids32)
        rec.map_and_record(0, ids64)
        rec.record_counts(0, local, 36)
    snap.capture(0)
    torch.cuda.synchronize()
    snap.collect()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            for rec in recs:
                rec.enabled(step != 2)
                for layer in range(layers):
                    rec.map_and_record(layer, ids32 if layer % 2 else ids64)
                    rec.record_counts(layer, local, 36)
            if step == 3:
                snap.switch_(step, maps[1], 1)
            else:
                snap.capture(step)
            snap.collect()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.equal(recs[0].counters, recs[1].counters)


def _drain(snap: Snapshotter, want: int, timeout: float = 10.0) -> list[LoadDelta]:
    out: list[LoadDelta] = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        out += snap.collect()
        time.sleep(0.001)
    return out


def test_snapshot_cut_is_exact_and_attributed_on_cuda():
    layers, experts, slots = 3, 256, 288
    gen = np.random.default_rng(6)
    maps = [random_placement(gen, layers, experts, slots) for _ in range(3)]
    view = PlacementView(maps[0], experts, device="cuda", version=0)
    rec = ExpertLoadRecorder(view)
    snap = Snapshotter(rec, buffers=2, first_step=1)
    cuts = {0: torch.zeros_like(rec.counters)}  # step -> counters at the capture, stream-ordered
    version = 0
    deltas: list[LoadDelta] = []
    stop = threading.Event()

    def agent() -> None:
        while not stop.is_set():
            deltas.extend(snap.collect())
            time.sleep(0.0005)

    thread = threading.Thread(target=agent)
    thread.start()
    try:
        for step in range(1, 41):
            for layer in range(layers):
                rec.map_and_record(layer, random_topk(4096, experts, 8, torch.int64, seed=step))
            if step in (13, 27):
                version += 1
                cuts[step] = rec.counters.clone()
                snap.switch_(step, maps[version], version)
            elif step % 4 == 0:
                cuts[step] = rec.counters.clone()
                snap.capture(step)
            # more counting enqueued right behind the capture: must not leak into it
            for _ in range(3):
                rec.map_and_record(0, random_topk(2048, experts, 8, torch.int32, seed=step))
        cuts[41] = rec.counters.clone()
        snap.capture(41)
        torch.cuda.synchronize()
        time.sleep(0.01)
    finally:
        stop.set()
        thread.join()
    deltas += _drain(snap, 1 if snap.pending else 0, timeout=2.0)
    begin, prev = 1, 0
    for d in deltas:
        assert d.step_begin == begin
        want = (cuts[d.step_end] - cuts[prev]).cpu().numpy()
        np.testing.assert_array_equal(d.counts, want)  # exact cut
        assert d.version == (0 if d.step_end <= 13 else 1 if d.step_end <= 27 else 2)
        begin, prev = d.step_end + 1, d.step_end
    assert begin == 42
