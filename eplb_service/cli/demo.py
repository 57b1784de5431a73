"""``eplb demo``: the whole loop live on this machine — the service and a real 4-rank CPU engine.

    eplb demo [--ranks 4] [--steps N] [--json] [--layers L] [--experts E] [--redundant X]
        [--tokens T] [--skew S] [--seed S] [--step-ms MS] [--drift-at F] [--layers-per-step N]

Starts ``eplb serve`` on free loopback ports with auto-rebalance on, and R engine processes
(torch.distributed, gloo) each running an ``EplbAgent`` with weight migration
(:mod:`eplb_engine.demo`). Prints progress live and a summary; ``--json`` sends those to stderr
and prints one JSON object as the last line on stdout. Everything it started is stopped on
exit, Ctrl-C and SIGTERM included. Torch and the engine are imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from types import FrameType
from typing import Any

from eplb_service.cli import UsageError


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        allow_abbrev=False,
        help="run the service and a live 4-rank CPU MoE engine; show the loop balancing it",
        description=(
            "Start the eplb service and an R-rank CPU expert-parallel MoE engine (each rank an "
            "eplb agent with weight migration) with skewed routing; show step, balancedness, "
            "active version, rollout state and experts moved live, then a summary. Halfway "
            "through the hot experts move, so the service rebalances again. Exits cleanly."
        ),
    )
    add = parser.add_argument
    add("--ranks", type=int, default=4, help="EP ranks (processes); default 4")
    add("--steps", type=int, default=500, help="forward steps; default 500")
    add("--json", action="store_true",
        help="progress and summary to stderr, one JSON object on stdout (the last line)")
    add("--layers", type=int, default=4, help="MoE layers; default 4")
    add("--experts", type=int, default=16, help="logical experts per layer; default 16")
    add("--redundant", type=int, default=4,
        help="redundant slots in all (experts + redundant must divide by ranks); default 4")
    add("--tokens", type=int, default=64, help="tokens per step (all ranks); default 64")
    add("--top-k", type=int, default=2, help="experts per token; default 2")
    add("--skew", type=float, default=1.2, help="Zipf exponent of the router skew; default 1.2")
    add("--seed", type=int, default=0, help="model seed; default 0")
    add("--step-ms", type=float, default=50.0,
        help="pace: at most one forward step per this many ms; default 50")
    add("--drift-at", type=float, default=0.5,
        help="fraction of the steps after which the hot experts move (0 = never); default 0.5")
    add("--layers-per-step", type=int, default=1,
        help="layers migrated per forward step during a switch (0 = all); default 1")
    add("--rebalance-interval-s", type=float, default=3.0,
        help="the service's auto-rebalance interval; default 3")
    add("--cooldown-s", type=float, default=3.0,
        help="the service's auto-rebalance cooldown after a rollout; default 3")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eplb_engine.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        ranks=args.ranks, steps=args.steps, layers=args.layers, experts=args.experts,
        redundant=args.redundant, tokens_per_step=args.tokens, top_k=args.top_k,
        skew=args.skew, seed=args.seed, step_ms=args.step_ms, drift_at=args.drift_at,
        layers_per_step=max(0, args.layers_per_step),
        rebalance_interval_s=args.rebalance_interval_s, cooldown_s=args.cooldown_s,
    )
    try:
        cfg.check()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out = sys.stderr if args.json else sys.stdout
    restore = _sigterm_as_interrupt()
    try:
        summary = run_demo(cfg, out)
    except KeyboardInterrupt:
        print("eplb demo: interrupted; the service and the engine were stopped",
              file=sys.stderr, flush=True)
        return 130
    except Exception as exc:
        print(f"eplb demo: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        restore()
    if args.json:
        print(json.dumps(summary), flush=True)
    ok = (summary["versions_consistent"] and summary["max_output_rel_error"] <= 1e-5
          and summary["weights_consistent"])
    return 0 if ok else 1


def _sigterm_as_interrupt() -> Any:
    """Make SIGTERM raise KeyboardInterrupt (so ``finally`` blocks stop the children); returns
    a function restoring the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)
