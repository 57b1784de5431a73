"""What it takes to go from one placement to another.

Weights move in place (DESIGN.md invariant 6): a rank keeps its S slot buffers and only their
contents change. Going from ``old`` to ``new``, each changed slot is filled in the cheapest way:

- local copy: the rank already holds the expert in another slot (a copy inside one GPU);
- intra-node copy: another rank of the same node held it (NVLink);
- cross-node copy: only ranks of other nodes held it (the network).

A rank that needs an expert in two new slots receives it once and copies it locally, so transfers
are counted per (layer, rank, expert) arrival, not per slot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from eplb_service.placement import Placement, PlacementError


@dataclass(frozen=True)
class MigrationSummary:
    """Counts over all layers. ``*_bytes`` are ``None`` when no expert size was given."""

    slots_total: int
    slots_changed: int
    local_copies: int  # changed slots whose expert the rank already held
    intra_node_transfers: int  # (layer, rank, expert) arrivals from a rank of the same node
    cross_node_transfers: int  # arrivals that must cross nodes
    bytes_moved: int | None  # (intra + cross) transfers x expert_bytes
    cross_node_bytes: int | None

    @property
    def fraction_changed(self) -> float:
        return self.slots_changed / self.slots_total if self.slots_total else 0.0

    @property
    def transfers(self) -> int:
        return self.intra_node_transfers + self.cross_node_transfers

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["fraction_changed"] = self.fraction_changed
        doc["transfers"] = self.transfers
        return doc


def summarize_migration(
    old: Placement, new: Placement, expert_bytes: int | None = None
) -> MigrationSummary:
    """Counts slot rewrites and weight transfers needed to turn ``old`` into ``new``.

    Args:
        old, new: placements of the same topology (``[L, P]`` each).
        expert_bytes: bytes of one expert's weights (all its tensors), for byte totals.
    """
    if old.topology != new.topology:
        raise PlacementError(
            f"cannot compare placements of different topologies: {old.topology} vs {new.topology}"
        )
    if expert_bytes is not None and expert_bytes < 0:
        raise ValueError(f"expert_bytes must be >= 0, got {expert_bytes}")
    t = new.topology
    changed = old.phy2log != new.phy2log  # [L, P]
    old_has = old.rank_experts()  # [L, R, E]
    new_has = new.rank_experts()
    arrivals = new_has & ~old_has  # [L, R, E]: must come from another rank
    # [L, N, E]: whether any rank of node n held expert e before.
    old_on_node = old_has.reshape(t.num_layers, t.num_nodes, t.ranks_per_node, -1).any(axis=2)
    held_nearby = np.repeat(old_on_node, t.ranks_per_node, axis=1)  # [L, R, E]
    cross = int((arrivals & ~held_nearby).sum())
    intra = int(arrivals.sum()) - cross

    # A changed slot is a local copy when its rank held that expert before.
    rank = t.rank_of_slot()
    layers = np.arange(t.num_layers)[:, None]
    held_before = old_has[layers, rank[None, :], new.phy2log]  # [L, P]
    local = int((changed & held_before).sum())

    moved = None if expert_bytes is None else (intra + cross) * expert_bytes
    cross_bytes = None if expert_bytes is None else cross * expert_bytes
    return MigrationSummary(
        slots_total=int(changed.size),
        slots_changed=int(changed.sum()),
        local_copies=local,
        intra_node_transfers=intra,
        cross_node_transfers=cross,
        bytes_moved=moved,
        cross_node_bytes=cross_bytes,
    )
