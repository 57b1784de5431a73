"""Deterministic transfer planning: what every rank sends, receives and copies to go from one
placement to the next (DESIGN.md invariant 6).

Every rank calls :func:`plan_transfers` with the same ``(old phy2log, new phy2log, R, N)`` and
gets the same :class:`TransferPlan`: the function is pure (numpy only, no rank input, no hash or
set iteration order), so sender and receiver agree on every transfer without talking. Its
:attr:`TransferPlan.digest` lets ranks check that in-band (:mod:`worker_agent.migration` does).

Per layer, for each rank ``r`` and each of its slots ``s`` (rank ``r`` owns ``[r*S, (r+1)*S)``):

- ``new[s] == old[s]``: unchanged, nothing moves;
- the new expert ``e`` is held by ``r`` in the old map (any of its slots): a :class:`LocalCopy`
  inside the rank;
- otherwise ``e`` arrives over the network once per (rank, expert) — a :class:`Transfer` whose
  ``dst_slots`` lists every new slot of ``r`` that gets ``e`` — from a rank holding ``e`` in the
  old map.

Sender choice (greedy, deterministic): candidates are the ranks holding ``e`` in the old map;
the key is ``(other node, sends so far in this layer, ring distance (src - dst) mod R, src)``:
same node first (NVLink before the network), then the least-loaded sender, then the nearest rank
after the receiver on the ring (spreads ties over senders), then the lowest rank. Receives are
assigned most-constrained first (fewest candidate senders), round-robin over receiving ranks.

Shapes: ``phy2log [L, P]`` integer (numpy, torch or nested lists), ``P = R * S``,
``R = N * ranks_per_node``. Slot and rank numbers in the plan are global (``0..P-1``, ``0..R-1``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "LayerTransfers",
    "LocalCopy",
    "Transfer",
    "TransferPlan",
    "plan_layer",
    "plan_transfers",
]

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Transfer:
    """One expert sent over the network from one rank to another (within one layer).

    Attributes:
        expert: logical expert id.
        src_rank: the sender; it holds ``expert`` in the old map.
        src_slot: the sender's (global) slot holding ``expert`` in the old map (its lowest).
        dst_rank: the receiver; it does not hold ``expert`` in the old map.
        dst_slots: the receiver's (global) slots that hold ``expert`` in the new map and changed,
            ascending; the expert is received once and written into each of them.
        cross_node: sender and receiver are on different nodes.
    """

    expert: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slots: tuple[int, ...]
    cross_node: bool


@dataclass(frozen=True)
class LocalCopy:
    """An expert the rank already holds, copied into other slots of the same rank.

    Attributes:
        expert: logical expert id.
        rank: the rank.
        src_slot: a (global) slot of ``rank`` holding ``expert`` in the old map; an unchanged one
            when there is one, else the lowest.
        dst_slots: (global) slots of ``rank`` that get ``expert`` in the new map, ascending.
        staged: ``src_slot`` itself is overwritten in this layer, so its contents must be staged
            (copied aside) before any slot of the layer is written.
    """

    expert: int
    rank: int
    src_slot: int
    dst_slots: tuple[int, ...]
    staged: bool


@dataclass(frozen=True)
class LayerTransfers:
    """Everything that moves in one layer; the same on every rank.

    Attributes:
        layer: the MoE layer index.
        num_ranks: ``R``.
        num_nodes: ``N``.
        slots_per_rank: ``S``.
        transfers: network transfers ordered by ``(dst_rank, dst_slots[0])``. A pair of ranks
            posts its sends and receives in this order, which is how they match.
        local_copies: ordered by ``(rank, dst_slots[0])``.
        changed_slots: global slots whose expert changes, ascending.
    """

    layer: int
    num_ranks: int
    num_nodes: int
    slots_per_rank: int
    transfers: tuple[Transfer, ...]
    local_copies: tuple[LocalCopy, ...]
    changed_slots: tuple[int, ...]

    @property
    def empty(self) -> bool:
        """Nothing changes in this layer."""
        return not self.changed_slots

    def sends(self, rank: int) -> tuple[Transfer, ...]:
        """Transfers ``rank`` sends, in plan order."""
        return tuple(t for t in self.transfers if t.src_rank == rank)

    def receives(self, rank: int) -> tuple[Transfer, ...]:
        """Transfers ``rank`` receives, in plan order."""
        return tuple(t for t in self.transfers if t.dst_rank == rank)

    def copies(self, rank: int) -> tuple[LocalCopy, ...]:
        """Local copies inside ``rank``, in plan order."""
        return tuple(c for c in self.local_copies if c.rank == rank)

    def changed_on(self, rank: int) -> tuple[int, ...]:
        """Global slots of ``rank`` whose expert changes."""
        lo, hi = rank * self.slots_per_rank, (rank + 1) * self.slots_per_rank
        return tuple(s for s in self.changed_slots if lo <= s < hi)

    @property
    def cross_node_transfers(self) -> int:
        return sum(1 for t in self.transfers if t.cross_node)

    @cached_property
    def digest(self) -> int:
        """A 62-bit fingerprint of this layer's lists (stable across processes and machines)."""
        return _digest(self.canonical())

    def canonical(self) -> tuple[Any, ...]:
        """A plain-tuple form of the layer (what :attr:`TransferPlan.digest` hashes)."""
        return (
            self.layer,
            self.num_ranks,
            self.num_nodes,
            self.slots_per_rank,
            tuple(
                (t.expert, t.src_rank, t.src_slot, t.dst_rank, t.dst_slots, t.cross_node)
                for t in self.transfers
            ),
            tuple(
                (c.expert, c.rank, c.src_slot, c.dst_slots, c.staged) for c in self.local_copies
            ),
            self.changed_slots,
        )


