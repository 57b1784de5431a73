"""An expert-parallel MoE engine: R processes, torch.distributed (gloo on CPU, NCCL on GPU).

Each rank holds the S expert slots ``[r*S, (r+1)*S)`` of every layer (weights loaded from the
seeded model by the placement), routes its own share of the tokens, and uses ``worker_agent``
the way vLLM or SGLang would:

- ``ExpertLoadRecorder.map_and_record(layer, topk_ids)`` in every layer turns logical expert ids
  into physical slots and counts them (the recorder's ``PlacementView`` is the routing map);
- the expert weight tensors of each layer (``w1, w3 [S, F, H]``, ``w2 [S, H, F]``) are
  registered in an :class:`~worker_agent.migration.ExpertWeights` and moved in place by it.

Dispatch: all-gather + all-reduce (what vLLM's naive / all-gather-reduce-scatter EP backends
do). Each rank all-gathers ``(h, physical ids, weights)`` of its tokens — every rank then knows
every token's slots — computes the rows routed to its own slots, and the partial outputs are
summed with one all-reduce; each rank keeps its own rows. Two collectives per layer with static
shapes, the same calls on every rank whatever the routing (no split sizes to exchange first).
All-to-all would move about R times fewer bytes; at the sizes this engine runs (tests, the CPU
demo) that does not matter, and the placement and migration logic are the same either way.

Driver: :func:`run_engine` spawns the ranks (``torch.multiprocessing``, spawn), runs ``steps``
forward steps on seeded batches, applies placement changes from a schedule and/or per-step hooks,
checks outputs against :func:`eplb_engine.dense.dense_forward` on rank 0, and returns per-rank
records.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from eplb_engine.dense import dense_forward, relative_error
from eplb_engine.launch import spawn_ranks
from eplb_engine.model import MoEConfig, MoEModel, expert_forward, rmsnorm
from eplb_engine.placement import balancedness, round_robin_placement
from worker_agent.migration import ExpertWeights, MigrationReport
from worker_agent.recording import ExpertLoadRecorder, PlacementView
from worker_agent.transfers import TransferPlan, plan_transfers

__all__ = [
    "EPEngine",
    "EngineHooks",
    "EngineParts",
    "EngineRun",
    "RankContext",
    "RankResult",
    "Rebalance",
    "RebalanceRecord",
    "StepRecord",
    "run_engine",
]


class EPEngine:
    """One rank of the expert-parallel engine.

    Args:
        model: the (replicated, seeded) model: router weights and the expert "checkpoint".
        phy2log: the initial map ``[L, P]`` (ignored when ``view`` is given).
        rank, world_size: this rank and R; ``P`` must divide by R.
        num_nodes: N hosts (for transfer planning: same node first).
        group: the EP process group (``None``: the default group).
        device: where weights and activations live (``cpu`` with gloo, ``cuda:i`` with NCCL).
        view, recorder: an agent's :class:`PlacementView` / :class:`ExpertLoadRecorder` to use
            instead of the engine's own (an ``EplbAgent`` owns them).
        weights: an (empty) :class:`ExpertWeights` registry to register the expert tensors in,
            e.g. one a ``MigratingSwitcher`` was built with; default: a new one.
        version: the initial map's version.

    Attributes: ``view``, ``recorder``, ``weights`` (the :class:`ExpertWeights` registry),
    ``slots_per_rank``.
    """

    def __init__(
        self,
        model: MoEModel,
        phy2log: Any = None,
        *,
        rank: int,
        world_size: int,
        num_nodes: int = 1,
        group: Any = None,
        device: torch.device | str = "cpu",
        view: PlacementView | None = None,
        recorder: ExpertLoadRecorder | None = None,
        weights: ExpertWeights | None = None,
        version: int = 0,
    ) -> None:
        c = model.config
        self.model = model
        self.rank, self.world_size, self.num_nodes = rank, world_size, num_nodes
        self.group = group
        self.device = torch.device(device)
        if view is None:
            if phy2log is None:
                raise ValueError("give phy2log or view")
            view = PlacementView(phy2log, c.num_experts, device=self.device, version=version)
        if view.num_layers != c.num_layers or view.num_experts != c.num_experts:
            raise ValueError(f"{view} does not fit {c}")
        if view.num_slots % world_size:
            raise ValueError(f"{view.num_slots} slots do not divide over {world_size} ranks")
        self.view = view
        self.recorder = recorder if recorder is not None else ExpertLoadRecorder(view)
        self.slots_per_rank = view.num_slots // world_size
        self.base = rank * self.slots_per_rank
        if weights is not None and weights.slots_per_rank != self.slots_per_rank:
            raise ValueError(f"weights registry has {weights.slots_per_rank} slots per rank, "
                             f"the map gives {self.slots_per_rank}")
        self.weights = weights if weights is not None else ExpertWeights(self.slots_per_rank)
        self._w: list[dict[str, torch.Tensor]] = []
        host = view.host_phy2log()
        for layer in range(c.num_layers):
            mine = torch.from_numpy(host[layer, self.base:self.base + self.slots_per_rank])
            tensors = {k: v.to(self.device) for k, v in model.expert_weights(layer, mine).items()}
            self.weights.register_layer(layer, tensors)
            self._w.append(tensors)

    # -- forward -------------------------------------------------------------------------------

    def layer_forward(self, layer: int, x: torch.Tensor, tokens_per_rank: int) -> torch.Tensor:
        """One MoE layer on this rank's tokens ``x [T_r, H]`` (``T_r <= tokens_per_rank``, the
        padded per-rank size, the same on every rank) -> ``[T_r, H]``. Collective."""
        c = self.model.config
        h = rmsnorm(x)
        ids, weights = self.model.route(layer, h)
        slots = self.recorder.map_and_record(layer, ids)  # [T_r, K] physical slots, counted
        # Pack (h, slots, weights) in one tensor; slot ids are exact in fp32 (P < 2^24).
        packed = torch.zeros(tokens_per_rank, c.hidden + 2 * c.top_k, dtype=x.dtype,
                             device=x.device)
        packed[:, c.hidden:c.hidden + c.top_k] = -1
        rows = x.shape[0]
        packed[:rows, :c.hidden] = h
        packed[:rows, c.hidden:c.hidden + c.top_k] = slots.to(x.dtype)
        packed[:rows, c.hidden + c.top_k:] = weights
        parts = [torch.empty_like(packed) for _ in range(self.world_size)]
        dist.all_gather(parts, packed, group=self.group)
        every = torch.cat(parts)  # [R * T_pad, H + 2K]
        h_all = every[:, :c.hidden]
        slot_all = every[:, c.hidden:c.hidden + c.top_k].round().to(torch.int64)
        w_all = every[:, c.hidden + c.top_k:]
        out = torch.zeros(every.shape[0], c.hidden, dtype=x.dtype, device=x.device)
        w = self._w[layer]
        for j in range(self.slots_per_rank):
            tok, k = torch.nonzero(slot_all == self.base + j, as_tuple=True)
            if tok.numel() == 0:
                continue
            y = expert_forward(h_all[tok], w["w1"][j], w["w2"][j], w["w3"][j])
            out.index_add_(0, tok, w_all[tok, k].unsqueeze(1) * y)
        dist.all_reduce(out, group=self.group)
        start = self.rank * tokens_per_rank
        return x + out[start:start + rows]

    def forward(self, x: torch.Tensor, tokens_per_rank: int) -> torch.Tensor:
        """All layers on this rank's tokens ``x [T_r, H]`` -> ``[T_r, H]``. Collective."""
        for layer in range(self.model.config.num_layers):
            x = self.layer_forward(layer, x, tokens_per_rank)
        return x

    # -- placement changes ---------------------------------------------------------------------

    def plan(self, new_phy2log: Any) -> TransferPlan:
        """Transfers from the current map to ``new_phy2log [L, P]`` (same on every rank)."""
        return plan_transfers(self.view.host_phy2log(), new_phy2log, self.world_size,
                              self.num_nodes)

    def migrate(
        self,
        new_phy2log: Any,
        *,
        layers: Any = None,
        timeout_s: float | None = None,
        fault: Callable[[int, str], None] | None = None,
    ) -> MigrationReport:
        """Move weights for ``new_phy2log`` (maps untouched). Collective; see
        :meth:`ExpertWeights.migrate`."""
        return self.weights.migrate(
            self.plan(new_phy2log), self.group, layers=layers, timeout_s=timeout_s, fault=fault
        )

    def rebalance(
        self,
        new_phy2log: Any,
        version: int,
        *,
        timeout_s: float | None = None,
        fault: Callable[[int, str], None] | None = None,
    ) -> MigrationReport:
        """Migrate weights, then switch the map of every layer whose weights moved.

        All layers moved: the whole map becomes ``new_phy2log`` at ``version``. Some failed:
        only the moved layers switch (``update_layers_``) and the version stays (the mix is no
        service version); the failed layers keep routing with their old map and old weights.
        """
        new = np.asarray(new_phy2log, dtype=np.int64)
        report = self.migrate(new, timeout_s=timeout_s, fault=fault)
        if not report.failed:
            self.view.update_(new, version)
        elif report.applied:
            self.view.update_layers_(list(report.applied_layers), new)
        return report

    def check_weights(self) -> list[tuple[int, int]]:
        """``(layer, slot)`` pairs whose weights differ from the map's expert (empty: all good)."""
        host = self.view.host_phy2log()
        bad = []
        for layer in range(self.model.config.num_layers):
            mine = torch.from_numpy(host[layer, self.base:self.base + self.slots_per_rank])
            want = self.model.expert_weights(layer, mine)
            for j in range(self.slots_per_rank):
                if any(not torch.equal(self._w[layer][k][j].cpu(), want[k][j]) for k in want):
                    bad.append((layer, self.base + j))
        return bad


