"""Run a function on R ranks, each its own process with ``torch.distributed`` initialized.

:func:`spawn_ranks` is what :func:`eplb_engine.ep.run_engine`, the multi-process tests and the
migration benchmark use: ``fn(rank, world_size, *args)`` runs in every rank process after
``init_process_group`` (gloo on CPU; NCCL with rank ``r`` on ``cuda:r``), and its return values
come back in rank order. The rendezvous is a file store in a private temporary directory (no port
to race for); gloo itself connects over loopback.
"""

from __future__ import annotations

import datetime
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["spawn_ranks"]

_PRELOAD = ["torch", "torch.distributed", "eplb_engine.ep"]


def spawn_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    threads_per_rank: int = 1,
    start_method: str = "forkserver",
    pg_timeout_s: float = 60.0,
) -> list[Any]:
    """``[fn(0, R, *args), ..., fn(R-1, R, *args)]``, each run in its own rank process.

    Args:
        fn: a module-level (picklable) function; returns something picklable.
        world_size: R.
        backend: ``"gloo"`` or ``"nccl"``.
        timeout_s: bound on the whole run; on expiry every rank is killed and ``TimeoutError``
            raised.
        threads_per_rank: ``torch.set_num_threads`` in each rank.
        start_method: ``"forkserver"`` (default: one fresh interpreter imports torch once and
            forks the ranks, so later runs start in a fraction of a second) or ``"spawn"``.
            Never ``"fork"``: the caller may have started OpenMP or CUDA.
        pg_timeout_s: the process group's timeout (a stuck collective fails after it).

    Raises the first failing rank's error (``torch.multiprocessing.ProcessRaisedException``,
    with its traceback), or ``TimeoutError``.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if start_method not in ("forkserver", "spawn"):
        raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        # Takes effect when this process's fork server starts (its first use); later calls
        # reuse the server.
        ctx.set_forkserver_preload(_PRELOAD)
    results: Any = ctx.Queue()
    collected: dict[int, Any] = {}
    with tempfile.TemporaryDirectory(prefix="eplb-ranks-") as tmp:
        store = os.path.join(tmp, "store")
        procs = mp.start_processes(
            _main,
            args=(world_size, backend, store, threads_per_rank, pg_timeout_s, fn, args, results),
            nprocs=world_size,
            join=False,
            start_method=start_method,
        )
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                _drain(results, collected)
                if procs.join(timeout=0.1):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} ranks ran longer than {timeout_s} s")
            _drain(results, collected, wait_s=10.0, want=world_size)
        finally:
            for p in procs.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
    if len(collected) != world_size:
        raise RuntimeError(f"only ranks {sorted(collected)} returned a result")
    return [collected[r] for r in range(world_size)]


def _drain(results: Any, into: dict[int, Any], wait_s: float = 0.0,
           want: int | None = None) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            rank, value = results.get(timeout=0.05)
        except queue.Empty:
            if want is None or len(into) >= want or time.monotonic() > deadline:
                return
            continue
        into[rank] = value


def _main(
    rank: int,
    world_size: int,
    backend: str,
    store: str,
    threads: int,
    pg_timeout_s: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(
        backend, init_method=f"file://{store}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=pg_timeout_s), **kwargs,
    )
    try:
        results.put((rank, fn(rank, world_size, *args)))
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()
