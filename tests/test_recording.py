"""CPU tests of worker_agent.recording: placement view, recorder fallback, snapshotter."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worker_agent.recording import ExpertLoadRecorder, LoadDelta, PlacementView, Snapshotter
from worker_agent.recording._reference import map_and_record_torch, record_counts_torch
from worker_agent.recording.placement import derive_maps


def random_placement(rng: np.random.Generator, layers: int, experts: int, slots: int) -> np.ndarray:
    """Every expert once plus ``slots - experts`` extra replicas of skewed picks, shuffled."""
    out = np.empty((layers, slots), dtype=np.int64)
    for layer in range(layers):
        weights = rng.pareto(1.5, experts) + 1e-3
        extra = rng.choice(experts, size=slots - experts, p=weights / weights.sum())
        row = np.concatenate([np.arange(experts), extra])
        out[layer] = rng.permutation(row)
    return out


def naive_map(phy2log: np.ndarray, experts: int, layer: int, topk: np.ndarray):
    """Per-(token, k) loop: replicas of e in slot order, replica (t + seed) % count, seed = sum of
    token 0's valid ids."""
    slots = phy2log.shape[1]
    phys = np.full(topk.shape, -1, dtype=np.int64)
    counts = np.zeros(slots, dtype=np.int64)
    seed = sum(int(e) for e in topk[0] if 0 <= e < experts) if len(topk) else 0
    for t in range(topk.shape[0]):
        for k in range(topk.shape[1]):
            e = int(topk[t, k])
            if not 0 <= e < experts:
                continue
            replicas = [p for p in range(slots) if phy2log[layer, p] == e]
            slot = replicas[(t + seed) % len(replicas)]
            phys[t, k] = slot
            counts[slot] += 1
    return phys, counts


def random_topk(rng, tokens: int, experts: int, top_k: int, invalid: float = 0.0) -> np.ndarray:
    rows = [rng.choice(experts, size=top_k, replace=False) for _ in range(tokens)]
    ids = np.stack(rows) if rows else np.zeros((0, top_k), dtype=np.int64)
    if invalid:
        ids[rng.random(ids.shape) < invalid] = -1
    return ids.astype(np.int64)


# ---------------------------------------------------------------- placement view


def test_view_shapes_and_maps():
    phy2log = np.array([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 3, 3]])
    view = PlacementView(phy2log, 4, version=7)
    assert (view.num_layers, view.num_experts, view.num_slots, view.version) == (2, 4, 6, 7)
    assert view.log2phy.shape == (2, 4, 3) and view.log2phy.dtype == torch.int64
    assert view.logcnt.tolist() == [[2, 2, 1, 1], [1, 1, 1, 3]]
    assert view.log2phy[0, 0].tolist() == [0, 4, -1]
    assert view.log2phy[1, 3].tolist() == [0, 4, 5]
    assert view.phy2log.tolist() == phy2log.tolist()
    assert view.device == torch.device("cpu")
    assert view.replica_table.dtype == torch.int32 and view.replica_table.shape == (2, 4, 4)
    assert view.replica_table[1, 3].tolist() == [3, 0, 4, 5]
    assert view.replica_table[0, 2].tolist() == [1, 2, -1, -1]


def test_view_from_tensor_and_derive_random():
    rng = np.random.default_rng(0)
    phy2log = random_placement(rng, 5, 16, 24)
    view = PlacementView(torch.from_numpy(phy2log).to(torch.int32), 16)
    log2phy, logcnt = derive_maps(phy2log, 16)
    for layer in range(5):
        for e in range(16):
            replicas = [p for p in range(24) if phy2log[layer, p] == e]
            assert logcnt[layer, e] == len(replicas)
            assert log2phy[layer, e].tolist() == replicas + [-1] * (9 - len(replicas))
    assert torch.equal(view.log2phy, torch.from_numpy(log2phy))