# ---------------------------------------------------------------------------------------------
# Driver


@dataclass
class StepRecord:
    """One forward step on one rank.

    Attributes:
        step: the step index.
        version: the placement version the step routed with (``view.version``).
        rel_error: ``max|ep - dense| / max|dense|`` over the whole batch (rank 0, when checked).
        balancedness: per-layer mean/max rank load of this step's tokens, ``[L]`` (every rank),
            from the recorders' counts summed over ranks (1.0 for a layer that counted nothing).
        seconds: the forward's wall time on this rank.
        counted: (token, expert) pairs the recorders counted this step over all ranks and layers;
            0 while counting is paused (a multi-step switch): skip such steps' balancedness.
        slot_loads: this step's counts per slot summed over ranks, ``[L, P]`` int64 (rank 0
            only; ``None`` elsewhere): sum them over steps for a window's balancedness.
    """

    step: int
    version: int
    rel_error: float | None
    balancedness: list[float]
    seconds: float
    counted: int = 0
    slot_loads: np.ndarray | None = None


@dataclass
class RebalanceRecord:
    """One placement change on one rank (before ``step``)."""

    step: int
    version: int
    applied_layers: list[int]
    failed: dict[int, str]
    bytes_received: int
    transfers_received: int
    local_copies: int
    seconds: float
    max_layer_seconds: float


