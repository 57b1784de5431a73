"""Transfer planning (worker_agent.transfers): complete, consistent, deterministic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_service.migration import summarize_migration
from eplb_service.placement import Placement, Topology
from worker_agent.transfers import LayerTransfers, TransferPlan, plan_layer, plan_transfers

ROOT = Path(__file__).resolve().parent.parent
Case = tuple[np.ndarray, np.ndarray, int, int, int]


@st.composite
def placements(draw: st.DrawFn) -> Case:
    """(old [L, P], new [L, P], R, N, E): two random valid placements of one topology."""
    nodes = draw(st.integers(1, 3))
    ranks = nodes * draw(st.integers(1, 3))
    slots = draw(st.integers(1, 4))
    num_slots = ranks * slots
    experts = draw(st.integers(1, num_slots))
    layers = draw(st.integers(1, 3))

    def one() -> np.ndarray:
        rows = []
        for _ in range(layers):
            extra = draw(st.lists(st.integers(0, experts - 1), min_size=num_slots - experts,
                                  max_size=num_slots - experts))
            rows.append(draw(st.permutations(list(range(experts)) + extra)))
        return np.array(rows, dtype=np.int64).reshape(layers, num_slots)

    return one(), one(), ranks, nodes, experts


def apply_layer(old_row: np.ndarray, lt: LayerTransfers) -> np.ndarray:
    """Simulate a layer's migration on slot contents; checks every rule on the way."""
    s, rpn = lt.slots_per_rank, lt.num_ranks // lt.num_nodes
    changed = set(lt.changed_slots)
    content = old_row.copy()
    written: list[int] = []
    for t in lt.transfers:
        assert t.src_slot // s == t.src_rank and old_row[t.src_slot] == t.expert
        assert t.src_rank != t.dst_rank
        assert t.expert not in old_row[t.dst_rank * s:(t.dst_rank + 1) * s]
        assert t.cross_node == (t.src_rank // rpn != t.dst_rank // rpn)
        assert list(t.dst_slots) == sorted(t.dst_slots) and t.dst_slots
        for d in t.dst_slots:
            assert d // s == t.dst_rank
            content[d] = t.expert
            written.append(d)
    for c in lt.local_copies:
        assert c.src_slot // s == c.rank and old_row[c.src_slot] == c.expert
        assert c.staged == (c.src_slot in changed)
        for d in c.dst_slots:
            assert d // s == c.rank
            content[d] = c.expert  # from the old contents (staged or unchanged source)
            written.append(d)
    assert sorted(written) == sorted(changed), "every changed slot written exactly once"
    return content


@settings(max_examples=150, deadline=None)
@given(placements())
def test_plan_is_complete_and_consistent(case: Case) -> None:
    old, new, ranks, nodes, _ = case
    plan = plan_transfers(old, new, ranks, nodes)
    assert len(plan) == old.shape[0]
    for layer, lt in enumerate(plan):
        assert lt.layer == layer
        assert lt.changed_slots == tuple(np.flatnonzero(old[layer] != new[layer]).tolist())
        np.testing.assert_array_equal(apply_layer(old[layer], lt), new[layer])
        s, rpn = lt.slots_per_rank, ranks // nodes
        # A rank receives an expert at most once.
        arrivals = [(t.dst_rank, t.expert) for t in lt.transfers]
        assert len(arrivals) == len(set(arrivals))
        # Same node first: a cross-node transfer only when no rank of the node held the expert.
        for t in lt.transfers:
            node = t.dst_rank // rpn
            node_old = old[layer][node * rpn * s:(node + 1) * rpn * s]
            assert t.cross_node == (t.expert not in node_old)
        # Per-rank views partition the lists.
        assert sum(len(lt.sends(r)) for r in range(ranks)) == len(lt.transfers)
        assert sum(len(lt.receives(r)) for r in range(ranks)) == len(lt.transfers)
        assert sum(len(lt.copies(r)) for r in range(ranks)) == len(lt.local_copies)
        assert sum(len(lt.changed_on(r)) for r in range(ranks)) == len(lt.changed_slots)
        # Same answer for the layer alone.
        assert plan_layer(layer, old[layer], new[layer], ranks, nodes) == lt


@settings(max_examples=60, deadline=None)
@given(placements())
def test_counts_match_the_service_summary(case: Case) -> None:
    old, new, ranks, nodes, experts = case
    plan = plan_transfers(old, new, ranks, nodes)
    topo = Topology(old.shape[0], experts, old.shape[1], ranks, nodes)
    summary = summarize_migration(Placement(old, topo), Placement(new, topo))
    assert plan.num_transfers == summary.transfers
    assert plan.num_cross_node_transfers == summary.cross_node_transfers
    assert sum(len(c.dst_slots) for lt in plan for c in lt.local_copies) == summary.local_copies
    assert plan.num_changed_slots == summary.slots_changed


@settings(max_examples=60, deadline=None)
@given(placements())
def test_same_plan_from_any_input_type(case: Case) -> None:
    old, new, ranks, nodes, _ = case
    a = plan_transfers(old, new, ranks, nodes)
    b = plan_transfers(torch.from_numpy(old), torch.from_numpy(new).to(torch.int32), ranks, nodes)
    c = plan_transfers(old.tolist(), new.astype(np.int32).tolist(), ranks, nodes)
    assert a == b == c
    assert a.digest == b.digest == c.digest
    assert [lt.digest for lt in a] == [lt.digest for lt in c]


def test_unchanged_plan_is_empty() -> None:
    old = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    plan = plan_transfers(old, old, 2)
    assert plan.changed_layers == ()
    assert plan.num_transfers == plan.num_local_copies == plan.num_changed_slots == 0
    assert all(lt.empty for lt in plan)


def test_hand_example_prefers_same_node_and_receives_once() -> None:
    # 4 ranks x 2 slots, 2 nodes: ranks 0-1 on node 0, ranks 2-3 on node 1.
    old = [[0, 1, 2, 3, 0, 2, 2, 3]]
    new = [[1, 0, 2, 2, 3, 1, 1, 0]]
    lt = plan_transfers(old, new, 4, 2)[0]
    got = [(t.expert, t.src_rank, t.dst_rank, t.dst_slots, t.cross_node) for t in lt.transfers]
    assert got == [
        (3, 3, 2, (4,), False),  # rank 3 (same node) holds 3
        (1, 0, 2, (5,), True),  # only rank 0 holds 1
        (1, 0, 3, (6,), True),
        (0, 2, 3, (7,), False),  # rank 2 (same node) holds 0, rank 0 too: same node wins
    ]
    copies = [(c.expert, c.rank, c.src_slot, c.dst_slots, c.staged) for c in lt.local_copies]
    assert copies == [
        (1, 0, 1, (0,), True),  # slots 0 and 1 swap: both sources overwritten -> staged
        (0, 0, 0, (1,), True),
        (2, 1, 2, (3,), False),  # slot 2 keeps expert 2: read directly
    ]
    # A rank needing one expert in two slots receives it once.
    lt2 = plan_transfers([[0, 1, 2, 2]], [[2, 2, 0, 1]], 2)[0]
    (arrival,) = [t for t in lt2.transfers if t.dst_rank == 0]
    assert arrival.expert == 2 and arrival.dst_slots == (0, 1)


def test_senders_are_spread() -> None:
    # Expert 0 on ranks 0 and 1; ranks 2..5 each need it: two sends each, not four from rank 0.
    old = [[0, 1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    new = [[0, 1, 0, 2, 0, 4, 0, 6, 0, 8, 0, 10]]
    lt = plan_transfers(old, new, 6)[0]
    senders = sorted(t.src_rank for t in lt.transfers)
    assert senders == [0, 0, 1, 1]
    # Everything held once, needed everywhere: loads differ by at most one.
    old = np.arange(8)[None, :]
    new = np.roll(np.arange(8), 3)[None, :]
    lt = plan_transfers(old, new, 8)[0]
    loads = np.bincount([t.src_rank for t in lt.transfers], minlength=8)
    assert loads.max() - loads.min() <= 1


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="divide"):
        plan_transfers([[0, 1, 2]], [[0, 1, 2]], 2)
    with pytest.raises(ValueError, match="divide over"):
        plan_transfers([[0, 1, 2, 3]], [[0, 1, 2, 3]], 2, 3)
    with pytest.raises(ValueError, match="shape"):
        plan_transfers([0, 1], [0, 1], 1)
    with pytest.raises(ValueError, match="no rank holds"):
        plan_transfers([[0, 0, 1, 1]], [[0, 2, 1, 1]], 2)
    with pytest.raises(ValueError, match="integers"):
        plan_transfers(np.zeros((1, 2)), np.zeros((1, 2)), 1)
    with pytest.raises(ValueError, match="old is"):
        plan_transfers([[0, 1]], [[0, 1], [1, 0]], 1)


_DIGEST_SCRIPT = """
import json, sys
import numpy as np
from worker_agent.transfers import plan_transfers
cases = json.loads(sys.stdin.read())
print(json.dumps([plan_transfers(np.array(o), np.array(n), r, k).digest for o, n, r, k in cases]))
"""


def _random_map(rng: np.random.Generator, layers: int, slots: int, experts: int) -> list[list[int]]:
    rows = []
    for _ in range(layers):
        row = np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)])
        rows.append(rng.permutation(row).tolist())
    return rows


