"""The one place the service calls the planner: :func:`plan`.

:func:`plan` is pure and synchronous (numpy, no I/O) so it can run in a worker thread;
:class:`Planner` runs it off the event loop and times it. The default policy (``sticky``, registered
as ``"default"``) plans from the placement in service with the request's budget and ``min_gain``
and says itself whether anything changed (:func:`eplb_service.policy.sticky.plan`); every other
policy goes through :func:`eplb_service.policy.rebalance_experts` and is gated here.
"""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from eplb_service import policy as policies
from eplb_service.balance import BalanceReport, evaluate
from eplb_service.migration import MigrationSummary, summarize_migration
from eplb_service.placement import Placement
from eplb_service.policy import sticky

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class PlanRequest:
    """What to plan.

    Attributes:
        policy: a name in :data:`eplb_service.policy.POLICIES`.
        min_gain: roll out only if mean balancedness rises by at least this (and by > 0).
        max_moves: at most this many slots change expert (None: no limit); the default policy
            plans within it, other policies are refused above it.
        num_groups: expert groups (divides E).
        expert_bytes: bytes per expert for the moved-bytes estimate (None: unknown).
        max_bytes: at most this many bytes of expert weights move (default policy only; needs
            ``expert_bytes``).
        strategy: ``"auto"``, ``"hierarchical"`` or ``"global"`` (default policy only).
    """

    policy: str = "default"
    min_gain: float = 0.0
    max_moves: int | None = None
    num_groups: int = 1
    expert_bytes: int | None = None
    max_bytes: int | None = None
    strategy: str = "auto"


@dataclass(frozen=True)
class PlanOutcome:
    """A proposed placement and whether it is worth rolling out.

    Attributes:
        placement: the proposal (same topology as ``current``).
        before: balance of the window under the current placement.
        after: predicted balance of the window under ``placement``.
        migration: what moves from current to proposal.
        worth_it: whether the request's gates pass (gain > 0, >= min_gain, moves <= max_moves).
        reason: why not, when not worth it.
        seconds: planner wall time.
        note: how a budget cut the plan short, or which strategy the default policy chose
            and why (None for other policies).
    """

    placement: Placement
    before: BalanceReport
    after: BalanceReport
    migration: MigrationSummary
    worth_it: bool
    reason: str | None
    seconds: float
    note: str | None = None

    @property
    def gain(self) -> float:
        return self.after.balancedness_mean - self.before.balancedness_mean

    @property
    def moves(self) -> int:
        return self.migration.slots_changed


def _accepted_options(policy: str) -> frozenset[str]:
    """Keyword options the policy function takes (``current``, ``max_moves`` ...)."""
    fn = policies.POLICIES.get(policy)
    if fn is None:
        return frozenset()
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _propose(load: FloatArray, current: Placement, request: PlanRequest) -> Placement:
    """Runs the policy on the ``[L, E]`` load; the single call into :mod:`eplb_service.policy`.

    Policies that plan incrementally (``policy="default"``) get the placement in service and the
    move budget, so they return a plan within it. ``min_gain`` stays with :func:`plan`, which
    gates every policy the same way and still shows the plan (and its gain) on a dry run.
    """
    t = current.topology
    accepted = _accepted_options(request.policy)
    wanted: dict[str, Any] = {
        "current": current.phy2log,
        "max_moves": request.max_moves,
        "expert_bytes": request.expert_bytes,
    }
    options = {k: v for k, v in wanted.items() if k in accepted and v is not None}
    phy2log, _, _ = policies.rebalance_experts(
        load,
        t.num_slots,
        request.num_groups,
        t.num_nodes,
        t.num_ranks,
        policy=request.policy,
        **options,
    )
    return Placement(np.asarray(phy2log, dtype=np.int64), t)