@dataclass
class RankResult:
    rank: int
    steps: list[StepRecord] = field(default_factory=list)
    rebalances: list[RebalanceRecord] = field(default_factory=list)
    weights_ok: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineRun:
    """What :func:`run_engine` returns: one :class:`RankResult` per rank, rank order."""

    ranks: list[RankResult]
    seconds: float

    @property
    def max_rel_error(self) -> float:
        errs = [s.rel_error for s in self.ranks[0].steps if s.rel_error is not None]
        return max(errs, default=0.0)

    @property
    def versions_consistent(self) -> bool:
        """Every rank ran every step with the same placement version."""
        per_rank = [[s.version for s in r.steps] for r in self.ranks]
        return all(v == per_rank[0] for v in per_rank)


@dataclass
class EngineParts:
    """What :meth:`EngineHooks.build` may hand the engine instead of its own (all optional)."""

    view: PlacementView | None = None
    recorder: ExpertLoadRecorder | None = None
    weights: ExpertWeights | None = None


@dataclass
class RankContext:
    """What hooks see on each rank."""

    engine: EPEngine
    model: MoEModel
    rank: int
    world_size: int
    group: Any
    result: RankResult
    state: dict[str, Any] = field(default_factory=dict)  # hooks' own per-rank state

    def rebalance(
        self,
        step: int,
        new_phy2log: Any,
        version: int,
        *,
        timeout_s: float | None = None,
        fault: Callable[[int, str], None] | None = None,
    ) -> MigrationReport:
        """``engine.rebalance`` plus a :class:`RebalanceRecord` in the result. Collective."""
        report = self.engine.rebalance(new_phy2log, version, timeout_s=timeout_s, fault=fault)
        self.result.rebalances.append(
            RebalanceRecord(
                step=step,
                version=version,
                applied_layers=list(report.applied_layers),
                failed=dict(report.failed),
                bytes_received=report.bytes_received,
                transfers_received=report.transfers_received,
                local_copies=report.local_copies,
                seconds=report.seconds,
                max_layer_seconds=report.max_layer_seconds,
            )
        )
        return report


