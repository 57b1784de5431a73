"""The expert-parallel engine (eplb_engine) against the dense single-process computation, before
and after placement changes moved by worker_agent.migration (gloo, CPU, fp32)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from eplb_engine import (
    EPEngine,
    MoEConfig,
    MoEModel,
    Rebalance,
    dense_forward,
    greedy_placement,
    random_placement,
    relative_error,
    run_engine,
    spawn_ranks,
)
from eplb_engine.dense import dense_layer
from eplb_engine.inband import InBandRollouts, Rollout
from worker_agent.recording import ExpertLoadRecorder, PlacementView

TOL = 1e-5
CONFIG = MoEConfig(num_layers=3, num_experts=8, top_k=2, hidden=16, ffn=24, skew=1.0, seed=3)


def test_outputs_match_dense_before_and_after_rebalances() -> None:
    rng = np.random.default_rng(0)
    num_slots = 12  # 4 ranks x 3 slots, 4 redundant
    maps = {step: random_placement(rng, CONFIG.num_layers, CONFIG.num_experts, num_slots)
            for step in (2, 4, 6, 8)}
    run = run_engine(4, 10, config=CONFIG, schedule=maps, num_slots=num_slots, num_nodes=2,
                     tokens_per_step=24, timeout_s=90)
    errors = [s.rel_error for s in run.ranks[0].steps]
    assert all(e is not None and e <= TOL for e in errors), errors
    assert run.versions_consistent
    assert [s.version for s in run.ranks[0].steps] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for rank in run.ranks:
        assert rank.weights_ok, rank.rank
        assert [rb.failed for rb in rank.rebalances] == [{}] * 4
        assert all(rb.applied_layers for rb in rank.rebalances)
    assert sum(rb.bytes_received for r in run.ranks for rb in r.rebalances) > 0


def test_a_failed_layer_keeps_its_old_map_and_outputs_stay_exact() -> None:
    rng = np.random.default_rng(1)
    p1, p2 = (random_placement(rng, CONFIG.num_layers, CONFIG.num_experts, 9) for _ in range(2))
    schedule = {2: Rebalance(p1, fault_rank=1, fault_layer=1), 4: p2}
    run = run_engine(3, 6, config=CONFIG, schedule=schedule, num_slots=9, tokens_per_step=18,
                     timeout_s=90)
    errors = [s.rel_error for s in run.ranks[0].steps]
    assert all(e is not None and e <= TOL for e in errors), errors
    assert run.versions_consistent
    for rank in run.ranks:
        first, second = rank.rebalances
        assert sorted(first.failed) == [1] and 1 not in first.applied_layers
        assert "rank 1" in first.failed[1]
        assert second.failed == {}
        assert rank.weights_ok
    # The partial switch keeps the version (the mix is no service version); the next is whole.
    assert [s.version for s in run.ranks[0].steps] == [0, 0, 0, 0, 2, 2]


def test_a_balanced_placement_raises_balancedness() -> None:
    config = MoEConfig(num_layers=2, num_experts=8, top_k=2, hidden=16, ffn=16, skew=1.5, seed=5)
    model = MoEModel(config)
    # Per-expert loads from the dense routing of the first steps' batches.
    loads = np.zeros((config.num_layers, config.num_experts))
    for step in range(3):
        x = model.inputs(step, 64)
        for layer in range(config.num_layers):
            x, ids = dense_layer(model, layer, x)
            loads[layer] += np.bincount(ids.flatten().numpy(), minlength=config.num_experts)
    balanced = greedy_placement(loads, 12, 4)
    run = run_engine(4, 6, config=config, schedule={3: balanced}, num_slots=12,
                     tokens_per_step=64, check_every=3, timeout_s=90)
    bal = [float(np.mean(s.balancedness)) for s in run.ranks[0].steps]
    assert np.mean(bal[3:]) > np.mean(bal[:3]) + 0.1, bal
    assert all(s.rel_error is None or s.rel_error <= TOL for s in run.ranks[0].steps)


def _agent_style(rank: int, world: int, phy2log: np.ndarray, new: np.ndarray) -> dict[str, Any]:
    """The engine on a view/recorder it does not own (as with an EplbAgent)."""
    model = MoEModel(CONFIG)
    view = PlacementView(phy2log, CONFIG.num_experts)
    recorder = ExpertLoadRecorder(view)
    engine = EPEngine(model, rank=rank, world_size=world, view=view, recorder=recorder)
    map_ptr, w_ptr = view.phy2log.data_ptr(), engine.weights.tensors(0)["w1"].data_ptr()
    x_all = model.inputs(0, 8)
    errors = []
    for version in (0, 1):
        y = engine.forward(x_all[rank * 4:(rank + 1) * 4], 4)
        parts = [torch.empty_like(y) for _ in range(world)]
        torch.distributed.all_gather(parts, y)
        errors.append(relative_error(torch.cat(parts), dense_forward(model, x_all)))
        if version == 0:
            report = engine.rebalance(new, version=1)
            assert not report.failed
    return {
        "errors": errors,
        "counted": int(recorder.counters.sum()),
        "in_place": (view.phy2log.data_ptr(), engine.weights.tensors(0)["w1"].data_ptr())
        == (map_ptr, w_ptr),
        "version": view.version,
        "weights_ok": not engine.check_weights(),
    }


def test_engine_on_an_external_view_and_recorder() -> None:
    rng = np.random.default_rng(2)
    old, new = (random_placement(rng, CONFIG.num_layers, CONFIG.num_experts, 10) for _ in "ab")
    for out in spawn_ranks(_agent_style, 2, old, new, timeout_s=60):
        assert max(out["errors"]) <= TOL
        assert out["counted"] == 2 * 4 * CONFIG.top_k * CONFIG.num_layers  # 2 steps, 4 tokens
        assert out["in_place"] and out["version"] == 1 and out["weights_ok"]


def test_dense_reference_and_skew() -> None:
    model = MoEModel(CONFIG)
    x = model.inputs(0, 5)
    y = dense_forward(model, x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert torch.equal(MoEModel(CONFIG).w2, model.w2)  # seeded: identical in every process
    flat = MoEModel(MoEConfig(skew=0.0, seed=1))
    assert torch.all(flat.bias == 0)
    skewed = MoEModel(MoEConfig(skew=2.0, seed=1))
    hot = skewed.hot_order[0].argmin()
    assert skewed.bias[0, hot] == skewed.bias[0].max()


def test_inband_rollouts_with_layers_per_step_and_a_rollback() -> None:
    """worker_agent's agreement + MigratingSwitcher on the engine: plans reach ranks at different
    steps, every rank switches at the same step, one layer per step, and a failure injected on
    one rank rolls the already-switched layers back on every rank. Outputs stay exact at every
    step, transitions included."""
    rng = np.random.default_rng(4)
    world, num_slots = 3, 9
    maps = [random_placement(rng, CONFIG.num_layers, CONFIG.num_experts, num_slots)
            for _ in range(4)]

    def deliver(base: int) -> tuple[int, ...]:
        return tuple(int(s) for s in rng.integers(base, base + 4, world))

    rollouts = [
        Rollout(1, maps[0], deliver(0)),
        Rollout(2, maps[1], deliver(8)),
        Rollout(3, maps[2], deliver(16), fault_rank=1, fault_layer=CONFIG.num_layers - 1),
        Rollout(4, maps[3], deliver(24)),
    ]
    hooks = InBandRollouts(rollouts, period_steps=2, layers_per_step=1)
    run = run_engine(world, 34, config=CONFIG, hooks=hooks, num_slots=num_slots,
                     tokens_per_step=18, timeout_s=90)
    errors = [s.rel_error for s in run.ranks[0].steps]
    assert all(e is not None and e <= TOL for e in errors), errors
    assert run.versions_consistent
    outcomes = [[(step, v, err is None) for step, v, err in r.extra["outcomes"]]
                for r in run.ranks]
    assert all(o == outcomes[0] for o in outcomes)  # the same step on every rank
    assert [(v, ok) for _, v, ok in outcomes[0]] == [(1, True), (2, True), (3, False), (4, True)]
    # Every rank knows rank 1 failed; only rank 1 knows why.
    reasons = [r.extra["outcomes"][2][2] for r in run.ranks]
    assert all("rank 1" in reason for reason in reasons)
    assert ["injected" in reason for reason in reasons] == [False, True, False]
    for rank in run.ranks:
        assert rank.extra["active_version"] == 4 and rank.weights_ok
        stats = rank.extra["migration"]
        # the preparation step (prepare_ahead), then one layer per step
        assert [s["steps"] for s in stats] == [4, 4, 4, 4]
        assert all(0 < s["prepare_ms"] <= s["max_step_pause_ms"] for s in stats)
        assert [s["rolled_back"] for s in stats] == [0, 0, 2, 0]
    versions = [s.version for s in run.ranks[0].steps]
    assert versions == sorted(versions) and versions[-1] == 4 and 3 not in versions
    counted = [s.counted for s in run.ranks[0].steps]
    assert counted[0] == 18 * CONFIG.top_k * CONFIG.num_layers and 0 in counted  # paused
