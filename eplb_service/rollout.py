"""The rollout controller: from a new placement to every rank routing with it.

States (one rollout in flight per deployment)::

    preparing --(every rank READY)--> committed --(every rank APPLIED)--> applied
        |  \\                           |
        |   `--(a rank FAILED)--> failed (Cancel sent to every rank)
        `--(timeout)--> cancelled (Cancel sent)   committed --(timeout)--> cancelled | applied

- preparing: the Plan went to every connected rank (ranks that connect later get it on hello);
  the service waits for READY from each rank.
- committed: every rank is READY; the ranks switch by themselves through the in-band agreement
  (DESIGN.md invariant 1), the service only watches.
- applied: every rank reported APPLIED (or said so in a hello/heartbeat). The deployment's
  active version moves on the *first* APPLIED: the agreement switches all ranks at one step.
- timeout: nobody APPLIED yet -> cancelled and Cancel sent (safe: a rank that drops its staged
  plan lowers the agreed minimum on every rank at once). Somebody APPLIED -> the group has
  switched, so the rollout is applied; the reason names the ranks that never confirmed.

Every state change is written to the store as a JSON snapshot (:meth:`Rollout.to_dict`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eplb_proto.v1 import eplb_pb2
from eplb_service import codec
from eplb_service.deployments import AgentLink, Deployment
from eplb_service.errors import Code, EplbError, RolloutBusy
from eplb_service.placement import Placement
from eplb_service.store import Store, StoreError
from eplb_service.telemetry import Telemetry

log = logging.getLogger(__name__)


class RolloutState(str, enum.Enum):
    PREPARING = "preparing"
    COMMITTED = "committed"
    APPLIED = "applied"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def in_flight(self) -> bool:
        return self in (RolloutState.PREPARING, RolloutState.COMMITTED)


@dataclass
class Rollout:
    """One rollout of one placement version to every rank of a deployment.

    Times: ``*_at`` are unix seconds (for people); ``started_mono`` is monotonic (for timeouts).
    """

    id: str
    deployment: str
    version: int
    from_version: int
    trigger: str  # "rebalance" (REST), "auto", "placement" (REST PUT)
    placement: Placement
    num_ranks: int
    created_at: float
    started_mono: float
    timeout_s: float
    state: RolloutState = RolloutState.PREPARING
    reason: str | None = None
    committed_at: float | None = None
    applied_at: float | None = None  # first APPLIED: the group switched
    finished_at: float | None = None
    switch_step: int | None = None
    ranks_ready: set[int] = field(default_factory=set)
    ranks_applied: set[int] = field(default_factory=set)
    ready_incarnation: dict[int, str] = field(default_factory=dict)
    slots_changed: int = 0  # slots whose expert differs from the previous version
    bytes_moved: int = 0  # reported by agents with APPLIED
    plan: dict[str, Any] | None = None  # predicted balance and migration, when planned

    @property
    def in_flight(self) -> bool:
        return self.state.in_flight

    def pending(self, ranks: set[int]) -> list[int]:
        return sorted(set(range(self.num_ranks)) - ranks)

    @classmethod
    def from_dict(cls, doc: dict[str, Any], placement: Placement, mono: float) -> Rollout:
        """Rebuilds a rollout from :meth:`to_dict` (after a restart)."""
        return cls(
            id=doc["id"],
            deployment=doc["deployment"],
            version=int(doc["version"]),
            from_version=int(doc["from_version"]),
            trigger=doc["trigger"],
            placement=placement,
            num_ranks=placement.topology.num_ranks,
            created_at=float(doc["created_at"]),
            started_mono=mono,
            timeout_s=float(doc["timeout_s"]),
            state=RolloutState(doc["state"]),
            reason=doc.get("reason"),
            committed_at=doc.get("committed_at"),
            applied_at=doc.get("applied_at"),
            finished_at=doc.get("finished_at"),
            switch_step=doc.get("switch_step"),
            ranks_ready=set(doc.get("ranks_ready", [])),
            ranks_applied=set(doc.get("ranks_applied", [])),
            ready_incarnation={
                int(rank): str(inc) for rank, inc in (doc.get("ready_incarnation") or {}).items()
            },
            slots_changed=int(doc.get("slots_changed", 0)),
            bytes_moved=int(doc.get("bytes_moved", 0)),
            plan=doc.get("plan"),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form for REST and the store (no map: that is stored by version)."""
        duration = None if self.finished_at is None else self.finished_at - self.created_at
        return {
            "id": self.id,
            "deployment": self.deployment,
            "version": self.version,
            "from_version": self.from_version,
            "trigger": self.trigger,
            "state": self.state.value,
            "reason": self.reason,
            "timeout_s": self.timeout_s,
            "created_at": self.created_at,
            "committed_at": self.committed_at,
            "applied_at": self.applied_at,
            "finished_at": self.finished_at,
            "duration_s": duration,
            "switch_step": self.switch_step,
            "ranks_ready": sorted(self.ranks_ready),
            "ranks_applied": sorted(self.ranks_applied),
            "ranks_not_ready": self.pending(self.ranks_ready),
            "ranks_not_applied": self.pending(self.ranks_applied),
            "slots_changed": self.slots_changed,
            "bytes_moved": self.bytes_moved,
            "plan": self.plan,
            "ready_incarnation": {str(r): inc for r, inc in sorted(self.ready_incarnation.items())},
        }


