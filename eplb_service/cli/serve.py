"""``eplb serve``: run the control plane (gRPC for agents, REST + /metrics for operators).

Every setting is a flag here, an ``EPLB_*`` environment variable and a key of ``--config FILE``
(see :mod:`eplb_service.config`; flags win over the environment, which wins over the file).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from eplb_service import config


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        # No abbreviations: "--token SECRET" must be an error, not "--token-file SECRET".
        allow_abbrev=False,
        help="run the eplb service (gRPC for agents, REST, /metrics)",
        description=(
            "Run the eplb control plane: agents stream load over gRPC, operators use REST "
            "(OpenAPI at /docs) and Prometheus scrapes /metrics. Every flag can also be set "
            "with the environment variable named in its help, or in --config FILE (JSON, or "
            "TOML on Python >= 3.11) with the flag's name in snake_case as key. Priority: "
            "flag > environment > file > default. SIGTERM/SIGINT shut down gracefully. "
            "The bearer token comes from EPLB_TOKEN or --token-file, never from a flag."
        ),
    )
    config.add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from eplb_service.cli import UsageError

    try:
        settings = config.from_args(args)
        settings.bearer_token()  # a bad token_file fails here, with a one-line error
    except config.ConfigError as exc:
        raise UsageError(str(exc)) from None

    from eplb_service.app import serve, setup_logging

    setup_logging(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except OSError as exc:  # a port in use, an address that does not exist
        print(f"eplb serve: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