@dataclass(frozen=True)
class TransferPlan:
    """Per-layer transfer lists for one placement change; identical on every rank.

    Attributes:
        layers: one :class:`LayerTransfers` per layer, index ``l`` for layer ``l``.
        num_ranks, num_nodes, slots_per_rank: the topology it was planned for.
    """

    layers: tuple[LayerTransfers, ...]
    num_ranks: int
    num_nodes: int
    slots_per_rank: int

    def __getitem__(self, layer: int) -> LayerTransfers:
        return self.layers[layer]

    def __iter__(self) -> Iterator[LayerTransfers]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def changed_layers(self) -> tuple[int, ...]:
        """Layers where at least one slot changes."""
        return tuple(lt.layer for lt in self.layers if not lt.empty)

    @property
    def num_transfers(self) -> int:
        return sum(len(lt.transfers) for lt in self.layers)

    @property
    def num_cross_node_transfers(self) -> int:
        return sum(lt.cross_node_transfers for lt in self.layers)

    @property
    def num_local_copies(self) -> int:
        return sum(len(lt.local_copies) for lt in self.layers)

    @property
    def num_changed_slots(self) -> int:
        return sum(len(lt.changed_slots) for lt in self.layers)

    def bytes_moved(self, expert_bytes: int) -> int:
        """Network bytes over all ranks when one expert's weights are ``expert_bytes``."""
        return self.num_transfers * int(expert_bytes)

    @property
    def digest(self) -> int:
        """A 62-bit fingerprint of the whole plan (stable across processes and machines)."""
        return _digest(
            (self.num_ranks, self.num_nodes, self.slots_per_rank,
             tuple(lt.canonical() for lt in self.layers))
        )


def _digest(value: tuple[Any, ...]) -> int:
    """62 bits of SHA-256 over ``repr`` of plain ints/bools/tuples (deterministic everywhere);
    small enough that ``-digest`` fits an int64 all-reduce."""
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:8], "big") >> 2


def _as_map(value: Any, name: str, ndim: int = 2) -> IntArray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected integers, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        want = "[L, P]" if ndim == 2 else "[P]"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(arr.shape)}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _check_topology(num_slots: int, num_ranks: int, num_nodes: int) -> int:
    if num_ranks < 1 or num_nodes < 1:
        raise ValueError(f"num_ranks ({num_ranks}) and num_nodes ({num_nodes}) must be >= 1")
    if num_slots % num_ranks:
        raise ValueError(f"{num_slots} slots do not divide over {num_ranks} ranks")
    if num_ranks % num_nodes:
        raise ValueError(f"{num_ranks} ranks do not divide over {num_nodes} nodes")
    return num_slots // num_ranks


def plan_layer(
    layer: int, old: Any, new: Any, num_ranks: int, num_nodes: int = 1
) -> LayerTransfers:
    """Transfers for one layer: ``old`` and ``new`` are ``[P]`` rows of ``phy2log``.

    Raises ``ValueError`` on mismatched shapes, a bad topology, negative expert ids, or a new
    expert that no rank holds in the old map (impossible between valid placements).
    """
    old_row = _as_map(old, "old", ndim=1)
    new_row = _as_map(new, "new", ndim=1)
    if old_row.shape != new_row.shape:
        raise ValueError(f"old has {old_row.shape[0]} slots, new has {new_row.shape[0]}")
    slots = _check_topology(int(old_row.shape[0]), num_ranks, num_nodes)
    return _plan_row(layer, old_row, new_row, num_ranks, num_nodes, slots)


