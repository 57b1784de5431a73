"""The placement model: which logical expert each physical slot holds.

A placement of one deployment is ``phy2log [L, P]``: for every MoE layer ``l`` and slot ``s``
the logical expert ``phy2log[l, s]`` in ``0..E-1``. Rank ``r`` owns slots ``[r*S, (r+1)*S)`` with
``S = P / R``; node ``n`` owns ranks ``[n*R/N, (n+1)*R/N)``. Everything else is derived:

- ``logcnt [L, E]``: replicas of each logical expert (>= 1 in a valid placement);
- ``log2phy [L, E, X]``: the slots of each expert in ascending slot order, -1 padded. ``X`` is
  ``P - E + 1``, the largest replica count any placement of P slots can give one expert, so the
  shape never depends on the loads (engines keep this tensor at a fixed address).

Validation raises :class:`PlacementError` (a ``ValueError``) whose message names the field and
the first offending index, so an operator can fix the map they sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


class PlacementError(ValueError):
    """A placement (or its topology) is malformed; the message says what and where."""


@dataclass(frozen=True)
class Topology:
    """Sizes of one deployment's expert-parallel group.

    ``num_slots`` P must divide evenly over ``num_ranks`` R, and R over ``num_nodes`` N.
    """

    num_layers: int
    num_experts: int
    num_slots: int
    num_ranks: int
    num_nodes: int = 1

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "num_slots", "num_ranks", "num_nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise PlacementError(f"{name} must be an integer, got {value!r}")
            if value < 1:
                raise PlacementError(f"{name} must be >= 1, got {value}")
        if self.num_slots < self.num_experts:
            raise PlacementError(
                f"num_slots ({self.num_slots}) must be >= num_experts ({self.num_experts}): "
                "every logical expert needs at least one slot"
            )
        if self.num_slots % self.num_ranks:
            raise PlacementError(
                f"num_slots ({self.num_slots}) must be divisible by num_ranks ({self.num_ranks})"
            )
        if self.num_ranks % self.num_nodes:
            raise PlacementError(
                f"num_ranks ({self.num_ranks}) must be divisible by num_nodes ({self.num_nodes})"
            )

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.num_ranks

    @property
    def ranks_per_node(self) -> int:
        return self.num_ranks // self.num_nodes

    @property
    def max_replicas(self) -> int:
        """``X = P - E + 1``: the replica-axis size of ``log2phy``."""
        return self.num_slots - self.num_experts + 1

    def rank_of_slot(self) -> IntArray:
        """``[P]``: the rank owning each slot."""
        return np.arange(self.num_slots, dtype=np.int64) // self.slots_per_rank

    def node_of_rank(self) -> IntArray:
        """``[R]``: the node hosting each rank."""
        return np.arange(self.num_ranks, dtype=np.int64) // self.ranks_per_node


def as_int_array(value: Any, name: str) -> IntArray:
    """Converts a numpy array, torch tensor or nested list to a fresh ``int64`` numpy array.

    Raises :class:`PlacementError` naming ``name`` when the values are not integers.
    """
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise PlacementError(f"{name} must be a rectangular array of integers: {exc}") from None
    if arr.dtype == object or arr.dtype.kind not in "iub":
        if arr.dtype.kind == "f" and arr.size and np.all(np.isfinite(arr)) and np.all(
            arr == np.round(arr)
        ):
            return arr.astype(np.int64)
        raise PlacementError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=True)


def validate_phy2log(phy2log: IntArray, topology: Topology) -> None:
    """Checks shape, range and that every logical expert has at least one replica.

    Args:
        phy2log: ``[L, P]`` int64.
        topology: the sizes the map must fit.

    Raises:
        PlacementError: naming the field and the first offending layer/slot/expert.
    """
    t = topology
    if phy2log.ndim != 2:
        raise PlacementError(
            f"phy2log must be 2-D [layers, slots], got {phy2log.ndim}-D shape {phy2log.shape}"
        )
    if phy2log.shape != (t.num_layers, t.num_slots):
        raise PlacementError(
            f"phy2log shape {tuple(phy2log.shape)} does not match "
            f"[layers={t.num_layers}, slots={t.num_slots}]"
        )
    bad = np.argwhere((phy2log < 0) | (phy2log >= t.num_experts))
    if bad.size:
        layer, slot = (int(i) for i in bad[0])
        raise PlacementError(
            f"phy2log[{layer}][{slot}] = {int(phy2log[layer, slot])} is out of range "
            f"0..{t.num_experts - 1}"
        )
    counts = _bincount_rows(phy2log, t.num_experts)
    missing = np.argwhere(counts == 0)
    if missing.size:
        layer, expert = (int(i) for i in missing[0])
        raise PlacementError(
            f"layer {layer}: logical expert {expert} has no replica "
            f"({len(missing)} (layer, expert) pairs have none)"
        )


def _bincount_rows(rows: IntArray, minlength: int) -> IntArray:
    """Row-wise bincount: ``[L, N]`` values in ``0..minlength-1`` -> ``[L, minlength]``."""
    num_rows = rows.shape[0]
    offset = (np.arange(num_rows, dtype=np.int64) * minlength)[:, None]
    flat = np.bincount((rows + offset).ravel(), minlength=num_rows * minlength)
    return flat.reshape(num_rows, minlength).astype(np.int64)


@dataclass(frozen=True, eq=False)
class Placement:
    """An immutable, validated expert placement.

    Attributes:
        phy2log: ``[L, P]`` int64, read-only; the logical expert held by each slot.
        topology: the deployment sizes the map was validated against.
    """

    phy2log: IntArray
    topology: Topology

    def __post_init__(self) -> None:
        arr = as_int_array(self.phy2log, "phy2log")
        validate_phy2log(arr, self.topology)
        arr.setflags(write=False)
        object.__setattr__(self, "phy2log", arr)

    @classmethod
    def from_map(
        cls, phy2log: Any, *, num_experts: int, num_ranks: int, num_nodes: int = 1
    ) -> Placement:
        """Builds a placement from any ``[L, P]`` integer array-like, deriving L and P from it."""
        arr = as_int_array(phy2log, "phy2log")
        if arr.ndim != 2:
            raise PlacementError(
                f"phy2log must be 2-D [layers, slots], got {arr.ndim}-D shape {arr.shape}"
            )
        topology = Topology(
            num_layers=int(arr.shape[0]),
            num_experts=num_experts,
            num_slots=int(arr.shape[1]),
            num_ranks=num_ranks,
            num_nodes=num_nodes,
        )
        return cls(arr, topology)

    @classmethod
    def identity(cls, topology: Topology) -> Placement:
        """The engines' initial placement: slot ``s`` holds expert ``s % E`` in every layer."""
        row = np.arange(topology.num_slots, dtype=np.int64) % topology.num_experts
        return cls(np.tile(row, (topology.num_layers, 1)), topology)

    @property
    def num_layers(self) -> int:
        return self.topology.num_layers

    @property
    def num_experts(self) -> int:
        return self.topology.num_experts

    @property
    def num_slots(self) -> int:
        return self.topology.num_slots

    @cached_property
    def logcnt(self) -> IntArray:
        """``[L, E]`` int64: replicas per logical expert (each >= 1)."""
        return _bincount_rows(self.phy2log, self.num_experts)

    @cached_property
    def log2phy(self) -> IntArray:
        """``[L, E, X]`` int64: each expert's slots in ascending order, -1 padded (X = P-E+1)."""
        num_layers, num_slots = self.phy2log.shape
        # Stable sort by expert: slots of one expert stay in ascending slot order.
        order = np.argsort(self.phy2log, axis=1, kind="stable")
        sorted_experts = np.take_along_axis(self.phy2log, order, axis=1)
        starts = np.cumsum(self.logcnt, axis=1) - self.logcnt  # [L, E]
        replica = np.arange(num_slots)[None, :] - np.take_along_axis(starts, sorted_experts, 1)
        out = np.full(
            (num_layers, self.num_experts, self.topology.max_replicas), -1, dtype=np.int64
        )
        layers = np.broadcast_to(np.arange(num_layers)[:, None], order.shape)
        out[layers, sorted_experts, replica] = order
        return out

    def rank_experts(self) -> npt.NDArray[np.bool_]:
        """``[L, R, E]`` bool: whether rank ``r`` holds at least one replica of expert ``e``."""
        t = self.topology
        has = np.zeros((t.num_layers, t.num_ranks, t.num_experts), dtype=bool)
        layers = np.arange(t.num_layers)[:, None]
        has[layers, t.rank_of_slot()[None, :], self.phy2log] = True
        return has

    def to_json(self, version: int | None = None) -> dict[str, Any]:
        """The JSON form SGLang reads with ``--init-expert-location``, plus our version."""
        doc: dict[str, Any] = {"physical_to_logical_map": self.phy2log.tolist()}
        if version is not None:
            doc["version"] = version
        return doc

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return self.topology == other.topology and np.array_equal(self.phy2log, other.phy2log)

    def __hash__(self) -> int:
        return hash((self.topology, self.phy2log.tobytes()))
