"""In-band version agreement: every rank switches maps at the same forward step (invariant 1).

The service delivers a plan to each rank's stream at its own pace, so receipt cannot be the
switch signal. Instead every rank calls ``step()`` once per forward step, and every K steps (the
same steps on every rank: EP ranks run in lockstep) the ranks agree over their process group:

1. **propose**: all-reduce MIN of ``[highest ready version, K, layers_per_step]``. Every rank gets
   the same minimum ``v``; ``v > active`` means every rank has *something* at least as new as
   ``v`` ready. The agreed K and ``layers_per_step`` (from the service's ``Settings``, which
   reach ranks at different times) take effect on every rank at this same step.
2. **confirm**, only when ``v > active`` (a fact every rank shares): all-reduce MIN of
   ``[holds v, fingerprint(v), -fingerprint(v)]``. All ranks switch iff every rank holds plan
   ``v`` and all fingerprints are equal (``min == max``). A rank whose highest ready plan is
   newer than ``v`` but that never staged ``v`` (it was cancelled and replaced, say) blocks the
   switch instead of applying something else.

A rank that never becomes ready contributes its active version, so nobody switches: it holds
everyone back safely, and the service cancels the rollout after its timeout. Whether a
collective runs depends only on the step count and on results of earlier collectives, never on
rank-local state, so ranks cannot deadlock on a mismatched collective.

The protocol is written once, as a generator (:meth:`VersionAgreement.rounds`) that yields the
vectors to reduce and receives the reductions. :meth:`VersionAgreement.step` drives it with a
:class:`Collective` (``torch.distributed`` or threads); :func:`step_lockstep` drives many
in-process ranks from one thread (the simulator).

Extension point for weight migration (issue 6): the switch itself is a :class:`Switcher`.
``begin`` runs on every rank at the agreed step; ``advance`` runs at that step and at every later
step until it returns True (no agreement rounds meanwhile). A migrating switcher moves weights
(collectives are allowed: every rank calls it at the same step with the same plan) and only then
switches each layer's map, ``layers_per_step`` layers per step. ``advance`` must return the same
value on every rank at the same step: derive it from agreed data (layer counts,
``layers_per_step``) or from a collective, never from rank-local timing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from worker_agent.plans import PlanBook, ReadyPlan

__all__ = [
    "AgreedSettings",
    "AgreementError",
    "Collective",
    "LocalCollective",
    "Lockstep",
    "StepOutcome",
    "Switcher",
    "ThreadGroup",
    "TorchCollective",
    "VersionAgreement",
    "step_lockstep",
]

_log = logging.getLogger(__name__)

Rounds = Generator[list[int], list[int], "StepOutcome | None"]


class AgreementError(RuntimeError):
    """Ranks diverged in the protocol (a bug), or a collective was used inconsistently."""


# ---------------------------------------------------------------------------------------------
# Collectives


class Collective(Protocol):
    """An all-reduce over the ranks of one EP group.

    ``allreduce_min(values)``: every rank passes a vector of the same length and gets the
    element-wise minimum over all ranks. It is called by every rank at the same points.
    """

    def allreduce_min(self, values: Sequence[int]) -> list[int]: ...


class LocalCollective:
    """The group of one rank: the minimum is the value itself."""

    def allreduce_min(self, values: Sequence[int]) -> list[int]:
        return [int(v) for v in values]


class Lockstep:
    """Marks ranks driven together by :func:`step_lockstep` from one thread (the simulator).

    It has no collective of its own: calling it (through ``VersionAgreement.step``) is an error.
    """

    def allreduce_min(self, values: Sequence[int]) -> list[int]:
        raise AgreementError("these ranks are driven by step_lockstep(), not step()")


class TorchCollective:
    """``torch.distributed.all_reduce(MIN)`` over ``group`` (gloo, NCCL, ...).

    Args:
        group: the EP process group (``None``: the default group).
        device: where the small int64 vector lives; default ``cuda:current`` for NCCL, else CPU.
            The result is read back to the host: one small synchronization every K steps.
    """

    def __init__(self, group: Any = None, device: Any = None) -> None:
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized")
        if device is None:
            backend = str(dist.get_backend(group)).lower()
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if "nccl" in backend
                else torch.device("cpu")
            )
        self._torch = torch
        self._dist = dist
        self.group = group
        self.device = torch.device(device)

    def allreduce_min(self, values: Sequence[int]) -> list[int]:
        tensor = self._torch.tensor(list(values), dtype=self._torch.int64, device=self.device)
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.MIN, group=self.group)
        return [int(v) for v in tensor.tolist()]


class ThreadGroup:
    """An in-process group of ``world_size`` ranks that are threads of one process.

    Each rank thread uses :meth:`member`\\ ``(rank)``. A reduction is two barrier phases: every
    rank writes its vector into its own slot, waits, reads all slots (nobody writes until every
    rank has read), waits again.

    Args:
        world_size: ranks in the group.
        timeout_s: a barrier wait longer than this breaks the group (``BrokenBarrierError`` on
            every member), so a dead rank thread cannot hang the others forever.
    """

    def __init__(self, world_size: int, *, timeout_s: float | None = 60.0) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout_s)
        self._slots: list[list[int]] = [[] for _ in range(world_size)]

    def member(self, rank: int) -> Collective:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside [0, {self.world_size})")
        return _ThreadMember(self, rank)

    def _allreduce_min(self, rank: int, values: Sequence[int]) -> list[int]:
        self._slots[rank] = [int(v) for v in values]
        self._barrier.wait()
        rows = list(self._slots)
        self._barrier.wait()
        if any(len(row) != len(rows[0]) for row in rows):
            raise AgreementError(f"ranks reduced vectors of lengths {[len(r) for r in rows]}")
        return [min(column) for column in zip(*rows, strict=True)]


@dataclass(frozen=True)
class _ThreadMember:
    group: ThreadGroup
    rank: int

    def allreduce_min(self, values: Sequence[int]) -> list[int]:
        return self.group._allreduce_min(self.rank, values)


# ---------------------------------------------------------------------------------------------
# The agreement


@dataclass(frozen=True)
class AgreedSettings:
    """Settings in force on every rank of the group (agreed in-band, never rank-local).

    Attributes:
        period_steps: K, steps between agreements (>= 1).
        layers_per_step: layers a migrating switcher may move per step (0 = all at once).
    """

    period_steps: int
    layers_per_step: int = 0


@dataclass(frozen=True)
class StepOutcome:
    """A switch this rank finished (or failed) at a step.

    Attributes:
        step: the forward step ``step()`` closed (0-based count of ``step()`` calls).
        plan: the plan switched to.
        error: why the switch failed on this rank; ``None`` when the rank now routes with
            ``plan`` from step ``step + 1`` on.
    """

    step: int
    plan: ReadyPlan
    error: str | None = None

    @property
    def applied(self) -> bool:
        return self.error is None

    @property
    def first_step(self) -> int:
        """The first forward step routed with the new map."""
        return self.step + 1


class Switcher(Protocol):
    """Applies an agreed plan on one rank. Engine thread; called on every rank at the same steps.

    ``begin(step, plan, settings)`` once at the agreed step, then ``advance(step)`` at that step
    and each following step until it returns True, when the rank routes with ``plan`` in every
    layer. A plain map switch does everything in its first ``advance``: capture the load snapshot
    (counts so far belong to the old version), then update the map in place.
    """

    def begin(self, step: int, plan: ReadyPlan, settings: AgreedSettings) -> None: ...

    def advance(self, step: int) -> bool: ...


class VersionAgreement:
    """One rank's side of the in-band agreement.

    Args:
        plans: the rank's ready plans (staged by the client thread).
        switcher: applies an agreed plan.
        active_version: the version the rank routes with at start.
        settings: K and ``layers_per_step`` in force at start; the same on every rank.

    Thread-safety: :meth:`step`/:meth:`rounds` run on the engine thread only. The client thread
    talks to it through the (locked) :class:`PlanBook` and :meth:`propose_settings`, which
    replaces one immutable object (an atomic reference assignment).
    """

    def __init__(
        self,
        plans: PlanBook,
        switcher: Switcher,
        *,
        active_version: int = 0,
        settings: AgreedSettings | None = None,
    ) -> None:
        self.plans = plans
        self.switcher = switcher
        self.settings = settings or AgreedSettings(period_steps=16)
        if self.settings.period_steps < 1:
            raise ValueError(f"period_steps must be >= 1, got {self.settings.period_steps}")
        self._proposed = self.settings
        self.active_version = int(active_version)
        self.steps = 0  # step() calls so far: the index of the next forward step
        self._countdown = self.settings.period_steps
        self._switching: ReadyPlan | None = None
        # Counters, engine thread only.
        self.agreements = 0
        self.switches = 0
        self.mismatches = 0
        self.errors = 0

    @property
    def switching(self) -> bool:
        """A switch is in progress (a multi-step switcher has not finished)."""
        return self._switching is not None

    def propose_settings(self, period_steps: int, layers_per_step: int) -> None:
        """New settings from the service; they take effect at the next agreement. Any thread."""
        self._proposed = AgreedSettings(max(1, int(period_steps)), max(0, int(layers_per_step)))

    def step(self, collective: Collective) -> StepOutcome | None:
        """Close one forward step. Engine thread, every rank, once per step; never raises.

        Returns an outcome when this rank switched (or failed to) at this step, else ``None``.
        A failing collective is logged and counted; the rank keeps its map.
        """
        gen = self.rounds()
        try:
            values = next(gen)
            while True:
                values = gen.send(collective.allreduce_min(values))
        except StopIteration as stop:
            outcome: StepOutcome | None = stop.value
            return outcome
        except Exception:
            self.errors += 1
            gen.close()
            _log.exception("version agreement failed at step %d; keeping version %d",
                           self.steps - 1, self.active_version)
            return None

    def rounds(self) -> Rounds:
        """The protocol for one step: yields vectors to all-reduce (MIN), receives the results.

        Yields nothing on most steps; one round at an agreement step, two when a switch is
        possible. The number of rounds depends only on the step count and on reduced values, so
        it is the same on every rank.
        """
        step = self.steps
        self.steps += 1
        if self._switching is not None:
            return self._advance(step, self._switching)
        self._countdown -= 1
        if self._countdown > 0:
            return None
        self.agreements += 1
        self._countdown = self.settings.period_steps  # also if the collective fails below
        proposed = self._proposed
        highest = self.plans.highest()
        ready = highest.version if highest and highest.version > self.active_version else None
        agreed = yield [
            ready if ready is not None else self.active_version,
            proposed.period_steps,
            proposed.layers_per_step,
        ]
        self.settings = AgreedSettings(max(1, agreed[1]), max(0, agreed[2]))
        self._countdown = self.settings.period_steps
        target = agreed[0]
        if target <= self.active_version:
            return None
        plan = self.plans.get(target)
        mark = plan.fingerprint if plan is not None else 0
        confirm = yield [1 if plan is not None else 0, mark, -mark]
        if confirm[0] != 1 or confirm[1] != -confirm[2]:
            self.mismatches += 1
            _log.warning(
                "step %d: version %d is the agreed minimum but not every rank holds the same "
                "plan for it (this rank: %s); not switching",
                step, target, "holds it" if plan is not None else "does not hold it",
            )
            return None
        assert plan is not None  # every rank holds it: confirm[0] == 1
        try:
            self.switcher.begin(step, plan, self.settings)
        except Exception as exc:
            return self._fail(step, plan, exc)
        self._switching = plan
        return self._advance(step, plan)

    def _advance(self, step: int, plan: ReadyPlan) -> StepOutcome | None:
        try:
            done = self.switcher.advance(step)
        except Exception as exc:
            return self._fail(step, plan, exc)
        if not done:
            return None
        self._switching = None
        self.active_version = plan.version
        self.plans.discard_through(plan.version)
        self.switches += 1
        return StepOutcome(step, plan)

    def _fail(self, step: int, plan: ReadyPlan, exc: Exception) -> StepOutcome:
        self._switching = None
        self.errors += 1
        self.plans.cancel(plan.version)
        _log.error("step %d: switching to version %d failed: %s", step, plan.version, exc)
        return StepOutcome(step, plan, error=f"switch to version {plan.version} failed: {exc}")


def step_lockstep(agreements: Sequence[VersionAgreement]) -> list[StepOutcome | None]:
    """Close one forward step on many in-process ranks at once (one thread, no barrier).

    Runs every rank's :meth:`VersionAgreement.rounds` side by side and reduces each round's
    vectors in memory: the same protocol as :meth:`VersionAgreement.step` with a real
    collective. Raises :class:`AgreementError` if the ranks do not agree on the number of rounds.
    """
    gens = [agreement.rounds() for agreement in agreements]
    outcomes: list[StepOutcome | None] = [None] * len(gens)
    sent: list[int] | None = None
    while True:
        values: list[list[int]] = []
        finished = 0
        for i, gen in enumerate(gens):
            try:
                values.append(next(gen) if sent is None else gen.send(sent))
            except StopIteration as stop:
                outcomes[i] = stop.value
                finished += 1
        if finished == len(gens):
            return outcomes
        if finished:
            raise AgreementError(
                f"{finished} of {len(gens)} ranks finished the step while the others reduce"
            )
        sent = [min(column) for column in zip(*values, strict=True)]
