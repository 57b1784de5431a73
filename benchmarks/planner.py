"""Planner benchmark: every policy side by side on seeded workloads and real MoE sizes.

    .venv/bin/python benchmarks/planner.py            # full run, Markdown tables on stdout
    .venv/bin/python benchmarks/planner.py --quick    # smoke run (two small configs)
    .venv/bin/python benchmarks/planner.py --json     # one JSON document instead

Policies: ``deepseek-reference`` (the loop-based torch EPLB the engines ship,
:mod:`benchmarks.baseline_deepseek`) and every policy registered in
:data:`eplb_service.policy.POLICIES` (a newly registered policy shows up without changes here).

Static workloads (one window): time (median of ``--repeats`` runs; the reference stops early
once its runs exceed ``--reference-budget`` seconds, and the table says how many ran),
balancedness mean / worst layer, max rank load over the lower bound (mean over layers), and
whether the ``deepseek`` maps equal the reference's.

Sequences (``--windows`` consecutive windows): the plan for window k is made from window k's
load, with the previous window's plan passed as ``current`` to policies that take one (deepseek
ignores it, so it replans from scratch), and is then judged on window k+1 (what serving sees
until the next rebalance). Reported per rebalance: the fraction of slots rewritten, cross-node
transfers and bytes moved; and the balancedness on the next window. Times there are the median
of the W-1 plans, one run each.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from eplb_service import workloads
from eplb_service.balance import evaluate
from eplb_service.migration import summarize_migration
from eplb_service.placement import Placement, Topology

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

REFERENCE = "deepseek-reference"


@dataclass(frozen=True)
class Config:
    """An EP deployment: ``layers x experts -> slots`` on ``ranks`` GPUs in ``nodes`` nodes."""

    name: str
    layers: int
    experts: int
    slots: int
    ranks: int
    nodes: int
    groups: int
    expert_bytes: int  # one expert's weights (all its matrices)

    @property
    def topology(self) -> Topology:
        return Topology(self.layers, self.experts, self.slots, self.ranks, self.nodes)


# Expert sizes: DeepSeek-V3 3 x 7168 x 2048 in fp8; Qwen3-30B-A3B 3 x 2048 x 768 in bf16;
# Mixtral 8x7B 3 x 4096 x 14336 in bf16.
_DSV3_BYTES = 3 * 7168 * 2048
_QWEN3_BYTES = 3 * 2048 * 768 * 2
_MIXTRAL_BYTES = 3 * 4096 * 14336 * 2

# groups % nodes != 0 selects DeepSeek's global policy (groups=1 with several nodes).
CONFIGS: tuple[Config, ...] = (
    Config("DSV3 EP32 hier", 58, 256, 288, 32, 4, 8, _DSV3_BYTES),
    Config("DSV3 EP32 global", 58, 256, 288, 32, 4, 1, _DSV3_BYTES),
    Config("DSV3 EP64 global", 58, 256, 320, 64, 8, 1, _DSV3_BYTES),
    Config("DSV3 EP144 decode", 58, 256, 288, 144, 18, 1, _DSV3_BYTES),
    Config("Qwen3-30B EP8", 48, 128, 144, 8, 1, 1, _QWEN3_BYTES),
    Config("Mixtral EP8", 32, 8, 16, 8, 1, 1, _MIXTRAL_BYTES),
)
QUICK_CONFIGS = ("Qwen3-30B EP8", "Mixtral EP8")


@dataclass(frozen=True)
class Workload:
    """``make(layers, experts, seed, tokens, windows)`` -> ``[W, L, E]`` (W = 1 when static)."""

    name: str
    make: Callable[[int, int, int, int, int], FloatArray]
    sequence: bool = False


def _static(fn: Callable[..., FloatArray], **options: Any) -> Callable[..., FloatArray]:
    def make(layers: int, experts: int, seed: int, tokens: int, windows: int) -> FloatArray:
        return fn(layers, experts, seed, tokens=tokens, **options)[None]

    return make


def _sequence(fn: Callable[..., FloatArray], **options: Any) -> Callable[..., FloatArray]:
    def make(layers: int, experts: int, seed: int, tokens: int, windows: int) -> FloatArray:
        return fn(layers, experts, seed, num_windows=windows, tokens=tokens, **options)

    return make


WORKLOADS: tuple[Workload, ...] = (
    Workload("zipf 1.0", _static(workloads.zipf, exponent=1.0)),
    Workload("zipf 1.5", _static(workloads.zipf, exponent=1.5)),
    Workload("lognormal 1", _static(workloads.lognormal, sigma=1.0)),
    Workload("hot 5-20x", _static(workloads.hot)),
    Workload("uniform", _static(workloads.uniform)),
    Workload("drift", _sequence(workloads.drift_sequence), sequence=True),
    Workload("noise only", _sequence(workloads.noise_sequence), sequence=True),
)
QUICK_WORKLOADS = ("zipf 1.0", "hot 5-20x", "drift", "noise only")


@dataclass(frozen=True)
class Policy:
    """A planner under test: ``plan(load [L, E], config, current [L, P] | None) -> [L, P]``.

    ``prepare`` converts the load before timing (the reference takes a float32 torch tensor, as
    in the engines).
    """

    name: str
    prepare: Callable[[FloatArray], Any]
    plan: Callable[[Any, Config, IntArray | None], IntArray]
    accepts_current: bool
    key: str = ""  # the registry name (``name`` may add aliases); "" for the reference


def _reference_policy() -> Policy:
    import torch

    from benchmarks.baseline_deepseek import rebalance_experts as reference

    def plan(weight: Any, c: Config, current: IntArray | None) -> IntArray:
        phy2log, _, _ = reference(weight, c.slots, c.groups, c.nodes, c.ranks)
        return np.asarray(phy2log.numpy(), dtype=np.int64)

    def prepare(load: FloatArray) -> Any:
        return torch.from_numpy(load.astype(np.float32))

    return Policy(REFERENCE, prepare, plan, accepts_current=False)


def _registered_policy(name: str, fn: Callable[..., Any], label: str) -> Policy:
    from eplb_service.policy import rebalance_experts

    try:
        accepts = "current" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        accepts = False

    def plan(weight: Any, c: Config, current: IntArray | None) -> IntArray:
        options = {"current": current} if accepts and current is not None else {}
        phy2log, _, _ = rebalance_experts(
            weight, c.slots, c.groups, c.nodes, c.ranks, policy=name, **options
        )
        return np.asarray(phy2log, dtype=np.int64)

    return Policy(label, lambda load: load, plan, accepts_current=accepts, key=name)


def all_policies(names: Sequence[str] | None = None) -> list[Policy]:
    """The reference, then ``deepseek``, ``default``, and every other registered policy (sorted).

    Names registered for the same function (``default`` is an alias of a named policy) run
    once, labelled ``first (= other)``.
    """
    from eplb_service.policy import POLICIES

    order = sorted(POLICIES, key=lambda n: (n != "deepseek", n != "default", n))
    aliases: dict[int, list[str]] = {}
    for name in order:
        aliases.setdefault(id(POLICIES[name]), []).append(name)
    policies = [_reference_policy()]
    for group in aliases.values():
        label = group[0] if len(group) == 1 else f"{group[0]} (= {', '.join(group[1:])})"
        policies.append(_registered_policy(group[0], POLICIES[group[0]], label))
    if names:
        unknown = set(names) - {REFERENCE} - set(POLICIES)
        if unknown:
            raise SystemExit(f"unknown policies: {', '.join(sorted(unknown))}")
        wanted = {aliases[id(POLICIES[n])][0] if n in POLICIES else n for n in names}
        policies = [p for p in policies if (p.key or p.name) in wanted]
    return policies


def _timed(fn: Callable[[], IntArray]) -> tuple[IntArray, float]:
    start = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start) * 1e3


def time_plan(
    policy: Policy, weight: Any, config: Config, repeats: int, budget_s: float
) -> tuple[IntArray, list[float]]:
    """Runs ``policy`` up to ``repeats`` times (at least once, stopping once the runs took
    ``budget_s`` seconds); returns the first plan ``[L, P]`` and the times in ms."""
    phy2log, first = _timed(lambda: policy.plan(weight, config, None))
    times = [first]
    while len(times) < repeats and sum(times) < budget_s * 1e3:
        times.append(_timed(lambda: policy.plan(weight, config, None))[1])
    return phy2log, times


@dataclass
class StaticRow:
    config: str
    workload: str
    policy: str
    time_ms: float  # median
    runs: int
    speedup: float | None  # reference time / this time
    balancedness_mean: float
    balancedness_worst: float
    max_over_lb: float
    same_as_reference: bool | None


@dataclass
class SequenceRow:
    config: str
    workload: str
    policy: str
    time_ms: float  # median over the plans
    plans: int
    speedup: float | None
    rewritten: float  # mean fraction of slots rewritten per rebalance
    cross_node: float  # mean cross-node transfers per rebalance
    gb_moved: float  # mean GB moved per rebalance
    next_balancedness_mean: float  # mean over plans of balancedness on the next window
    next_balancedness_worst: float  # worst layer over all plans, on the next window
    same_as_reference: bool | None
    planned_balancedness_mean: float = 0.0  # mean over plans, on the window planned for
    # Policies taking ``current``: the same policy with current=None on the same windows, and
    # the relative shortfall of the migration-aware plans (positive: current costs balance).
    fresh_planned_balancedness_mean: float | None = None
    fresh_next_balancedness_mean: float | None = None
    planned_shortfall: float | None = None
    next_shortfall: float | None = None


def run_static(
    config: Config, workload: str, load: FloatArray, policies: Sequence[Policy], args: Any
) -> list[StaticRow]:
    topology = config.topology
    results: list[tuple[Policy, IntArray, list[float]]] = []
    for policy in policies:
        weight = policy.prepare(load)
        if policy.name == REFERENCE:
            phy2log, times = time_plan(policy, weight, config, args.repeats, args.reference_budget)
        else:
            policy.plan(weight, config, None)  # warm-up, untimed
            phy2log, times = time_plan(policy, weight, config, args.repeats, float("inf"))
        results.append((policy, phy2log, times))
    ref = next(((m, statistics.median(t)) for p, m, t in results if p.name == REFERENCE), None)
    rows = []
    for policy, phy2log, times in results:
        report = evaluate(load, Placement(phy2log, topology))
        median = statistics.median(times)
        rows.append(
            StaticRow(
                config=config.name,
                workload=workload,
                policy=policy.name,
                time_ms=median,
                runs=len(times),
                speedup=None if ref is None or policy.name == REFERENCE else ref[1] / median,
                balancedness_mean=report.balancedness_mean,
                balancedness_worst=report.balancedness_worst,
                max_over_lb=report.max_over_lower_bound,
                same_as_reference=(
                    bool(np.array_equal(phy2log, ref[0]))
                    if ref is not None and policy.key == "deepseek"
                    else None
                ),
            )
        )
    return rows


def replay(
    policy: Policy, config: Config, windows: FloatArray
) -> tuple[list[IntArray], list[float]]:
    """Plans windows ``0..W-2`` in order, each from the previous plan; returns plans and ms."""
    plans: list[IntArray] = []
    times: list[float] = []
    current: IntArray | None = None
    for load in windows[:-1]:
        weight = policy.prepare(load)
        phy2log, ms = _timed(partial(policy.plan, weight, config, current))
        plans.append(phy2log)
        times.append(ms)
        current = phy2log
    return plans, times


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def run_sequence(
    config: Config, workload: str, windows: FloatArray, policies: Sequence[Policy]
) -> list[SequenceRow]:
    topology = config.topology
    results = []
    for policy in policies:
        if policy.name != REFERENCE:
            policy.plan(policy.prepare(windows[0]), config, None)  # warm-up, untimed
        results.append((policy, *replay(policy, config, windows)))
    ref = next(((pl, statistics.median(t)) for p, pl, t in results if p.name == REFERENCE), None)
    rows = []
    for policy, plans, times in results:
        placements = [Placement(p, topology) for p in plans]
        moves = [
            summarize_migration(old, new, config.expert_bytes)
            for old, new in itertools.pairwise(placements)
        ]
        nexts = [evaluate(windows[k + 1], p) for k, p in enumerate(placements)]
        planned = _mean([evaluate(windows[k], p).balancedness_mean
                         for k, p in enumerate(placements)])
        next_mean = float(np.mean([r.balancedness_mean for r in nexts]))
        fresh_planned = fresh_next = planned_short = next_short = None
        if policy.accepts_current:
            # The same policy from scratch on the same windows (untimed).
            fresh = [Placement(policy.plan(policy.prepare(w), config, None), topology)
                     for w in windows[:-1]]
            fresh_planned = _mean([evaluate(windows[k], p).balancedness_mean
                                   for k, p in enumerate(fresh)])
            fresh_next = _mean([evaluate(windows[k + 1], p).balancedness_mean
                                for k, p in enumerate(fresh)])
            planned_short = (fresh_planned - planned) / fresh_planned
            next_short = (fresh_next - next_mean) / fresh_next
        median = statistics.median(times)
        rows.append(
            SequenceRow(
                config=config.name,
                workload=workload,
                policy=policy.name,
                time_ms=median,
                plans=len(times),
                speedup=None if ref is None or policy.name == REFERENCE else ref[1] / median,
                rewritten=_mean([m.fraction_changed for m in moves]),
                cross_node=_mean([m.cross_node_transfers for m in moves]),
                gb_moved=_mean([(m.bytes_moved or 0) / 1e9 for m in moves]),
                next_balancedness_mean=next_mean,
                next_balancedness_worst=float(min(r.balancedness_worst for r in nexts)),
                same_as_reference=(
                    all(np.array_equal(a, b) for a, b in zip(plans, ref[0], strict=True))
                    if ref is not None and policy.key == "deepseek"
                    else None
                ),
                planned_balancedness_mean=planned,
                fresh_planned_balancedness_mean=fresh_planned,
                fresh_next_balancedness_mean=fresh_next,
                planned_shortfall=planned_short,
                next_shortfall=next_short,
            )
        )
    return rows


def _yes_no(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "NO")


def _shortfall(row: SequenceRow) -> str:
    if row.planned_shortfall is None or row.next_shortfall is None:
        return ""
    return f"{100 * row.planned_shortfall:+.2f}% / {100 * row.next_shortfall:+.2f}%"


def _speedup(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}x"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_markdown(meta: dict[str, Any], static: list[StaticRow], seqs: list[SequenceRow]) -> str:
    out = [
        "## Planner benchmark",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; date {meta['date']}; "
        f"numpy {meta['numpy']}, torch {meta['torch']}; "
        f"seed {meta['seed']}, {meta['tokens']:,} routed tokens per layer and window; "
        f"whole run {meta['elapsed_s']:.0f} s.  ",
        f"Time: median ms of up to {meta['repeats']} runs (`runs`; the reference stops after "
        f"~{meta['reference_budget']:g} s of runs); `ref/this` = reference time / this time. "
        "Balancedness = mean/max rank load (1 is perfect); max/LB = max rank load over the "
        "lower bound, mean over layers; `= ref`: deepseek's maps equal the reference's.",
        "",
    ]
    if static:
        out.append(
            _table(
                ["config", "workload", "policy", "ms", "runs", "ref/this", "bal mean",
                 "bal worst", "max/LB", "= ref"],
                [
                    [r.config, r.workload, r.policy, f"{r.time_ms:.1f}", str(r.runs),
                     _speedup(r.speedup), f"{r.balancedness_mean:.4f}",
                     f"{r.balancedness_worst:.4f}", f"{r.max_over_lb:.4f}",
                     _yes_no(r.same_as_reference)]
                    for r in static
                ],
            )
        )
    if seqs:
        out += [
            "",
            f"Sequences of {meta['windows']} windows: each plan made from the previous plan "
            "(passed as `current` where the policy takes it), judged on the next window. "
            "`rewritten`, `x-node` (cross-node transfers) and `GB` are means per rebalance; "
            "`planned bal` is the mean balancedness on the window each plan was made for, "
            "`next bal` on the next window (mean; worst layer of all); for policies taking "
            "`current`, `vs None` is the relative shortfall of those means against the same "
            "policy with `current=None` on the same windows (planned / next; negative: "
            "better); ms is the median over the plans, one run each.",
            "",
            _table(
                ["config", "workload", "policy", "ms", "ref/this", "rewritten", "x-node", "GB",
                 "planned bal", "next bal mean", "next bal worst", "vs None planned / next",
                 "= ref"],
                [
                    [r.config, r.workload, r.policy, f"{r.time_ms:.1f}", _speedup(r.speedup),
                     f"{100 * r.rewritten:.1f}%", f"{r.cross_node:.0f}", f"{r.gb_moved:.1f}",
                     f"{r.planned_balancedness_mean:.4f}",
                     f"{r.next_balancedness_mean:.4f}", f"{r.next_balancedness_worst:.4f}",
                     _shortfall(r), _yes_no(r.same_as_reference)]
                    for r in seqs
                ],
            ),
        ]
    return "\n".join(out)


def _machine() -> str:
    return (
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small smoke run (seconds)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=1_000_000, help="per layer and window")
    parser.add_argument("--windows", type=int, default=None, help="per sequence (default 6)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 5)")
    parser.add_argument(
        "--reference-budget", type=float, default=None,
        help="seconds after which the reference stops repeating (default 3)",
    )
    parser.add_argument("--configs", nargs="+", metavar="NAME", help="subset of config names")
    parser.add_argument("--workloads", nargs="+", metavar="NAME", help="subset of workloads")
    parser.add_argument("--policies", nargs="+", metavar="NAME", help="subset of policies")
    parser.add_argument("--machine", default=None, help="machine description for the header")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.windows is None:
        args.windows = 4 if quick else 6
    if args.repeats is None:
        args.repeats = 3 if quick else 5
    if args.reference_budget is None:
        args.reference_budget = 0.5 if quick else 3.0
    if args.windows < 2:
        parser.error("--windows must be >= 2")
    return args


def _select(items: Sequence[Any], names: Sequence[str] | None) -> list[Any]:
    if not names:
        return list(items)
    known = {i.name for i in items}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown names {unknown}; known: {sorted(known)}")
    return [i for i in items if i.name in names]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configs = _select(CONFIGS, args.configs or (QUICK_CONFIGS if args.quick else None))
    loads = _select(WORKLOADS, args.workloads or (QUICK_WORKLOADS if args.quick else None))
    policies = all_policies(args.policies)
    static: list[StaticRow] = []
    seqs: list[SequenceRow] = []
    started = time.perf_counter()
    for config in configs:
        for index, workload in enumerate(WORKLOADS):
            if workload not in loads:
                continue
            windows = workload.make(
                config.layers, config.experts, args.seed + index, args.tokens, args.windows
            )
            print(f"[{time.perf_counter() - started:6.1f}s] {config.name}: {workload.name}",
                  file=sys.stderr)
            if workload.sequence:
                seqs += run_sequence(config, workload.name, windows, policies)
            else:
                static += run_static(config, workload.name, windows[0], policies, args)
    import torch

    meta = {
        "command": shlex.join(
            [".venv/bin/python", "benchmarks/planner.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": args.machine or _machine(),
        "date": time.strftime("%Y-%m-%d"),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "seed": args.seed,
        "tokens": args.tokens,
        "windows": args.windows,
        "repeats": args.repeats,
        "reference_budget": args.reference_budget,
        "elapsed_s": time.perf_counter() - started,
    }
    if args.json:
        doc = {"meta": meta, "static": [asdict(r) for r in static],
               "sequences": [asdict(r) for r in seqs]}
        print(json.dumps(doc, indent=1))
    else:
        print(format_markdown(meta, static, seqs))
    return 0


if __name__ == "__main__":
    # Run as a script (`python benchmarks/planner.py`): make `benchmarks` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
