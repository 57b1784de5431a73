"""A real expert-parallel MoE engine for eplb's tests, benchmarks and demo (not a product package).

- :mod:`eplb_engine.model`: the seeded MoE model (SwiGLU experts, skewable top-k router).
- :mod:`eplb_engine.dense`: the single-process dense reference computation.
- :mod:`eplb_engine.ep`: :class:`EPEngine` (one rank) and :func:`run_engine` (R spawned ranks).
- :mod:`eplb_engine.launch`: :func:`spawn_ranks`, R rank processes with torch.distributed up.
- :mod:`eplb_engine.placement`: initial / random placements and balance metrics.
- :mod:`eplb_engine.inband`: in-band rollouts without a service (agreement + migration).
- :mod:`eplb_engine.served`: :class:`~eplb_engine.served.ServedAgents`, every rank a real
  ``EplbAgent`` of a running eplb service (fault injection for tests).
- :mod:`eplb_engine.service`: ``eplb serve`` as a child process on free loopback ports.
- :mod:`eplb_engine.demo`: what ``eplb demo`` runs.

It uses ``worker_agent`` as an inference engine would (``map_and_record`` per layer, expert
weights registered for in-place migration) and nothing from ``eplb_service``.
"""

from eplb_engine.dense import dense_forward, relative_error
from eplb_engine.ep import (
    EngineHooks,
    EngineParts,
    EngineRun,
    EPEngine,
    RankContext,
    RankResult,
    Rebalance,
    RebalanceRecord,
    StepRecord,
    run_engine,
)
from eplb_engine.launch import spawn_ranks
from eplb_engine.model import MoEConfig, MoEModel
from eplb_engine.placement import (
    balancedness,
    greedy_placement,
    random_placement,
    rank_loads,
    round_robin_placement,
)

__all__ = [
    "EPEngine",
    "EngineHooks",
    "EngineParts",
    "EngineRun",
    "MoEConfig",
    "MoEModel",
    "RankContext",
    "RankResult",
    "Rebalance",
    "RebalanceRecord",
    "StepRecord",
    "balancedness",
    "dense_forward",
    "greedy_placement",
    "random_placement",
    "rank_loads",
    "relative_error",
    "round_robin_placement",
    "run_engine",
    "spawn_ranks",
]