def test_update_in_place_keeps_addresses():
    rng = np.random.default_rng(1)
    view = PlacementView(random_placement(rng, 4, 8, 12), 8)
    ptrs = tuple(
        t.data_ptr() for t in (view.phy2log, view.log2phy, view.logcnt, view.replica_table)
    )
    new = random_placement(rng, 4, 8, 12)
    view.update_(new, 3)
    assert ptrs == tuple(
        t.data_ptr() for t in (view.phy2log, view.log2phy, view.logcnt, view.replica_table)
    )
    assert view.version == 3 and view.phy2log.tolist() == new.tolist()
    log2phy, logcnt = derive_maps(new, 8)
    assert torch.equal(view.log2phy, torch.from_numpy(log2phy))
    assert torch.equal(view.logcnt, torch.from_numpy(logcnt))

    # update_layers_: full-map reading and row reading, only those layers change
    newer = random_placement(rng, 4, 8, 12)
    view.update_layers_([2], newer)
    expect = new.copy()
    expect[2] = newer[2]
    assert view.phy2log.tolist() == expect.tolist() and view.version == 3
    view.update_layers_([3, 0], newer[[3, 0]], version=4)
    expect[[3, 0]] = newer[[3, 0]]
    assert view.phy2log.tolist() == expect.tolist() and view.version == 4
    assert torch.equal(view.log2phy, torch.from_numpy(derive_maps(expect, 8)[0]))
    assert ptrs == tuple(
        t.data_ptr() for t in (view.phy2log, view.log2phy, view.logcnt, view.replica_table)
    )
    assert view.host_phy2log().tolist() == expect.tolist()
    log2phy, logcnt = derive_maps(expect, 8)
    assert torch.equal(view.replica_table[..., 0].long(), torch.from_numpy(logcnt))
    assert torch.equal(view.replica_table[..., 1:].long(), torch.from_numpy(log2phy))


@pytest.mark.parametrize(
    ("phy2log", "experts", "match"),
    [
        (np.zeros((2, 3, 4), dtype=np.int64), 2, "shape"),
        (np.array([[0, 1, 2]]), 3, None),  # valid
        (np.array([[0, 1, 3]]), 3, "outside"),
        (np.array([[0, -1, 2]]), 3, "outside"),
        (np.array([[0, 0, 2]]), 3, "no replica of expert 1"),
        (np.array([[0, 1]]), 3, "cannot hold"),
        (np.array([[0.0, 1.0]]), 2, "integer"),
    ],
)
def test_view_validation(phy2log, experts, match):
    if match is None:
        PlacementView(phy2log, experts)
        return
    with pytest.raises(ValueError, match=match):
        PlacementView(phy2log, experts)


def test_update_validation_leaves_view_unchanged():
    view = PlacementView(np.array([[0, 1, 2, 0], [2, 1, 0, 1]]), 3, version=1)
    before = view.phy2log.clone()
    with pytest.raises(ValueError, match="shape"):
        view.update_(np.array([[0, 1, 2, 0]]), 2)
    with pytest.raises(ValueError, match="4 slots"):
        view.update_(np.array([[0, 1, 2], [0, 1, 2]]), 2)
    with pytest.raises(ValueError, match="layer 1 has no replica of expert 2"):
        view.update_(np.array([[0, 1, 2, 0], [0, 1, 0, 1]]), 2)
    with pytest.raises(ValueError, match="outside"):
        view.update_layers_([2], np.array([[0, 1, 2, 0]]))
    with pytest.raises(ValueError, match="duplicate"):
        view.update_layers_([1, 1], np.array([[0, 1, 2, 0], [0, 1, 2, 0]]))
    with pytest.raises(ValueError, match="layers"):
        view.update_layers_([1], np.array([[0, 1, 1, 0]]))
    assert torch.equal(view.phy2log, before) and view.version == 1 and view.updates == 0


# ---------------------------------------------------------------- recorder (torch fallback)


def _check_against_naive(rng, layers, experts, slots, tokens, top_k, dtype, invalid=0.0):
    phy2log = random_placement(rng, layers, experts, slots)
    rec = ExpertLoadRecorder(PlacementView(phy2log, experts))
    assert rec.backend == "torch"
    start = torch.from_numpy(rng.integers(0, 1000, size=(layers, slots)))
    rec.counters.copy_(start)
    layer = int(rng.integers(layers))
    topk = random_topk(rng, tokens, experts, top_k, invalid)
    phys = rec.map_and_record(layer, torch.from_numpy(topk).to(dtype))
    want_phys, want_counts = naive_map(phy2log, experts, layer, topk)
    assert phys.dtype == torch.int64 and phys.shape == (tokens, top_k)
    np.testing.assert_array_equal(phys.numpy(), want_phys)
    want = start.numpy().copy()
    want[layer] += want_counts
    np.testing.assert_array_equal(rec.counters.numpy(), want)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("top_k", [1, 2, 3, 6, 8, 9, 16])
