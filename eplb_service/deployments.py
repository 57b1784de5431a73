"""Deployment state: shape, placements by version, load window, deduplication, connected ranks.

A :class:`Deployment` is the in-memory working state of one EP group. It lives on the event loop
and is only touched from there (no locks). Durable parts are written through to the
:class:`~eplb_service.store.Store` by :mod:`eplb_service.control`.

Agent streams are represented transport-free: an :class:`Outbox` of outgoing
``ServiceMessage`` s (drained by the gRPC handler) and an :class:`AgentLink` per accepted hello.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np
import numpy.typing as npt

from eplb_proto.v1 import eplb_pb2
from eplb_service.balance import balancedness, imbalance_ratio, rank_loads
from eplb_service.config import DeploymentOptions
from eplb_service.errors import Code
from eplb_service.placement import Placement, Topology
from eplb_service.store import DeploymentRecord
from eplb_service.window import LoadWindow

if TYPE_CHECKING:
    from eplb_service.rollout import Rollout

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,63}$")


# ------------------------------------------------------------------------------------------
# Streams


@dataclass(frozen=True)
class Close:
    """End of an agent stream: ``code`` None = OK, else the error to abort with."""

    code: Code | None
    message: str = ""


OutItem = Union[eplb_pb2.ServiceMessage, Close]  # noqa: UP007 (a runtime alias on 3.10)


class Outbox:
    """Outgoing messages of one agent stream, drained in order by the transport.

    Acks are cumulative, so a queued Ack is replaced by a newer one instead of queueing both.
    More than ``limit`` queued messages means the agent does not read: the stream is closed
    with RESOURCE_EXHAUSTED rather than growing without bound.
    """

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._items: deque[OutItem] = deque()
        self._event = asyncio.Event()
        self.closed: Close | None = None

    def send(self, message: eplb_pb2.ServiceMessage) -> bool:
        """Queues ``message``; False when the stream is closed (or just got closed)."""
        if self.closed is not None:
            return False
        if (
            self._items
            and message.HasField("ack")
            and isinstance(self._items[-1], eplb_pb2.ServiceMessage)
            and self._items[-1].HasField("ack")
        ):
            self._items[-1] = message
            return True
        if len(self._items) >= self.limit:
            self._items.clear()
            self.close(
                Code.RESOURCE_EXHAUSTED,
                f"agent is not reading its stream ({self.limit} messages queued)",
            )
            return False
        self._items.append(message)
        self._event.set()
        return True

    def close(self, code: Code | None, message: str = "") -> None:
        """Ends the stream after the messages already queued (first close wins)."""
        if self.closed is not None:
            return
        self.closed = Close(code, message)
        self._items.append(self.closed)
        self._event.set()

    async def get(self) -> OutItem:
        while not self._items:
            self._event.clear()
            await self._event.wait()
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class AgentLink:
    """One accepted agent stream (after its hello)."""

    deployment: str
    rank: int
    incarnation: str
    peer: str
    outbox: Outbox
    connected_at: float  # unix seconds


@dataclass
class RankStatus:
    """What the service last heard from a rank (kept across disconnects)."""

    rank: int
    incarnation: str = ""
    connected: bool = False
    active_version: int | None = None
    step: int | None = None
    last_seen: float | None = None  # unix seconds


# ------------------------------------------------------------------------------------------
# Balance of the window


@dataclass(frozen=True)
class WindowBalance:
    """Balance of the window load under a placement.

    Attributes:
        per_layer: ``[L]`` mean/max rank load (1.0 for layers without load).
        imbalance: ``[L]`` max/mean - 1.
        tokens: total load in the window.
    """

    per_layer: FloatArray
    imbalance: FloatArray
    tokens: int

    @property
    def mean(self) -> float:
        return float(self.per_layer.mean())

    @property
    def worst_layer(self) -> int:
        return int(self.per_layer.argmin())

    @property
    def worst(self) -> float:
        return float(self.per_layer.min())

    @property
    def imbalance_mean(self) -> float:
        return float(self.imbalance.mean())


def window_balance(load: IntArray, placement: Placement) -> WindowBalance:
    """Balance of ``[L, E]`` ``load`` under ``placement``."""
    weight = load.astype(np.float64)
    loads = rank_loads(weight, placement)
    return WindowBalance(balancedness(loads), imbalance_ratio(loads), int(load.sum()))


# ------------------------------------------------------------------------------------------
# Deployment


class Deployment:
    """Working state of one deployment (event-loop only).

    Args:
        record: shape, options and version pointers.
        placements: at least the active version's placement.
        window: the load window, with maps of the kept versions.
        rollouts_kept: finished rollouts remembered.
        incarnations_kept: deduplication entries kept (least recently seen evicted first).
    """

    def __init__(
        self,
        record: DeploymentRecord,
        placements: dict[int, Placement],
        window: LoadWindow,
        *,
        rollouts_kept: int = 100,
        incarnations_kept: int | None = None,
    ) -> None:
        if record.active_version not in placements:
            raise ValueError(f"{record.name}: no placement for active version")
        self.name = record.name
        self.topology: Topology = record.topology
        self.options: DeploymentOptions = record.options
        self.created_at = record.created_at
        self.active_version = record.active_version
        self.latest_version = record.latest_version
        self.placements: dict[int, Placement] = dict(placements)
        self.window = window
        self.window.protect(self.active_version)
        self.last_sequence: OrderedDict[str, int] = OrderedDict()
        self.incarnations_kept = incarnations_kept or max(64, 4 * self.topology.num_ranks)
        self.tokens_total = 0
        self.last_report_at: float | None = None  # unix seconds
        self.links: dict[int, AgentLink] = {}
        self.ranks: dict[int, RankStatus] = {}
        self.rollout: Rollout | None = None  # the one in flight
        self.rollouts: OrderedDict[str, Rollout] = OrderedDict()  # recent, oldest first
        self.rollouts_kept = rollouts_kept
        self.last_rollout_end: float | None = None  # monotonic seconds
        self.last_predicted: float | None = None
        self.plan_lock = asyncio.Lock()
        self._balance_key: tuple[int, int] | None = None
        self._balance: WindowBalance | None = None

    # -- records ---------------------------------------------------------------------------

    def record(self) -> DeploymentRecord:
        return DeploymentRecord(
            name=self.name,
            topology=self.topology,
            options=self.options,
            created_at=self.created_at,
            active_version=self.active_version,
            latest_version=self.latest_version,
        )

    @property
    def active_placement(self) -> Placement:
        return self.placements[self.active_version]

    def shape_mismatch(self, shape: Topology) -> str | None:
        """None when ``shape`` equals the registered one, else "field got != registered want"."""
        fields = (
            ("world_size", "num_ranks"),
            ("num_layers", "num_layers"),
            ("num_experts", "num_experts"),
            ("num_slots", "num_slots"),
            ("num_nodes", "num_nodes"),
        )
        diffs = [
            f"{wire} {getattr(shape, attr)} != registered {getattr(self.topology, attr)}"
            for wire, attr in fields
            if getattr(shape, attr) != getattr(self.topology, attr)
        ]
        return "; ".join(diffs) or None

    # -- versions --------------------------------------------------------------------------

    def issue_version(self, placement: Placement) -> int:
        """Assigns the next version to ``placement`` and keeps its map for attribution."""
        self.latest_version += 1
        version = self.latest_version
        self.placements[version] = placement
        self.window.add_version(version, placement.phy2log)
        self._trim_placements()
        return version

    def activate(self, version: int) -> None:
        """Makes ``version`` (already issued) the active one."""
        self.active_version = version
        self.window.protect(version)
        self._trim_placements()

    def _trim_placements(self) -> None:
        keep = set(self.window.versions) | {self.active_version}
        if self.rollout is not None:
            keep.add(self.rollout.version)
        for version in [v for v in self.placements if v not in keep]:
            del self.placements[version]

    # -- ingestion -------------------------------------------------------------------------

    def seen(self, incarnation: str) -> int:
        """The last counted sequence of ``incarnation`` (0 if none)."""
        return self.last_sequence.get(incarnation, 0)

    def count(self, incarnation: str, sequence: int, tokens: int, now: float) -> list[str]:
        """Records a counted report; returns incarnations evicted from the dedup table."""
        self.last_sequence[incarnation] = sequence
        self.last_sequence.move_to_end(incarnation)
        self.tokens_total += tokens
        self.last_report_at = now
        evicted: list[str] = []
        while len(self.last_sequence) > self.incarnations_kept:
            evicted.append(self.last_sequence.popitem(last=False)[0])
        return evicted

    # -- ranks -----------------------------------------------------------------------------

    def rank(self, rank: int) -> RankStatus:
        status = self.ranks.get(rank)
        if status is None:
            status = self.ranks[rank] = RankStatus(rank)
        return status

    @property
    def ranks_connected(self) -> int:
        return len(self.links)

    def broadcast(self, message: eplb_pb2.ServiceMessage) -> None:
        for link in list(self.links.values()):
            link.outbox.send(message)

    # -- rollouts --------------------------------------------------------------------------

    def remember(self, rollout: Rollout) -> None:
        self.rollouts[rollout.id] = rollout
        while len(self.rollouts) > self.rollouts_kept:
            oldest = next(iter(self.rollouts))
            if self.rollout is not None and oldest == self.rollout.id:
                break
            del self.rollouts[oldest]

    @property
    def last_rollout(self) -> Rollout | None:
        if self.rollout is not None:
            return self.rollout
        return next(reversed(self.rollouts.values()), None)

    # -- balance ---------------------------------------------------------------------------

    def balance(self) -> WindowBalance | None:
        """Balance of the current window under the active placement; None if the window is
        empty. Cached until the window or the active version changes."""
        load = self.window.total()
        key = (self.window.generation, self.active_version)
        if key != self._balance_key:
            self._balance_key = key
            has_load = bool(load.any())
            self._balance = window_balance(load, self.active_placement) if has_load else None
        return self._balance
