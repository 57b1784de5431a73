"""Weight migration benchmark: throughput against plain send/recv, and the pause per rebalance.

    # CPU, gloo, small experts (2 ranks spawned here):
    .venv/bin/python benchmarks/migration.py --quick
    # 2 GPUs, NCCL, DeepSeek-V3 FP8 experts (3 x 7168 x 2048 bytes = 44 MB):
    torchrun --standalone --nproc-per-node 2 benchmarks/migration.py --backend nccl
    # (or without torchrun: .venv/bin/python benchmarks/migration.py --backend nccl)

**Throughput.** Every rank holds ``--slots`` expert slots of ``--tp-layers`` layers, each expert
three ``[hidden, ffn]`` byte matrices (w1, w2, w3: FP8). The new map rotates ``--moves`` experts
per layer around the ring: rank ``r`` sends ``M`` experts to ``r+1`` and receives ``M`` from
``r-1`` (for 2 ranks: a bidirectional swap), no local copies. Timed (max over ranks, median of
``--iters`` after ``--warmup``):

- ``plain``: one ``batch_isend_irecv`` of one contiguous buffer of the same bytes each way, into
  a separate buffer (the best case the transport offers);
- ``migrate_layer``: :meth:`ExpertWeights.migrate_layer` of one layer (pre-flight all-reduce,
  P2P into staging, status all-reduce, in-place commit, synchronized);
- ``migrate``: :meth:`ExpertWeights.migrate` of all ``--tp-layers`` layers (one pre-flight, layers
  grouped by bytes, a group's commit overlapping the next group's transfers), against ``plain``
  of the same total bytes;
- ``prepared``: the same calls after :meth:`ExpertWeights.prepare` laid them out (untimed, as
  :class:`MigratingSwitcher` does a step ahead): the call itself only launches copies and posts
  transfers.

Ratio = plain time / migration time for the same bytes (1.0 = as fast as the raw transport).

**Pause per rebalance.** ``--layers`` layers of ``--slots`` slots per rank, ``E = P - R``
experts; the new map swaps a ``--churn`` fraction of slots between random ranks (contents keep
every expert). With ``--layers-per-step N`` (several values allowed; 0 = all layers at once) the
rebalance moves N layers per forward step, as :class:`MigratingSwitcher` does: a first step
prepares every call (:meth:`ExpertWeights.prepare`, its copies' GPU work and pre-flight included
in the step's time), the next steps migrate (``--same-step``: the pre-flight and the first
migration in one step, each group laid out while the previous one moves: ``prepare_ahead=False``,
the path before ``prepare``). Reported are the steps, the longest pause of
one step (max over ranks), the preparation step, the migration steps' sum (``move``) and the
total, each against plain send/recv of the bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eplb_engine.launch import spawn_ranks
from worker_agent.migration import ExpertWeights, migration_group
from worker_agent.transfers import plan_transfers

MiB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    p.add_argument("--quick", action="store_true", help="small experts, few layers (CPU smoke)")
    p.add_argument("--world-size", type=int, default=2, help="ranks to spawn (no torchrun)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--moves", type=int, nargs="+", default=[1, 4, 8],
                   help="experts each rank receives per layer (throughput)")
    p.add_argument("--tp-layers", type=int, default=4, help="layers in the multi-layer run")
    p.add_argument("--slots", type=int, default=9, help="slots per rank")
    p.add_argument("--layers", type=int, default=58, help="layers of the rebalance")
    p.add_argument("--churn", type=float, default=0.25, help="fraction of slots rewritten")
    p.add_argument("--layers-per-step", type=int, nargs="+", default=[0, 1, 4],
                   help="layers moved per forward step (0 = all at once)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--caller-stream-packing", action="store_true",
                   help="pack on the caller's stream (ExpertWeights(side_stream_packing=False))")
    p.add_argument("--unbatched-copies", action="store_true",
                   help="one copy_ per byte range (ExpertWeights(batched_copies=False))")
    p.add_argument("--in-flight", type=int, default=1,
                   help="groups queued on the GPU (ExpertWeights(groups_in_flight=N))")
    p.add_argument("--copy-programs", type=int, default=None,
                   help="programs of a copy beside a transfer (ExpertWeights(copy_programs=N)); "
                        "default: 'auto'; 0: uncapped")
    p.add_argument("--ramp", type=int, default=None,
                   help="smaller groups at each end of a call (ExpertWeights(ramp_groups=N); "
                        "0: equal groups; default: the library's)")
    p.add_argument("--migration-group", choices=("dedicated", "engine"), default="dedicated",
                   help="migrate on worker_agent.migration.migration_group() (NCCL: its own "
                        "high-priority communicator; default) or on the engine's group")
    p.add_argument("--group-mib", type=int, default=None,
                   help="bytes received per group of layers (migrate(group_bytes=N MiB))")
    p.add_argument("--phases", action="store_true",
                   help="also time the host phases of three migrations (ExpertWeights tracer)")
    p.add_argument("--timeout-s", type=float, default=30.0,
                   help="timeout_s of every migration call, as engines pass one (0: none)")
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput rows")
    p.add_argument("--ahead-groups", type=int, default=1,
                   help="groups whose copies prepare() builds ahead "
                        "(ExpertWeights.prepare(ahead_groups=N)); 0: all")
    p.add_argument("--same-step", action="store_true",
                   help="rebalance: pre-flight and first migration in one step, laid out on "
                        "the fly (MigratingSwitcher(prepare_ahead=False))")
    p.add_argument("--trace", type=Path,
                   help="NCCL: profile one all-at-once rebalance (torch.profiler) and write "
                        "rank 0's GPU timeline summary here")
    p.add_argument("--host-profile", type=Path,
                   help="cProfile one all-at-once rebalance on rank 0; write the top functions "
                        "by own time here")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--markdown", type=Path, help="also write the tables here")
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; flags given explicitly still win
        quick = {"hidden": 1024, "ffn": 512, "moves": [1, 4], "tp_layers": 2, "slots": 4,
                 "layers": 4, "layers_per_step": [0, 1], "iters": 15, "warmup": 3}
        for key, value in quick.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    if max(args.moves) > args.slots:
        args.slots = max(args.moves)
    return args


# ---------------------------------------------------------------------------------------------
# timing helpers (every rank calls them alike)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, device: torch.device, setup: Any = None) -> float:
    """Max over ranks of ``fn()``'s wall time, started together after a barrier (after
    ``setup()``, untimed, and its device work)."""
    if setup is not None:
        setup()
    _sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    _sync(device)
    took = torch.tensor([time.perf_counter() - t0], dtype=torch.float64,
                        device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took.item())


def _median(fn: Any, device: torch.device, iters: int, warmup: int, setup: Any = None) -> float:
    for _ in range(warmup):
        _timed(fn, device, setup)
    return statistics.median(_timed(fn, device, setup) for _ in range(iters))


def _build(layers: int, slots: int, hidden: int, ffn: int, device: torch.device,
           rank: int, args: argparse.Namespace, tracer: Any = None) -> ExpertWeights:
    weights = ExpertWeights(slots, tracer=tracer,
                            side_stream_packing=not args.caller_stream_packing,
                            batched_copies=not args.unbatched_copies,
                            groups_in_flight=args.in_flight,
                            copy_programs=_copy_programs(args),
                            **({} if args.ramp is None else {"ramp_groups": args.ramp}))
    for layer in range(layers):
        weights.register_layer(layer, {
            name: torch.full((slots, hidden, ffn), (rank * 7 + layer) % 251, dtype=torch.uint8,
                             device=device)
            for name in ("w1", "w2", "w3")
        })
    return weights


def _copy_programs(args: argparse.Namespace) -> int | str | None:
    if args.copy_programs is None:
        return "auto"
    return args.copy_programs or None


# ---------------------------------------------------------------------------------------------
# the two measurements


def _ring_maps(layers: int, world: int, slots: int, moves: int) -> tuple[np.ndarray, np.ndarray]:
    """Old map: rank r holds experts [r*S, (r+1)*S). New: each rank's first ``moves`` experts
    move to the next rank's first ``moves`` slots."""
    old = np.arange(world * slots, dtype=np.int64)
    new = old.copy()
    for r in range(world):
        prev = (r - 1) % world
        new[r * slots:r * slots + moves] = old[prev * slots:prev * slots + moves]
    return np.tile(old, (layers, 1)), np.tile(new, (layers, 1))


