"""Expert weight migration (worker_agent.migration) across real gloo ranks.

Every rank holds, per layer, tensors of several dtypes and shapes (``[S, ...]``); slot ``s``
of a layer holds expert ``e``'s bytes, a deterministic function of (layer, expert, tensor). After
a migration the tensors must hold exactly the new map's experts, at the same addresses; after a
failure, the failed layer must be untouched on every rank.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np
import pytest
import torch

from eplb_engine.launch import spawn_ranks
from eplb_engine.placement import random_placement
from worker_agent.migration import (
    ExpertWeights,
    MigrationError,
    _Comm,
    _cut,
    _Status,
    migration_group,
)
from worker_agent.transfers import plan_transfers

L, E, S = 3, 5, 3
TENSORS: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "w13": ((4, 3), torch.float32),
    "w2": ((3, 4), torch.bfloat16),
    "scale": ((), torch.float8_e4m3fn),  # [S]: one value per expert
    "meta": ((2,), torch.int64),
}


def expert_tensor(layer: int, expert: int, name: str) -> torch.Tensor:
    shape, dtype = TENSORS[name]
    gen = torch.Generator().manual_seed(1000 * layer + 10 * expert + len(name))
    if dtype == torch.int64:
        return torch.randint(0, 1 << 40, shape, generator=gen)
    return (torch.rand(shape, generator=gen) * 4 + expert).to(dtype)


def _device(rank: int) -> torch.device:
    """This rank's device: ``cuda:rank`` under NCCL (see eplb_engine.launch), else the CPU."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", rank)
    return torch.device("cpu")


def build(rank: int, phy2log: np.ndarray, in_flight: int = 1,
          copy_programs: int | str | None = "auto") -> ExpertWeights:
    weights = ExpertWeights(S, groups_in_flight=in_flight, copy_programs=copy_programs)
    for layer in range(L):
        mine = phy2log[layer, rank * S:(rank + 1) * S]
        weights.register_layer(layer, {
            name: torch.stack([expert_tensor(layer, int(e), name) for e in mine]).contiguous()
            .to(_device(rank))
            for name in TENSORS
        })
    return weights


def mismatches(weights: ExpertWeights, rank: int, phy2log: np.ndarray,
               layers: Any = range(L)) -> list[tuple[int, int, str]]:
    bad = []
    for layer in layers:
        tensors = weights.tensors(layer)
        for j in range(S):
            e = int(phy2log[layer, rank * S + j])
            for name in TENSORS:
                got, want = tensors[name][j].cpu(), expert_tensor(layer, e, name)
                if not torch.equal(got.view(torch.uint8), want.view(torch.uint8)):
                    bad.append((layer, rank * S + j, name))
    return bad


def pointers(weights: ExpertWeights) -> list[int]:
    return [t.data_ptr() for layer in range(L) for t in weights.tensors(layer).values()]


# ---------------------------------------------------------------------------------------------
# rank workers (run in spawned processes)


