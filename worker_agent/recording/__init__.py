"""Counting expert load on the GPU (invariants 2 and 3 of docs: monotonic counts, attributed to
the placement version they were recorded under).

Pieces:

- ``PlacementView(phy2log, num_experts, *, device=None, version=0)``: device tensors
  ``phy2log [L, P]``, ``log2phy [L, E, P-E+1]`` (-1 padded, replicas in slot order) and
  ``logcnt [L, E]``, updated in place (fixed addresses) by ``update_`` / ``update_layers_``.
- ``ExpertLoadRecorder(view)``: monotonic int64 ``counters [L, P]``;
  ``map_and_record(layer, topk_ids [T, K]) -> [T, K]`` physical ids, fused in one Triton kernel
  (per-program shared-memory histogram, one atomic per (program, slot); one atomic per pair below
  1024 pairs, where a histogram has nothing to merge), torch fallback on CPU or without Triton;
  ``record_counts(layer, slot_counts, slot_offset)``; ``enabled(flag)`` flips a device-side flag.
  Both are custom ops (``eplb::map_and_record``, ``eplb::record_counts``), so
  ``torch.compile(fullgraph=True)`` and CUDA-graph capture work.
- ``Snapshotter(recorder)``: ``capture(step)`` (engine thread, non-blocking) and
  ``collect() -> list[LoadDelta]`` (agent thread, never blocks on the GPU).

Replica choice: token ``t`` sends expert ``e`` to replica ``(t + s) % logcnt[layer, e]`` where
``s`` is the sum of token 0's valid expert ids, a per-call rotation (token-position modulo, like
vLLM; docs/decisions/0003-recorder-counters.md says why).

Switch protocol (invariant 3). At the step where the engine switches maps it calls, in order::

    snap.capture(step)              # cut: everything recorded so far is the old version's
    view.update_(phy2log, version)  # new contents, same tensor addresses
    # (or snap.switch_(step, phy2log, version), which does both)

Each capture is tagged with the view's version at the time of the call. The delta returned for a
capture B covers the steps after the previous capture A up to and including B's step, and its
``version`` is B's tag: because the engine captures before every update, that is exactly the
version that was active between A and B. A delta is never split across versions, and counts
recorded after the switch land in the next delta with the new version. The first capture's
baseline is zero counters.
"""

from worker_agent.recording.placement import PlacementView
from worker_agent.recording.recorder import ExpertLoadRecorder
from worker_agent.recording.snapshot import LoadDelta, Snapshotter

__all__ = ["ExpertLoadRecorder", "LoadDelta", "PlacementView", "Snapshotter"]