def test_fallback_matches_naive(dtype, top_k):
    rng = np.random.default_rng(top_k * 10 + (dtype == torch.int32))
    for tokens in (0, 1, 5, 64, 257):
        experts = int(rng.integers(max(top_k, 2), 40))
        slots = experts + int(rng.integers(0, 2 * experts))
        _check_against_naive(rng, 3, experts, slots, tokens, top_k, dtype, invalid=0.05)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    experts=st.integers(1, 24),
    redundant=st.integers(0, 30),
    tokens=st.integers(0, 80),
    top_k=st.integers(1, 16),
    int32=st.booleans(),
)
def test_fallback_matches_naive_property(seed, experts, redundant, tokens, top_k, int32):
    top_k = min(top_k, experts)
    dtype = torch.int32 if int32 else torch.int64
    rng = np.random.default_rng(seed)
    _check_against_naive(rng, 2, experts, experts + redundant, tokens, top_k, dtype, invalid=0.1)


def test_fallback_deepseek_shape():
    rng = np.random.default_rng(5)
    _check_against_naive(rng, 2, 256, 288, 40, 8, torch.int64)


def test_out_of_range_ids_not_counted():
    view = PlacementView(np.array([[0, 1, 2, 2]]), 3)
    rec = ExpertLoadRecorder(view)
    phys = rec.map_and_record(0, torch.tensor([[-1, 3], [2, 2**40]]))
    assert phys.tolist() == [[-1, -1], [3, -1]]  # token 1, k 0: (1 + 0) % 2 -> second replica
    assert rec.counters.tolist() == [[0, 0, 0, 1]]


def test_replica_spreading_even_for_column_pinned_hot_expert():
    # Hot expert 0 with 2 replicas always in column 0 of top-8: (t*K + k) % 2 would send every
    # token to one replica; token-position modulo splits them evenly.
    experts, tokens = 16, 1001
    phy2log = np.array([[*range(experts), 0, 5, 5, 5]])
    rec = ExpertLoadRecorder(PlacementView(phy2log, experts))
    rng = np.random.default_rng(2)
    topk = np.stack(
        [
            np.concatenate([[0], rng.choice(np.arange(1, experts), 7, replace=False)])
            for _ in range(tokens)
        ]
    )
    rec.map_and_record(0, torch.from_numpy(topk))
    c = rec.counters[0]
    assert abs(int(c[0]) - int(c[16])) <= 1 and int(c[0] + c[16]) == tokens
    replicas_of_5 = [int(c[5]), int(c[17]), int(c[18]), int(c[19])]
    assert sum(replicas_of_5) == int((topk == 5).sum())
    assert max(replicas_of_5) - min(replicas_of_5) <= 0.25 * sum(replicas_of_5) / 4 + 3


@pytest.mark.parametrize("replicas", [2, 3, 4, 7])
def test_replica_spreading_even_random_routing(replicas):
    # every token routes to the hot expert (column varies), others random: max/min close to 1
    experts, top_k, tokens = 32, 8, 4000
    phy2log = np.array([[*range(experts)] + [0] * (replicas - 1)])
    rec = ExpertLoadRecorder(PlacementView(phy2log, experts))
    rng = np.random.default_rng(replicas)
    topk = np.stack(
        [
            rng.permutation(
                np.concatenate([[0], rng.choice(np.arange(1, experts), top_k - 1, replace=False)])
            )
            for _ in range(tokens)
        ]
    )
    rec.map_and_record(0, torch.from_numpy(topk))
    slots = [0, *range(experts, experts + replicas - 1)]
    loads = rec.counters[0, slots].numpy()
    assert loads.sum() == tokens
    assert loads.max() - loads.min() <= 1  # every token has it: round robin over tokens