class EngineHooks:
    """Per-rank callbacks of :func:`run_engine` (subclass; must be picklable: the instance is
    sent to every spawned rank). Every method runs on every rank; collectives inside them must
    be made by every rank alike (e.g. ``ctx.rebalance``, an agent's ``step()``).

    With an ``EplbAgent``: build it in :meth:`build` (``phy2log`` is the initial map; pass
    ``switcher=lambda agent: MigratingSwitcher(weights, agent.snapshotter, ...)`` with a fresh
    ``ExpertWeights(S)``) and return ``EngineParts(agent.view, agent.recorder, weights)``; call
    ``agent.step()`` in :meth:`after_step` and ``agent.close()`` in :meth:`finish`.
    """

    def build(
        self, rank: int, world_size: int, phy2log: np.ndarray, model: MoEModel
    ) -> EngineParts | None:
        """Before the engine exists: return parts it should use (an agent's view, recorder,
        weights registry), or ``None`` for its own."""
        return None

    def start(self, ctx: RankContext) -> None:
        """After the engine is built, before step 0."""

    def before_step(self, ctx: RankContext, step: int) -> None:
        """Before the forward of ``step`` (placement changes go here)."""

    def after_step(self, ctx: RankContext, step: int, output: torch.Tensor) -> None:
        """After the forward of ``step``; ``output`` is this rank's ``[T_r, H]``."""

    def should_stop(self, ctx: RankContext, step: int) -> bool:
        """After :meth:`after_step`: end the run after ``step`` (before ``steps``). Must return
        the same on every rank at the same step: derive it from a collective, never from
        rank-local state alone."""
        return False

    def finish(self, ctx: RankContext) -> dict[str, Any]:
        """After the last step; the dict lands in ``RankResult.extra``."""
        return {}


@dataclass(frozen=True)
class Rebalance:
    """A scheduled placement change, optionally with a fault injected into its migration.

    Attributes:
        phy2log: the new map ``[L, P]``.
        fault_rank, fault_layer: where to inject a transfer failure (both or neither).
        fault_phase: ``"received"`` (the rank's transfers completed, then it reports failure)
            or ``"post"`` (the rank fails before posting: its peers time out, the group breaks).
        timeout_s: bound on each rank's wait for its transfers.
    """

    phy2log: Any
    fault_rank: int | None = None
    fault_layer: int | None = None
    fault_phase: str = "received"
    timeout_s: float | None = None

    def fault(self, rank: int) -> Callable[[int, str], None] | None:
        if self.fault_rank is None or self.fault_rank != rank:
            return None
        return _Fault(self.fault_layer, self.fault_phase)


@dataclass(frozen=True)
class _Fault:
    layer: int | None
    phase: str

    def __call__(self, layer: int, phase: str) -> None:
        if phase == self.phase and (self.layer is None or layer == self.layer):
            raise RuntimeError(f"injected transfer failure (layer {layer}, {phase})")


@dataclass(frozen=True)
class _Spec:
    steps: int
    config: MoEConfig
    num_nodes: int
    initial: np.ndarray
    schedule: dict[int, Rebalance]
    tokens_per_step: int
    check_every: int
    hooks: EngineHooks | None


