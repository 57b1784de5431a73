"""The ``eplb`` command: one module per subcommand, each with ``register(subparsers)``.

A subcommand module defines ``register(subparsers) -> None`` that adds its parser and sets
``func=run`` where ``run(args) -> int`` returns the exit code. Heavy imports (torch, grpc, the
web stack) happen inside ``run`` so that ``eplb --help`` and ``eplb plan`` start fast.

Exit codes: 0 success, 1 runtime failure, 2 bad input (one clear line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from eplb_service import __version__

# Subcommand modules, in the order `eplb --help` lists them.
SUBCOMMANDS: tuple[str, ...] = ("plan", "serve", "simulate_agents", "demo")


class UsageError(Exception):
    """Bad input from the user: printed as one line on stderr, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eplb", description="Expert-parallel load balancing for MoE inference."
    )
    parser.add_argument("--version", action="version", version=f"eplb {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"eplb_service.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"eplb_service.cli.{name}":
                continue  # not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except UsageError as exc:
        print(f"eplb {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