def plan(load: npt.ArrayLike, current: Placement, request: PlanRequest) -> PlanOutcome:
    """Plans a placement for the window load and gates it.

    Args:
        load: ``[L, E]`` logical load of the window (non-negative).
        current: the active placement ``[L, P]``.
        request: policy and gates.

    Raises:
        ValueError: unknown policy, or sizes the policy refuses (e.g. num_groups not dividing E).
    """
    started = time.perf_counter()
    weight = np.asarray(load, dtype=np.float64)
    if _is_default(request.policy):
        return _plan_default(weight, current, request, started)
    proposal = _propose(weight, current, request)
    before = evaluate(weight, current)
    after = evaluate(weight, proposal)
    migration = summarize_migration(current, proposal, request.expert_bytes)
    gain = after.balancedness_mean - before.balancedness_mean
    reason: str | None = None
    if migration.slots_changed == 0:
        reason = "the plan equals the current placement"
    elif gain <= 0:
        reason = f"no predicted gain (mean balancedness {before.balancedness_mean:.4f} -> " \
            f"{after.balancedness_mean:.4f})"
    elif gain < request.min_gain:
        reason = f"predicted gain {gain:.4f} < min_gain {request.min_gain}"
    elif request.max_moves is not None and migration.slots_changed > request.max_moves:
        reason = f"plan changes {migration.slots_changed} slots > max_moves {request.max_moves}"
    return PlanOutcome(
        placement=proposal,
        before=before,
        after=after,
        migration=migration,
        worth_it=reason is None,
        reason=reason,
        seconds=time.perf_counter() - started,
    )


def _is_default(policy: str) -> bool:
    """Whether ``policy`` names the default (``sticky``) policy, under any of its names."""
    return policies.POLICIES.get(policy) is sticky.rebalance_experts


def _plan_default(
    weight: FloatArray, current: Placement, request: PlanRequest, started: float
) -> PlanOutcome:
    """The default policy plans from ``current`` within the request's budget and gates itself
    (``min_gain``); its ``changed`` / ``reason`` decide whether the plan is worth rolling out."""
    result = sticky.plan(
        weight,
        current.topology,
        num_groups=request.num_groups,
        current=current,
        max_moves=request.max_moves,
        max_bytes=request.max_bytes,
        expert_bytes=request.expert_bytes,
        min_gain=request.min_gain,
        strategy=request.strategy,
    )
    assert result.before is not None and result.migration is not None  # current was given
    reason: str | None = None
    if not result.changed:
        reason = result.reason or "the plan equals the current placement"
        if request.max_moves is not None and reason.startswith("budget"):
            reason += f" (the unbudgeted plan changes more slots > max_moves {request.max_moves})"
    elif result.gain <= 0:
        reason = (f"no predicted gain (mean balancedness {result.before.balancedness_mean:.4f}"
                  f" -> {result.after.balancedness_mean:.4f})")
    notes = [f"strategy {result.strategy}: {result.strategy_reason}"]
    if result.changed and result.reason:
        notes.append(result.reason)
    return PlanOutcome(
        placement=result.placement,
        before=result.before,
        after=result.after,
        migration=result.migration,
        worth_it=reason is None,
        reason=reason,
        seconds=time.perf_counter() - started,
        note="; ".join(notes),
    )


class Planner:
    """Runs :func:`plan` off the event loop so ingestion never waits for it.

    Threads by default (no start-up cost, no copies); worker processes when ``processes > 0``
    (no GIL contention with ingestion while a slow pure-Python policy runs; inputs and outputs
    are pickled, and the pool starts with the ``spawn`` method: gRPC does not survive fork).
    See docs/decisions/0004-service-concurrency.md.

    Args:
        threads: worker threads (planner runs of different deployments in parallel).
        processes: worker processes instead of threads when > 0.
    """

    def __init__(self, threads: int = 1, processes: int = 0) -> None:
        self._executor: Executor
        if processes > 0:
            self._executor = ProcessPoolExecutor(
                max_workers=processes, mp_context=multiprocessing.get_context("spawn")
            )
        else:
            self._executor = ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix="eplb-planner"
            )

    async def warm(self) -> None:
        """Starts the workers (a process pool imports numpy and the policies once, here)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, known_policies)

    async def run(
        self, load: npt.ArrayLike, current: Placement, request: PlanRequest
    ) -> PlanOutcome:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, plan, load, current, request)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def known_policies() -> list[str]:
    return sorted(policies.POLICIES)