def run_engine(
    world_size: int,
    steps: int,
    *,
    config: MoEConfig | None = None,
    schedule: Mapping[int, Any] | None = None,
    hooks: EngineHooks | None = None,
    initial_phy2log: Any = None,
    num_slots: int | None = None,
    num_nodes: int = 1,
    tokens_per_step: int = 32,
    check_every: int = 1,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    threads_per_rank: int = 1,
    start_method: str = "forkserver",
) -> EngineRun:
    """Run the engine on ``world_size`` rank processes for ``steps`` forward steps.

    Args:
        world_size: R ranks (processes).
        steps: forward steps; step ``s`` processes ``model.inputs(s, tokens_per_step)``, split
            into R contiguous chunks (rank ``r`` owns chunk ``r``).
        config: the model (default :class:`MoEConfig`).
        schedule: ``{step: phy2log [L, P] or Rebalance}``: before that step every rank
            rebalances (versions 1, 2, ... in step order).
        hooks: per-rank callbacks (:class:`EngineHooks`), e.g. to drive an ``EplbAgent``.
        initial_phy2log: the starting map (default round-robin over ``num_slots`` slots).
        num_slots: P (default: E rounded up to a multiple of R, plus R: one redundant per rank).
        num_nodes: N hosts, for transfer planning.
        tokens_per_step: the global batch per step.
        check_every: compare against the dense reference every this many steps (0: never).
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (rank ``r`` on ``cuda:r``).
        timeout_s: the whole run's bound; on expiry every rank process is killed.
        threads_per_rank: torch intra-op threads per rank.
        start_method: see :func:`eplb_engine.launch.spawn_ranks` (``"forkserver"`` default).

    Raises the first rank's error or ``TimeoutError``.
    """
    c = config or MoEConfig()
    if num_slots is None:
        num_slots = -(-c.num_experts // world_size) * world_size + world_size
    initial = (round_robin_placement(c.num_layers, c.num_experts, num_slots)
               if initial_phy2log is None else np.asarray(initial_phy2log, dtype=np.int64))
    plan: dict[int, Rebalance] = {}
    for k, v in (schedule or {}).items():
        item = v if isinstance(v, Rebalance) else Rebalance(v)
        plan[int(k)] = Rebalance(np.asarray(item.phy2log, dtype=np.int64), item.fault_rank,
                                 item.fault_layer, item.fault_phase, item.timeout_s)
    spec = _Spec(steps, c, num_nodes, initial, plan, tokens_per_step, check_every, hooks)
    start = time.perf_counter()
    ranks = spawn_ranks(
        _run_rank, world_size, spec, backend=backend, timeout_s=timeout_s,
        threads_per_rank=threads_per_rank, start_method=start_method,
    )
    return EngineRun(ranks, time.perf_counter() - start)


def _run_rank(rank: int, world_size: int, spec: _Spec) -> RankResult:
    c = spec.config
    nccl = "nccl" in str(dist.get_backend()).lower()
    device = torch.device("cuda", rank) if nccl else torch.device("cpu")
    model = MoEModel(c)
    hooks = spec.hooks
    built = hooks.build(rank, world_size, spec.initial.copy(), model) if hooks else None
    built = built or EngineParts()
    engine = EPEngine(model, spec.initial, rank=rank, world_size=world_size,
                      num_nodes=spec.num_nodes, device=device, view=built.view,
                      recorder=built.recorder, weights=built.weights)
    result = RankResult(rank)
    ctx = RankContext(engine, model, rank, world_size, None, result)
    if hooks is not None:
        hooks.start(ctx)
    per_rank = -(-spec.tokens_per_step // world_size)
    version = engine.view.version
    last_counts = engine.recorder.counters.clone()
    for step in range(spec.steps):
        if step in spec.schedule:
            change = spec.schedule[step]
            version += 1
            ctx.rebalance(step, change.phy2log, version, timeout_s=change.timeout_s,
                          fault=change.fault(rank))
        if hooks is not None:
            hooks.before_step(ctx, step)
        x_all = model.inputs(step, spec.tokens_per_step)
        lo = min(rank * per_rank, spec.tokens_per_step)
        x = x_all[lo:lo + per_rank].to(device)
        t0 = time.perf_counter()
        y = engine.forward(x, per_rank)
        seconds = time.perf_counter() - t0
        step_version = engine.view.version
        # This step's global slot loads -> balancedness (every rank gets the same numbers).
        counts = engine.recorder.counters.clone()
        delta = counts - last_counts
        last_counts = counts
        dist.all_reduce(delta)
        bal = balancedness(delta.cpu().numpy(), world_size).tolist()
        rel: float | None = None
        if spec.check_every and step % spec.check_every == 0:
            padded = torch.zeros(per_rank, c.hidden, dtype=y.dtype, device=device)
            padded[: y.shape[0]] = y
            parts = [torch.empty_like(padded) for _ in range(world_size)]
            dist.all_gather(parts, padded)
            if rank == 0:
                got = torch.cat(parts)[: spec.tokens_per_step].cpu()
                rel = relative_error(got, dense_forward(model, x_all))
        loads = delta.cpu().numpy() if rank == 0 else None
        result.steps.append(
            StepRecord(step, step_version, rel, bal, seconds, int(delta.sum().item()), loads)
        )
        if hooks is not None:
            hooks.after_step(ctx, step, y)
            if hooks.should_stop(ctx, step):
                break
    result.weights_ok = not engine.check_weights()
    if hooks is not None:
        result.extra = hooks.finish(ctx)
    return result
