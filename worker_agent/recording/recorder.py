"""ExpertLoadRecorder: monotonic per-slot load counters ``[L, P]`` of one rank, on its device.

Counters are int64 and only ever increase (see docs/decisions/0003-recorder-counters.md). On CUDA
each counter has its own 128-byte line (``COUNTER_STRIDE``): the atomics of one layer then spread
over ``P`` lines of the L2 instead of queueing on ``P / 16``. Nothing here synchronizes with the
host: the enable flag is a device tensor read by the kernels, and the only host-side checks are on
shapes, dtypes and Python ints.
"""

from __future__ import annotations

from typing import Literal

import torch

from worker_agent.recording.ops import (
    map_and_record_impl,
    map_and_record_op,
    record_counts_impl,
    record_counts_op,
    triton_available,
)
from worker_agent.recording.placement import PlacementView

__all__ = ["COUNTER_STRIDE", "ExpertLoadRecorder"]

Backend = Literal["auto", "triton", "torch"]
_ID_DTYPES = (torch.int32, torch.int64)
# int64 elements from one slot's counter to the next on CUDA: one 128-byte L2 line per counter,
# so that atomics on different slots do not queue on a shared line. Measured on an H100 (decision
# 0003, best launch configuration per layout): 512 tokens 2.03 -> 1.82 us, 32768 6.2 -> 5.6 us.
COUNTER_STRIDE = 16


def _counter_buffer(layers: int, slots: int, device: torch.device) -> torch.Tensor:
    """``[L, P]`` int64 zeros; on CUDA a view with strides ``(P * COUNTER_STRIDE, COUNTER_STRIDE)``
    into an ``[L, P, COUNTER_STRIDE]`` buffer (the view keeps it alive)."""
    stride = COUNTER_STRIDE if device.type == "cuda" else 1
    return torch.zeros(layers, slots, stride, dtype=torch.int64, device=device)[:, :, 0]


class ExpertLoadRecorder:
    """Counts tokens per physical slot and maps logical expert ids to slots.

    Args:
        view: the rank's placement view (its tensors are read by every call, so a switch made
            with ``view.update_`` is seen by captured CUDA graphs too).
        backend: ``"auto"`` (Triton on CUDA when importable, else torch), ``"triton"`` or
            ``"torch"``.

    Attributes:
        counters: ``[L, P]`` int64 device tensor, monotonic, never reset by the forward pass;
            fixed address; on CUDA not contiguous (one 128-byte line per counter).
        backend: the backend in use, ``"triton"`` or ``"torch"``.
    """

    def __init__(self, view: PlacementView, *, backend: Backend = "auto") -> None:
        self.view = view
        device = view.device
        table = view.num_experts * view.max_replicas
        if view.num_layers * max(table, view.num_slots * COUNTER_STRIDE) >= 2**31:
            raise ValueError("placement too large for 32-bit kernel indexing")
        if backend == "auto":
            use_triton = device.type == "cuda" and triton_available()
        elif backend == "triton":
            if device.type != "cuda" or not triton_available():
                raise RuntimeError("backend='triton' needs a CUDA device and Triton")
            use_triton = True
        elif backend == "torch":
            use_triton = False
        else:
            raise ValueError(f"unknown backend {backend!r}")
        self._use_triton = use_triton
        self.backend: str = "triton" if use_triton else "torch"
        self.counters = _counter_buffer(view.num_layers, view.num_slots, device)
        self._flag = torch.ones(1, dtype=torch.int32, device=device)
        self._enabled = True

    @property
    def flag(self) -> torch.Tensor:
        """``[1]`` int32 device tensor read by the kernels: counting is on when it is non-zero."""
        return self._flag

    @property
    def is_enabled(self) -> bool:
        """Host mirror of the flag as last set through ``enabled``."""
        return self._enabled

    def enabled(self, flag: bool) -> None:
        """Turn counting on or off: a device ``fill_`` on the current stream, no recompile, no
        sync; takes effect for kernels enqueued (or graph replays) after it."""
        self._flag.fill_(1 if flag else 0)
        self._enabled = bool(flag)

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.view.num_layers:
            raise IndexError(f"layer {layer} outside [0, {self.view.num_layers})")

    def map_and_record(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """``topk_ids [T, K]`` int32/int64 logical ids -> ``[T, K]`` int64 physical slot ids.

        Replica of expert ``e`` for token ``t``: ``(t + s) % logcnt[layer, e]``, ``s`` the sum of
        token 0's valid ids (rotates small decode batches over the replicas).
        Adds 1 to ``counters[layer, slot]`` per (token, k) when enabled. Ids outside ``[0, E)``
        (e.g. ``-1`` padding) map to ``-1`` and are not counted.
        """
        self._check_layer(layer)
        if topk_ids.dim() != 2:
            raise ValueError(f"topk_ids: expected [T, K], got shape {tuple(topk_ids.shape)}")
        if topk_ids.dtype not in _ID_DTYPES:
            raise TypeError(f"topk_ids: expected int32 or int64, got {topk_ids.dtype}")
        if topk_ids.device != self.counters.device:
            raise ValueError(f"topk_ids on {topk_ids.device}, recorder on {self.counters.device}")
        view = self.view
        args = (topk_ids, view.replica_table, self.counters, self._flag, layer)
        if torch.compiler.is_compiling():
            return map_and_record_op(*args, self._use_triton)
        # Eager: skip the dispatcher round trip (host overhead per layer); same implementation.
        return map_and_record_impl(*args, self._use_triton)

    def record_counts(self, layer: int, slot_counts: torch.Tensor, slot_offset: int = 0) -> None:
        """Add ``slot_counts [n]`` (integer) into ``counters[layer, slot_offset : slot_offset+n]``.

        For dispatchers that count tokens per local expert themselves (DeepEP low-latency
        ``expert_num_tokens``, vllm-ascend ``expert_token_num``): pass the rank's local slice and
        ``slot_offset = rank * S``. Respects the enable flag.
        """
        self._check_layer(layer)
        if slot_counts.dim() != 1:
            raise ValueError(f"slot_counts: expected [n], got shape {tuple(slot_counts.shape)}")
        if slot_counts.is_floating_point() or slot_counts.dtype == torch.bool:
            raise TypeError(f"slot_counts: expected an integer tensor, got {slot_counts.dtype}")
        n = slot_counts.shape[0]
        if slot_offset < 0 or slot_offset + n > self.view.num_slots:
            raise ValueError(
                f"slots [{slot_offset}, {slot_offset + n}) outside [0, {self.view.num_slots})"
            )
        if slot_counts.device != self.counters.device:
            raise ValueError(
                f"slot_counts on {slot_counts.device}, recorder on {self.counters.device}"
            )
        args = (slot_counts, self.counters, self._flag, layer, slot_offset, self._use_triton)
        if torch.compiler.is_compiling():
            record_counts_op(*args)
        else:
            record_counts_impl(*args)
