"""The engine served by a real eplb service: one :class:`~worker_agent.agent.EplbAgent` per rank.

:class:`ServedAgents` is an :class:`~eplb_engine.ep.EngineHooks` that makes every rank of
:func:`~eplb_engine.ep.run_engine` an eplb agent, the way a vLLM / SGLang integration would:

- ``build``: a fresh :class:`~worker_agent.migration.ExpertWeights` and an ``EplbAgent`` whose
  switcher is a :class:`~worker_agent.migration.MigratingSwitcher` over the default (EP) group;
  the engine routes with the agent's view, counts with its recorder and registers its expert
  weights in that registry;
- ``after_step``: ``agent.step()`` (the in-band agreement; weights move and maps switch there);
- ``finish``: ``agent.close()`` (flush the load, disconnect).

The service delivers plans, the agents acknowledge READY / APPLIED (with the switcher's
migration stats) or FAILED, and the service rolls out, times out and cancels.

Test and demo extras, all off by default (:class:`Faults`): random delays before a plan is
staged (READY) and before switch acks on some ranks, a rank that never becomes ready, a transfer
failure injected on one rank. Progress: rank 0 appends one JSON line per step (and one per
switch) to ``progress_path``. Stop: when ``stop_path`` exists the ranks agree (an all-reduce MAX
every ``stop_check_every`` steps, on every rank alike) to end the run early.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist

from eplb_engine.ep import EngineHooks, EngineParts, RankContext
from eplb_engine.model import MoEModel
from worker_agent.agent import EplbAgent
from worker_agent.agreement import StepOutcome
from worker_agent.migration import ExpertWeights, MigratingSwitcher, migration_group
from worker_agent.plans import ReadyPlan

__all__ = ["Faults", "ServedAgents"]


@dataclass(frozen=True)
class Faults:
    """Faults to inject (tests).

    Attributes:
        delay_ranks: ranks whose plan staging (before READY) and switch acks (APPLIED / FAILED)
            are delayed by a random ``0..max_delay_s`` each.
        max_delay_s: the largest injected delay.
        stall_rank: a rank that never becomes ready (its plans are never staged or acked).
        fail_rank, fail_versions: make ``fail_rank``'s transfers of ``fail_layer`` (every layer
            when ``None``) fail while one of ``fail_versions`` is being applied.
        seed: the delays' seed (per rank: ``seed + rank``).
    """

    delay_ranks: tuple[int, ...] = ()
    max_delay_s: float = 0.0
    stall_rank: int | None = None
    fail_rank: int | None = None
    fail_versions: tuple[int, ...] = ()
    fail_layer: int | None = None
    seed: int = 0


@dataclass
class _Switch:
    """One switch outcome on one rank (what ``RankResult.extra["switches"]`` holds)."""

    step: int
    version: int
    error: str | None
    stats: dict[str, Any] | None


class _Agent(EplbAgent):
    """An ``EplbAgent`` that records its switch outcomes and may delay its acks (tests)."""

    def __init__(self, *args: Any, ack_delay: _Delay | None = None, **kwargs: Any) -> None:
        self.switches: list[_Switch] = []
        self._ack_delay = ack_delay
        self._timers: list[threading.Timer] = []
        super().__init__(*args, **kwargs)

    def after_step(self, outcome: StepOutcome | None) -> None:
        if outcome is None:
            return
        stats = getattr(self.agreement.switcher, "last_stats", None)
        self.switches.append(_Switch(
            outcome.step, outcome.plan.version, outcome.error,
            asdict(stats) if stats is not None else None,
        ))
        if self._ack_delay is None:
            super().after_step(outcome)
            return
        timer = threading.Timer(self._ack_delay(), super().after_step, (outcome,))
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def join_acks(self, timeout_s: float = 10.0) -> None:
        """Wait for delayed acks to be handed to the client."""
        deadline = time.monotonic() + timeout_s
        for timer in self._timers:
            timer.join(max(0.0, deadline - time.monotonic()))


@dataclass
class _Delay:
    """Random delays ``0..max_s`` (thread-safe; used from the client and timer threads)."""

    max_s: float
    seed: int
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def __call__(self) -> float:
        with self._lock:
            return self._rng.uniform(0.0, self.max_s)


@dataclass
class _Prepare:
    """The agent's ``prepare`` hook (client thread, before READY): delay, or stall until the
    run ends (the plan is then refused, never staged)."""

    delay: _Delay | None
    stall: threading.Event | None

    def __call__(self, plan: ReadyPlan) -> None:
        if self.stall is not None:
            self.stall.wait(600.0)
            raise RuntimeError(f"injected: this rank never became ready for version {plan.version}")
        if self.delay is not None:
            time.sleep(self.delay())


@dataclass
class _TransferFault:
    """``fault(layer, phase)`` of a :class:`MigratingSwitcher`: fail this rank's received
    transfers of one layer (or all) while one of some versions is being applied."""

    switcher: MigratingSwitcher | None
    versions: tuple[int, ...]
    layer: int | None

    def __call__(self, layer: int, phase: str) -> None:
        plan = self.switcher.plan if self.switcher is not None else None
        if plan is None or phase != "received" or plan.version not in self.versions:
            return
        if self.layer is None or self.layer == layer:
            raise RuntimeError(
                f"injected transfer failure (version {plan.version}, layer {layer})"
            )


class ServedAgents(EngineHooks):
    """Every rank an ``EplbAgent`` of deployment ``deployment`` on the service at ``target``.

    Args:
        target: the service's gRPC ``host:port``.
        deployment: the deployment name.
        period_steps: K until the service's settings say otherwise.
        num_nodes: N hosts (transfer planning; match ``run_engine``'s).
        timeout_s: bound on each layer's transfer wait.
        step_interval_s: pace the forward steps at most this often (0: as fast as possible).
        progress_path: rank 0 appends JSON lines there (``{"kind": "step", ...}`` per step,
            ``{"kind": "switch", ...}`` per switch outcome).
        stop_path: end the run (every rank at the same step) once this file exists.
        stop_check_every: steps between stop agreements.
        faults: faults to inject.

    ``RankResult.extra``: ``switches`` (per outcome: ``step``, ``version``, ``error``,
    ``stats``: the switcher's migration stats), ``active_version``, ``agent`` (counters).
    """

    def __init__(
        self,
        target: str,
        deployment: str,
        *,
        period_steps: int = 8,
        num_nodes: int = 1,
        timeout_s: float | None = 30.0,
        step_interval_s: float = 0.0,
        progress_path: str | None = None,
        stop_path: str | None = None,
        stop_check_every: int = 4,
        faults: Faults | None = None,
    ) -> None:
        self.target = target
        self.deployment = deployment
        self.period_steps = period_steps
        self.num_nodes = num_nodes
        self.timeout_s = timeout_s
        self.step_interval_s = step_interval_s
        self.progress_path = progress_path
        self.stop_path = stop_path
        self.stop_check_every = max(1, stop_check_every)
        self.faults = faults or Faults()
        self._built: dict[str, Any] = {}  # set in build() in each rank process

    def build(
        self, rank: int, world_size: int, phy2log: np.ndarray, model: MoEModel
    ) -> EngineParts:
        f = self.faults
        weights = ExpertWeights(phy2log.shape[1] // world_size)
        group = migration_group()  # NCCL: its own high-priority communicator; gloo: the world
        delay = (_Delay(f.max_delay_s, f.seed * 1009 + rank)
                 if rank in f.delay_ranks and f.max_delay_s > 0 else None)
        stall = threading.Event() if f.stall_rank == rank else None
        fault = (_TransferFault(None, f.fail_versions, f.fail_layer)
                 if f.fail_rank == rank and f.fail_versions else None)

        def switcher(agent: EplbAgent) -> MigratingSwitcher:
            s = MigratingSwitcher(weights, agent.snapshotter, group=group, num_ranks=world_size,
                                  num_nodes=self.num_nodes, timeout_s=self.timeout_s,
                                  fault=fault)
            if fault is not None:
                fault.switcher = s
            return s

        agent = _Agent(
            self.target, deployment=self.deployment, rank=rank, world_size=world_size,
            num_experts=model.config.num_experts, phy2log=phy2log, num_nodes=self.num_nodes,
            device="cpu", period_steps=self.period_steps, switcher=switcher,
            prepare=_Prepare(delay, stall) if delay is not None or stall is not None else None,
            recorder_backend="torch", start=False, ack_delay=delay,
        )
        self._built = {"agent": agent, "stall": stall}
        return EngineParts(agent.view, agent.recorder, weights)

    def start(self, ctx: RankContext) -> None:
        ctx.state.update(self._built, last_step_at=0.0, progress=None)
        if ctx.rank == 0 and self.progress_path:
            ctx.state["progress"] = open(self.progress_path, "a", encoding="utf-8")  # noqa: SIM115
        ctx.state["agent"].start()

    def before_step(self, ctx: RankContext, step: int) -> None:
        if self.step_interval_s > 0:
            wait = ctx.state["last_step_at"] + self.step_interval_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            ctx.state["last_step_at"] = time.monotonic()

    def after_step(self, ctx: RankContext, step: int, output: torch.Tensor) -> None:
        agent: _Agent = ctx.state["agent"]
        seen = len(agent.switches)
        agent.step()
        out: TextIO | None = ctx.state["progress"]
        if out is None:
            return
        record = ctx.result.steps[-1]
        loads = record.slot_loads
        _write(out, {
            "kind": "step", "step": step, "version": record.version, "counted": record.counted,
            "rel_error": record.rel_error, "t": time.time(),
            "loads": loads.tolist() if loads is not None else None,
        })
        for switch in agent.switches[seen:]:
            _write(out, {"kind": "switch", **asdict(switch)})

    def should_stop(self, ctx: RankContext, step: int) -> bool:
        if self.stop_path is None or (step + 1) % self.stop_check_every:
            return False
        flag = torch.tensor([1 if os.path.exists(self.stop_path) else 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank, the same steps
        return bool(flag.item())

    def finish(self, ctx: RankContext) -> dict[str, Any]:
        agent: _Agent = ctx.state["agent"]
        stall: threading.Event | None = ctx.state["stall"]
        if stall is not None:
            stall.set()
        agent.join_acks()
        agent.close(flush_timeout_s=5.0)
        out: TextIO | None = ctx.state["progress"]
        if out is not None:
            out.close()
        stats = agent.stats()
        return {
            "switches": [asdict(s) for s in agent.switches],
            "active_version": agent.active_version,
            "agent": {"agreements": stats.agreements, "switches": stats.switches,
                      "mismatches": stats.mismatches, "errors": stats.errors},
        }


def _write(out: TextIO, record: dict[str, Any]) -> None:
    out.write(json.dumps(record) + "\n")
    out.flush()