def _chain(rank: int, world: int, seed: int, hops: int, nodes: int,
           in_flight: int = 1, copy_programs: int | str | None = "auto",
           dedicated: bool = False) -> dict[str, Any]:
    rng = np.random.default_rng(seed)  # the same maps on every rank
    maps = [random_placement(rng, L, E, world * S) for _ in range(hops + 1)]
    maps[2][1] = maps[1][1]  # layer 1 does not change in the second hop
    maps.append(np.roll(maps[-1], S, axis=1))  # every rank takes its left neighbour's slots:
    # runs of consecutive source slots, sent as one op per tensor
    weights = build(rank, maps[0], in_flight, copy_programs)
    group = migration_group() if dedicated else None
    before = pointers(weights)
    out: dict[str, Any] = {"bad": [], "failed": [], "bytes": 0, "copies": 0, "layers": []}
    for hop, (old, new) in enumerate(itertools.pairwise(maps)):
        plan = plan_transfers(old, new, world, nodes)
        # Odd hops: one layer per group (pipelined: a group commits while the next transfers).
        report = weights.migrate(plan, group, group_bytes=1 if hop % 2 else None)
        out["failed"].append(dict(report.failed))
        out["layers"].append(list(report.applied_layers))
        out["bad"].append(mismatches(weights, rank, new))
        out["bytes"] += report.bytes_received
        out["copies"] += report.local_copies
        expert = weights.expert_bytes(0)
        mine = sum(len(plan[lyr].receives(rank)) for lyr in range(L))
        assert report.bytes_received == mine * expert
    # The rollout path (MigratingSwitcher): one pre-flight for every layer, then migrations
    # of verified layers without one, a layer at a time.
    back = plan_transfers(maps[-1], maps[0], world, nodes)
    out["verified"] = weights.preflight(back, group)
    for layer in back.changed_layers:
        weights.migrate(back, group, layers=[layer], preflight=False)
    out["bad_verified"] = mismatches(weights, rank, maps[0])
    # Laid out ahead (MigratingSwitcher's path): prepare() lays out two calls, every group's
    # copies compiled (the first call's first group packed at once), the verdict is read,
    # then the calls run without any host layout. The second call runs first, so the first
    # call's pre-packed buffer is stale by then and must be packed again (else it would send
    # the second call's bytes).
    fwd = plan_transfers(maps[0], maps[-1], world, nodes)
    layers = list(fwd.changed_layers)
    calls = [layers[:1], layers[1:]]
    out["prepared"] = weights.prepare(fwd, group, calls=calls, group_bytes=1,
                                      ahead_groups=None).errors()
    laid: list[str] = []
    lay_out, run = weights._lay_out, weights._copier.run
    weights._lay_out = lambda *a: laid.append("lay_out") or lay_out(*a)  # type: ignore[method-assign]
    weights._copier.run = lambda *a: laid.append("run") or run(*a)  # type: ignore[method-assign]
    for call in reversed(calls):
        out["failed"].append(dict(weights.migrate(fwd, group, layers=call, preflight=False,
                                                  group_bytes=1).failed))
    weights._lay_out, weights._copier.run = lay_out, run  # type: ignore[method-assign]
    out["laid_out_on_the_fly"] = laid
    out["bad_prepared"] = mismatches(weights, rank, maps[-1])
    # The default: only each call's first group compiled ahead, later groups on the fly.
    back = plan_transfers(maps[-1], maps[0], world, nodes)
    layers = list(back.changed_layers)
    assert weights.prepare(back, group, calls=[layers], group_bytes=1).errors() == {}
    out["failed"].append(dict(weights.migrate(back, group, layers=layers, preflight=False,
                                              group_bytes=1).failed))
    out["bad_prepared_first"] = mismatches(weights, rank, maps[0])
    out["pointers_kept"] = pointers(weights) == before
    # An empty layer migrates as a no-op (every rank still makes the collectives).
    stats = weights.migrate_layer(0, plan_transfers(maps[-1], maps[-1], world, nodes)[0], group)
    out["noop"] = (stats.transfers_received, stats.slots_written)
    return out


