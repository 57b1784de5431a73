"""Plans an agent received: validation (DESIGN.md invariant 5) and the book of ready plans.

The client thread validates each plan against the deployment shape before it acknowledges
READY; the engine thread reads the book at agreement steps. A plan that fails validation is never
staged: the client reports it FAILED with the reason this module produces.
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = ["PlanBook", "PlanError", "ReadyPlan", "Shape", "validate_plan"]


class PlanError(ValueError):
    """A plan the agent must refuse; the message is the reason sent back in ``PlanAck``."""


@dataclass(frozen=True)
class Shape:
    """The deployment sizes every map of this agent must fit.

    ``num_slots`` P is split evenly over ``world_size`` R ranks (``S = P / R`` each) and R over
    ``num_nodes`` N hosts.
    """

    num_layers: int
    num_experts: int
    num_slots: int
    world_size: int
    num_nodes: int = 1

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "num_slots", "world_size", "num_nodes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_slots < self.num_experts:
            raise ValueError(f"num_slots {self.num_slots} < num_experts {self.num_experts}")
        if self.num_slots % self.world_size:
            raise ValueError(
                f"num_slots {self.num_slots} is not divisible by world_size {self.world_size}"
            )
        if self.world_size % self.num_nodes:
            raise ValueError(
                f"world_size {self.world_size} is not divisible by num_nodes {self.num_nodes}"
            )

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.world_size


def validate_plan(phy2log: npt.NDArray[np.int64], shape: Shape) -> None:
    """Raise :class:`PlanError` unless ``phy2log [L, P]`` is a valid map for ``shape``.

    Checks: 2-D ``[L, P]`` of the deployment's sizes; every value in ``[0, E)``; every logical
    expert of every layer has at least one replica; every rank holds exactly ``S = P / R`` slots
    (which the ``[L, P]`` shape with ``P = R * S`` guarantees once ``P`` matches).
    """
    expected = (shape.num_layers, shape.num_slots)
    if phy2log.ndim != 2 or phy2log.shape != expected:
        raise PlanError(f"phy2log shape {list(phy2log.shape)} != [layers, slots] {list(expected)}")
    if phy2log.shape[1] != shape.world_size * shape.slots_per_rank:
        raise PlanError(  # unreachable with a valid Shape; kept as the explicit invariant
            f"{phy2log.shape[1]} slots do not give each of {shape.world_size} ranks "
            f"{shape.slots_per_rank} slots"
        )
    bad = (phy2log < 0) | (phy2log >= shape.num_experts)
    if bad.any():
        layer, slot = (int(v) for v in np.argwhere(bad)[0])
        raise PlanError(
            f"phy2log[{layer}][{slot}] = {int(phy2log[layer, slot])} is outside "
            f"[0, {shape.num_experts})"
        )
    offsets = np.arange(shape.num_layers, dtype=np.int64)[:, None] * shape.num_experts
    replicas = np.bincount(
        (phy2log + offsets).ravel(), minlength=shape.num_layers * shape.num_experts
    ).reshape(shape.num_layers, shape.num_experts)
    missing = np.argwhere(replicas == 0)
    if missing.size:
        layer, expert = (int(v) for v in missing[0])
        raise PlanError(
            f"layer {layer}: logical expert {expert} has no replica "
            f"({len(missing)} (layer, expert) pairs have none)"
        )


def fingerprint(phy2log: npt.NDArray[np.int64]) -> int:
    """A 31-bit checksum of a map's contents; ranks compare it before switching to a version."""
    return zlib.crc32(np.ascontiguousarray(phy2log, dtype="<i8").tobytes()) & 0x7FFFFFFF


@dataclass(frozen=True)
class ReadyPlan:
    """A validated plan, staged on this rank.

    Attributes:
        version: the placement version the plan creates.
        rollout_id: the service's rollout id (echoed in acks).
        phy2log: ``[L, P]`` int64, read-only.
        fingerprint: :func:`fingerprint` of ``phy2log``.
    """

    version: int
    rollout_id: str
    phy2log: npt.NDArray[np.int64] = field(repr=False)
    fingerprint: int

    @classmethod
    def create(cls, version: int, rollout_id: str, phy2log: npt.NDArray[np.int64]) -> ReadyPlan:
        arr = np.array(phy2log, dtype=np.int64, copy=True)
        arr.setflags(write=False)
        return cls(int(version), rollout_id, arr, fingerprint(arr))


class PlanBook:
    """Ready plans of one rank, by version; shared by the client and the engine thread.

    Thread-safety: every method takes one lock for a few dictionary operations (no I/O, no
    waiting), so the engine thread never blocks for longer than that. Plans are immutable, so a
    plan handed out stays valid after the book changes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plans: dict[int, ReadyPlan] = {}

    def stage(self, plan: ReadyPlan) -> None:
        """Add (or replace) the ready plan of ``plan.version``. Client thread."""
        with self._lock:
            self._plans[plan.version] = plan

    def cancel(self, version: int, rollout_id: str = "") -> bool:
        """Forget the plan of ``version`` (only if its rollout id matches, when one is given)."""
        with self._lock:
            plan = self._plans.get(version)
            if plan is None or (rollout_id and plan.rollout_id != rollout_id):
                return False
            del self._plans[version]
            return True

    def get(self, version: int) -> ReadyPlan | None:
        with self._lock:
            return self._plans.get(version)

    def highest(self) -> ReadyPlan | None:
        """The ready plan with the highest version, if any."""
        with self._lock:
            return self._plans[max(self._plans)] if self._plans else None

    def discard_through(self, version: int) -> None:
        """Forget every plan with a version ``<= version`` (after switching to ``version``)."""
        with self._lock:
            for v in [v for v in self._plans if v <= version]:
                del self._plans[v]

    def versions(self) -> list[int]:
        with self._lock:
            return sorted(self._plans)