def test_contiguous_hot_tokens_split_within_one():
    phy2log = np.array([[0, 1, 2, 0, 0]])  # expert 0 has 3 replicas
    rec = ExpertLoadRecorder(PlacementView(phy2log, 3))
    rec.map_and_record(0, torch.zeros(100, 1, dtype=torch.int32))
    loads = rec.counters[0, [0, 3, 4]]
    assert loads.tolist() == [34, 33, 33]


def test_enable_flag():
    view = PlacementView(np.array([[0, 1, 1]]), 2)
    rec = ExpertLoadRecorder(view)
    assert rec.is_enabled and int(rec.flag.item()) == 1
    rec.enabled(False)
    phys = rec.map_and_record(0, torch.tensor([[0, 1], [1, 0]]))
    assert phys.tolist() == [[0, 2], [1, 0]]  # mapping still done (seed 1: token 0 -> replica 1)
    rec.record_counts(0, torch.tensor([5, 5, 5]))
    assert rec.counters.sum().item() == 0 and not rec.is_enabled
    rec.enabled(True)
    rec.map_and_record(0, torch.tensor([[0, 1], [1, 0]]))
    assert rec.counters.tolist() == [[2, 1, 1]]


def test_record_counts():
    view = PlacementView(np.array([[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 2, 3]]), 4)
    rec = ExpertLoadRecorder(view)
    rec.record_counts(1, torch.tensor([3, 4, 0], dtype=torch.int32), slot_offset=3)
    rec.record_counts(1, torch.tensor([1, 1]), 0)
    rec.record_counts(0, torch.tensor([], dtype=torch.int64), 6)
    assert rec.counters.tolist() == [[0] * 6, [1, 1, 0, 3, 4, 0]]
    with pytest.raises(ValueError, match="outside"):
        rec.record_counts(1, torch.tensor([1, 1]), slot_offset=5)
    with pytest.raises(ValueError, match="outside"):
        rec.record_counts(1, torch.tensor([1]), slot_offset=-1)
    with pytest.raises(TypeError):
        rec.record_counts(1, torch.tensor([1.0]))
    with pytest.raises(IndexError):
        rec.record_counts(2, torch.tensor([1]))


def test_map_and_record_argument_errors():
    rec = ExpertLoadRecorder(PlacementView(np.array([[0, 1]]), 2))
    with pytest.raises(IndexError):
        rec.map_and_record(1, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="T, K"):
        rec.map_and_record(0, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="int32 or int64"):
        rec.map_and_record(0, torch.zeros(2, 2, dtype=torch.int16))
    with pytest.raises(ValueError, match="backend"):
        ExpertLoadRecorder(PlacementView(np.array([[0, 1]]), 2), backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        ExpertLoadRecorder(PlacementView(np.array([[0, 1]]), 2), backend="triton")


def test_counters_are_int64_and_do_not_wrap_at_2_31():
    view = PlacementView(np.array([[0, 1]]), 2)
    rec = ExpertLoadRecorder(view)
    assert rec.counters.dtype == torch.int64
    assert rec.counters.is_contiguous()  # the one-line-per-counter layout is for CUDA only
    snap = Snapshotter(rec)
    rec.counters[0, 0] = 2**31 - 2
    snap.capture(1)
    rec.map_and_record(0, torch.zeros(5, 1, dtype=torch.int64))
    snap.capture(2)
    first, second = snap.collect()
    assert first.counts[0, 0] == 2**31 - 2 and second.counts[0, 0] == 5
    assert rec.counters[0, 0].item() == 2**31 + 3


def test_fallback_on_strided_counters():
    """On CUDA without Triton the fallback gets the recorder's strided counters (one 128-byte line
    per counter): same counts as on contiguous ones, and the gaps are never written."""
    gen = np.random.default_rng(7)
    phy2log = np.stack(
        [gen.permutation(np.concatenate([np.arange(6), [0, 0, 3]])) for _ in range(2)]
    )
    view = PlacementView(phy2log, 6)
    flag = torch.ones(1, dtype=torch.int32)
    buf = torch.full((2, 9, 16), -7, dtype=torch.int64)
    strided, dense = buf[:, :, 0], torch.zeros(2, 9, dtype=torch.int64)
    strided.zero_()
    ids = torch.from_numpy(gen.integers(-1, 6, size=(40, 3)))
    for counters in (strided, dense):
        out = map_and_record_torch(ids, view.replica_table, counters, flag, 1)
        record_counts_torch(torch.arange(4), counters, flag, 0, 5)
    assert torch.equal(strided, dense) and int(dense[1].sum()) == int((ids >= 0).sum())
    assert out.shape == (40, 3) and bool((buf[:, :, 1:] == -7).all())


def test_non_contiguous_ids():
    rec = ExpertLoadRecorder(PlacementView(np.array([[0, 1, 2, 1]]), 3))
    ids = torch.tensor([[0, 1, 2], [2, 1, 0]]).t()  # [3, 2], non-contiguous
    phys = rec.map_and_record(0, ids)
    want, _ = naive_map(np.array([[0, 1, 2, 1]]), 3, 0, ids.numpy())
    np.testing.assert_array_equal(phys.numpy(), want)


# ---------------------------------------------------------------- custom ops / compile


def test_custom_ops_opcheck():
    from worker_agent.recording.ops import map_and_record_op, record_counts_op

    view = PlacementView(np.array([[0, 1, 2, 0], [1, 2, 0, 2]]), 3)
    counters = torch.zeros(2, 4, dtype=torch.int64)
    flag = torch.ones(1, dtype=torch.int32)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1]], dtype=torch.int32)
    torch.library.opcheck(map_and_record_op, (ids, view.replica_table, counters, flag, 1, False))
    torch.library.opcheck(record_counts_op, (torch.tensor([1, 2]), counters, flag, 0, 2, False))