def _failures(rank: int, world: int, seed: int, in_flight: int = 1) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    old, new, other = (random_placement(rng, L, E, world * S) for _ in range(3))
    plan = plan_transfers(old, new, world)
    weights = build(rank, old, in_flight)
    before = pointers(weights)
    out: dict[str, Any] = {}

    def fail_rank1_layer1(layer: int, phase: str) -> None:
        if rank == 1 and layer == 1 and phase == "received":
            raise RuntimeError("injected: checksum mismatch")

    # 1. Several layers, one fails (on rank 1 only): every rank agrees, the others apply.
    report = weights.migrate(plan, fault=fail_rank1_layer1)
    out["applied"] = list(report.applied_layers)
    out["failed"] = sorted(report.failed)
    out["failed_msg"] = report.failed.get(1, "")
    out["layer1_untouched"] = mismatches(weights, rank, old, [1]) == []
    out["others_moved"] = mismatches(weights, rank, new, [0, 2]) == []

    # 1b. The same with one layer per group (pipelined), and in stop mode: layer 0 applied,
    # layer 1 failed, layer 2 not attempted (posted, never written).
    fresh = build(rank, old, in_flight)
    report = fresh.migrate(plan, fault=fail_rank1_layer1, group_bytes=1)
    out["grouped"] = (list(report.applied_layers), sorted(report.failed),
                      mismatches(fresh, rank, old, [1]) == [],
                      mismatches(fresh, rank, new, [0, 2]) == [])
    fresh = build(rank, old, in_flight)
    report = fresh.migrate(plan, fault=fail_rank1_layer1, group_bytes=1, stop_on_error=True)
    out["stopped"] = (list(report.applied_layers), sorted(report.failed),
                      "not attempted" in report.failed.get(2, ""),
                      mismatches(fresh, rank, old, [1, 2]) == [],
                      mismatches(fresh, rank, new, [0]) == [])

    # 2. The same failure through migrate_layer: the error says where and why.
    try:
        weights.migrate_layer(1, plan[1], fault=lambda phase: fail_rank1_layer1(1, phase))
        out["error"] = None
    except MigrationError as exc:
        out["error"] = (exc.phase, exc.failed_rank, exc.reason)
    out["layer1_still_old"] = mismatches(weights, rank, old, [1]) == []

    # 3. Ranks disagree on the plan (rank 0 plans for another map): refused before any byte.
    current = new.copy()
    current[1] = old[1]
    wrong = plan_transfers(current, other if rank == 0 else new, world)
    try:
        weights.migrate_layer(1, wrong[1])
        out["mismatch"] = None
    except MigrationError as exc:
        out["mismatch"] = (exc.phase, exc.reason)

    # 3b. The same disagreement found by an explicit pre-flight: every rank learns it, and
    # nothing moves.
    out["preflight"] = {layer: (e.phase, e.reason)
                        for layer, e in weights.preflight(wrong, layers=[1]).items()}

    # 3c. The same found by prepare(): a call laid out for those layers reads its verdict,
    # even without a pre-flight of its own, and refuses on every rank.
    weights.prepare(wrong, layers=[1])
    report = weights.migrate(wrong, layers=[1], preflight=False)
    out["prepared_refused"] = (sorted(report.failed), report.errors[1].phase,
                               report.errors[1].reason)

    # 4. One rank cannot take part (the last passes another layer's list): refused by all.
    try:
        weights.migrate_layer(1, plan[2] if rank == world - 1 else plan[1])
        out["not_ready"] = None
    except MigrationError as exc:
        out["not_ready"] = (exc.phase, exc.failed_rank)
    out["still_old_after_refusals"] = mismatches(weights, rank, old, [1]) == []

    # 5. The group is healthy: the layer migrates now.
    weights.migrate_layer(1, plan[1])
    out["final_ok"] = mismatches(weights, rank, new) == []
    out["pointers_kept"] = pointers(weights) == before
    return out


