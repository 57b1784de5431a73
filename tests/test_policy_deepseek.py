"""The vectorized DeepSeek EPLB policy: exact against the loop-based baseline; valid maps."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from benchmarks import baseline_deepseek
from eplb_service import policy
from eplb_service.policy import POLICIES
from eplb_service.policy.deepseek import balanced_packing, descending_order

# The function under test: the dispatcher with the deepseek policy (the default is "default").
rebalance_experts = functools.partial(policy.rebalance_experts, policy="deepseek")

# DeepSeek's README example: 2 layers x 12 experts, 16 slots, 4 groups, 2 nodes, 8 GPUs.
README_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
# Layer 0 by hand. Group loads: g0=262, g1=330, g2=116, g3=325; packing onto 2 nodes in order
# g1, g3, g0, g2 gives node 0 = {g1, g2} (experts 3..8), node 1 = {g3, g0} (9..11, 0..2).
# Node 0 replicates e5 (165) then e4 (104); node 1 replicates e10 (183) then e1 (132).
# Node 0 replica loads in order: e5 82.5, e5 82.5, e8 73, e3 61, e4 52, e4 52, e6 39, e7 4 go to
# GPUs 0, 1, 2, 3, 3 (lightest: 61), 2 (73), 0 (82.5 tie: lower index), 1: "5 6 5 7 8 4 3 4".
# Node 1: e10 91.5, e10 91.5, e0 90, e11 86, e1 66, e1 66, e9 56, e2 40 -> "10 9 10 2 0 1 11 1".
README_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]
README_LOGCNT = [
    [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
    [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1],
]
# Replica k of expert e sits in slot README_LOG2PHY[l][e][k] (rank 0: the original copy).
README_LOG2PHY = [
    [[12], [15, 13], [11], [6], [7, 5], [0, 2], [1], [3], [4], [9], [8, 10], [14]],
    [[13], [15, 11], [8], [14], [9], [10, 12], [2, 4], [0], [6, 3], [7], [1], [5]],
]


def padded(log2phy: list[list[list[int]]], width: int) -> np.ndarray:
    """Pads the replica lists of every (layer, expert) with -1 to ``width``."""
    return np.array([[row + [-1] * (width - len(row)) for row in layer] for layer in log2phy])


def baseline(weight: np.ndarray, *sizes: int) -> tuple[np.ndarray, ...]:
    """The loop-based torch oracle, as numpy arrays."""
    out = baseline_deepseek.rebalance_experts(torch.from_numpy(weight), *sizes)
    return tuple(t.numpy() for t in out)


def assert_same(got: tuple[Any, ...], want: tuple[np.ndarray, ...]) -> None:
    for name, a, b in zip(("phy2log", "log2phy", "logcnt"), got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=name)


def assert_valid(weight: np.ndarray, placement: tuple[Any, ...], sizes: Sequence[int]) -> None:
    """Checks the invariants every placement of this policy meets."""
    num_replicas, num_groups, num_nodes, _ = sizes
    phy2log, log2phy, logcnt = placement
    num_layers, num_experts = weight.shape
    assert phy2log.shape == (num_layers, num_replicas)
    assert log2phy.shape == (num_layers, num_experts, num_replicas - num_experts + 1)
    assert logcnt.shape == (num_layers, num_experts)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == np.int64
    assert ((phy2log >= 0) & (phy2log < num_experts)).all()
    assert (logcnt >= 1).all()
    assert (logcnt.sum(axis=1) == num_replicas).all()
    for layer in range(num_layers):
        np.testing.assert_array_equal(
            np.bincount(phy2log[layer], minlength=num_experts), logcnt[layer]
        )
        for expert in range(num_experts):
            count = logcnt[layer, expert]
            slots = log2phy[layer, expert]
            assert (slots[count:] == -1).all()
            assert sorted(slots[:count]) == np.flatnonzero(phy2log[layer] == expert).tolist()
    if num_groups % num_nodes == 0:  # hierarchical: a group's replicas all on one node
        group_of_slot = phy2log // (num_experts // num_groups)
        node_of_slot = np.arange(num_replicas) // (num_replicas // num_nodes)
        for layer in range(num_layers):
            for group in range(num_groups):
                assert len(set(node_of_slot[group_of_slot[layer] == group])) == 1


def assert_greedy_replication(weight: np.ndarray, logcnt: np.ndarray) -> None:
    """Global policy: no replica could move to lower the max per-replica load (greedy optimum)."""
    load = weight.astype(np.float32)
    per_replica_max = (load / logcnt.astype(np.float32)).max(axis=1, keepdims=True)
    multi = logcnt > 1
    before_last = load / np.maximum(logcnt - 1, 1).astype(np.float32)
    assert (before_last[multi] >= np.broadcast_to(per_replica_max, load.shape)[multi]).all()


def random_load(rng: np.random.Generator, kind: str, shape: tuple[int, int]) -> np.ndarray:
    if kind == "int-small":  # many ties
        return rng.integers(0, 8, shape).astype(np.float32)
    if kind == "int-large":
        return rng.integers(0, 1_000_000, shape).astype(np.float32)
    if kind == "float":
        return (rng.random(shape) * 1000).astype(np.float32)
    return (rng.pareto(1.2, shape) * 100).astype(np.float32)  # heavy tail, like real routing


# (layers, experts, replicas, groups, nodes, gpus)
SHAPES = [
    (3, 16, 24, 4, 2, 8),  # hierarchical
    (3, 32, 40, 8, 4, 8),  # hierarchical, 5 slots per GPU
    (2, 32, 48, 8, 1, 4),  # hierarchical on one node (groups packed onto it)
    (3, 24, 32, 3, 2, 8),  # global: 3 groups do not split over 2 nodes
    (3, 24, 36, 1, 1, 6),  # global
    (2, 20, 20, 4, 2, 4),  # no redundant slot
    (2, 12, 18, 2, 2, 2),  # hierarchical, one GPU per node
    (2, 10, 15, 5, 1, 1),  # one GPU
    (2, 8, 16, 4, 4, 16),  # one slot per GPU: packing is the identity
]


@pytest.mark.parametrize("kind", ["int-small", "int-large", "float", "pareto"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_baseline(shape: tuple[int, ...], kind: str) -> None:
    num_layers, num_experts, *sizes = shape
    rng = np.random.default_rng([num_experts, *sizes, len(kind)])
    for _ in range(3):
        weight = random_load(rng, kind, (num_layers, num_experts))
        got = rebalance_experts(weight, *sizes)
        assert_same(got, baseline(weight, *sizes))
        assert_valid(weight, got, tuple(sizes))


@pytest.mark.slow
@pytest.mark.parametrize(
    "sizes", [(288, 8, 4, 32), (288, 1, 1, 32)], ids=["v3-hierarchical-ep32", "v3-global-ep32"]
)
def test_matches_baseline_deepseek_v3(sizes: tuple[int, int, int, int]) -> None:
    weight = random_load(np.random.default_rng(3), "pareto", (58, 256)).round()
    assert_same(rebalance_experts(weight, *sizes), baseline(weight, *sizes))


def test_readme_example() -> None:
    weight = np.array(README_WEIGHT)
    phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8)
    assert phy2log[0].tolist() == [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]
    np.testing.assert_array_equal(phy2log, README_PHY2LOG)
    np.testing.assert_array_equal(logcnt, README_LOGCNT)
    np.testing.assert_array_equal(log2phy, padded(README_LOG2PHY, 16 - 12 + 1))
    assert_same((phy2log, log2phy, logcnt), baseline(weight.astype(np.float32), 16, 4, 2, 8))


def test_all_equal_loads() -> None:
    weight = np.full((2, 8), 5.0, dtype=np.float32)
    phy2log, log2phy, logcnt = rebalance_experts(weight, 12, 1, 1, 4)
    # Ties go to the lower expert index: experts 0..3 get the 4 extra replicas.
    assert logcnt.tolist() == [[2, 2, 2, 2, 1, 1, 1, 1]] * 2
    # Replica loads: slots 0..3 and 8..11 carry 2.5, slots 4..7 carry 5. Stably sorted: slots
    # 4..7 go to GPUs 0..3, then slots 0..3 and 8..11 round-robin (all ties: lowest GPU).
    assert phy2log[0].tolist() == [4, 0, 0, 5, 1, 1, 6, 2, 2, 7, 3, 3]
    assert_same((phy2log, log2phy, logcnt), baseline(weight, 12, 1, 1, 4))


def test_duplicated_values() -> None:
    rng = np.random.default_rng(11)
    weight = rng.choice(np.array([3.0, 7.0, 7.0, 12.0], dtype=np.float32), size=(4, 32))
    for sizes in [(48, 8, 2, 8), (48, 1, 1, 8), (64, 4, 4, 16)]:
        assert_same(rebalance_experts(weight, *sizes), baseline(weight, *sizes))


def test_zero_load_layer() -> None:
    weight = np.zeros((2, 16), dtype=np.float32)
    weight[1] = np.arange(16)
    phy2log, log2phy, logcnt = rebalance_experts(weight, 24, 4, 2, 4)
    assert_valid(weight, (phy2log, log2phy, logcnt), (24, 4, 2, 4))
    # All loads equal: each node's extra replicas all go to its lowest (relabelled) expert.
    assert sorted(logcnt[0].tolist()) == [1] * 14 + [5, 5]
    assert_same((phy2log, log2phy, logcnt), baseline(weight, 24, 4, 2, 4))


def test_one_gpu() -> None:
    weight = random_load(np.random.default_rng(5), "pareto", (3, 12))
    phy2log, log2phy, logcnt = rebalance_experts(weight, 20, 4, 1, 1)
    assert_valid(weight, (phy2log, log2phy, logcnt), (20, 4, 1, 1))
    assert_same((phy2log, log2phy, logcnt), baseline(weight, 20, 4, 1, 1))


def test_no_redundant_slots() -> None:
    weight = random_load(np.random.default_rng(6), "float", (3, 16))
    phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 4)
    assert (logcnt == 1).all()
    assert log2phy.shape == (3, 16, 1)
    assert (np.sort(phy2log, axis=1) == np.arange(16)).all()
    np.testing.assert_array_equal(np.take_along_axis(phy2log, log2phy[:, :, 0], 1)[0], range(16))
    assert_same((phy2log, log2phy, logcnt), baseline(weight, 16, 4, 2, 4))


def test_greedy_replication_is_optimal() -> None:
    weight = random_load(np.random.default_rng(8), "pareto", (6, 64))
    _, _, logcnt = rebalance_experts(weight, 96, 1, 1, 8)
    assert_greedy_replication(weight, logcnt)


def test_numpy_in_numpy_out() -> None:
    weight = np.array(README_WEIGHT, dtype=np.int32)
    out = rebalance_experts(weight, 16, 4, 2, 8)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.int64 for a in out)
    listed = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert_same(listed, out)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.float64, torch.bfloat16])
def test_torch_in_torch_out(dtype: torch.dtype) -> None:
    weight = torch.tensor(README_WEIGHT, dtype=dtype)
    out = rebalance_experts(weight, 16, 4, 2, 8)
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.int64 for t in out)
    assert all(t.device == weight.device for t in out)
    want = rebalance_experts(np.array(README_WEIGHT), 16, 4, 2, 8)
    assert_same(tuple(t.numpy() for t in out), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_cuda_in_cuda_out() -> None:
    weight = torch.tensor(README_WEIGHT, device="cuda")
    out = rebalance_experts(weight, 16, 4, 2, 8)
    assert all(t.device == weight.device and t.dtype == torch.int64 for t in out)
    assert out[0].cpu().tolist() == README_PHY2LOG


def test_torch_not_imported() -> None:
    code = (
        "import sys, numpy as np; import eplb_service.policy as p; "
        "p.rebalance_experts(np.ones((2, 8)), 12, 2, 2, 4); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_known_policies() -> None:
    assert "deepseek" in POLICIES
    weight = np.array(README_WEIGHT)
    assert_same(
        policy.rebalance_experts(weight, 16, 4, 2, 8, policy="deepseek"),
        (np.array(README_PHY2LOG), padded(README_LOG2PHY, 5), np.array(README_LOGCNT)),
    )


GOOD = {"num_replicas": 16, "num_groups": 4, "num_nodes": 2, "num_gpus": 8}


@pytest.mark.parametrize(
    ("weight", "changes", "field"),
    [
        (np.ones(12), {}, "weight"),
        (np.ones((2, 3, 4)), {}, "weight"),
        (np.ones((0, 12)), {}, "weight"),
        (np.full((2, 12), np.nan), {}, "weight"),
        (np.full((2, 12), np.inf), {}, "weight"),
        (np.full((2, 12), 1e39), {}, "weight"),  # infinite as float32
        (-np.ones((2, 12)), {}, "weight"),
        (np.full((2, 12), 1e37, dtype=np.float32), {}, "weight"),  # layer total overflows
        ([["a"] * 12] * 2, {}, "weight"),
        (np.ones((2, 12)), {"num_replicas": 8}, "num_replicas"),
        (np.ones((2, 12)), {"num_replicas": 20}, "num_replicas"),
        (np.ones((2, 12)), {"num_groups": 5}, "num_groups"),
        (np.ones((2, 12)), {"num_gpus": 6, "num_replicas": 18, "num_nodes": 4}, "num_gpus"),
        (np.ones((2, 12)), {"num_gpus": 0}, "num_gpus"),
        (np.ones((2, 12)), {"num_nodes": -2}, "num_nodes"),
        (np.ones((2, 12)), {"num_groups": 4.0}, "num_groups"),
        (np.ones((2, 12)), {"num_nodes": True}, "num_nodes"),
    ],
)
def test_bad_input(weight: Any, changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        rebalance_experts(weight, **{**GOOD, **changes})


def test_bad_torch_input() -> None:
    with pytest.raises(ValueError, match="weight"):
        rebalance_experts(torch.tensor([[1.0, -1.0]]), 2, 1, 1, 1)


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match=r"unknown policy 'nope'.*deepseek"):
        policy.rebalance_experts(np.ones((2, 12)), **GOOD, policy="nope")


def test_unknown_option() -> None:
    with pytest.raises(TypeError):
        rebalance_experts(np.ones((2, 12)), **GOOD, migration_cost=0.5)


# ---- properties ---------------------------------------------------------------------------


@st.composite
def topologies(draw: st.DrawFn) -> tuple[int, int, int, int, int, int]:
    """(layers, experts, replicas, groups, nodes, gpus) meeting the divisibility rules."""
    num_nodes = draw(st.sampled_from([1, 2, 3, 4]))
    num_gpus = num_nodes * draw(st.integers(1, 4))
    if draw(st.booleans()):  # hierarchical
        num_groups = num_nodes * draw(st.integers(1, 3))
    else:
        num_groups = draw(st.integers(1, 6))
    num_experts = num_groups * draw(st.integers(1, 4))
    min_per_gpu = -(-num_experts // num_gpus)
    num_replicas = num_gpus * draw(st.integers(min_per_gpu, min_per_gpu + 3))
    num_layers = draw(st.integers(1, 3))
    return num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus


@settings(max_examples=80, deadline=None)
@given(topo=topologies(), data=st.data())
def test_property_integer_loads_match_baseline(
    topo: tuple[int, int, int, int, int, int], data: st.DataObject
) -> None:
    num_layers, num_experts, *sizes = topo
    weight = data.draw(
        hnp.arrays(np.float32, (num_layers, num_experts), elements=st.integers(0, 6))
    )
    got = rebalance_experts(weight, *sizes)
    assert_valid(weight, got, tuple(sizes))
    assert_same(got, baseline(weight, *sizes))


@settings(max_examples=80, deadline=None)
@given(topo=topologies(), data=st.data())
def test_property_float_loads_valid(
    topo: tuple[int, int, int, int, int, int], data: st.DataObject
) -> None:
    num_layers, num_experts, *sizes = topo
    elements = st.floats(0, 1e9, width=32, allow_subnormal=False)
    weight = data.draw(hnp.arrays(np.float32, (num_layers, num_experts), elements=elements))
    got = rebalance_experts(weight, *sizes)
    assert_valid(weight, got, tuple(sizes))
    if sizes[2] == 1 or sizes[1] % sizes[2]:  # one node or global: replication is global
        assert_greedy_replication(weight, got[2])


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    num_rows=st.integers(1, 4),
    num_packs=st.integers(1, 6),
    per_pack=st.integers(1, 5),
)
def test_property_packing(
    data: st.DataObject, num_rows: int, num_packs: int, per_pack: int
) -> None:
    shape = (num_rows, num_packs * per_pack)
    weight = data.draw(hnp.arrays(np.float32, shape, elements=st.integers(0, 9)))
    pack_index, rank_in_pack = balanced_packing(weight, num_packs)
    for row in range(num_rows):  # every pack gets exactly n/m items, ranked 0..n/m-1
        assert (np.bincount(pack_index[row], minlength=num_packs) == per_pack).all()
        for pack in range(num_packs):
            assert sorted(rank_in_pack[row, pack_index[row] == pack]) == list(range(per_pack))
    want = baseline_deepseek.balanced_packing(torch.from_numpy(weight), num_packs)
    np.testing.assert_array_equal(pack_index, want[0].numpy())
    np.testing.assert_array_equal(rank_in_pack, want[1].numpy())


@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, max_side=40),
        elements=st.floats(0, float(np.finfo(np.float32).max), width=32),
    )
)
def test_property_descending_order_is_stable_argsort(weight: np.ndarray) -> None:
    want = np.argsort(-weight, axis=1, kind="stable")
    np.testing.assert_array_equal(descending_order(weight), want)


def test_descending_order_zeros_and_ties() -> None:
    weight = np.array([[0.0, -0.0, 2.0, 0.0, 2.0, 1.0]], dtype=np.float32)
    assert descending_order(weight).tolist() == [[2, 4, 5, 0, 1, 3]]