class _Flip:
    """Migrates back and forth between two maps (so every call moves the same bytes)."""

    def __init__(self, weights: ExpertWeights, old: np.ndarray, new: np.ndarray,
                 world: int, group_bytes: int | None = None,
                 timeout_s: float | None = None, group: Any = None,
                 ahead_groups: int | None = 1) -> None:
        self.weights = weights
        self.ahead_groups = ahead_groups
        self.group = group
        self.group_bytes = group_bytes
        self.timeout_s = timeout_s
        self.plans = (plan_transfers(old, new, world), plan_transfers(new, old, world))
        self.layer0 = 0  # plans[layer0] applies to layer 0 next
        self.rest = 0  # plans[rest] applies to the other layers next

    def one_layer(self, preflight: bool = True) -> None:
        self.weights.migrate_layer(0, self.plans[self.layer0][0], self.group,
                                   preflight=preflight, timeout_s=self.timeout_s)
        self.layer0 ^= 1

    def prepare_one_layer(self) -> None:
        """Lay out the next :meth:`one_layer` ahead (the rollout path's preparation step)."""
        assert not self.weights.prepare(self.plans[self.layer0], self.group, layers=[0],
                                        ahead_groups=self.ahead_groups).errors()

    def one_layer_prepared(self) -> None:
        self.one_layer(preflight=False)

    def _align(self) -> None:
        """Layer 0 onto the other layers' map (untimed: only between measurements)."""
        if self.layer0 != self.rest:
            self.one_layer()

    def all_layers(self, preflight: bool = True) -> None:
        self._align()
        report = self.weights.migrate(self.plans[self.rest], self.group, preflight=preflight,
                                      group_bytes=self.group_bytes, timeout_s=self.timeout_s)
        assert not report.failed, report.failed
        self.layer0 ^= 1
        self.rest ^= 1

    def prepare_all_layers(self) -> None:
        self._align()
        assert not self.weights.prepare(self.plans[self.rest], self.group,
                                        group_bytes=self.group_bytes,
                                        ahead_groups=self.ahead_groups).errors()

    def all_layers_prepared(self) -> None:
        self.all_layers(preflight=False)


