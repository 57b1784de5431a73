"""Shared test helpers: hypothesis strategies and CLI runners used by several test modules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

from eplb_service.cli import main
from eplb_service.placement import Placement, Topology


@st.composite
def placements_of(draw: st.DrawFn, topology: Topology) -> Placement:
    """Any valid placement of ``topology``: per layer every expert once, the remaining slots
    random experts, shuffled."""
    t = topology
    rows = []
    for _ in range(t.num_layers):
        extra = draw(
            st.lists(
                st.integers(0, t.num_experts - 1),
                min_size=t.num_slots - t.num_experts,
                max_size=t.num_slots - t.num_experts,
            )
        )
        rows.append(draw(st.permutations([*range(t.num_experts), *extra])))
    return Placement(np.array(rows, dtype=np.int64), t)


def run_plan_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``eplb plan ARGV`` in-process -> (exit code, stdout, stderr); argparse exits included."""
    try:
        code = main(["plan", *argv])
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
