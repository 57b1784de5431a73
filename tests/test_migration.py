"""Migration between placements: hand-counted local / intra-node / cross-node moves."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_service.migration import summarize_migration
from eplb_service.placement import Placement, PlacementError, Topology
from tests.helpers import placements_of

# 4 ranks of 2 slots on 2 nodes: ranks 0-1 on node 0, ranks 2-3 on node 1.
TOPO = Topology(num_layers=1, num_experts=4, num_slots=8, num_ranks=4, num_nodes=2)
#            rank 0   rank 1   rank 2   rank 3
OLD = np.array([[0, 1, 2, 3, 0, 2, 2, 3]])
NEW = np.array([[1, 0, 2, 2, 3, 1, 1, 0]])


def test_counts_by_hand() -> None:
    # slot 0: 0->1 and slot 1: 1->0, rank 0 held both         -> 2 local copies
    # slot 2: unchanged; slot 3: 3->2, rank 1 held 2           -> 1 local copy
    # slot 4: 0->3 on rank 2; rank 3 (same node) held 3        -> intra-node arrival
    # slot 5: 2->1 on rank 2; only rank 0 (node 0) held 1      -> cross-node arrival
    # slot 6: 2->1 on rank 3; likewise                         -> cross-node arrival
    # slot 7: 3->0 on rank 3; rank 2 (same node) held 0        -> intra-node arrival
    m = summarize_migration(Placement(OLD, TOPO), Placement(NEW, TOPO), expert_bytes=100)
    assert m.slots_total == 8
    assert m.slots_changed == 7
    assert m.fraction_changed == pytest.approx(7 / 8)
    assert m.local_copies == 3
    assert m.intra_node_transfers == 2
    assert m.cross_node_transfers == 2
    assert m.transfers == 4
    assert m.bytes_moved == 400
    assert m.cross_node_bytes == 200
    doc = m.to_dict()
    assert doc["fraction_changed"] == pytest.approx(7 / 8)
    assert doc["transfers"] == 4
    assert doc["local_copies"] == 3


def test_no_bytes_without_expert_size() -> None:
    m = summarize_migration(Placement(OLD, TOPO), Placement(NEW, TOPO))
    assert m.bytes_moved is None and m.cross_node_bytes is None
    assert m.to_dict()["bytes_moved"] is None


def test_an_expert_arrives_once_per_rank() -> None:
    # Rank 0 needs expert 2 in both of its slots: one transfer, then a copy inside the GPU.
    t = Topology(num_layers=1, num_experts=3, num_slots=4, num_ranks=2, num_nodes=1)
    old = Placement(np.array([[0, 1, 2, 2]]), t)
    new = Placement(np.array([[2, 2, 0, 1]]), t)
    m = summarize_migration(old, new, expert_bytes=1)
    assert m.slots_changed == 4
    assert m.local_copies == 0
    assert (m.intra_node_transfers, m.cross_node_transfers) == (3, 0)
    assert m.bytes_moved == 3


def test_counts_sum_over_layers() -> None:
    t = Topology(num_layers=2, num_experts=4, num_slots=8, num_ranks=4, num_nodes=2)
    old = Placement(np.stack([OLD[0], OLD[0]]), t)
    new = Placement(np.stack([NEW[0], OLD[0]]), t)
    m = summarize_migration(old, new)
    assert (m.slots_total, m.slots_changed, m.local_copies) == (16, 7, 3)
    assert (m.intra_node_transfers, m.cross_node_transfers) == (2, 2)


def test_one_node_has_no_cross_node_moves() -> None:
    t = Topology(num_layers=1, num_experts=4, num_slots=8, num_ranks=4, num_nodes=1)
    m = summarize_migration(Placement(OLD, t), Placement(NEW, t))
    assert (m.intra_node_transfers, m.cross_node_transfers) == (4, 0)


def test_errors() -> None:
    other = Topology(num_layers=1, num_experts=4, num_slots=8, num_ranks=4, num_nodes=1)
    with pytest.raises(PlacementError, match="different topologies"):
        summarize_migration(Placement(OLD, TOPO), Placement(OLD, other))
    with pytest.raises(ValueError, match="expert_bytes must be >= 0"):
        summarize_migration(Placement(OLD, TOPO), Placement(NEW, TOPO), expert_bytes=-1)


@st.composite
def placement_pairs(draw: st.DrawFn) -> tuple[Placement, Placement]:
    num_layers = draw(st.integers(1, 3))
    num_experts = draw(st.integers(1, 8))
    num_nodes = draw(st.integers(1, 3))
    num_ranks = num_nodes * draw(st.integers(1, 2))
    per_rank = -(-num_experts // num_ranks) + draw(st.integers(0, 2))
    num_slots = num_ranks * per_rank
    t = Topology(num_layers, num_experts, num_slots, num_ranks, num_nodes)
    return draw(placements_of(t)), draw(placements_of(t))


@settings(max_examples=150, deadline=None)
@given(placement_pairs(), st.integers(0, 10**9))
def test_migration_properties(pair: tuple[Placement, Placement], expert_bytes: int) -> None:
    old, new = pair
    same = summarize_migration(old, old, expert_bytes)
    assert (same.slots_changed, same.local_copies, same.transfers) == (0, 0, 0)
    assert same.bytes_moved == 0 and same.fraction_changed == 0.0

    m = summarize_migration(old, new, expert_bytes)
    assert m.slots_changed == int((old.phy2log != new.phy2log).sum())
    # Every arrival fills a changed slot that is not a local copy, one slot per arrival.
    assert m.transfers <= m.slots_changed - m.local_copies
    # Arrivals are exactly the distinct (layer, rank, expert) of changed, non-local slots.
    t = old.topology
    rank = t.rank_of_slot()
    held = {
        (layer, int(rank[s]), int(old.phy2log[layer, s]))
        for layer, s in np.ndindex(*old.phy2log.shape)
    }
    changed = [
        (layer, int(rank[s]), int(new.phy2log[layer, s]))
        for layer, s in zip(*np.nonzero(old.phy2log != new.phy2log), strict=True)
    ]
    assert m.local_copies == sum(c in held for c in changed)
    assert m.transfers == len({c for c in changed if c not in held})
    assert (m.slots_changed == 0) == (old == new)
    if old.topology.num_nodes == 1:
        assert m.cross_node_transfers == 0
    assert m.bytes_moved == m.transfers * expert_bytes
    assert m.cross_node_bytes == m.cross_node_transfers * expert_bytes
