"""``eplb plan``: plan a placement offline from a dumped load, and show what it buys.

    eplb plan --load LOAD --num-slots P --num-ranks R [--num-nodes N] [--num-groups G]
              [--policy NAME] [--current CUR] [--expert-bytes B] [--out OUT] [--json]
              [--max-moves N] [--max-bytes B] [--min-gain G]
              [--strategy {auto,hierarchical,global}]

Compares the plan with the placement in service (CUR, or the engines' identity placement when
no CUR is given) under LOAD: balancedness (mean and worst layer), imbalance, max rank load over
the lower bound, and the migration from CUR (or identity) to the plan. ``--json`` prints the same
as one JSON object. Bad input exits with code 2 and one line on stderr.

With the default policy (``sticky``, :func:`eplb_service.policy.sticky.plan`) the plan is made
from CUR: it keeps what can stay, ``--max-moves`` / ``--max-bytes`` cap what moves,
``--min-gain`` keeps CUR unless balancedness rises by at least G, ``--strategy`` chooses
group locality; the report says which strategy was used and why, and whether anything changed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from eplb_service.cli import UsageError

# The policy `eplb plan` uses when --policy is not given.
DEFAULT_POLICY = "default"


def _int_at_least(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _float_at_least(minimum: float) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= minimum:  # also rejects NaN
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g}, got {text}")
        return value

    parse.__name__ = f"number >= {minimum:g}"
    return parse


def _one_line_error(prog: str) -> Any:
    """argparse's ``error`` without the usage block: one line on stderr, exit code 2."""

    def error(message: str) -> NoReturn:
        print(f"{prog}: error: {message} (see `{prog} --help`)", file=sys.stderr)
        sys.exit(2)

    return error


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="plan a placement from a load file and show before/after balance and migration",
        description=(
            "Plan an expert placement for a dumped load and compare it with the current "
            "placement (or the identity placement)."
        ),
    )
    parser.error = _one_line_error(parser.prog)
    parser.add_argument(
        "--load", required=True, type=Path, metavar="LOAD",
        help="per-expert load [layers, experts]: .npy, .json ({\"logical_count\": ...}) or .pt",
    )
    parser.add_argument(
        "--num-slots", required=True, type=_int_at_least(1), metavar="P",
        help="physical expert slots per layer (experts + redundant), divisible by --num-ranks",
    )
    parser.add_argument(
        "--num-ranks", required=True, type=_int_at_least(1), metavar="R",
        help="EP ranks (GPUs)",
    )
    parser.add_argument(
        "--num-nodes", type=_int_at_least(1), default=1, metavar="N",
        help="nodes; must divide --num-ranks (default 1)",
    )
    parser.add_argument(
        "--num-groups", type=_int_at_least(1), default=1, metavar="G",
        help="expert groups of group-limited routing; must divide the experts (default 1)",
    )
    parser.add_argument(
        "--policy", default=DEFAULT_POLICY, metavar="NAME",
        help=f"placement policy (default {DEFAULT_POLICY})",
    )
    parser.add_argument(
        "--current", type=Path, metavar="CUR",
        help="placement in service, phy2log [layers, slots]: .npy or .json "
        "({\"physical_to_logical_map\": ...}); migration is reported from it",
    )
    parser.add_argument(
        "--expert-bytes", type=_int_at_least(0), metavar="B",
        help="bytes of one expert's weights, to report bytes moved",
    )
    parser.add_argument(
        "--out", type=Path, metavar="OUT",
        help="write the plan: .npy or .json (SGLang --init-expert-location form)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    # Migration-aware options of the default policy (sticky); they need --current.
    parser.add_argument(
        "--max-moves", type=_int_at_least(0), metavar="N",
        help="rewrite at most N slots (best balancedness gain per move first); needs --current",
    )
    parser.add_argument(
        "--max-bytes", type=_int_at_least(0), metavar="B",
        help="transfer at most B bytes of expert weights; needs --current and --expert-bytes",
    )
    parser.add_argument(
        "--min-gain", type=_float_at_least(0.0), default=0.0, metavar="G",
        help="keep CUR unless mean balancedness rises by at least G (default 0); needs --current",
    )
    parser.add_argument(
        "--strategy", choices=("auto", "hierarchical", "global"), default="auto",
        help="hierarchical keeps each expert group's replicas on one node; auto (default) does "
        "when that costs little balance",
    )
    parser.set_defaults(func=run)


def _sticky(policy: str) -> Any:
    """:func:`eplb_service.policy.sticky.plan` when ``policy`` names the sticky policy."""
    from eplb_service.policy import POLICIES, sticky

    return sticky.plan if POLICIES[policy] is sticky.rebalance_experts else None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _policy_options(fn: Any, current: Any) -> dict[str, Any]:
    """Options for a policy function: ``current`` (phy2log ``[L, P]``) when it takes one."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if current is not None and "current" in params:
        return {"current": current}
    return {}


def run(args: argparse.Namespace) -> int:
    from eplb_service.balance import evaluate
    from eplb_service.loadfile import check_writable, read_load, read_placement
    from eplb_service.migration import summarize_migration
    from eplb_service.placement import Placement, PlacementError, Topology
    from eplb_service.policy import POLICIES, rebalance_experts

    if args.policy not in POLICIES:
        raise UsageError(
            f"unknown policy {args.policy!r}; known policies: {', '.join(sorted(POLICIES))}"
        )
    try:
        if args.out is not None:
            check_writable(args.out)
        load = read_load(args.load)
    except ValueError as exc:
        raise UsageError(_one_line(exc)) from None

    num_layers, num_experts = load.shape
    slots, ranks, nodes, groups = args.num_slots, args.num_ranks, args.num_nodes, args.num_groups
    if slots < num_experts:
        raise UsageError(
            f"--num-slots ({slots}) must be >= the number of experts in {args.load} "
            f"({num_experts}): every expert needs a slot"
        )
    if slots % ranks:
        raise UsageError(f"--num-slots ({slots}) must be divisible by --num-ranks ({ranks})")
    if ranks % nodes:
        raise UsageError(f"--num-ranks ({ranks}) must be divisible by --num-nodes ({nodes})")
    if num_experts % groups:
        raise UsageError(
            f"--num-groups ({groups}) must divide the number of experts in {args.load} "
            f"({num_experts})"
        )
    try:
        topology = Topology(num_layers, num_experts, slots, ranks, nodes)
        before = (
            read_placement(args.current, topology)
            if args.current is not None
            else Placement.identity(topology)
        )
    except ValueError as exc:
        raise UsageError(_one_line(exc)) from None

    current_map = before.phy2log if args.current is not None else None
    options = _policy_options(POLICIES[args.policy], current_map)
    sticky_plan = _sticky(args.policy)
    migration_options = {"--max-moves": args.max_moves, "--max-bytes": args.max_bytes,
                         "--min-gain": args.min_gain or None}
    given = [name for name, value in migration_options.items() if value is not None]
    if given and sticky_plan is None:
        raise UsageError(f"{', '.join(given)}: policy {args.policy!r} does not take them "
                         f"(use --policy {DEFAULT_POLICY})")
    if given and args.current is None:
        raise UsageError(f"{', '.join(given)} need --current (the placement in service)")
    if args.strategy != "auto" and sticky_plan is None:
        raise UsageError(f"--strategy: policy {args.policy!r} does not take it")
    extra: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        if sticky_plan is not None:
            result = sticky_plan(
                load, topology, num_groups=groups,
                current=before if args.current is not None else None,
                max_moves=args.max_moves, max_bytes=args.max_bytes,
                expert_bytes=args.expert_bytes, min_gain=args.min_gain, strategy=args.strategy,
            )
            phy2log = result.placement.phy2log
            extra = {"changed": result.changed, "reason": result.reason,
                     "strategy": result.strategy, "strategy_reason": result.strategy_reason}
        else:
            phy2log, _, _ = rebalance_experts(
                load, slots, groups, nodes, ranks, policy=args.policy, **options
            )
    except ValueError as exc:
        raise UsageError(_one_line(exc)) from None
    time_ms = (time.perf_counter() - start) * 1e3
    try:
        after = Placement(phy2log, topology)
    except PlacementError as exc:  # a policy bug, not bad input
        print(
            f"eplb plan: policy {args.policy!r} made an invalid placement: {exc}", file=sys.stderr
        )
        return 1

    migration = summarize_migration(before, after, args.expert_bytes)
    if not extra:  # same keys for every policy; only the default one chooses a strategy
        extra = {"changed": migration.slots_changed > 0, "reason": None, "strategy": None,
                 "strategy_reason": None}
    if args.out is not None:
        from eplb_service.loadfile import write_placement

        try:
            write_placement(args.out, after)
        except ValueError as exc:
            raise UsageError(_one_line(exc)) from None

    report: dict[str, Any] = {
        "load": str(args.load),
        "layers": num_layers,
        "experts": num_experts,
        "slots": slots,
        "ranks": ranks,
        "nodes": nodes,
        "groups": groups,
        "policy": args.policy,
        "current": None if args.current is None else str(args.current),
        "before_placement": "current" if args.current is not None else "identity",
        "before": evaluate(load, before).to_dict(),
        "after": evaluate(load, after).to_dict(),
        "migration": migration.to_dict(),
        "time_ms": time_ms,
        "out": None if args.out is None else str(args.out),
        **extra,
    }
    return _emit(json.dumps(report) if args.json else format_report(report))


def _emit(text: str) -> int:
    """Prints ``text``; a closed pipe (``eplb plan --json | head``) is not an error."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the failed flush again at exit; point stdout at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


def _bytes(value: int | None) -> str:
    if value is None:
        return "n/a"
    size = float(value)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} TB"