def test_torch_compile_fullgraph_traces_ops():
    view = PlacementView(np.array([[0, 1, 2, 0], [1, 2, 0, 2]]), 3)
    rec = ExpertLoadRecorder(view)
    ref = ExpertLoadRecorder(PlacementView(view.phy2log, 3))

    def step(r: ExpertLoadRecorder, ids: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        out = r.map_and_record(1, ids)
        r.record_counts(0, local, 1)
        return out + 0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    ids = torch.tensor([[0, 2], [1, 0], [2, 1]])
    local = torch.tensor([4, 5], dtype=torch.int32)
    for _ in range(2):
        assert torch.equal(compiled(rec, ids, local), step(ref, ids, local))
    rec.enabled(False)
    ref.enabled(False)
    assert torch.equal(compiled(rec, ids, local), step(ref, ids, local))
    assert torch.equal(rec.counters, ref.counters)
    assert rec.counters.sum().item() == 2 * (6 + 9)


# ---------------------------------------------------------------- snapshotter


def test_first_delta_against_zero_and_steps():
    rec = ExpertLoadRecorder(PlacementView(np.array([[0, 1, 1]]), 2, version=5))
    snap = Snapshotter(rec, first_step=1)
    assert snap.collect() == []
    rec.map_and_record(0, torch.tensor([[0], [1]]))
    snap.capture(3)
    snap.capture(3)  # same step again: no-op
    with pytest.raises(ValueError):
        snap.capture(2)
    (delta,) = snap.collect()
    assert isinstance(delta, LoadDelta)
    assert (delta.version, delta.step_begin, delta.step_end) == (5, 1, 3)
    assert delta.counts.dtype == np.int64 and delta.counts.tolist() == [[1, 0, 1]]
    snap.capture(4)
    (empty,) = snap.collect()
    assert (empty.step_begin, empty.step_end) == (4, 4) and empty.counts.sum() == 0
    with pytest.raises(AttributeError):
        delta.version = 3  # type: ignore[misc]


def _simulate(rng, buffers, collect_every):
    """Engine loop with switches every 7 steps, captures every 3; returns deltas + truth."""
    layers, experts, slots = 3, 8, 12
    maps = {v: random_placement(rng, layers, experts, slots) for v in range(4)}
    view = PlacementView(maps[0], experts, version=0)
    rec = ExpertLoadRecorder(view)
    snap = Snapshotter(rec, buffers=buffers, first_step=1)
    truth = {v: np.zeros((layers, slots), dtype=np.int64) for v in maps}
    deltas: list[LoadDelta] = []
    version = 0
    for step in range(1, 29):
        for layer in range(layers):
            topk = random_topk(rng, int(rng.integers(0, 20)), experts, 2)
            rec.map_and_record(layer, torch.from_numpy(topk))
            truth[version][layer] += naive_map(maps[version], experts, layer, topk)[1]
        if step % 7 == 0 and version < 3:
            version += 1
            snap.switch_(step, maps[version], version)  # capture, then update
        elif step % 3 == 0:
            snap.capture(step)
        if step % collect_every == 0:
            deltas += snap.collect()
    snap.capture(29)
    deltas += snap.collect()
    return deltas, truth


@pytest.mark.parametrize(("buffers", "collect_every"), [(4, 1), (1, 10), (2, 100)])
def test_snapshot_attribution_at_switch(buffers, collect_every):
    deltas, truth = _simulate(np.random.default_rng(buffers), buffers, collect_every)
    got = {v: np.zeros_like(t) for v, t in truth.items()}
    expected_begin = 1
    for d in deltas:
        assert d.step_begin == expected_begin and d.step_end >= d.step_begin
        expected_begin = d.step_end + 1
        # a delta never crosses a switch (switches at steps 7, 14, 21)
        version_of = lambda s: min(3, (s - 1) // 7)  # noqa: E731
        assert version_of(d.step_begin) == version_of(d.step_end) == d.version
        assert (d.counts >= 0).all()
        got[d.version] += d.counts
    assert expected_begin == 30
    for v in truth:
        np.testing.assert_array_equal(got[v], truth[v])


def test_snapshot_pool_bounded_when_not_collected():
    rec = ExpertLoadRecorder(PlacementView(np.array([[0, 1]]), 2))
    snap = Snapshotter(rec, buffers=2)
    for step in range(1, 50):
        rec.record_counts(0, torch.tensor([1, 2]))
        snap.capture(step)
    assert snap.pending == 2
    deltas = snap.collect()
    assert [(d.step_begin, d.step_end) for d in deltas] == [(0, 1), (2, 49)]
    assert deltas[1].counts.tolist() == [[48, 96]]


def test_collect_from_another_thread():
    rec = ExpertLoadRecorder(PlacementView(np.array([[0, 1]]), 2))
    snap = Snapshotter(rec, buffers=2)
    out: list[LoadDelta] = []
    stop = threading.Event()

    def agent() -> None:
        while not stop.wait(0.0002):  # poll like the agent thread does, without hogging the GIL
            out.extend(snap.collect())
        out.extend(snap.collect())

    thread = threading.Thread(target=agent)
    thread.start()
    for step in range(200):
        rec.record_counts(0, torch.tensor([1, 0]))
        snap.capture(step)
    stop.set()
    thread.join()
    assert sum(int(d.counts[0, 0]) for d in out) == 200
    assert out[-1].step_end == 199


def test_warns_when_switch_without_capture(caplog):
    view = PlacementView(np.array([[0, 1]]), 2)
    rec = ExpertLoadRecorder(view)
    snap = Snapshotter(rec)
    snap.capture(1)
    view.update_(np.array([[1, 0]]), 1)
    view.update_(np.array([[0, 1]]), 2)
    snap.capture(2)
    with caplog.at_level("WARNING"):
        snap.collect()
    assert "without a capture" in caplog.text


def test_single_token_calls_rotate_over_replicas():
    # decode with one token per call, hot expert pinned to column 0: the per-call rotation
    # (seeded by token 0's ids) spreads it over its replicas across calls
    experts, top_k = 64, 8
    phy2log = np.array([[*range(experts), 0, 0, 0]])  # expert 0: slots 0, 64, 65, 66
    rec = ExpertLoadRecorder(PlacementView(phy2log, experts))
    rng = np.random.default_rng(9)
    for _ in range(800):
        row = np.concatenate([[0], rng.choice(np.arange(1, experts), top_k - 1, replace=False)])
        rec.map_and_record(0, torch.from_numpy(row[None, :]))
    loads = rec.counters[0, [0, 64, 65, 66]].numpy()
    assert loads.sum() == 800 and loads.min() > 150
