"""The ``sticky`` policy (the service's default): near-optimal balance, minimal weight movement.

:func:`plan` is the rich entry point the service and ``eplb plan`` use; :func:`rebalance_experts`
is the drop-in ``(phy2log, log2phy, logcnt)`` form registered as ``"sticky"`` and ``"default"``.

1. **Fresh plan** (:mod:`~eplb_service.policy.fresh`): DeepSeek's greedy as a start, evened out
   and polished by swaps; count-limited layers retry with cardinality-shaped replica counts.
   Hierarchical plans do this per (layer, node) after packing groups onto nodes
   (:mod:`~eplb_service.policy.hierarchy`).
2. **Strategy**: ``hierarchical`` keeps each group's replicas on one node; ``global`` does not;
   ``auto`` takes hierarchical when its fresh plan's balancedness is within
   :data:`AUTO_MAX_LOSS` (relative) of the global one's, and says why.
3. **From the placement in service** (``current``; :mod:`~eplb_service.policy.incremental`): a
   layer already within ``tolerance`` of the fresh plan keeps every slot; the others change as
   little as reaches that goal, cheapest moves first (copy inside a GPU < within a node <
   across nodes). Then a polish: swaps where they gain most per rewrite (in any layer above
   its fresh plan) until the mean balancedness is within ``MEAN_SHARE * tolerance`` of the
   fresh plan's, or ``POLISH_SLOTS`` more slots are spent.
4. **Budgets** (:mod:`~eplb_service.policy.budget`): ``max_moves`` / ``max_bytes`` keep the
   edits with the best balancedness gain per cost; **gating**: ``min_gain`` keeps the current
   placement when the predicted gain is smaller, and the result says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from eplb_service.balance import (
    BalanceReport,
    balancedness,
    lower_bound,
    report,
)
from eplb_service.balance import as_load as as_float_load
from eplb_service.migration import MigrationSummary, summarize_migration
from eplb_service.placement import Placement, PlacementError, Topology, as_int_array
from eplb_service.policy._common import Placement as PlacementMaps
from eplb_service.policy._inputs import check_sizes
from eplb_service.policy.budget import Budget, choose_points
from eplb_service.policy.fresh import SETTLE, item_loads, plan_fresh
from eplb_service.policy.fresh import lower_bound as lower_bound_rows
from eplb_service.policy.hierarchy import (
    assign_groups,
    groups_in_service,
    node_experts,
    node_loads,
    regroup,
    to_global,
    to_local,
)
from eplb_service.policy.incremental import Paths, materialize, replan

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

__all__ = [
    "AUTO_MAX_LOSS",
    "STRATEGIES",
    "TOLERANCE",
    "PlanResult",
    "plan",
    "rebalance_experts",
]

STRATEGIES = ("auto", "hierarchical", "global")
# auto keeps group locality when it costs at most this much balancedness (relative).
AUTO_MAX_LOSS = 0.01
# With a placement in service, each layer stops once its max rank load is within this
# (relative) of the fresh plan's.
TOLERANCE = 0.004
# Whole-number (token count) loads: rank-load excess within this many standard deviations of
# multinomial sampling noise is not worth moving weights for.
SIGNIFICANCE = 1.0
# Most swaps per row in the migration-aware search.
MAX_SWAPS = 64
# With a placement in service, the plan's mean balancedness also stays within this fraction
# of ``tolerance`` (relative) of the fresh plan's: rows within their own goal (tolerance plus
# sampling noise) add swaps where they gain most per rewrite until it holds.
MEAN_SHARE = 1.125
# ... those swaps go down to this (relative) above each row's fresh plan ...
POLISH = 0.001
# ... and rewrite at most this fraction of all slots beyond what the rows' goals take.
POLISH_SLOTS = 0.03


@dataclass(frozen=True)
class PlanResult:
    """What :func:`plan` proposes and what it would do.

    Attributes:
        placement: the plan (``current`` itself when ``changed`` is False).
        before: balance of the load under ``current`` (None without ``current``).
        after: predicted balance of the load under ``placement``.
        fresh: balance the from-scratch plan of the chosen strategy reaches (the reference the
            migration-aware plan stays within ``tolerance`` of).
        migration: what moves from ``current`` to ``placement`` (None without ``current``).
        strategy: ``"hierarchical"`` or ``"global"``, the one used.
        strategy_reason: why that strategy.
        changed: whether ``placement`` differs from ``current`` (True without ``current``).
        reason: why nothing changed, or how a budget cut the plan (None otherwise).
    """

    placement: Placement
    before: BalanceReport | None
    after: BalanceReport
    fresh: BalanceReport
    migration: MigrationSummary | None
    strategy: str
    strategy_reason: str
    changed: bool
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def gain(self) -> float:
        """Predicted rise of mean balancedness (0.0 without ``current``)."""
        if self.before is None:
            return 0.0
        return self.after.balancedness_mean - self.before.balancedness_mean

    def to_dict(self) -> dict[str, Any]:
        return {
            "changed": self.changed,
            "reason": self.reason,
            "strategy": self.strategy,
            "strategy_reason": self.strategy_reason,
            "gain": self.gain,
            "before": None if self.before is None else self.before.to_dict(),
            "after": self.after.to_dict(),
            "fresh": self.fresh.to_dict(),
            "migration": None if self.migration is None else self.migration.to_dict(),
            **self.details,
        }


@dataclass(frozen=True)
class _Fresh:
    """A from-scratch plan of one strategy."""

    item: I64  # [L, R, S]
    balancedness: float  # mean over layers
    group_node: I64 | None  # [L, G] for hierarchical plans


def _fresh_global(weight: F64, topology: Topology) -> _Fresh:
    t = topology
    item, _ = plan_fresh(weight, t.num_slots, t.num_ranks)
    return _Fresh(item, _mean_balancedness(weight, item.reshape(t.num_layers, -1), t.num_ranks),
                  None)


def _fresh_hierarchical(
    weight: F64, topology: Topology, num_groups: int, group_node: I64 | None = None
) -> _Fresh:
    """Per (layer, node) fresh plans under ``group_node`` (packed by load when None)."""
    t = topology
    if group_node is None:
        group_node = assign_groups(weight, num_groups, t.num_nodes)
    experts = node_experts(group_node, t.num_experts, t.num_nodes)  # [L, N, E/N]
    sub_weight = weight[np.arange(t.num_layers)[:, None, None], experts].reshape(
        t.num_layers * t.num_nodes, -1
    )
    sub, _ = plan_fresh(sub_weight, t.num_slots // t.num_nodes, t.ranks_per_node)
    item = to_global(sub, experts)
    mean = _mean_balancedness(weight, item.reshape(t.num_layers, -1), t.num_ranks)
    return _Fresh(item, mean, group_node)


def _choose_strategy(
    weight: F64, topology: Topology, num_groups: int, strategy: str, lazy: bool
) -> tuple[_Fresh | None, str, str]:
    """Fresh plan of the strategy to use (None when ``lazy`` and the choice needs none), its
    name and why."""
    t = topology
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")

    def global_plan() -> _Fresh | None:
        return None if lazy else _fresh_global(weight, t)

    if t.num_nodes == 1:
        return global_plan(), "global", "one node: every placement is node-local"
    possible = num_groups % t.num_nodes == 0
    if not possible:
        why = (
            f"num_groups ({num_groups}) is not a multiple of num_nodes ({t.num_nodes}): "
            "groups cannot be kept on single nodes"
        )
        if strategy == "hierarchical":
            raise ValueError(f"strategy 'hierarchical' impossible: {why}")
        return global_plan(), "global", why
    if strategy == "global":
        return global_plan(), "global", "requested"
    hier = _fresh_hierarchical(weight, t, num_groups)
    if strategy == "hierarchical":
        return hier, "hierarchical", "requested"
    glob = _fresh_global(weight, t)
    b_h, b_g = hier.balancedness, glob.balancedness
    loss = (b_g - b_h) / b_g if b_g > 0 else 0.0
    if loss <= AUTO_MAX_LOSS:
        why = (
            f"keeping groups on nodes costs {100 * max(loss, 0.0):.2f}% balancedness "
            f"({b_h:.4f} vs {b_g:.4f} global) <= {100 * AUTO_MAX_LOSS:g}%"
        )
        return hier, "hierarchical", why
    why = (
        f"keeping groups on nodes would cost {100 * loss:.2f}% balancedness "
        f"({b_h:.4f} vs {b_g:.4f} global) > {100 * AUTO_MAX_LOSS:g}%"
    )
    return glob, "global", why


def _from_current(
    weight: F64,
    topology: Topology,
    current: Placement,
    fresh: _Fresh | None,
    strategy: str,
    num_groups: int,
    tolerance: float,
    significance: float,
    budget: Budget,
) -> tuple[I64, str | None]:
    """Migration-aware plan ``[L, P]``: per row, the point on its move path chosen by
    :func:`choose_points` (mean balancedness within ``tolerance`` of the fresh plan's, at the
    least cost, within the budget)."""
    t = topology
    cur = current.phy2log.reshape(t.num_layers, t.num_ranks, -1)
    if strategy == "global":
        mean = weight.sum(axis=1) / t.num_ranks
        allowance = _noise(weight, mean, significance)
        if fresh is None:
            # The lower bound stands in for the fresh plan until a layer cannot reach it.
            reference = lower_bound_rows(weight, t.num_slots, t.num_ranks) * (1 + SETTLE)

            def fresh_rows(rows: I64) -> tuple[I64, F64]:
                return plan_fresh(weight[rows], t.num_slots, t.num_ranks)
        else:
            known = fresh.item
            reference = _peaks(weight, known)

            def fresh_rows(rows: I64) -> tuple[I64, F64]:
                return known[rows], reference[rows]
        paths, goal = replan(weight, cur, reference, fresh_rows, num_nodes=t.num_nodes,
                             tolerance=tolerance, allowance=allowance, max_moves=MAX_SWAPS,
                             stand_in=fresh is None, polish=POLISH)
        needed = _needed(mean, goal, paths, np.ones(t.num_layers))
        more = _needed_mean(mean, (goal - allowance) / (1 + tolerance), paths,
                            np.ones(t.num_layers), MEAN_SHARE * tolerance)
        point, note = _choose(paths, mean, np.ones(t.num_layers), needed, budget, more)
        return materialize(paths, point).reshape(t.num_layers, -1), note
    assert fresh is not None and fresh.group_node is not None
    # Start from the group-to-node assignment in service and swap groups between nodes only
    # until node loads are about as balanced as the fresh assignment's (never under a budget).
    in_service = groups_in_service(current.phy2log, num_groups, t.num_nodes, t.num_experts)
    group_node = in_service
    if not budget.limited:
        node_mean = weight.sum(axis=1) / t.num_nodes
        fresh_node_peak = node_loads(weight, fresh.group_node, t.num_nodes).max(axis=1)
        target = fresh_node_peak * (1 + tolerance) + _noise(weight, node_mean, significance)
        group_node = regroup(weight, in_service, t.num_nodes, target)
    ref = _fresh_hierarchical(weight, t, num_groups, group_node)
    experts = node_experts(group_node, t.num_experts, t.num_nodes)
    sub_weight = weight[np.arange(t.num_layers)[:, None, None], experts].reshape(
        t.num_layers * t.num_nodes, -1
    )
    sub_cur = to_local(cur, experts)
    sub_fresh = to_local(ref.item, experts)
    fresh_peak = _peaks(sub_weight, sub_fresh)
    mean = sub_weight.sum(axis=1) / t.ranks_per_node
    allowance = _noise(sub_weight, mean, significance)
    def sub_rows(rows: I64) -> tuple[I64, F64]:
        return sub_fresh[rows], fresh_peak[rows]

    paths, goal = replan(sub_weight, sub_cur, fresh_peak, sub_rows, num_nodes=1,
                         tolerance=tolerance, allowance=allowance, max_moves=MAX_SWAPS,
                         polish=POLISH)
    # Rows are (layer, node) pairs: each node's balancedness counts 1/N toward its layer's.
    row_weight = np.full(sub_weight.shape[0], 1.0 / t.num_nodes)
    needed = _needed(mean, goal, paths, row_weight)
    more = _needed_mean(mean, (goal - allowance) / (1 + tolerance), paths, row_weight,
                        MEAN_SHARE * tolerance)
    point, note = _choose(paths, mean, row_weight, needed, budget, more)
    return to_global(materialize(paths, point), experts).reshape(t.num_layers, -1), note


def _choose(
    paths: Paths, mean: F64, row_weight: F64, needed: float, budget: Budget, more: float
) -> tuple[I64, str | None]:
    """Points per row within the budget, and a note when the budget cut the plan short:
    ``needed`` (every row's goal on average), then toward ``more`` (the mean within
    ``MEAN_SHARE * tolerance`` of the fresh plans') with at most ``POLISH_SLOTS`` of all
    slots rewritten beyond."""
    extra = POLISH_SLOTS * paths.current[0].size * paths.current.shape[0]
    if paths.options.shape[1]:
        more = needed  # exact fewest-rewrites rows (Mixtral): not polished (see replan)
    point = choose_points(paths, mean, row_weight, needed=needed, budget=budget, more=more,
                          more_moves=extra)
    if not budget.limited:
        return point, None
    free = choose_points(paths, mean, row_weight, needed=needed, budget=Budget(), more=more,
                         more_moves=extra)
    rows = np.arange(point.size)
    taken = int(paths.changed[rows, point].sum())
    wanted = int(paths.changed[rows, free].sum())
    if taken >= wanted:
        return point, None
    limits = ", ".join(
        f"{name}={value}" for name, value in
        (("max_moves", budget.max_moves), ("max_bytes", budget.max_bytes)) if value is not None
    )
    return point, f"budget ({limits}): {taken} of the {wanted} slot rewrites wanted"


def _needed(mean: F64, goal: F64, paths: Paths, row_weight: F64) -> float:
    """Weighted balancedness gain over the placement in service that brings every row to its
    goal on average."""
    target = float((row_weight * _ratio(mean, goal)).sum())
    now = float((row_weight * _ratio(mean, paths.peak[:, 0])).sum())
    return max(target - now, 0.0)


def _needed_mean(
    mean: F64, reference: F64, paths: Paths, row_weight: F64, margin: float
) -> float:
    """Weighted balancedness gain over the placement in service that brings the weighted mean
    balancedness within ``margin`` (relative) of the fresh plans' (peaks ``reference``, [X])."""
    target = (1 - margin) * float((row_weight * _ratio(mean, reference)).sum())
    now = float((row_weight * _ratio(mean, paths.peak[:, 0])).sum())
    return max(target - now, 0.0)


def _group_local(placement: Placement, num_groups: int) -> bool:
    """Whether each expert group's replicas sit on one node in every layer."""
    t = placement.topology
    group = placement.phy2log // (t.num_experts // num_groups)  # [L, P]
    node = np.arange(t.num_slots) // (t.num_slots // t.num_nodes)  # [P]
    seen = np.zeros((t.num_layers, num_groups, t.num_nodes), dtype=bool)
    seen[np.arange(t.num_layers)[:, None], group, node[None, :]] = True
    return bool((seen.sum(axis=2) <= 1).all())


def _ratio(mean: F64, peak: F64) -> F64:
    """Balancedness ``mean / peak`` (1 where the peak is 0)."""
    return np.divide(mean, peak, out=np.ones_like(mean), where=peak > 0)


def _noise(weight: F64, mean: F64, significance: float) -> F64:
    """``[X]`` load a row may stay above its goal because sampling noise alone explains it.

    Whole-number loads are token counts: a rank's count then varies between windows by about
    ``sqrt(load)`` (multinomial sampling), so ``significance * sqrt(mean rank load)`` of excess
    carries no signal worth moving weights for. Other loads (normalized, decayed) get none.
    """
    if significance <= 0 or not np.array_equal(weight, np.round(weight)):
        return np.zeros(weight.shape[0])
    return significance * np.sqrt(mean)


def _peaks(weight: F64, item: I64) -> F64:
    """``[X, n]`` loads, ``[X, R, S]`` arrangement -> ``[X]`` largest rank load."""
    return item_loads(weight, item).sum(axis=2).max(axis=1)


def _current_placement(current: Any, topology: Topology) -> Placement:
    if isinstance(current, Placement):
        if current.topology != topology:
            raise PlacementError(
                f"current placement topology {current.topology} does not match {topology}"
            )
        return current
    return Placement(as_int_array(current, "current"), topology)


def _check_options(
    load: F64,
    topology: Topology,
    num_groups: int,
    current: Any,
    budget: Budget,
    min_gain: float,
    tolerance: float,
    significance: float,
) -> None:
    """Raises ValueError naming the first bad option."""
    t = topology
    if load.shape != (t.num_layers, t.num_experts):
        raise ValueError(
            f"weight shape {load.shape} does not match [layers={t.num_layers}, "
            f"experts={t.num_experts}]"
        )
    check_sizes(t.num_experts, t.num_slots, num_groups, t.num_nodes, t.num_ranks)
    for name, value in (("max_moves", budget.max_moves), ("max_bytes", budget.max_bytes),
                        ("expert_bytes", budget.expert_bytes)):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 0):
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if budget.max_bytes is not None and budget.expert_bytes is None:
        raise ValueError("max_bytes needs expert_bytes (the size of one expert's weights)")
    if budget.limited and current is None:
        raise ValueError("max_moves and max_bytes need current (the placement in service)")
    for name, number in (("min_gain", min_gain), ("tolerance", tolerance),
                         ("significance", significance)):
        if not np.isfinite(number) or (name != "min_gain" and number < 0):
            raise ValueError(f"{name} must be finite{'' if name == 'min_gain' else ' and >= 0'}"
                             f", got {number!r}")


