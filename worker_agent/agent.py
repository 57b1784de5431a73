"""EplbAgent: what a vLLM / SGLang integration creates once per EP rank.

It owns the rank's placement view, load recorder, snapshotter, ready-plan book, in-band version
agreement and service client, and exposes the three calls an engine makes::

    import torch.distributed as dist
    from worker_agent.agent import EplbAgent

    agent = EplbAgent("eplb:50051", deployment="dsv3-prod", rank=dist.get_rank(),
                      world_size=dist.get_world_size(), num_experts=256,
                      phy2log=initial_map, device="cuda", group=ep_group)
    for batch in batches:                                   # the engine's forward loop
        for layer, moe in enumerate(moe_layers):
            topk_ids = moe.router(hidden)                   # [T, K] logical expert ids
            slots = agent.map_and_record(layer, topk_ids)   # [T, K] physical slots, counted
            hidden = moe.dispatch_and_compute(hidden, slots)
        agent.step()                                        # every rank, once per forward step
    agent.close()                                           # flush unacknowledged load, bounded

Threads: ``map_and_record`` and ``step`` run on the engine thread and never wait on the service.
``step`` issues a collective only at agreement steps (every K-th call, the same calls on every
rank). The client runs on its own daemon thread (:class:`~worker_agent.runtime.AgentRuntime`);
the two sides meet only in thread-safe structures: the snapshotter's queue (load), the
:class:`~worker_agent.plans.PlanBook` (ready plans), one immutable :class:`_Active` object
replaced by reference at a switch (what the client says in ``hello``), and the client's
``send_plan_ack`` (a non-blocking hand-off to the loop). Errors on the engine thread are logged
and counted, never raised from ``step``.

Many ranks in one process (the simulator): pass ``collective=Lockstep()`` and a shared
``runtime``, and close every forward step with :func:`step_lockstep`\\ ``(agents)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from eplb_proto.v1 import eplb_pb2
from worker_agent import agreement as _agreement
from worker_agent.agreement import (
    AgreedSettings,
    Collective,
    LocalCollective,
    StepOutcome,
    Switcher,
    TorchCollective,
    VersionAgreement,
)
from worker_agent.client import AgentClient, ClientOptions, ClientStats, RankState
from worker_agent.plans import PlanBook, ReadyPlan, Shape
from worker_agent.recording import ExpertLoadRecorder, PlacementView, Snapshotter
from worker_agent.runtime import AgentRuntime

__all__ = ["AgentStats", "EplbAgent", "MapSwitcher", "step_lockstep"]

_log = logging.getLogger(__name__)

_CAPTURE_FRACTION = 0.9  # of the report interval between two periodic snapshots


class MapSwitcher:
    """The default :class:`~worker_agent.agreement.Switcher`: no weights to move.

    At the agreed step it cuts the load snapshot (counts so far belong to the old version) and
    copies the new map into the view in place, all in one step. Weight migration (issue 6)
    replaces it with a switcher that moves weights first.
    """

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.snapshotter = snapshotter
        self._plan: ReadyPlan | None = None

    def begin(self, step: int, plan: ReadyPlan, settings: AgreedSettings) -> None:
        self._plan = plan

    def advance(self, step: int) -> bool:
        plan, self._plan = self._plan, None
        assert plan is not None, "advance() without begin()"
        # A writable copy: the plan's array is read-only (shared with the plan book).
        self.snapshotter.switch_(step, np.array(plan.phy2log), plan.version)
        return True


@dataclass(frozen=True)
class _Active:
    """The map the rank routes with, as the client reports it (replaced whole at a switch)."""

    version: int
    phy2log: npt.NDArray[np.int64]
    since: int


@dataclass(frozen=True)
class AgentStats:
    """Client counters plus the agreement's (agreements run, switches, mismatches, errors)."""

    client: ClientStats
    step: int
    active_version: int
    agreements: int
    switches: int
    mismatches: int
    errors: int


