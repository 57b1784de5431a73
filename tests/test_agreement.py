"""In-band version agreement (DESIGN.md invariant 1): every rank switches at the same step.

Ranks are simulated three ways: threads over :class:`ThreadGroup`, one thread over
:func:`step_lockstep`, and real processes over ``torch.distributed`` (gloo). Plans reach ranks at
different steps, on purpose; the checks are always that all ranks route with the same version at
every step, and that a rank that is not ready holds everyone back.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker_agent.agreement import (
    AgreedSettings,
    AgreementError,
    Collective,
    LocalCollective,
    Lockstep,
    ThreadGroup,
    TorchCollective,
    VersionAgreement,
    step_lockstep,
)
from worker_agent.plans import PlanBook, ReadyPlan

L, P, E = 2, 8, 4


def plan(version: int, salt: int = 0) -> ReadyPlan:
    phy2log = np.tile((np.arange(P) + version + salt) % E, (L, 1))
    return ReadyPlan.create(version, f"ro-{version}", phy2log)


class RecordingSwitcher:
    """Switches in ``steps_needed`` steps (1 = a plain map switch); records what it did."""

    def __init__(self, steps_needed: int = 1, fail: bool = False) -> None:
        self.steps_needed = steps_needed
        self.fail = fail
        self.begun: list[tuple[int, int]] = []
        self.advanced: list[int] = []
        self._left = 0

    def begin(self, step: int, plan: ReadyPlan, settings: AgreedSettings) -> None:
        self.begun.append((step, plan.version))
        self._left = self.steps_needed

    def advance(self, step: int) -> bool:
        if self.fail:
            raise RuntimeError("transfer failed")
        self.advanced.append(step)
        self._left -= 1
        return self._left == 0


Schedule = Callable[[int, int, PlanBook], None]  # (rank, step, plans) before the step


def run_threads(
    world: int, steps: int, schedule: Schedule, *, period: int = 4, steps_needed: int = 1
) -> tuple[list[list[int]], list[VersionAgreement]]:
    """Runs ``world`` rank threads for ``steps`` steps; returns each rank's active version
    after every step, and the agreements."""
    group = ThreadGroup(world, timeout_s=20)
    books = [PlanBook() for _ in range(world)]
    agreements = [
        VersionAgreement(books[r], RecordingSwitcher(steps_needed),
                         settings=AgreedSettings(period_steps=period))
        for r in range(world)
    ]
    versions: list[list[int]] = [[] for _ in range(world)]
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            collective = group.member(rank)
            for step in range(steps):
                schedule(rank, step, books[rank])
                agreements[rank].step(collective)
                versions[rank].append(agreements[rank].active_version)
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert all(a.errors == 0 for a in agreements)
    return versions, agreements


def first_step_with(versions: list[int], version: int) -> int:
    return next(i for i, v in enumerate(versions) if v == version)


def test_all_ranks_switch_at_the_same_step_whenever_plans_arrive() -> None:
    # Rank r gets plan 1 before step 3 + 5r: the last rank is ready before step 18, so the
    # first agreement after that (K = 4: steps 19, 23, ... close agreements) switches everyone.
    def schedule(rank: int, step: int, plans: PlanBook) -> None:
        if step == 3 + 5 * rank:
            plans.stage(plan(1))
        if step == 30 + rank:
            plans.stage(plan(2))

    versions, agreements = run_threads(4, 48, schedule)
    assert all(v == versions[0] for v in versions)  # one map per step, on every rank
    assert first_step_with(versions[0], 1) == 19
    assert first_step_with(versions[0], 2) == 35
    assert [a.switches for a in agreements] == [2] * 4
    assert all(a.plans.versions() == [] for a in agreements)  # applied plans are dropped


def test_a_rank_that_never_becomes_ready_holds_everyone_back() -> None:
    def schedule(rank: int, step: int, plans: PlanBook) -> None:
        if rank != 2 and step == 1:
            plans.stage(plan(1))

    versions, agreements = run_threads(4, 40, schedule)
    assert all(v == [0] * 40 for v in versions)
    assert [a.switches for a in agreements] == [0] * 4


def test_cancel_on_one_rank_blocks_the_switch_for_all() -> None:
    def schedule(rank: int, step: int, plans: PlanBook) -> None:
        if step == 0:
            plans.stage(plan(1))
        if rank == 0 and step == 2:
            plans.cancel(1, "ro-1")

    versions, _ = run_threads(3, 20, schedule)
    assert all(v == [0] * 20 for v in versions)


def test_different_maps_for_one_version_never_switch() -> None:
    def schedule(rank: int, step: int, plans: PlanBook) -> None:
        if step == 0:
            plans.stage(plan(1, salt=1 if rank == 1 else 0))

    versions, agreements = run_threads(3, 12, schedule)
    assert all(v == [0] * 12 for v in versions)
    assert all(a.mismatches == 3 for a in agreements)


def test_agreed_minimum_that_a_rank_does_not_hold_blocks_the_switch() -> None:
    # Rank 0 only ever staged version 2 (its version 1 was replaced); the others still hold only
    # version 1. MIN is 1, which rank 0 cannot apply: nobody switches until they all hold 2.
    def schedule(rank: int, step: int, plans: PlanBook) -> None:
        if step == 0:
            plans.stage(plan(2) if rank == 0 else plan(1))
        if rank != 0 and step == 10:
            plans.cancel(1)
            plans.stage(plan(2))

    versions, _ = run_threads(3, 20, schedule)
    assert all(v == versions[0] for v in versions)
    assert set(versions[0][:11]) == {0} and first_step_with(versions[0], 2) == 11


def test_period_changes_take_effect_on_every_rank_at_the_same_step() -> None:
    world, steps = 3, 60
    group = ThreadGroup(world)
    agreements = [VersionAgreement(PlanBook(), RecordingSwitcher()) for _ in range(world)]
    agreement_steps: list[list[int]] = [[] for _ in range(world)]

    def rank_main(rank: int) -> None:
        collective = group.member(rank)
        agreement = agreements[rank]
        for step in range(steps):
            if step == 5 + 7 * rank:  # the Settings message reaches each rank at its own time
                agreement.propose_settings(3, 2)
            before = agreement.agreements
            agreement.step(collective)
            if agreement.agreements != before:
                agreement_steps[rank].append(step)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(s == agreement_steps[0] for s in agreement_steps)
    # K = 16 at first; the agreed K is the MIN of the proposals, so it drops to 3 at the first
    # agreement after any rank has the new settings (step 15), on every rank at once.
    assert agreement_steps[0][:4] == [15, 18, 21, 24]
    assert all(a.settings == AgreedSettings(3, 2) for a in agreements)


def test_a_multi_step_switch_runs_on_every_rank_and_pauses_agreements() -> None:
    def schedule(rank: int, step: int, plans: PlanBook) -> None:
        if step == 0:
            plans.stage(plan(1))

    versions, agreements = run_threads(2, 12, schedule, steps_needed=3)
    # Agreed at step 3; the switcher needs steps 3, 4, 5; routes with version 1 from step 6.
    assert versions[0] == versions[1] == [0] * 5 + [1] * 7
    for agreement in agreements:
        switcher = agreement.switcher
        assert isinstance(switcher, RecordingSwitcher)
        assert switcher.begun == [(3, 1)] and switcher.advanced == [3, 4, 5]


def test_a_failing_switch_reports_an_error_outcome_and_drops_the_plan() -> None:
    books = PlanBook()
    books.stage(plan(1))
    agreement = VersionAgreement(books, RecordingSwitcher(fail=True),
                                 settings=AgreedSettings(period_steps=1))
    outcome = agreement.step(LocalCollective())
    assert outcome is not None and not outcome.applied and "transfer failed" in str(outcome.error)
    assert agreement.active_version == 0 and books.versions() == []


def test_step_never_raises_when_the_collective_fails() -> None:
    agreement = VersionAgreement(PlanBook(), RecordingSwitcher(),
                                 settings=AgreedSettings(period_steps=2))
    for _ in range(6):
        assert agreement.step(Lockstep()) is None
    assert agreement.errors == 3 and agreement.steps == 6


def test_lockstep_driver_matches_the_threaded_collective() -> None:
    def schedule(rank: int, step: int, plans: PlanBook) -> None:
        if step == 3 + 5 * rank:
            plans.stage(plan(1))

    threaded, _ = run_threads(4, 30, schedule)
    books = [PlanBook() for _ in range(4)]
    agreements = [VersionAgreement(b, RecordingSwitcher(),
                                   settings=AgreedSettings(period_steps=4)) for b in books]
    lockstep: list[list[int]] = [[] for _ in range(4)]
    for step in range(30):
        for rank in range(4):
            schedule(rank, step, books[rank])
        outcomes = step_lockstep(agreements)
        assert len({o is None for o in outcomes}) == 1
        for rank, agreement in enumerate(agreements):
            lockstep[rank].append(agreement.active_version)
    assert lockstep == threaded


def test_lockstep_detects_ranks_that_diverge() -> None:
    agreements = [
        VersionAgreement(PlanBook(), RecordingSwitcher(), settings=AgreedSettings(period))
        for period in (1, 2)
    ]
    with pytest.raises(AgreementError, match="1 of 2 ranks finished"):
        step_lockstep(agreements)


def test_thread_group_reduces_elementwise_and_times_out() -> None:
    group = ThreadGroup(3, timeout_s=0.2)
    results: dict[int, list[int]] = {}

    def run(rank: int) -> None:
        results[rank] = group.member(rank).allreduce_min([rank + 5, 10 - rank, 7])

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert results == {r: [5, 8, 7] for r in range(3)}
    lonely = ThreadGroup(2, timeout_s=0.1)
    with pytest.raises(threading.BrokenBarrierError):
        lonely.member(0).allreduce_min([1])


# ---------------------------------------------------------------------------------------------
# torch.distributed (gloo), real processes


def _gloo_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        collective: Collective = TorchCollective()
        books = PlanBook()
        agreement = VersionAgreement(books, RecordingSwitcher(),
                                     settings=AgreedSettings(period_steps=4))
        versions = []
        for step in range(60):
            if step == 2 + 6 * rank:  # each rank gets plan 1 at its own step
                books.stage(plan(1))
            if step == 30 and rank != world - 1:  # the last rank never gets plan 2
                books.stage(plan(2))
            agreement.step(collective)
            versions.append(agreement.active_version)
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), np.array(versions))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gloo_ranks_switch_at_the_same_step(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    world = 3
    init_file = tmp_path / "init"
    context: Any = mp.spawn(
        _gloo_rank, args=(world, str(init_file), str(tmp_path)), nprocs=world, join=False
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        assert time.monotonic() < deadline, "gloo ranks did not finish"
    versions = [np.load(tmp_path / f"rank{r}.npy") for r in range(world)]
    for v in versions[1:]:
        assert np.array_equal(v, versions[0])
    # The last rank is ready before step 14: everyone switches at the agreement of step 15.
    assert int(np.argmax(versions[0] == 1)) == 15
    assert set(versions[0][15:].tolist()) == {1}  # version 2 held back by the last rank