@dataclass(frozen=True)
class _Solution:
    """What :func:`_solve` decided, before any report is computed."""

    phy2log: I64  # [L, P], the plan (before min_gain gating)
    current: Placement | None
    fresh_item: I64 | None  # [L, R, S], the fresh plan of the strategy used, if computed
    strategy: str
    strategy_reason: str
    note: str | None  # how a budget cut the plan


def _solve(
    load: F64,
    topology: Topology,
    num_groups: int,
    current: Any,
    budget: Budget,
    strategy: str,
    tolerance: float,
    significance: float,
) -> _Solution:
    t = topology
    fresh, used, why = _choose_strategy(load, t, num_groups, strategy, lazy=current is not None)
    if current is None:
        assert fresh is not None
        return _Solution(fresh.item.reshape(t.num_layers, -1), None, fresh.item, used, why, None)
    cur = _current_placement(current, t)
    if used == "hierarchical" and budget.limited and not _group_local(cur, num_groups):
        # Making the placement in service group-local could take any number of moves.
        fresh = _fresh_global(load, t)
        used, why = "global", (
            "the placement in service is not group-local and a budget caps the moves "
            "needed to make it so"
        )
    phy2log, note = _from_current(load, t, cur, fresh, used, num_groups, tolerance,
                                  significance, budget)
    return _Solution(phy2log, cur, None if fresh is None else fresh.item, used, why, note)