def _timeout(rank: int, world: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    old, new = (random_placement(rng, L, E, world * S) for _ in range(2))
    plan = plan_transfers(old, new, world)
    layer = max(range(L), key=lambda lyr: len(plan[lyr].transfers))
    weights = build(rank, old)

    def late(phase: str) -> None:
        if rank == 1 and phase == "post":
            time.sleep(2.0)  # rank 1 posts long after the others gave up

    start = time.monotonic()
    try:
        weights.migrate_layer(layer, plan[layer], timeout_s=0.5, fault=late)
        error = None
    except MigrationError as exc:
        error = exc.phase
    return {
        "error": error,
        "seconds": time.monotonic() - start,
        "untouched": mismatches(weights, rank, old) == [],
        "transfers": len(plan[layer].transfers),
    }


# ---------------------------------------------------------------------------------------------
# tests


def _check_chain(results: list[dict[str, Any]]) -> None:
    for rank, out in enumerate(results):
        assert out["failed"] == [{}] * 7, rank  # 4 hops, then 3 prepared calls
        assert out["bad"] == [[]] * 4, rank
        assert out["pointers_kept"], rank
        assert 1 not in out["layers"][1]  # unchanged layer skipped
        assert out["noop"] == (0, 0)
        assert out["verified"] == {} and out["bad_verified"] == [], rank
        assert out["prepared"] == {} and out["bad_prepared"] == [], rank
        assert out["laid_out_on_the_fly"] == [], rank  # the prepared calls only launched
        assert out["bad_prepared_first"] == [], rank
    assert sum(out["bytes"] for out in results) > 0


def _check_failures(results: list[dict[str, Any]]) -> None:
    last = len(results) - 1  # the rank that passes another layer's list in case 4
    for rank, out in enumerate(results):
        assert out["applied"] == [0, 2] and out["failed"] == [1], rank
        assert "rank 1" in out["failed_msg"] and "not modified" in out["failed_msg"]
        assert out["layer1_untouched"] and out["others_moved"], rank
        assert out["grouped"] == ([0, 2], [1], True, True), rank
        assert out["stopped"] == ([0], [1, 2], True, True, True), rank
        phase, failed_rank, reason = out["error"]
        assert (phase, failed_rank) == ("transfer", 1), rank
        # Only the failing rank knows the local reason; everyone knows who failed.
        assert ("checksum mismatch" in (reason or "")) == (rank == 1)
        assert out["layer1_still_old"], rank
        assert out["mismatch"] == ("preflight", "ranks computed different plans"), rank
        assert out["not_ready"] == ("preflight", last), rank
        assert out["preflight"] == {1: ("preflight", "ranks computed different plans")}, rank
        assert out["prepared_refused"] == ([1], "preflight", "ranks computed different plans")
        assert out["still_old_after_refusals"], rank
        assert out["final_ok"] and out["pointers_kept"], rank


@pytest.mark.parametrize(("world", "nodes"), [(2, 1), (4, 2)])
def test_random_migrations_move_exactly_the_new_map(world: int, nodes: int) -> None:
    _check_chain(spawn_ranks(_chain, world, 11 + world, 3, nodes, timeout_s=90))


def _groups(rank: int, world: int) -> list[bool]:
    import torch.distributed as dist

    sub = dist.new_group(list(range(world)))
    out = [migration_group() is dist.group.WORLD, migration_group(sub) is sub]
    dist.barrier(group=sub)  # both ranks connected the subgroup before either tears down
    return out


def test_migration_group_is_the_group_itself_off_nccl() -> None:
    """Only NCCL gets a dedicated (high-priority) communicator; gloo migrates on the group."""
    assert spawn_ranks(_groups, 2, timeout_s=60) == [[True, True], [True, True]]


def test_failure_on_one_rank_leaves_the_layer_untouched_everywhere() -> None:
    _check_failures(spawn_ranks(_failures, 3, 5, timeout_s=90))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
@pytest.mark.parametrize(("in_flight", "copy_programs", "dedicated"), [
    (1, "auto", True), (2, "auto", False), (1, None, False), (1, 1, True), (2, 3, False),
])
def test_random_migrations_over_nccl(in_flight: int, copy_programs: int | str | None,
                                     dedicated: bool) -> None:
    """The same chain over NCCL on 2 GPUs: packed regions, device votes, copy-stream commits,
    one or two groups queued while the host commits the oldest; packs and commits beside a
    transfer capped to a share of the SMs (default), uncapped, or capped to 1 or 3 programs
    looping over every chunk; on the world group or on migration_group()'s own high-priority
    communicator."""
    _check_chain(spawn_ranks(_chain, 2, 13, 3, 1, in_flight, copy_programs, dedicated,
                             backend="nccl", start_method="spawn", timeout_s=180))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
@pytest.mark.parametrize("in_flight", [1, 2])
def test_failure_on_one_rank_over_nccl(in_flight: int) -> None:
    _check_failures(spawn_ranks(_failures, 2, 5, in_flight, backend="nccl",
                                start_method="spawn", timeout_s=180))


def test_groups_in_flight_must_be_positive() -> None:
    with pytest.raises(ValueError, match="groups_in_flight"):
        ExpertWeights(S, groups_in_flight=0)
    for bad in (0, -3, "fast", 2.5):
        with pytest.raises(ValueError, match="copy_programs"):
            ExpertWeights(S, copy_programs=bad)  # type: ignore[arg-type]
    for bad in (-1, 9, 1.5, "2"):
        with pytest.raises(ValueError, match="ramp_groups"):
            ExpertWeights(S, ramp_groups=bad)  # type: ignore[arg-type]


def test_timeout_fails_every_rank_without_writing() -> None:
    results = spawn_ranks(_timeout, 2, 3, timeout_s=60, pg_timeout_s=5)
    assert results[0]["transfers"] > 0
    for out in results:
        assert out["error"] in ("transfer", "status")
        assert out["untouched"]
        assert out["seconds"] < 10


def test_local_copies_in_one_process() -> None:
    """Without torch.distributed: a 1-rank group; swaps need staging, in place."""
    old = np.array([[0, 1, 2], [2, 1, 0], [0, 1, 2]])
    new = np.array([[1, 0, 2], [2, 2, 1], [0, 1, 2]])
    weights = build(0, old)  # torch.distributed is down: a 1-rank group, on the CPU
    ptrs = [t.data_ptr() for lyr in range(L) for t in weights.tensors(lyr).values()]
    plan = plan_transfers(old, new, 1)
    report = weights.migrate(plan)
    assert report.applied_layers == (0, 1) and not report.failed
    assert report.bytes_received == 0 and report.local_copies == 4
    eb = weights.expert_bytes(0)
    assert [s.bytes_staged for s in report.applied] == [2 * eb, eb]  # swap; slot 1 -> slot 2
    assert mismatches(weights, 0, new) == []
    assert ptrs == [t.data_ptr() for lyr in range(L) for t in weights.tensors(lyr).values()]


def test_registry_checks() -> None:
    weights = ExpertWeights(2)
    with pytest.raises(ValueError, match="expected shape"):
        weights.register(0, "w", torch.zeros(3, 4))
    with pytest.raises(ValueError, match="contiguous"):
        weights.register(0, "w", torch.zeros(4, 2).T)
    weights.register(0, "w", torch.zeros(2, 4))
    weights.register(0, "s", torch.zeros(2, dtype=torch.float16))
    assert weights.layers == (0,)
    assert weights.expert_bytes(0) == 4 * 4 + 2
    # Unknown layer: refused in pre-flight (a 1-rank group here).
    plan = plan_transfers([[0, 1]], [[1, 0]], 1)
    with pytest.raises(MigrationError, match="preflight"):
        weights.migrate_layer(1, plan[0])
    with pytest.raises(MigrationError, match="transfers are for layer 1, not 0"):
        weights.migrate_layer(0, plan_transfers([[0, 1], [0, 1]], [[0, 1], [1, 0]], 1)[1])


class _NeverDone:
    """A CUDA event stand-in whose work never completes (a peer that never sends)."""

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:  # pragma: no cover - would hang; the deadline path must win
        raise AssertionError("synchronize() called although a timeout was given")


class _Handle:
    def __init__(self) -> None:
        self.waits: list[Any] = []

    def wait(self, *args: Any) -> None:
        self.waits.append(args)


def test_status_read_is_bounded_by_the_timeout() -> None:
    """On NCCL the transfers' bound is the status read: a result that never lands raises
    TimeoutError after ``timeout_s`` instead of blocking."""
    status = _Status(tensor=torch.zeros(2, dtype=torch.int64), event=_NeverDone())
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"within 0\.2 s"):
        status.result(0.2)
    assert 0.2 <= time.perf_counter() - start < 2.0