class RolloutController:
    """Starts rollouts, tracks acks, times them out. Event-loop only.

    Args:
        store: where rollout snapshots go.
        telemetry: metrics.
        timeout_s: a rollout not finished in this many seconds is cancelled.
        clock: unix seconds; mono: monotonic seconds (both injectable).
    """

    def __init__(
        self,
        store: Store,
        telemetry: Telemetry,
        timeout_s: float,
        *,
        clock: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.telemetry = telemetry
        self.timeout_s = timeout_s
        self._clock = clock
        self._mono = mono
        self._timers: dict[str, asyncio.Task[None]] = {}
        self.on_store_error: Callable[[StoreError], None] | None = None

    # -- messages --------------------------------------------------------------------------

    @staticmethod
    def plan_message(
        rollout_id: str, version: int, placement: Placement
    ) -> eplb_pb2.ServiceMessage:
        return eplb_pb2.ServiceMessage(
            plan=eplb_pb2.Plan(
                version=version, rollout_id=rollout_id, phy2log=codec.encode(placement.phy2log)
            )
        )

    @staticmethod
    def cancel_message(rollout: Rollout) -> eplb_pb2.ServiceMessage:
        return eplb_pb2.ServiceMessage(
            cancel=eplb_pb2.Cancel(
                version=rollout.version, rollout_id=rollout.id, reason=rollout.reason or ""
            )
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(
        self,
        dep: Deployment,
        placement: Placement,
        *,
        trigger: str,
        plan: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Rollout:
        """Issues the next version for ``placement`` and sends the Plan to every rank.

        Raises:
            RolloutBusy: a rollout is in flight.
            EplbError: FAILED_PRECONDITION when ``placement`` does not fit the deployment.
        """
        if dep.rollout is not None:
            raise RolloutBusy(dep.name, dep.rollout.id)
        if placement.topology != dep.topology:
            raise EplbError(
                Code.FAILED_PRECONDITION, f"placement topology {placement.topology} does not "
                f"match deployment {dep.name!r} ({dep.topology})",
            )
        slots_changed = int((placement.phy2log != dep.active_placement.phy2log).sum())
        version = dep.issue_version(placement)
        rollout = Rollout(
            id=f"ro-{dep.name}-{version}-{secrets.token_hex(3)}",
            deployment=dep.name,
            version=version,
            from_version=dep.active_version,
            trigger=trigger,
            placement=placement,
            num_ranks=dep.topology.num_ranks,
            created_at=self._clock(),
            started_mono=self._mono(),
            timeout_s=self.timeout_s if timeout_s is None else timeout_s,
            plan=plan,
            slots_changed=slots_changed,
        )
        dep.rollout = rollout
        dep.remember(rollout)
        self.telemetry.rollouts_in_progress.inc()
        await self.store.save_placement(dep.name, version, placement.phy2log)
        await self.store.save_deployment(dep.record())
        await self.store.save_rollout(dep.name, rollout.to_dict())
        dep.broadcast(self.plan_message(rollout.id, version, placement))
        self._timers[rollout.id] = asyncio.create_task(
            self._expire(dep, rollout), name=f"rollout-timeout-{rollout.id}"
        )
        log.info(
            "rollout %s started: %s v%d -> v%d (%s)",
            rollout.id, dep.name, rollout.from_version, version, trigger,
        )
        return rollout

    def resume(self, dep: Deployment, rollout: Rollout) -> None:
        """Takes over ``rollout`` (in flight, restored from the store) with a fresh timeout."""
        self.telemetry.rollouts_in_progress.inc()
        rollout.started_mono = self._mono()
        self._timers[rollout.id] = asyncio.create_task(
            self._expire(dep, rollout), name=f"rollout-timeout-{rollout.id}"
        )
        log.warning(
            "rollout %s (%s v%d -> v%d, %s) resumed from the store: ranks get the plan again "
            "when they reconnect; it times out in %gs",
            rollout.id, dep.name, rollout.from_version, rollout.version, rollout.state.value,
            rollout.timeout_s,
        )

    def abandon(self, in_flight: int) -> None:
        """Stops every timer without writing (this replica stopped leading: the next leader
        resumes the ``in_flight`` rollouts from the store)."""
        for timer in self._timers.values():
            if timer is not asyncio.current_task():
                timer.cancel()
        self._timers.clear()
        self.telemetry.rollouts_in_progress.dec(in_flight)

    async def _expire(self, dep: Deployment, rollout: Rollout) -> None:
        try:
            await self._expire_after_timeout(dep, rollout)
        except StoreError as exc:
            if self.on_store_error is None:
                raise
            self.on_store_error(exc)

    async def _expire_after_timeout(self, dep: Deployment, rollout: Rollout) -> None:
        await asyncio.sleep(rollout.timeout_s)
        self._timers.pop(rollout.id, None)
        if rollout is not dep.rollout or not rollout.in_flight:
            return
        if rollout.ranks_applied:
            await self._finish(
                dep, rollout, RolloutState.APPLIED,
                f"timed out after {rollout.timeout_s:g}s waiting for APPLIED from ranks "
                f"{rollout.pending(rollout.ranks_applied)}; the group switched at step "
                f"{rollout.switch_step}",
            )
            return
        waiting = (
            f"READY from ranks {rollout.pending(rollout.ranks_ready)}"
            if rollout.state is RolloutState.PREPARING
            else f"APPLIED from ranks {rollout.pending(rollout.ranks_applied)}"
        )
        await self._finish(
            dep, rollout, RolloutState.CANCELLED,
            f"timed out after {rollout.timeout_s:g}s waiting for {waiting}",
        )

    async def cancel(self, dep: Deployment, reason: str) -> Rollout | None:
        """Cancels the in-flight rollout (if nobody has APPLIED yet)."""
        rollout = dep.rollout
        if rollout is None or rollout.ranks_applied:
            return None
        await self._finish(dep, rollout, RolloutState.CANCELLED, reason)
        return rollout

    async def _finish(
        self, dep: Deployment, rollout: Rollout, state: RolloutState, reason: str | None
    ) -> None:
        if not rollout.in_flight:
            return
        rollout.state = state
        rollout.reason = reason
        rollout.finished_at = self._clock()
        if dep.rollout is rollout:
            dep.rollout = None
        dep.last_rollout_end = self._mono()
        timer = self._timers.pop(rollout.id, None)
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()
        if state in (RolloutState.CANCELLED, RolloutState.FAILED):
            dep.broadcast(self.cancel_message(rollout))
        t = self.telemetry
        t.rollouts_in_progress.dec()
        t.rebalances.labels(dep.name, state.value).inc()
        t.rollout_seconds.labels(state.value).observe(self._mono() - rollout.started_mono)
        if state is RolloutState.APPLIED:
            t.slots_moved.labels(dep.name).inc(rollout.slots_changed)
            t.bytes_moved.labels(dep.name).inc(rollout.bytes_moved)
        log.log(
            logging.INFO if state is RolloutState.APPLIED else logging.WARNING,
            "rollout %s %s%s", rollout.id, state.value, f": {reason}" if reason else "",
        )
        await self.store.save_rollout(dep.name, rollout.to_dict())

    # -- agent events ----------------------------------------------------------------------

    async def on_ack(self, dep: Deployment, link: AgentLink, ack: eplb_pb2.PlanAck) -> None:
        """A PlanAck from ``link``'s rank. Acks of other versions are ignored (late or stale).

        Raises:
            EplbError: INVALID_ARGUMENT for an unspecified status.
        """
        status = ack.status
        if status not in (
            eplb_pb2.PlanAck.STATUS_READY,
            eplb_pb2.PlanAck.STATUS_APPLIED,
            eplb_pb2.PlanAck.STATUS_FAILED,
        ):
            raise EplbError(
                Code.INVALID_ARGUMENT,
                f"plan_ack.status: {status} is not STATUS_READY, STATUS_APPLIED or STATUS_FAILED",
                "protocol",
            )
        rollout = dep.rollout
        if rollout is None or ack.version != rollout.version:
            log.debug("%s rank %d: ignoring ack for version %d", dep.name, link.rank, ack.version)
            return
        if ack.rollout_id and ack.rollout_id != rollout.id:
            log.debug(
                "%s rank %d: ignoring ack for rollout %s", dep.name, link.rank, ack.rollout_id
            )
            return
        if status == eplb_pb2.PlanAck.STATUS_FAILED:
            reason = ack.reason or "no reason given"
            await self._finish(
                dep, rollout, RolloutState.FAILED, f"rank {link.rank} failed: {reason}"
            )
            return
        rollout.ranks_ready.add(link.rank)
        rollout.ready_incarnation[link.rank] = link.incarnation
        if status == eplb_pb2.PlanAck.STATUS_APPLIED:
            if ack.HasField("migration"):
                rollout.bytes_moved += ack.migration.bytes_moved
            await self._applied(dep, rollout, link.rank, ack.step)
        else:
            await self._maybe_commit(dep, rollout)

    async def on_rank_version(self, dep: Deployment, rank: int, version: int) -> None:
        """A hello or heartbeat says ``rank`` routes with ``version`` (as good as APPLIED)."""
        rollout = dep.rollout
        if rollout is not None and version >= rollout.version and rank not in rollout.ranks_applied:
            rollout.ranks_ready.add(rank)
            await self._applied(dep, rollout, rank, None)

    async def on_hello(self, dep: Deployment, link: AgentLink, active_version: int) -> None:
        """A rank (re)connected during a rollout: forget a READY of a previous incarnation
        (its staged plan died with it) and send it the plan if it has not switched."""
        rollout = dep.rollout
        if rollout is None:
            return
        if active_version >= rollout.version:
            await self.on_rank_version(dep, link.rank, active_version)
            return
        if rollout.ready_incarnation.get(link.rank, link.incarnation) != link.incarnation:
            rollout.ranks_ready.discard(link.rank)
            rollout.ready_incarnation.pop(link.rank, None)
        link.outbox.send(self.plan_message(rollout.id, rollout.version, rollout.placement))

    async def _maybe_commit(self, dep: Deployment, rollout: Rollout) -> None:
        all_ready = len(rollout.ranks_ready) >= rollout.num_ranks
        if rollout.state is RolloutState.PREPARING and all_ready:
            rollout.state = RolloutState.COMMITTED
            rollout.committed_at = self._clock()
            log.info("rollout %s committed: every rank is ready", rollout.id)
            await self.store.save_rollout(dep.name, rollout.to_dict())

    async def _applied(
        self, dep: Deployment, rollout: Rollout, rank: int, step: int | None
    ) -> None:
        first = not rollout.ranks_applied
        rollout.ranks_applied.add(rank)
        if rollout.switch_step is None and step is not None:
            rollout.switch_step = step  # from an APPLIED ack: the step the group switched at
        if first:
            if rollout.state is RolloutState.PREPARING:
                rollout.state = RolloutState.COMMITTED
                rollout.committed_at = self._clock()
            rollout.applied_at = self._clock()
            dep.activate(rollout.version)
            self.telemetry.active_version.labels(dep.name).set(rollout.version)
            await self.store.save_deployment(dep.record())
        if len(rollout.ranks_applied) >= rollout.num_ranks:
            await self._finish(dep, rollout, RolloutState.APPLIED, None)

    async def close(self) -> None:
        """Stops the timers (rollouts stay as they are; a durable store resumes them)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
