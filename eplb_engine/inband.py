"""In-band rollouts without a service: the engine driven by worker_agent's version agreement.

:class:`InBandRollouts` is an :class:`~eplb_engine.ep.EngineHooks` that gives every rank what an
``EplbAgent`` would own — a ``Snapshotter``, a ``PlanBook``, a ``VersionAgreement`` whose switcher
is a :class:`~worker_agent.migration.MigratingSwitcher`, and a ``TorchCollective`` — and stages
each rollout's plan on each rank at a rank-specific step (the service delivers at its own pace).
Every forward step ends with ``agreement.step()``: every K steps the ranks agree on the newest
version all of them hold, migrate weights (``layers_per_step`` layers per step) and switch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from eplb_engine.ep import EngineHooks, EngineParts, RankContext
from eplb_engine.model import MoEModel
from worker_agent.agreement import AgreedSettings, TorchCollective, VersionAgreement
from worker_agent.migration import ExpertWeights, MigratingSwitcher, migration_group
from worker_agent.plans import PlanBook, ReadyPlan
from worker_agent.recording import ExpertLoadRecorder, PlacementView, Snapshotter

__all__ = ["InBandRollouts", "Rollout"]


@dataclass(frozen=True)
class Rollout:
    """One plan to roll out.

    Attributes:
        version: its placement version (increasing across rollouts).
        phy2log: the map ``[L, P]``.
        deliver_at: per rank, the step before which the plan is staged (ready) on that rank.
        fault_rank, fault_layer: inject a transfer failure there while applying it.
    """

    version: int
    phy2log: np.ndarray
    deliver_at: tuple[int, ...]
    fault_rank: int | None = None
    fault_layer: int | None = None


class InBandRollouts(EngineHooks):
    """Stages rollouts per rank and closes every step with the in-band agreement.

    Args:
        rollouts: the plans and when each rank receives them.
        period_steps: K, steps between agreements.
        layers_per_step: layers migrated per step once a switch is agreed (0 = all at once).
        timeout_s: bound on each layer's transfer wait.
        num_nodes: N, for transfer planning (match ``run_engine``'s).

    ``RankResult.extra`` gets ``outcomes`` (``(step, version, error)`` per finished or failed
    switch), ``active_version`` and ``migration`` (per applied rollout, the switcher's stats).
    """

    def __init__(
        self,
        rollouts: list[Rollout],
        *,
        period_steps: int = 2,
        layers_per_step: int = 0,
        timeout_s: float | None = None,
        num_nodes: int = 1,
    ) -> None:
        self.rollouts = list(rollouts)
        self.num_nodes = num_nodes
        self._state: dict[str, Any] = {}
        self.period_steps = period_steps
        self.layers_per_step = layers_per_step
        self.timeout_s = timeout_s

    def build(
        self, rank: int, world_size: int, phy2log: np.ndarray, model: MoEModel
    ) -> EngineParts:
        """What an ``EplbAgent`` would own, built before the engine (which then uses them)."""
        c = model.config
        view = PlacementView(phy2log, c.num_experts)
        recorder = ExpertLoadRecorder(view)
        snapshotter = Snapshotter(recorder)
        weights = ExpertWeights(phy2log.shape[1] // world_size)
        faults = {r.version: r.fault_layer for r in self.rollouts if r.fault_rank == rank}
        switcher = MigratingSwitcher(
            weights, snapshotter, group=migration_group(), num_ranks=world_size,
            num_nodes=self.num_nodes,
            timeout_s=self.timeout_s,
        )
        switcher.fault = _Fault(switcher, faults)
        book = PlanBook()
        self._state = {
            "snapshotter": snapshotter,
            "book": book,
            "switcher": switcher,
            "agreement": VersionAgreement(
                book, switcher, active_version=view.version,
                settings=AgreedSettings(self.period_steps, self.layers_per_step),
            ),
            "outcomes": [],
            "migration": [],
        }
        return EngineParts(view, recorder, weights)

    def start(self, ctx: RankContext) -> None:
        ctx.state.update(self._state, collective=TorchCollective(ctx.group))

    def before_step(self, ctx: RankContext, step: int) -> None:
        for r in self.rollouts:
            if r.deliver_at[ctx.rank] == step:
                ctx.state["book"].stage(ReadyPlan.create(r.version, f"rollout-{r.version}",
                                                         r.phy2log))

    def after_step(self, ctx: RankContext, step: int, output: Any) -> None:
        state = ctx.state
        outcome = state["agreement"].step(state["collective"])
        state["snapshotter"].collect()  # what the client thread would ship
        if outcome is not None:
            state["outcomes"].append((outcome.step, outcome.plan.version, outcome.error))
            stats = state["switcher"].last_stats
            state["migration"].append(asdict(stats) if stats is not None else None)

    def finish(self, ctx: RankContext) -> dict[str, Any]:
        state = ctx.state
        return {
            "outcomes": state["outcomes"],
            "active_version": state["agreement"].active_version,
            "migration": state["migration"],
        }


@dataclass
class _Fault:
    """Fails this rank's transfers of one layer while a given version is being applied."""

    switcher: MigratingSwitcher
    layers: dict[int, int | None]

    def __call__(self, layer: int, phase: str) -> None:
        plan = self.switcher.plan
        if plan is None or phase != "received" or plan.version not in self.layers:
            return
        want = self.layers[plan.version]
        if want is None or want == layer:
            raise RuntimeError(f"injected transfer failure (version {plan.version}, layer {layer})")