def format_report(report: dict[str, Any]) -> str:
    """The terminal summary of a :func:`run` report (the ``--json`` object)."""
    b, a, m = report["before"], report["after"], report["migration"]
    label = "current" if report["before_placement"] == "current" else "identity"
    rows = [
        ("balancedness mean", f"{b['balancedness_mean']:.4f}", f"{a['balancedness_mean']:.4f}"),
        (
            "balancedness worst",
            f"{b['balancedness_worst']:.4f} (layer {b['worst_layer']})",
            f"{a['balancedness_worst']:.4f} (layer {a['worst_layer']})",
        ),
        ("imbalance mean", f"{b['imbalance_mean']:.4f}", f"{a['imbalance_mean']:.4f}"),
        ("imbalance max", f"{b['imbalance_max']:.4f}", f"{a['imbalance_max']:.4f}"),
        (
            "max / lower bound",
            f"{b['max_over_lower_bound']:.4f}",
            f"{a['max_over_lower_bound']:.4f}",
        ),
    ]
    head = ("", f"before ({label})", "after (plan)")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    table = [
        "  ".join(
            (cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]))
            for i, cell in enumerate(row)
        ).rstrip()
        for row in [head, *rows]
    ]
    lines = [
        f"eplb plan: {report['load']}: {report['layers']} layers x {report['experts']} experts "
        f"-> {report['slots']} slots on {report['ranks']} ranks, {report['nodes']} node(s), "
        f"{report['groups']} group(s); policy {report['policy']}",
        "",
        *table,
        "",
        f"migration from {label}: {m['slots_changed']}/{m['slots_total']} slots rewritten "
        f"({100 * m['fraction_changed']:.1f}%)",
        f"  {m['local_copies']} local copies, {m['intra_node_transfers']} intra-node and "
        f"{m['cross_node_transfers']} cross-node transfers",
    ]
    if m["bytes_moved"] is not None:
        lines.append(
            f"  bytes moved: {_bytes(m['bytes_moved'])} "
            f"({_bytes(m['cross_node_bytes'])} cross-node)"
        )
    if report.get("strategy"):
        lines.append(f"strategy: {report['strategy']} ({report['strategy_reason']})")
    if report.get("changed") is False:
        lines.append(f"no change: {report['reason']}")
    elif report.get("reason"):
        lines.append(f"note: {report['reason']}")
    lines.append(f"planned in {report['time_ms']:.1f} ms")
    if report["out"] is not None:
        lines.append(f"wrote {report['out']}")
    return "\n".join(lines)