def test_nccl_waits_do_not_block_the_host_gloo_waits_are_bounded() -> None:
    """NCCL's Work.wait(timeout) blocks the host until the transfer ends; the migration must
    only order the stream there (wait() without arguments) and pass the timeout on gloo."""
    comm = _Comm(None)
    handles = [_Handle(), _Handle()]
    comm.nccl = True
    comm.wait(handles, 5.0)
    assert [h.waits for h in handles] == [[()], [()]]
    comm.nccl = False
    comm.wait(handles, 5.0)
    assert all(len(h.waits[1]) == 1 and h.waits[1][0].total_seconds() == 5.0 for h in handles)


def test_groups_ramp_up_and_down_at_the_ends() -> None:
    """The first and last groups of a call are small (their pack / commit has nothing to hide
    behind); the middle ones hold the target; order and membership are kept."""
    mib = 1 << 20
    groups = _cut(list(range(58)), [64 * mib] * 58, 512 * mib, [64 * mib, 128 * mib, 256 * mib])
    assert [len(g) for g in groups] == [1, 2, 4, 8, 8, 8, 8, 8, 4, 4, 2, 1]
    assert [i for g in groups for i in g] == list(range(58))
    # No ramp: the plain cut; one item per group when the target is one byte.
    assert [len(g) for g in _cut(list(range(10)), [3] * 10, 9, [])] == [3, 3, 3, 1]
    assert _cut([4, 7, 9], [5, 5, 5], 1, [0, 0, 0]) == [[4], [7], [9]]
    # Too few items to ramp both ends: every item still in exactly one group, in order.
    for n in range(1, 9):
        cut = _cut(list(range(n)), [10] * n, 80, [10, 20, 40])
        assert [i for g in cut for i in g] == list(range(n)) and all(cut)