def _throughput(rank: int, world: int, args: argparse.Namespace,
                device: torch.device) -> list[dict[str, Any]]:
    rows = []
    expert = 3 * args.hidden * args.ffn
    for moves in args.moves:
        weights = _build(args.tp_layers, args.slots, args.hidden, args.ffn, device, rank, args)
        flip = _Flip(weights, *_ring_maps(args.tp_layers, world, args.slots, moves), world,
                     _group_bytes(args), _timeout(args), args.migration_pg, _ahead_groups(args))
        t_layer = _median(flip.one_layer, device, args.iters, args.warmup)
        t_layer_p = _median(flip.one_layer_prepared, device, args.iters, args.warmup,
                            flip.prepare_one_layer)
        flip._align()  # layer 0 with the others before timing all layers
        t_all = _median(flip.all_layers, device, max(2, args.iters // 2), 1)
        t_all_p = _median(flip.all_layers_prepared, device, max(2, args.iters // 2), 1,
                          flip.prepare_all_layers)
        del weights, flip
        t_plain1 = _median(_plain(rank, world, moves * expert, device), device, args.iters,
                           args.warmup)
        t_plain_all = _median(_plain(rank, world, args.tp_layers * moves * expert, device),
                              device, max(2, args.iters // 2), 1)
        one = moves * expert
        rows.append({
            "moves": moves,
            "expert_mib": expert / MiB,
            "mib_each_way": one / MiB,
            "plain_ms": t_plain1 * 1e3,
            "plain_gbps": one / t_plain1 / 1e9,
            "layer_ms": t_layer * 1e3,
            "layer_gbps": one / t_layer / 1e9,
            "layer_ratio": t_plain1 / t_layer,
            "layer_prepared_ms": t_layer_p * 1e3,
            "layer_prepared_ratio": t_plain1 / t_layer_p,
            "layers": args.tp_layers,
            "plain_all_ms": t_plain_all * 1e3,
            "migrate_all_ms": t_all * 1e3,
            "migrate_all_gbps": args.tp_layers * one / t_all / 1e9,
            "all_ratio": t_plain_all / t_all,
            "migrate_all_prepared_ms": t_all_p * 1e3,
            "all_prepared_ratio": t_plain_all / t_all_p,
        })
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _plain(rank: int, world: int, nbytes: int, device: torch.device) -> Any:
    """Plain send/recv of ``nbytes`` around the ring: to the next rank, from the previous."""
    sends, recvs = [0] * world, [0] * world
    sends[(rank + 1) % world] = recvs[(rank - 1) % world] = nbytes
    return _exchange(sends, recvs, device)


def _exchange(sends: list[int], recvs: list[int], device: torch.device) -> Any:
    """One ``batch_isend_irecv`` of one buffer per peer and direction (bytes per peer)."""
    bufs = [(peer, torch.zeros(n, dtype=torch.uint8, device=device), kind)
            for kind, sizes in ((dist.isend, sends), (dist.irecv, recvs))
            for peer, n in enumerate(sizes) if n]

    def run() -> None:
        ops = [dist.P2POp(kind, buf, group_peer=peer) for peer, buf, kind in bufs]
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()

    return run


def _swap_map(rng: np.random.Generator, layers: int, world: int, slots: int,
              churn: float) -> tuple[np.ndarray, np.ndarray]:
    """Old map: E = P - R experts, every expert once plus R replicas; new: ``churn * P / 2``
    random cross-rank slot swaps per layer."""
    num_slots = world * slots
    experts = num_slots - world
    old = np.empty((layers, num_slots), dtype=np.int64)
    for layer in range(layers):
        old[layer] = rng.permutation(np.concatenate([np.arange(experts),
                                                     rng.integers(0, experts, world)]))
    new = old.copy()
    swaps = max(1, round(churn * num_slots / 2))
    for layer in range(layers):
        done = 0
        while done < swaps:
            a, b = rng.integers(0, num_slots, 2)
            if a // slots != b // slots and new[layer, a] != new[layer, b]:
                new[layer, [a, b]] = new[layer, [b, a]]
                done += 1
    return old, new


def _rebalance(rank: int, world: int, args: argparse.Namespace, device: torch.device,
               tracer: Any = None) -> tuple[ExpertWeights, tuple[Any, Any]]:
    """The rebalance workload: ``--layers`` layers of weights and the two plans between the
    ``_swap_map`` maps (forward, backward; the same on every rank)."""
    rng = np.random.default_rng(args.seed)
    old, new = _swap_map(rng, args.layers, world, args.slots, args.churn)
    weights = _build(args.layers, args.slots, args.hidden, args.ffn, device, rank, args, tracer)
    return weights, (plan_transfers(old, new, world), plan_transfers(new, old, world))


def _all_at_once(weights: ExpertWeights, plan: Any, args: argparse.Namespace) -> Any:
    """Prepare every changed layer of ``plan`` as one call now; return the call (the rollout
    path's migration step, after its preparation step)."""
    layers = list(plan.changed_layers)
    assert not weights.prepare(plan, args.migration_pg, layers=layers,
                               group_bytes=_group_bytes(args),
                               ahead_groups=_ahead_groups(args)).errors()
    return lambda: _checked(weights, plan, layers, _group_bytes(args), _timeout(args),
                            args.migration_pg)


class _Rollout:
    """One rebalance the way :class:`MigratingSwitcher` runs it: one preparation of every call
    (``layers_per_step`` changed layers each), then one migration call per step."""

    def __init__(self, weights: ExpertWeights, plan: Any, per_step: int,
                 args: argparse.Namespace) -> None:
        self.weights, self.plan, self.args = weights, plan, args
        self.todo = list(plan.changed_layers)
        chunk = per_step or len(self.todo)
        self.calls = [self.todo[i:i + chunk] for i in range(0, len(self.todo), chunk)]
        self.preparation: Any = None

    def prepare(self, ahead: bool = True) -> None:
        """The pre-flight and (``ahead``) the first call laid out, as ``MigratingSwitcher``."""
        self.preparation = self.weights.prepare(
            self.plan, self.args.migration_pg, layers=self.todo,
            calls=self.calls[:1] if ahead else [], group_bytes=_group_bytes(self.args),
            ahead_groups=_ahead_groups(self.args))

    def move(self, n: int = 0) -> None:
        if n == 0:  # the first migration reads the pre-flight's verdict
            assert not self.preparation.errors()
        _checked(self.weights, self.plan, self.calls[n], _group_bytes(self.args),
                 _timeout(self.args), self.args.migration_pg)


def _pause(rank: int, world: int, args: argparse.Namespace,
           device: torch.device) -> list[dict[str, Any]]:
    weights, (forward, backward) = _rebalance(rank, world, args, device)
    rows = []
    fwd = True
    for per_step in args.layers_per_step:
        pauses, totals, prepares = [], [], []
        for rep in range(max(2, args.iters // 2) + 1):
            plan = forward if fwd else backward
            fwd = not fwd
            rollout = _Rollout(weights, plan, per_step, args)
            if args.same_step:  # MigratingSwitcher(prepare_ahead=False)
                step_pauses = [_timed(lambda r=rollout: (r.prepare(False), r.move(0)), device)]
            else:  # the preparation step, then the first migration step
                step_pauses = [_timed(rollout.prepare, device), _timed(rollout.move, device)]
            for n in range(1, len(rollout.calls)):
                step_pauses.append(_timed(lambda r=rollout, n=n: r.move(n), device))
            if rep:  # the first is warm-up
                pauses.append(max(step_pauses))
                totals.append(sum(step_pauses))
                prepares.append(0.0 if args.same_step else step_pauses[0])
        mine = sum(len(lt.receives(rank)) for lt in forward)
        plain = _median(_plain_plan(rank, world, forward, 3 * args.hidden * args.ffn, device),
                        device, max(2, args.iters // 2), 1)
        moves = [t - p for t, p in zip(totals, prepares, strict=True)]
        rows.append({
            "layers_per_step": per_step,
            "steps": len(step_pauses),
            "same_step": args.same_step,
            "max_pause_ms": statistics.median(pauses) * 1e3,
            "prepare_ms": statistics.median(prepares) * 1e3,
            "move_ms": statistics.median(moves) * 1e3,
            "move_ms_runs": [round(t * 1e3, 3) for t in moves],
            "total_ms": statistics.median(totals) * 1e3,
            "total_ms_runs": [round(t * 1e3, 3) for t in totals],
            "transfers": forward.num_transfers,
            "local_copies": forward.num_local_copies,
            "mib_received_rank": mine * 3 * args.hidden * args.ffn / MiB,
            "plain_ms": plain * 1e3,
            "move_ratio": plain / statistics.median(moves),
            "ratio": plain / statistics.median(totals),
        })
    return rows


def _group_bytes(args: argparse.Namespace) -> int | None:
    return None if args.group_mib is None else args.group_mib * MiB


def _ahead_groups(args: argparse.Namespace) -> int | None:
    return args.ahead_groups or None


def _timeout(args: argparse.Namespace) -> float | None:
    return args.timeout_s or None


def _checked(weights: ExpertWeights, plan: Any, layers: list[int], group_bytes: int | None,
             timeout_s: float | None, group: Any = None) -> None:
    """One migration call of verified (prepared) layers; every layer must apply."""
    report = weights.migrate(plan, group, layers=layers, preflight=False, group_bytes=group_bytes,
                             timeout_s=timeout_s)
    assert not report.failed, report.failed


def _plain_plan(rank: int, world: int, plan: Any, expert: int, device: torch.device) -> Any:
    """Plain send/recv of the bytes ``plan`` moves for this rank: one message per peer and
    direction, each as large as all the experts of all layers exchanged with that peer."""
    sends = [0] * world
    recvs = [0] * world
    for lt in plan:
        for t in lt.transfers:
            if t.src_rank == rank:
                sends[t.dst_rank] += expert
            if t.dst_rank == rank:
                recvs[t.src_rank] += expert
    return _exchange(sends, recvs, device)


# ---------------------------------------------------------------------------------------------
# entry points


class _PhaseLog:
    """An ``ExpertWeights`` tracer: host time at each phase boundary, per call."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, float]]] = []
        self.on = False

    def __call__(self, phase: str) -> None:
        if not self.on:
            return
        if phase == "start" or not self.calls:
            self.calls.append([])
        self.calls[-1].append((phase, time.perf_counter()))

    def medians(self) -> list[tuple[str, float]]:
        """(phase, median ms since the previous boundary) over the calls whose phase sequence
        is the most common one."""
        seqs = [tuple(p for p, _ in c) for c in self.calls]
        common = max(set(seqs), key=seqs.count)
        deltas = [[(c[i][1] - c[i - 1][1]) * 1e3 for i in range(1, len(c))]
                  for c, seq in zip(self.calls, seqs, strict=True) if seq == common]
        return [(common[i + 1], statistics.median(d[i] for d in deltas))
                for i in range(len(common) - 1)]


def _phases(rank: int, world: int, args: argparse.Namespace,
            device: torch.device) -> list[dict[str, Any]]:
    """Host phase times of three migrations (rank 0's view)."""
    out = []
    for name, moves, layers in (("1 layer x 1 expert, prepared", 1, 1),
                                ("4 layers x 8 experts, prepared", 8, args.tp_layers)):
        log = _PhaseLog()
        weights = _build(layers, max(args.slots, moves), args.hidden, args.ffn, device, rank,
                         args, tracer=log)
        flip = _Flip(weights, *_ring_maps(layers, world, max(args.slots, moves), moves), world,
                     _group_bytes(args), _timeout(args), args.migration_pg, _ahead_groups(args))
        for i in range(args.warmup + args.iters):
            log.on = i >= args.warmup
            _timed(flip.all_layers_prepared, device, flip.prepare_all_layers)
        out.append({"case": name, "phases": log.medians()})
        del weights, flip
    log = _PhaseLog()
    weights, plans = _rebalance(rank, world, args, device, log)
    for i in range(args.warmup + args.iters // 2 * 2):
        log.on = i >= args.warmup
        log.on = False  # the preparation (untimed) runs no migration phase anyway
        move = _all_at_once(weights, plans[i % 2], args)
        log.on = i >= args.warmup
        _timed(move, device)
    out.append({"case": f"rebalance, {args.layers} layers at once, prepared",
                "phases": log.medians()})
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _trace(rank: int, world: int, args: argparse.Namespace, device: torch.device) -> str:
    """GPU timeline of one all-at-once rebalance's migration step (prepared before, outside
    the profile; after two untimed rebalances), summarised: busy
    time of the NCCL kernels and of the copies, their overlap, the transport's idle gaps."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    weights, plans = _rebalance(rank, world, args, device)
    for p in plans:
        _timed(_all_at_once(weights, p, args), device)
    move = _all_at_once(weights, plans[0], args)
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        took = _timed(move, device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
           and "dur" in e]
    return _summarise(gpu, took)


def _host_profile(rank: int, world: int, args: argparse.Namespace, device: torch.device) -> str:
    """cProfile of one all-at-once rebalance (after two untimed ones), its preparation step
    and its migration step apart: where the host goes."""
    import cProfile
    import io
    import pstats

    weights, plans = _rebalance(rank, world, args, device)
    for p in plans:
        _timed(_all_at_once(weights, p, args), device)
    out = io.StringIO()
    for name in ("preparation step", "migration step"):
        profiler = cProfile.Profile()
        _sync(device)
        dist.barrier()
        profiler.enable()
        if name == "preparation step":
            move = _all_at_once(weights, plans[0], args)
        else:
            move()
        profiler.disable()
        _sync(device)
        out.write(f"==== {name}\n")
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(30)
    return out.getvalue()


def _summarise(gpu: list[dict[str, Any]], took: float) -> str:
    def kind(e: dict[str, Any]) -> str:
        name = e["name"].lower()
        if "nccl" in name:
            return "nccl"
        if "copy" in name or e["cat"] == "gpu_memcpy":
            return "copy"
        return "other"

    if not gpu:
        return "no GPU events recorded\n"
    t0 = min(e["ts"] for e in gpu)
    spans: dict[str, list[tuple[float, float]]] = {"nccl": [], "copy": [], "other": []}
    for e in gpu:
        spans[kind(e)].append((e["ts"] - t0, e["ts"] - t0 + e["dur"]))

    def union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        for lo, hi in sorted(iv):
            if out and lo <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], hi))
            else:
                out.append((lo, hi))
        return out

    def length(iv: list[tuple[float, float]]) -> float:
        return sum(hi - lo for lo, hi in iv)

    def intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
        total, j = 0.0, 0
        for lo, hi in a:
            while j < len(b) and b[j][1] <= lo:
                j += 1
            k = j
            while k < len(b) and b[k][0] < hi:
                total += max(0.0, min(hi, b[k][1]) - max(lo, b[k][0]))
                k += 1
        return total

    u = {k: union(v) for k, v in spans.items()}
    end = max(hi for v in spans.values() for _, hi in v)
    nccl = u["nccl"]
    gaps = [(nccl[i][1], nccl[i + 1][0]) for i in range(len(nccl) - 1)]
    lines = [
        f"call {took * 1e3:.2f} ms (host, max over ranks); GPU span {end / 1e3:.2f} ms",
        f"nccl busy {length(nccl) / 1e3:.2f} ms in {len(nccl)} spans; copy busy "
        f"{length(u['copy']) / 1e3:.2f} ms; other {length(u['other']) / 1e3:.2f} ms",
        f"copy while nccl runs {intersect(u['copy'], nccl) / 1e3:.2f} ms; nccl idle gaps "
        f"{sum(b - a for a, b in gaps) / 1e3:.2f} ms (largest "
        f"{max((b - a for a, b in gaps), default=0.0):.0f} us)",
        "",
        "start_us dur_us stream kind name",
    ]
    for e in sorted(gpu, key=lambda e: e["ts"]):
        stream = e.get("args", {}).get("stream", e.get("tid"))
        lines.append(f"{e['ts'] - t0:9.1f} {e['dur']:8.1f} {stream!s:>6} {kind(e):5} "
                     f"{e['name'][:60]}")
    return "\n".join(lines) + "\n"


def bench(rank: int, world: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """Both measurements on this rank (torch.distributed is up); rank 0 returns the results."""
    device = (torch.device("cuda", torch.cuda.current_device()) if args.backend == "nccl"
              else torch.device("cpu"))
    # Migrations run on this group; the `plain` baselines on the engine's (the world).
    args.migration_pg = migration_group() if args.migration_group == "dedicated" else None
    throughput = [] if args.no_throughput else _throughput(rank, world, args, device)
    pause = _pause(rank, world, args, device)
    phases = _phases(rank, world, args, device) if args.phases else []
    if args.host_profile is not None:
        text = _host_profile(rank, world, args, device)
        if rank == 0:
            args.host_profile.write_text(text)
    if args.trace is not None and device.type == "cuda":
        timeline = _trace(rank, world, args, device)
        if rank == 0:
            args.trace.write_text(timeline)
    if rank:
        return None
    return {
        "phases": phases,
        "command": " ".join(["benchmarks/migration.py", *sys.argv[1:]]),
        "backend": args.backend,
        "world_size": world,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "expert_bytes": 3 * args.hidden * args.ffn,
        "throughput": throughput,
        "pause": pause,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k != "migration_pg"},
    }


def _ramp_text(cfg: dict[str, Any]) -> str:
    ramp = cfg.get("ramp")
    if ramp is None:
        ramp = ExpertWeights(1).ramp_groups
    return "equal" if ramp == 0 else f"{ramp} smaller at each end"


def _copy_programs_text(cfg: dict[str, Any]) -> str:
    value = cfg.get("copy_programs")
    return "auto" if value is None else ("uncapped" if value == 0 else str(value))


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"Command: `{res['command']}`  ",
        f"Backend {res['backend']}, {res['world_size']} ranks, {res['device']}, torch "
        f"{res['torch']}, expert {res['expert_bytes'] / MiB:.1f} MiB (3 byte matrices). "
        f"Migration group: {res['config']['migration_group']}; copy programs beside a "
        f"transfer: {_copy_programs_text(res['config'])}; groups: "
        f"{_ramp_text(res['config'])}.",
        "",
        "One layer per call, then `layers` layers per call; `ratio` = plain / migration for "
        "the same bytes. `prepared`: the call after `ExpertWeights.prepare` laid it out and "
        "ran its pre-flight (untimed), as `MigratingSwitcher` does a step ahead.",
        "",
        "| moves/rank | MiB each way | plain ms | plain GB/s | migrate_layer ms | ratio "
        "| prepared ms | ratio | layers | plain ms | migrate ms | ratio | prepared ms | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["throughput"]:
        lines.append(
            f"| {r['moves']} | {r['mib_each_way']:.1f} | {r['plain_ms']:.3f} | "
            f"{r['plain_gbps']:.2f} | {r['layer_ms']:.3f} | {r['layer_ratio']:.2f} | "
            f"{r['layer_prepared_ms']:.3f} | {r['layer_prepared_ratio']:.2f} | "
            f"{r['layers']} | {r['plain_all_ms']:.3f} | {r['migrate_all_ms']:.3f} | "
            f"{r['all_ratio']:.2f} | {r['migrate_all_prepared_ms']:.3f} | "
            f"{r['all_prepared_ratio']:.2f} |"
        )
    cfg = res["config"]
    lines += [
        "",
        f"Pause per rebalance: {cfg['layers']} layers x {cfg['slots']} slots/rank, churn "
        f"{cfg['churn']}; the rollout path: "
        + ("pre-flight and first migration in one step, laid out on the fly"
           if cfg.get("same_step") else
           "a preparation step (its device work included), then the migration steps")
        + ". `plain`: one send/recv per peer of the same bytes; `move` = the migration steps; "
        "ratios = plain / move and plain / total.",
        "",
        "| layers/step | steps | longest pause ms | prepare ms | move ms | total ms | plain ms "
        "| move ratio | total ratio | transfers | local copies | MiB received (rank 0) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["pause"]:
        lines.append(
            f"| {r['layers_per_step'] or 'all'} | {r['steps']} | {r['max_pause_ms']:.2f} | "
            f"{r['prepare_ms']:.2f} | {r['move_ms']:.2f} | {r['total_ms']:.2f} | "
            f"{r['plain_ms']:.2f} | {r['move_ratio']:.2f} | {r['ratio']:.2f} | "
            f"{r['transfers']} | {r['local_copies']} | {r['mib_received_rank']:.1f} |"
        )
    for case in res.get("phases", []):
        lines += ["", f"Host phases (rank 0, median ms since the previous boundary): "
                      f"{case['case']}", "", "| phase | ms |", "|---|---|"]
        lines += [f"| {phase} | {ms:.3f} |" for phase, ms in case["phases"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        kwargs: dict[str, Any] = {}
        if args.backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", rank))
            torch.cuda.set_device(local)
            kwargs["device_id"] = torch.device("cuda", local)
        dist.init_process_group(args.backend, **kwargs)
        try:
            res = bench(rank, world, args)
        finally:
            dist.destroy_process_group()
    else:
        res = spawn_ranks(bench, args.world_size, args, backend=args.backend, timeout_s=1800,
                          threads_per_rank=1,
                          start_method="spawn" if args.backend == "nccl" else "forkserver")[0]
    if res is None:
        return 0
    text = markdown(res)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