def _report(weight: F64, phy2log: I64, topology: Topology, bound: F64) -> BalanceReport:
    """:func:`eplb_service.balance.evaluate` with the lower bound computed once per plan."""
    t = topology
    loads = item_loads(weight, phy2log.reshape(t.num_layers, t.num_ranks, -1)).sum(axis=2)
    return report(loads, bound)


def _mean_balancedness(weight: F64, phy2log: I64, num_ranks: int) -> float:
    loads = item_loads(weight, phy2log.reshape(phy2log.shape[0], num_ranks, -1)).sum(axis=2)
    return float(balancedness(loads).mean())


def plan(
    weight: Any,
    topology: Topology,
    *,
    num_groups: int = 1,
    current: Placement | Any | None = None,
    max_moves: int | None = None,
    max_bytes: int | None = None,
    expert_bytes: int | None = None,
    min_gain: float = 0.0,
    strategy: str = "auto",
    tolerance: float = TOLERANCE,
    significance: float = SIGNIFICANCE,
) -> PlanResult:
    """Plans a placement for ``weight``, migration-aware when ``current`` is given.

    Parameters:
        weight: [L, E] load per logical expert (numpy, torch or nested lists; finite, >= 0)
        topology: the deployment's sizes (L, E, P, R, N)
        num_groups: G, expert groups of group-limited routing (divides E)
        current: the placement in service (a :class:`Placement` or a ``[L, P]`` map)
        max_moves: most slots whose expert may change (needs ``current``)
        max_bytes: most bytes of expert weights to transfer (needs ``current`` and
            ``expert_bytes``)
        expert_bytes: bytes of one expert's weights (for ``max_bytes`` and the summary)
        min_gain: keep ``current`` unless mean balancedness rises by at least this
        strategy: ``"auto"``, ``"hierarchical"`` or ``"global"``
        tolerance: with ``current``, how far (relative max rank load) layers may stay above
            the fresh plan, on average, to save moves; the plan's mean balancedness is then
            brought within ``MEAN_SHARE * tolerance`` of the fresh plan's where at most
            ``POLISH_SLOTS`` of all slots more buy it (best gain per rewrite first)
        significance: with whole-number loads (token counts), also tolerate this many standard
            deviations of sampling noise (0 disables)

    Returns:
        :class:`PlanResult`

    Raises:
        ValueError: bad sizes, loads, options or a malformed ``current``
    """
    t = topology
    load = as_float_load(weight)
    budget = Budget(max_moves, max_bytes, expert_bytes)
    _check_options(load, t, num_groups, current, budget, min_gain, tolerance, significance)
    sol = _solve(load, t, num_groups, current, budget, strategy, tolerance, significance)
    bound = lower_bound(load, t.num_slots, t.num_ranks)
    fresh_item = sol.fresh_item
    if fresh_item is None:
        fresh_item = _fresh_global(load, t).item
    fresh = _report(load, fresh_item.reshape(t.num_layers, -1), t, bound)
    placement = Placement(sol.phy2log, t)
    after = _report(load, sol.phy2log, t, bound)
    if sol.current is None:
        return PlanResult(placement, None, after, fresh, None, sol.strategy, sol.strategy_reason,
                          changed=True)
    cur = sol.current
    before = _report(load, cur.phy2log, t, bound)
    migration = summarize_migration(cur, placement, expert_bytes)
    gain = after.balancedness_mean - before.balancedness_mean
    if migration.slots_changed == 0:
        # ``placement`` equals ``cur``: its migration summary is already the empty one.
        return PlanResult(cur, before, before, fresh, migration, sol.strategy,
                          sol.strategy_reason, changed=False,
                          reason=sol.note or "the placement in service is already within "
                          "tolerance of the fresh plan")
    if min_gain > 0 and gain < min_gain:
        return PlanResult(cur, before, before, fresh, summarize_migration(cur, cur, expert_bytes),
                          sol.strategy, sol.strategy_reason, changed=False,
                          reason=f"predicted gain {gain:.4f} < min_gain {min_gain:g}")
    return PlanResult(placement, before, after, fresh, migration, sol.strategy,
                      sol.strategy_reason, changed=True, reason=sol.note)


