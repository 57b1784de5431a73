"""Where state that must survive a restart lives: the :class:`Store` protocol.

The service works on in-memory objects (:mod:`eplb_service.deployments`) and writes through to a
store at the points where durable state changes:

- a deployment is registered (shape, options) or its active/latest version moves;
- a placement version is issued (the full history of maps, by version);
- a rollout changes state (a JSON snapshot, bounded history);
- a load report is counted (deduplication state incarnation -> last counted sequence, and
  ``tokens_total``), *before* the report is acknowledged, so an acknowledged report is durable.

On start the service rebuilds its deployments from :meth:`Store.load_deployments` and friends.
:class:`MemoryStore` is the zero-set-up default (nothing survives the process);
:class:`eplb_service.redis_store.RedisStore` implements the same protocol on Redis, making the
writes that belong together atomic and fencing them with the leader lease (docs/decisions/0008).
Store failures raise :class:`StoreError`. The load
window itself is not written per report: a durable store snapshots it periodically
(:meth:`Store.save_window`), bounding what a restart loses to one snapshot interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from eplb_service.config import DeploymentOptions
from eplb_service.placement import Topology

IntArray = npt.NDArray[np.int64]


class StoreError(Exception):
    """The store could not do what was asked; the service must not trust its in-memory state
    any more than what the store holds (it steps down and reloads when the store is back)."""


class StoreUnavailable(StoreError):
    """The store does not answer (connection refused, timeout, ...)."""


class StoreFenced(StoreError):
    """A write was refused because this replica no longer holds the leader lease."""


@dataclass(frozen=True)
class DeploymentRecord:
    """A deployment's durable identity and version pointers."""

    name: str
    topology: Topology
    options: DeploymentOptions
    created_at: float  # unix seconds
    active_version: int
    latest_version: int  # highest version ever issued (cancelled ones included)


@dataclass
class IngestState:
    """Deduplication state of one deployment.

    Attributes:
        last_sequence: agent incarnation -> highest sequence counted.
        tokens_total: sum of every counted count.
    """

    last_sequence: dict[str, int] = field(default_factory=dict)
    tokens_total: int = 0


class Store(Protocol):
    """Durable state of every deployment. All methods are coroutines; none blocks the loop."""

    async def save_deployment(self, record: DeploymentRecord) -> None: ...

    async def load_deployments(self) -> list[DeploymentRecord]: ...

    async def save_placement(self, deployment: str, version: int, phy2log: IntArray) -> None:
        """Stores version ``version`` (``[L, P]`` int64); versions are never rewritten."""
        ...

    async def load_placement(self, deployment: str, version: int) -> IntArray | None: ...

    async def placement_versions(self, deployment: str) -> list[int]: ...

    async def save_rollout(self, deployment: str, rollout: dict[str, Any]) -> None:
        """Inserts or replaces the rollout snapshot with ``rollout["id"]``."""
        ...

    async def load_rollouts(self, deployment: str) -> list[dict[str, Any]]:
        """Rollout snapshots, oldest first."""
        ...

    async def commit_report(
        self, deployment: str, incarnation: str, sequence: int, tokens: int
    ) -> bool:
        """Records that report ``sequence`` of ``incarnation`` was counted with ``tokens``,
        atomically with the deduplication check: False (nothing changed) when the store already
        counted a sequence >= ``sequence`` of ``incarnation``."""
        ...

    async def forget_incarnations(self, deployment: str, incarnations: list[str]) -> None:
        """Drops deduplication entries of incarnations evicted as long gone."""
        ...

    async def load_ingest(self, deployment: str) -> IngestState: ...

    async def save_window(self, deployment: str, buckets: list[tuple[int, IntArray]]) -> None:
        """A snapshot of the window's ``(bucket index, [L, E] load)`` buckets."""
        ...

    async def load_window(self, deployment: str) -> list[tuple[int, IntArray]]: ...

    async def close(self) -> None: ...


class MemoryStore:
    """The default store: plain dictionaries; everything is lost with the process.

    Args:
        rollouts_kept: rollout snapshots kept per deployment (oldest dropped first).
    """

    def __init__(self, rollouts_kept: int = 100) -> None:
        self.rollouts_kept = rollouts_kept
        self._deployments: dict[str, DeploymentRecord] = {}
        self._placements: dict[str, dict[int, IntArray]] = {}
        self._rollouts: dict[str, dict[str, dict[str, Any]]] = {}
        self._ingest: dict[str, IngestState] = {}
        self._windows: dict[str, list[tuple[int, IntArray]]] = {}

    async def save_deployment(self, record: DeploymentRecord) -> None:
        self._deployments[record.name] = record

    async def load_deployments(self) -> list[DeploymentRecord]:
        return list(self._deployments.values())

    async def save_placement(self, deployment: str, version: int, phy2log: IntArray) -> None:
        versions = self._placements.setdefault(deployment, {})
        if version in versions and not np.array_equal(versions[version], phy2log):
            raise ValueError(f"{deployment}: placement version {version} already stored")
        stored = np.array(phy2log, dtype=np.int64)
        stored.setflags(write=False)
        versions[version] = stored

    async def load_placement(self, deployment: str, version: int) -> IntArray | None:
        return self._placements.get(deployment, {}).get(version)

    async def placement_versions(self, deployment: str) -> list[int]:
        return sorted(self._placements.get(deployment, {}))

    async def save_rollout(self, deployment: str, rollout: dict[str, Any]) -> None:
        rollouts = self._rollouts.setdefault(deployment, {})
        rollouts[rollout["id"]] = dict(rollout)
        while len(rollouts) > self.rollouts_kept:
            del rollouts[next(iter(rollouts))]

    async def load_rollouts(self, deployment: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self._rollouts.get(deployment, {}).values()]

    async def commit_report(
        self, deployment: str, incarnation: str, sequence: int, tokens: int
    ) -> bool:
        state = self._ingest.setdefault(deployment, IngestState())
        if state.last_sequence.get(incarnation, 0) >= sequence:
            return False
        state.last_sequence[incarnation] = sequence
        state.tokens_total += tokens
        return True

    async def forget_incarnations(self, deployment: str, incarnations: list[str]) -> None:
        state = self._ingest.get(deployment)
        if state is not None:
            for incarnation in incarnations:
                state.last_sequence.pop(incarnation, None)

    async def load_ingest(self, deployment: str) -> IngestState:
        state = self._ingest.get(deployment, IngestState())
        return IngestState(dict(state.last_sequence), state.tokens_total)

    async def save_window(self, deployment: str, buckets: list[tuple[int, IntArray]]) -> None:
        self._windows[deployment] = [(i, load.copy()) for i, load in buckets]

    async def load_window(self, deployment: str) -> list[tuple[int, IntArray]]:
        return [(i, load.copy()) for i, load in self._windows.get(deployment, [])]

    async def close(self) -> None:
        return None
