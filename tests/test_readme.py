"""The README stays true: every setting, metric, CLI flag and REST path is documented in it.

The settings and metrics tables are generated from their single sources of truth
(``eplb_service.config.settings_table`` and ``eplb_service.telemetry.metrics_table``) and pasted
verbatim; the CLI flags come from the real parsers and the REST paths from the served OpenAPI.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from eplb_service.cli import build_parser
from eplb_service.config import settings_table
from eplb_service.telemetry import metrics_table

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_opens_with_the_two_commands() -> None:
    first_block = README.split("```", 2)[1]
    assert "make demo" in first_block and "make test" in first_block


def test_settings_table_is_current() -> None:
    assert settings_table() in README, (
        "README settings table is stale: paste eplb_service.config.settings_table()"
    )


def test_metrics_table_is_current() -> None:
    assert metrics_table() in README, (
        "README metrics table is stale: paste eplb_service.telemetry.metrics_table()"
    )


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


def test_every_subcommand_is_documented() -> None:
    subcommands = _subcommands()
    assert set(subcommands) >= {"plan", "serve", "simulate-agents", "demo"}
    for name in subcommands:
        assert f"eplb {name}" in README, f"README does not document `eplb {name}`"


@pytest.mark.parametrize("name", ["plan", "simulate-agents", "demo"])
def test_every_flag_is_documented(name: str) -> None:
    """`eplb serve` flags are the settings table; the other commands list theirs."""
    parser = _subcommands()[name]
    missing = [
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help" and option not in README
    ]
    assert not missing, f"README does not mention these `eplb {name}` flags: {missing}"


def test_every_rest_path_is_documented(
    service_factory: Callable[..., Any], http: Callable[..., tuple[int, Any]]
) -> None:
    running = service_factory()
    status, spec = http("GET", f"{running.http_url}/openapi.json")
    assert status == 200
    documented = README.replace("{name}", "{NAME}")
    missing = []
    for path in spec["paths"]:
        if path in ("/docs", "/openapi.json"):
            continue
        short = re.sub(r"^/v1/deployments/\{name\}", "", path)
        readable = path.replace("{name}", "{NAME}")
        if readable not in documented and f"`{short}" not in documented:
            missing.append(path)
    assert not missing, f"README does not document these REST paths: {missing}"