def rebalance_experts(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    current: Any = None,
    max_moves: int | None = None,
    max_bytes: int | None = None,
    expert_bytes: int | None = None,
    min_gain: float = 0.0,
    strategy: str = "auto",
    tolerance: float = TOLERANCE,
    significance: float = SIGNIFICANCE,
) -> PlacementMaps:
    """Drop-in form of :func:`plan`: ``(phy2log, log2phy, logcnt)`` like DeepSeek's function.

    Computes no reports, so it is the fast path for engines and benchmarks.

    Parameters:
        weight: [L, E] load (float32 numpy from :func:`eplb_service.policy.rebalance_experts`,
            or anything :func:`plan` accepts)
        num_replicas: P; num_groups: G; num_nodes: N; num_gpus: R
        current: [L, P] placement in service (numpy or torch), or None
        max_moves, max_bytes, expert_bytes, min_gain, strategy, tolerance, significance:
            see :func:`plan`

    Returns:
        phy2log [L, P], log2phy [L, E, P - E + 1] (slots in ascending order, -1 padded),
        logcnt [L, E]; int64 numpy arrays (the registry converts them for torch input)
    """
    load = as_float_load(weight)
    num_layers, num_experts = load.shape
    t = Topology(num_layers, num_experts, int(num_replicas), int(num_gpus), int(num_nodes))
    budget = Budget(max_moves, max_bytes, expert_bytes)
    _check_options(load, t, int(num_groups), current, budget, min_gain, tolerance, significance)
    sol = _solve(load, t, int(num_groups), current, budget, strategy, tolerance, significance)
    phy2log = sol.phy2log
    if sol.current is not None and min_gain > 0:
        gain = _mean_balancedness(load, phy2log, t.num_ranks) - _mean_balancedness(
            load, sol.current.phy2log, t.num_ranks
        )
        if gain < min_gain:
            phy2log = sol.current.phy2log
    placement = Placement(phy2log, t)
    return placement.phy2log.copy(), placement.log2phy, placement.logcnt.copy()