def _random_cases(seed: int, count: int) -> list[tuple[list[list[int]], list[list[int]], int, int]]:
    rng = np.random.default_rng(seed)
    # 8 ranks x 5 slots on 2 nodes, 32 experts, 4 layers.
    return [(_random_map(rng, 4, 40, 32), _random_map(rng, 4, 40, 32), 8, 2)
            for _ in range(count)]


def test_identical_in_other_processes() -> None:
    """What each rank computes in its own process (other hash seed) is the same plan."""
    cases = _random_cases(7, 20)
    here = [plan_transfers(np.array(o), np.array(n), r, k).digest for o, n, r, k in cases]
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", _DIGEST_SCRIPT], input=json.dumps(cases), text=True,
            capture_output=True, cwd=ROOT, env=env, timeout=60, check=True,
        )
        assert json.loads(out.stdout) == here


def test_plan_properties() -> None:
    plan: TransferPlan = plan_transfers([[0, 1, 2, 3], [0, 1, 2, 3]], [[2, 0, 1, 3],
                                                                        [0, 1, 2, 3]], 2)
    assert plan.changed_layers == (0,)
    assert plan.num_transfers == 2  # 2 -> rank 0, 1 -> rank 1
    assert plan.num_local_copies == 1  # expert 0 from slot 0 (overwritten: staged) to slot 1
    assert plan[0].local_copies[0].staged
    assert plan.num_changed_slots == 3
    assert plan.bytes_moved(10) == 20
