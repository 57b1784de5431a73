"""Snapshotter: asynchronous copies of the counters, turned into per-version load deltas.

``capture(step)`` runs on the engine thread and never waits on the GPU. On CUDA it enqueues, on
the current (forward) stream, a device-to-device copy of the counters into a staging buffer — this
is the exact cut: kernels enqueued after it are not in the snapshot — and then, on a side stream
that waits for that copy, a device-to-host copy of the staging buffer into pinned memory followed
by an event. Only the small D2D copy sits in the forward stream; the PCIe transfer overlaps
compute. On CPU the counters are copied at once.

``collect()`` runs on the agent thread: it takes the finished captures (``event.query()``, never
a blocking wait), oldest first, and returns each as a ``LoadDelta`` against the previous capture
(the first against zero counters).

Attribution (invariant 3): a capture is tagged with ``view.version`` at the time of the call. The
delta ending at capture B covers steps ``(A.step, B.step]`` and carries B's tag, which is the
version that was active over that interval **provided the engine captures before every switch**:
at the switch step it calls ``capture(step)`` and only then ``view.update_(...)`` (or uses
``switch_``, which does both). Counts recorded after the switch are then in the next delta, tagged
with the new version by the next capture.

Buffers: ``buffers`` (staging, pinned) pairs are pre-allocated; a pair returns to the pool when
``collect`` has consumed it. When none is free, a capture of the same version as the newest
pending capture overwrites that one (counters are monotonic, so the merged delta is exact); a new
pair is allocated only when versions differ, so memory stays bounded by the number of switches
the agent has not collected yet.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from worker_agent.recording.recorder import ExpertLoadRecorder

__all__ = ["LoadDelta", "Snapshotter"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadDelta:
    """Counts recorded under one placement version over steps ``[step_begin, step_end]``.

    ``counts``: ``[L, P]`` int64, ``>= 0``, per physical slot; map them to logical experts with
    that version's ``phy2log``.
    """

    version: int
    step_begin: int
    step_end: int
    counts: np.ndarray


@dataclass
class _Buffers:
    host: torch.Tensor  # [L, P] int64, pinned on CUDA
    staging: torch.Tensor | None = None  # [L, P] int64 on the device (CUDA only)
    ready: Any = None  # torch.cuda.Event: the cut is done on the forward stream
    done: Any = None  # torch.cuda.Event: the host copy is done on the side stream


@dataclass
class _Capture:
    step: int
    version: int
    updates: int
    buffers: _Buffers
    enqueued: bool = False  # a D2H copy into these buffers was enqueued (CUDA)


class Snapshotter:
    """Async snapshots of ``recorder.counters`` -> ``LoadDelta`` list.

    Args:
        recorder: whose counters to snapshot (its view gives the version tag).
        buffers: pre-allocated (staging, pinned host) buffer pairs.
        first_step: ``step_begin`` of the first delta.
        timing: create the completion events with timing enabled (benchmarks).
    """

    def __init__(
        self,
        recorder: ExpertLoadRecorder,
        *,
        buffers: int = 4,
        first_step: int = 0,
        timing: bool = False,
    ) -> None:
        if buffers < 1:
            raise ValueError(f"buffers must be >= 1, got {buffers}")
        self.recorder = recorder
        self.view = recorder.view
        counters = recorder.counters
        self._cuda = counters.is_cuda
        self._timing = timing
        self.stream: torch.cuda.Stream | None = (
            torch.cuda.Stream(device=counters.device) if self._cuda else None
        )
        self._lock = threading.Lock()
        self._collect_lock = threading.Lock()
        self._free: list[_Buffers] = [self._new_buffers() for _ in range(buffers)]
        self._pending: deque[_Capture] = deque()
        self._last_step: int | None = None
        self._baseline = np.zeros(tuple(counters.shape), dtype=np.int64)
        self._baseline_updates = self.view.updates
        self._next_begin = int(first_step)

    def _new_buffers(self) -> _Buffers:
        counters = self.recorder.counters
        if not self._cuda:
            return _Buffers(torch.empty(counters.shape, dtype=torch.int64))
        return _Buffers(
            host=torch.empty(counters.shape, dtype=torch.int64, pin_memory=True),
            # contiguous whatever the counters' strides: the cut gathers them into one block
            staging=torch.empty(counters.shape, dtype=torch.int64, device=counters.device),
            ready=torch.cuda.Event(),
            done=torch.cuda.Event(enable_timing=self._timing),
        )

    @property
    def pending(self) -> int:
        """Captures not yet returned by ``collect``."""
        with self._lock:
            return len(self._pending)

    def capture(self, step: int, *, stream: torch.cuda.Stream | None = None) -> None:
        """Snapshot the counters as they stand after everything enqueued so far (counts up to and
        including ``step``), tagged with ``view.version``. Non-blocking; engine thread.

        ``stream``: the forward stream (default: the current stream). A second capture at the same
        step is a no-op; an earlier step raises ``ValueError``.
        """
        step = int(step)
        with self._lock:
            if self._last_step is not None:
                if step < self._last_step:
                    raise ValueError(f"capture step {step} before previous {self._last_step}")
                if step == self._last_step:
                    return
            version = self.view.version
            newest = self._pending[-1] if self._pending else None
            if self._free or newest is None or newest.version != version:
                bufs = self._free.pop() if self._free else self._new_buffers()
                entry = _Capture(step, version, self.view.updates, bufs)
                self._pending.append(entry)
            else:  # no free buffers: merge into the newest pending capture (same version)
                entry = newest
                entry.step = step
                entry.updates = self.view.updates
            self._enqueue_copy(entry, stream)
            self._last_step = step

    def _enqueue_copy(self, entry: _Capture, stream: torch.cuda.Stream | None) -> None:
        counters = self.recorder.counters
        bufs = entry.buffers
        if not self._cuda:
            bufs.host.copy_(counters)
            return
        assert bufs.staging is not None and self.stream is not None
        main = stream if stream is not None else torch.cuda.current_stream(counters.device)
        if entry.enqueued:  # merged capture: its last D2H may still read the staging buffer
            main.wait_event(bufs.done)
        if stream is None and counters.device.index == torch.cuda.current_device():
            bufs.staging.copy_(counters)  # the exact cut, in forward-stream order
        else:
            with torch.cuda.stream(main):
                bufs.staging.copy_(counters)
        bufs.ready.record(main)
        self.stream.wait_event(bufs.ready)
        with torch.cuda.stream(self.stream):
            bufs.host.copy_(bufs.staging, non_blocking=True)
        bufs.done.record(self.stream)
        entry.enqueued = True

    def switch_(self, step: int, phy2log: Any, version: int) -> None:
        """The switch protocol in one call: ``capture(step)`` then ``view.update_(...)``."""
        self.capture(step)
        self.view.update_(phy2log, version)

    @staticmethod
    def _finished(entry: _Capture) -> bool:
        return not entry.enqueued or bool(entry.buffers.done.query())

    def collect(self) -> list[LoadDelta]:
        """Finished captures as deltas, oldest first; never blocks on the GPU. Agent thread."""
        with self._collect_lock:
            with self._lock:
                ready: list[_Capture] = []
                while self._pending and self._finished(self._pending[0]):
                    ready.append(self._pending.popleft())
            deltas: list[LoadDelta] = []
            for entry in ready:
                current = entry.buffers.host.numpy().copy()
                counts = current - self._baseline
                if (counts < 0).any():
                    raise RuntimeError("recorder counters decreased between two snapshots")
                if entry.updates - self._baseline_updates > 1:
                    _log.warning(
                        "steps %d..%d span %d placement updates without a capture between them; "
                        "their counts are all attributed to version %d",
                        self._next_begin,
                        entry.step,
                        entry.updates - self._baseline_updates,
                        entry.version,
                    )
                deltas.append(LoadDelta(entry.version, self._next_begin, entry.step, counts))
                self._baseline = current
                self._baseline_updates = entry.updates
                self._next_begin = entry.step + 1
            with self._lock:
                self._free.extend(entry.buffers for entry in ready)
            return deltas