def _settings(rank: int, world: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    old, new = (random_placement(rng, L, E, world * S) for _ in range(2))
    weights = build(rank, old)
    weights.ramp_groups = 2 if rank == 0 else 0  # the ranks would cut different groups
    report = weights.migrate(plan_transfers(old, new, world))
    return {"failed": report.failed, "untouched": mismatches(weights, rank, old) == []}


def test_ranks_with_different_settings_are_refused_before_any_byte() -> None:
    for out in spawn_ranks(_settings, 2, 11, timeout_s=60):
        assert sorted(out["failed"]) == [0, 1, 2]
        assert all("different migration settings" in r for r in out["failed"].values())
        assert out["untouched"]


def test_migration_after_a_preflight_reuses_its_preparation(monkeypatch: Any) -> None:
    """The rollout path verifies a plan, then migrates it: the layers are not prepared twice
    (host time on the first step), unless the registry changed in between."""
    old = np.array([[0, 1, 2], [2, 1, 0], [0, 1, 2]])
    new = np.array([[1, 0, 2], [1, 2, 0], [0, 2, 1]])
    weights = build(0, old)  # torch.distributed is down: a 1-rank group, on the CPU
    calls: list[int] = []
    prepare = weights._prepare
    monkeypatch.setattr(weights, "_prepare", lambda layer, *a: calls.append(layer) or
                        prepare(layer, *a))
    plan = plan_transfers(old, new, 1)
    assert weights.preflight(plan) == {} and calls == [0, 1, 2]
    # layer 2 re-registered (same bytes): its verified preparation is stale
    weights.register(2, "meta", weights.tensors(2)["meta"])
    report = weights.migrate(plan, preflight=False)
    assert calls == [0, 1, 2, 2] and report.applied_layers == (0, 1, 2)
    assert mismatches(weights, 0, new) == []
    # a second migration without a pre-flight prepares again
    back = plan_transfers(new, old, 1)
    weights.migrate(back, preflight=False)
    assert calls == [0, 1, 2, 2, 0, 1, 2] and mismatches(weights, 0, old) == []


def test_prepare_checks_its_calls() -> None:
    old = np.array([[0, 1, 2], [2, 1, 0], [0, 1, 2]])
    new = np.array([[1, 0, 2], [1, 2, 0], [0, 2, 1]])
    weights = build(0, old)
    plan = plan_transfers(old, new, 1)
    for calls in ([[0], [0, 1]], [[0, 1], [5]]):
        with pytest.raises(ValueError, match="calls must be disjoint subsets of layers"):
            weights.prepare(plan, calls=calls)
    with pytest.raises(ValueError, match="ahead_groups"):
        weights.prepare(plan, ahead_groups=0)
    prep = weights.prepare(plan, calls=[])  # the pre-flight only
    assert prep.layers == (0, 1, 2) and prep.errors() == {}
    assert mismatches(weights, 0, old) == []  # nothing moved


def test_a_prepared_call_survives_another_call_in_between() -> None:
    """One rank, on the CPU: local copies that overwrite their own source are staged (packed)
    into the first call's buffer by prepare(). A migration of another layer in between
    reuses that buffer; the prepared call then packs again and still writes the right bytes,
    and a second migration of the same call (not prepared any more) lays out on the fly."""
    old = np.array([[0, 1, 2], [2, 1, 0], [0, 1, 2]])
    new = np.array([[1, 0, 2], [1, 2, 0], [0, 2, 1]])  # swaps: every layer stages
    weights = build(0, old)
    plan = plan_transfers(old, new, 1)
    assert weights.prepare(plan, calls=[[0, 1]]).errors() == {}
    other = weights.migrate(plan, layers=[2])  # not a prepared call: buffer 0 reused
    assert other.applied_layers == (2,)
    report = weights.migrate(plan, layers=[0, 1], preflight=False)
    assert report.applied_layers == (0, 1) and mismatches(weights, 0, new) == []
    back = plan_transfers(new, old, 1)
    assert weights.migrate(back).applied_layers == (0, 1, 2)
    assert mismatches(weights, 0, old) == []


def test_rollout_prepares_at_the_agreed_step_and_moves_at_the_next() -> None:
    """MigratingSwitcher: the agreed step only prepares (no map change), the next step
    moves and switches; ``prepare_ahead=False`` does both in the agreed step."""
    from worker_agent.migration import MigratingSwitcher
    from worker_agent.recording import ExpertLoadRecorder, PlacementView, Snapshotter

    old = np.array([[0, 1, 2], [2, 1, 0], [0, 1, 2]])
    new = np.array([[1, 0, 2], [1, 2, 0], [0, 1, 2]])

    class Plan:
        version = 1
        phy2log = new

    class Settings:
        layers_per_step = 0

    for ahead, steps in ((True, [False, True]), (False, [True])):
        weights = build(0, old)
        view = PlacementView(old.copy(), 3)
        switcher = MigratingSwitcher(weights, Snapshotter(ExpertLoadRecorder(view)),
                                     num_ranks=1, prepare_ahead=ahead)
        switcher.begin(0, Plan(), Settings())
        done = [switcher.advance(step) for step in range(len(steps))]
        assert done == steps and view.version == 1
        assert np.array_equal(view.host_phy2log(), new) and mismatches(weights, 0, new) == []
        stats = switcher.last_stats
        assert stats is not None and stats.steps == len(steps) and stats.prepare_ms > 0
        assert stats.total_pause_ms >= stats.max_step_pause_ms >= stats.prepare_ms