class EplbAgent:
    """One EP rank's eplb agent (see the module docstring for usage and threading).

    Args:
        target: ``host:port`` of the eplb service.
        deployment: the deployment name, the same on every rank of the EP group.
        rank: this rank in ``0..world_size-1``.
        world_size: ranks R of the EP group.
        num_experts: logical experts E per layer.
        phy2log: the initial map ``[L, P]`` (tensor or array) the engine routes with.
        version: its placement version.
        num_nodes: hosts N of the EP group.
        device: where the map and counters live (default: ``phy2log``'s device, else CPU).
        collective: the EP group's all-reduce; default: :class:`LocalCollective` for one rank,
            else :class:`TorchCollective` over ``group`` (``torch.distributed`` must be up).
        group: the EP process group for the default collective.
        period_steps: K, steps between agreements until the service's settings change it (must
            be the same on every rank).
        options: client tuning (report interval, backoff, metadata such as a bearer token).
        runtime: share an event-loop thread between agents (default: one of its own).
        switcher: builds the :class:`Switcher` from the agent (default :class:`MapSwitcher`);
            the hook for weight migration, e.g. ``lambda agent: MigratingSwitcher(weights,
            agent.snapshotter, group=ep_group, num_ranks=R)``. A switcher exposing
            ``last_stats`` (fields of ``eplb.v1.MigrationStats``) has them sent with APPLIED.
        prepare: run on the client thread before a plan is acknowledged READY (stage weights).
        recorder_backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        start: connect at once (else call :meth:`start`).
    """

    def __init__(
        self,
        target: str,
        *,
        deployment: str,
        rank: int,
        world_size: int,
        num_experts: int,
        phy2log: Any,
        version: int = 0,
        num_nodes: int = 1,
        device: torch.device | str | None = None,
        collective: Collective | None = None,
        group: Any = None,
        period_steps: int = 16,
        options: ClientOptions | None = None,
        runtime: AgentRuntime | None = None,
        switcher: Callable[[EplbAgent], Switcher] | None = None,
        prepare: Callable[[ReadyPlan], None] | None = None,
        recorder_backend: Literal["auto", "triton", "torch"] = "auto",
        start: bool = True,
    ) -> None:
        self.view = PlacementView(phy2log, num_experts, device=device, version=version)
        self.shape = Shape(
            num_layers=self.view.num_layers,
            num_experts=num_experts,
            num_slots=self.view.num_slots,
            world_size=world_size,
            num_nodes=num_nodes,
        )
        self.rank = rank
        self.recorder = ExpertLoadRecorder(self.view, backend=recorder_backend)
        self.snapshotter = Snapshotter(self.recorder)
        self.plans = PlanBook()
        self.collective = collective if collective is not None else _default_collective(
            world_size, group
        )
        self.agreement = VersionAgreement(
            self.plans,
            switcher(self) if switcher is not None else MapSwitcher(self.snapshotter),
            active_version=version,
            settings=AgreedSettings(period_steps=period_steps),
        )
        self._active = _Active(int(version), self.view.host_phy2log(), 0)
        self.client = AgentClient(
            target,
            deployment=deployment,
            rank=rank,
            shape=self.shape,
            source=self.snapshotter,
            state=self._rank_state,
            plans=self.plans,
            on_settings=self._on_settings,
            prepare=prepare,
            options=options,
            runtime=runtime,
        )
        self._last_capture = time.monotonic()
        self._closed = False
        self.errors = 0
        if start:
            self.start()

    def start(self) -> EplbAgent:
        """Connect to the service (in the background; returns at once)."""
        self.client.start()
        return self

    # -- engine thread -------------------------------------------------------------------------

    def map_and_record(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """``topk_ids [T, K]`` logical expert ids -> ``[T, K]`` int64 physical slots, counted.

        The recorder's fused op: no host sync, CUDA-graph safe.
        """
        return self.recorder.map_and_record(layer, topk_ids)

    def record_counts(self, layer: int, slot_counts: torch.Tensor, slot_offset: int = 0) -> None:
        """Add ``slot_counts [n]`` tokens to slots ``[slot_offset, slot_offset + n)`` of
        ``layer`` (for dispatchers that count per slot themselves)."""
        self.recorder.record_counts(layer, slot_counts, slot_offset)

    def step(self) -> None:
        """Close one forward step: every rank, once per step, after the step's last layer.

        Cuts a load snapshot once per report interval, and every K steps runs the in-band
        agreement (a collective on every rank); when all ranks are ready for a newer version,
        switches the map in place here, so the next step routes with it. Never raises.
        """
        try:
            self.before_step()
            outcome = self.agreement.step(self.collective)
            self.after_step(outcome)
        except Exception:
            self.errors += 1
            _log.exception("rank %d: step failed", self.rank)

    def before_step(self) -> None:
        """The rank-local part before the agreement (used by :func:`step_lockstep`): cut a load
        snapshot once per report interval — at the first step at least 90 % of the interval
        after the previous cut, so steps that do not fall exactly on the interval never make it
        skip one."""
        now = time.monotonic()
        if now - self._last_capture >= _CAPTURE_FRACTION * self.client.report_interval_s:
            self._last_capture = now
            self.snapshotter.capture(self.agreement.steps)

    def after_step(self, outcome: StepOutcome | None) -> None:
        """Report a switch (or a failed one) to the service (used by :func:`step_lockstep`)."""
        if outcome is None:
            return
        plan = outcome.plan
        if outcome.applied:
            self._active = _Active(plan.version, np.asarray(plan.phy2log), outcome.first_step)
            self.client.send_plan_ack(
                plan.version, plan.rollout_id, eplb_pb2.PlanAck.STATUS_APPLIED,
                step=outcome.first_step, migration=_migration_stats(self.agreement.switcher),
            )
        else:
            self.errors += 1
            self.client.send_plan_ack(
                plan.version, plan.rollout_id, eplb_pb2.PlanAck.STATUS_FAILED,
                reason=outcome.error or "switch failed", step=outcome.step,
            )

    @property
    def active_version(self) -> int:
        return self.agreement.active_version

    def stats(self) -> AgentStats:
        a = self.agreement
        return AgentStats(
            client=self.client.stats(),
            step=a.steps,
            active_version=a.active_version,
            agreements=a.agreements,
            switches=a.switches,
            mismatches=a.mismatches,
            errors=a.errors + self.errors,
        )

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Cut a snapshot and wait (at most ``timeout_s``) until every count recorded so far is
        acknowledged. Engine thread, between steps; blocks: not for the forward path."""
        self.capture_final()
        return self.client.flush(timeout_s)

    def close(self, flush_timeout_s: float = 5.0) -> bool:
        """Cut a last snapshot, flush it (waiting at most ``flush_timeout_s`` for acks) and
        disconnect. Returns whether every count was acknowledged. Engine thread, at shutdown."""
        if self._closed:
            return self.client.ledger.drained
        self._closed = True
        self.capture_final()
        return self.client.close(flush_timeout_s)

    def capture_final(self) -> None:
        """Snapshot everything recorded so far. Engine thread, between steps.

        The cut is tagged with the last closed step (``step()`` calls - 1), which is exact
        between steps: a later capture in ``step()`` (periodic, or at a switch) has a higher
        step, so it is never skipped as a repeat.
        """
        try:
            self.snapshotter.capture(max(self.agreement.steps - 1, 0))
        except Exception:
            _log.exception("rank %d: final capture failed", self.rank)

    def __enter__(self) -> EplbAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- client thread -------------------------------------------------------------------------

    def _rank_state(self) -> RankState:
        active = self._active  # one reference read: a consistent (version, map, since)
        return RankState(active.version, self.agreement.steps, active.phy2log, active.since)

    def _on_settings(self, settings: eplb_pb2.Settings) -> None:
        period = settings.agreement_period_steps or self.agreement.settings.period_steps
        self.agreement.propose_settings(period, settings.layers_per_step)


def step_lockstep(agents: Sequence[EplbAgent]) -> None:
    """Close one forward step on many in-process ranks from one thread (the simulator).

    The same as every agent calling :meth:`EplbAgent.step` with a real collective, with the
    all-reduce done in memory (:func:`worker_agent.agreement.step_lockstep`).
    """
    for agent in agents:
        agent.before_step()
    outcomes = _agreement.step_lockstep([agent.agreement for agent in agents])
    for agent, outcome in zip(agents, outcomes, strict=True):
        agent.after_step(outcome)


def _migration_stats(switcher: Switcher) -> eplb_pb2.MigrationStats | None:
    """``eplb.v1.MigrationStats`` from a switcher that exposes ``last_stats`` (an object with
    some of the message's fields, as ``worker_agent.migration.MigratingSwitcher`` does)."""
    stats = getattr(switcher, "last_stats", None)
    if stats is None:
        return None
    fields = ("bytes_moved", "transfers", "local_copies", "total_pause_ms", "max_layer_ms")
    return eplb_pb2.MigrationStats(
        **{name: getattr(stats, name) for name in fields if hasattr(stats, name)}
    )


def _default_collective(world_size: int, group: Any) -> Collective:
    if world_size == 1:
        return LocalCollective()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "world_size > 1 needs collective= or an initialized torch.distributed (group=)"
        )
    return TorchCollective(group)