def plan_transfers(old: Any, new: Any, num_ranks: int, num_nodes: int = 1) -> TransferPlan:
    """Per-layer transfer lists turning ``old [L, P]`` into ``new [L, P]``.

    Args:
        old: the placement the ranks hold now (``phy2log``).
        new: the placement to reach.
        num_ranks: ``R``; rank ``r`` owns slots ``[r*S, (r+1)*S)``.
        num_nodes: ``N``; node ``n`` owns ranks ``[n*R/N, (n+1)*R/N)``.

    Returns the same :class:`TransferPlan` on every rank (a pure function of its arguments).
    Applying it — unchanged slots kept, local copies and transfers written into their
    ``dst_slots`` — leaves every rank's slots holding the new map's experts.
    """
    old_map = _as_map(old, "old")
    new_map = _as_map(new, "new")
    if old_map.shape != new_map.shape:
        raise ValueError(f"old is {tuple(old_map.shape)}, new is {tuple(new_map.shape)}")
    slots = _check_topology(int(old_map.shape[1]), num_ranks, num_nodes)
    layers = tuple(
        _plan_row(layer, old_map[layer], new_map[layer], num_ranks, num_nodes, slots)
        for layer in range(old_map.shape[0])
    )
    return TransferPlan(layers, num_ranks, num_nodes, slots)


def _plan_row(
    layer: int, old: IntArray, new: IntArray, num_ranks: int, num_nodes: int, slots: int
) -> LayerTransfers:
    if old.size and (old.min() < 0 or new.min() < 0):
        raise ValueError(f"layer {layer}: negative expert id")
    ranks_per_node = num_ranks // num_nodes
    changed = np.flatnonzero(old != new)
    # holders[e]: ranks holding e in the old map, ascending; first_slot[(r, e)]: r's lowest slot.
    holders: dict[int, list[int]] = {}
    old_slots: dict[tuple[int, int], list[int]] = {}
    for slot in range(old.shape[0]):
        e, r = int(old[slot]), slot // slots
        old_slots.setdefault((r, e), []).append(slot)
        rank_list = holders.setdefault(e, [])
        if not rank_list or rank_list[-1] != r:
            rank_list.append(r)
    changed_set = {int(s) for s in changed}

    copies: list[LocalCopy] = []
    # needs[r]: (expert, dst_slots) arrivals of rank r, ordered by first destination slot.
    needs: list[list[tuple[int, tuple[int, ...]]]] = [[] for _ in range(num_ranks)]
    for r in range(num_ranks):
        by_expert: dict[int, list[int]] = {}
        for slot in changed[(changed >= r * slots) & (changed < (r + 1) * slots)]:
            by_expert.setdefault(int(new[slot]), []).append(int(slot))
        for e, dst_list in sorted(by_expert.items(), key=lambda item: item[1][0]):
            dsts = tuple(dst_list)
            held = old_slots.get((r, e))
            if held:
                keep = [s for s in held if s not in changed_set]
                src = keep[0] if keep else held[0]
                copies.append(LocalCopy(e, r, src, dsts, staged=not keep))
            else:
                if e not in holders:
                    raise ValueError(
                        f"layer {layer}: expert {e} is needed on rank {r} but no rank holds it "
                        "in the old map"
                    )
                needs[r].append((e, dsts))

    # Most constrained first, then round-robin over receivers (k-th need of every rank).
    order = sorted(
        ((len(holders[e]), k, r) for r in range(num_ranks) for k, (e, _) in enumerate(needs[r])),
    )
    load = [0] * num_ranks
    transfers: list[Transfer] = []
    for _, k, r in order:
        e, dsts = needs[r][k]
        node = r // ranks_per_node
        src = min(
            holders[e],
            key=lambda c: (c // ranks_per_node != node, load[c], (c - r) % num_ranks, c),
        )
        load[src] += 1
        transfers.append(
            Transfer(e, src, old_slots[(src, e)][0], r, dsts, src // ranks_per_node != node)
        )
    transfers.sort(key=lambda t: (t.dst_rank, t.dst_slots[0]))
    return LayerTransfers(
        layer=layer,
        num_ranks=num_ranks,
        num_nodes=num_nodes,
        slots_per_rank=slots,
        transfers=tuple(transfers),
        local_copies=tuple(copies),
        changed_slots=tuple(int(s) for s in changed),
    )
