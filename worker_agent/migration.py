"""Expert weight migration between ranks, in place (DESIGN.md invariant 6).

The engine registers, per MoE layer, the tensors that hold its expert weights on this rank —
each ``[S, ...]`` (one row per local slot), any dtype, several per layer (w1/w2/w3, scales) —
in an :class:`ExpertWeights`. Given the layer's :class:`~worker_agent.transfers.LayerTransfers`
(the same on every rank), :meth:`ExpertWeights.migrate_layer` moves the weights so that the
rank's slots hold the new map's experts, copying into the registered tensors in place: their
``data_ptr`` never changes (CUDA graphs and the engine's references stay valid).

Protocol of one layer (every rank calls it with the same layer and plan; every collective below
is made by every rank, unconditionally)::

    1. prepare (local): check the plan against the registry, lay out a staging buffer.
    2. pre-flight all-reduce MIN [ok, rank-if-failed, plan digest, -digest, layout, -layout]:
       every rank learns whether every rank is ready and holds the same plan and tensor layout.
       If not, every rank raises MigrationError before any byte moves.
    3. stage: local copies whose source slot is overwritten in this layer are copied aside.
    4. transfer: torch.distributed.batch_isend_irecv — sends read straight from the weight
       rows (nothing is written before step 6), receives land in the staging buffer; wait for
       all of them (bounded by ``timeout_s``).
    5. status all-reduce MIN [ok, rank-if-failed]: every rank learns whether every rank's
       transfers completed (and passed the optional ``fault`` hook).
    6. commit (only if every rank succeeded): copy staged / received / unchanged-source rows
       into the destination rows of the registered tensors. On CUDA the copies run on a copy
       stream, so in :meth:`ExpertWeights.migrate` a layer's commit overlaps the next layer's
       transfers (two staging buffers alternate); ``migrate`` returns once all are done.

**Failure guarantee.** The registered tensors of a layer are written only in step 6, after the
status all-reduce reported that every rank's receives for that layer completed. A failure
anywhere (a rank not ready, a plan or layout mismatch, a transfer error, a timeout, the
``fault`` hook raising) makes every rank raise :class:`MigrationError` with that layer's weights
untouched on every rank, so the caller keeps routing that layer with the old map. A rank
commits only when the status all-reduce *returned* "every rank ok", so data is never read from
a half-received buffer. The one case outside the "all ranks alike" part: the group breaking
during the status all-reduce itself (a peer dies; or a timed-out transfer closed the connection
— gloo closes the pair, NCCL's watchdog aborts the communicator). Ranks that see the error raise
(phase ``"status"``) without writing; a rank whose all-reduce had already returned "ok" commits.
The group is then unusable for serving anyway (every forward step needs it) and must be rebuilt.
On NCCL, "receives completed" is established on the host (the works are waited, then the stream
synchronized) before the status all-reduce.

Stats per layer (:class:`LayerMigrationStats`): transfers sent/received, local copies, bytes
sent/received/staged, seconds (whole call) and transfer seconds (posting to completion).

:class:`MigratingSwitcher` plugs this into the in-band agreement (``worker_agent.agreement``'s
``Switcher`` protocol): it migrates ``layers_per_step`` layers per step, switches each layer's
map rows right after its weights are in place, and rolls switched layers back on a failure.
"""

from __future__ import annotations

import datetime
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from worker_agent.transfers import LayerTransfers, TransferPlan, plan_transfers

__all__ = [
    "ExpertWeights",
    "LayerMigrationStats",
    "MigratingSwitcher",
    "MigrationError",
    "MigrationReport",
    "RolloutMigrationStats",
]

#: Phases a fault hook is called in: before this rank posts its transfers ("post"), and after
#: they completed, before the status exchange ("received").
FaultHook = Callable[[str], None]

_ALIGN = 256  # bytes; staging regions start at aligned offsets


class MigrationError(RuntimeError):
    """A layer could not be migrated; no rank wrote its weights (see the module docstring).

    Attributes:
        layer: the layer.
        phase: ``"preflight"`` (not every rank ready, or plans/layouts differ), ``"transfer"``
            (a rank's transfers failed or timed out), ``"status"`` (the status exchange itself
            failed: the process group is probably broken), or ``"rollback"``
            (:class:`MigratingSwitcher` could not move switched layers back).
        failed_rank: the lowest rank that reported the failure (``None`` when unknown).
        reason: this rank's own error, when it had one.
    """

    def __init__(
        self, layer: int, phase: str, failed_rank: int | None, reason: str | None
    ) -> None:
        where = f"rank {failed_rank}" if failed_rank is not None else "an unknown rank"
        detail = f": {reason}" if reason else ""
        super().__init__(
            f"migration of layer {layer} failed in {phase} ({where}){detail}; "
            "the layer's weights were not modified"
        )
        self.layer = layer
        self.phase = phase
        self.failed_rank = failed_rank
        self.reason = reason


@dataclass(frozen=True)
class LayerMigrationStats:
    """What one rank did for one layer.

    Attributes:
        layer: the layer.
        transfers_sent, transfers_received: network transfers (one per expert, all its tensors).
        local_copies: experts copied inside the rank (each may fill several slots).
        slots_written: rows written per registered tensor (this rank's changed slots).
        bytes_sent, bytes_received: network bytes of this rank.
        bytes_staged: bytes copied into the staging buffer by local copies.
        seconds: the whole call on this rank (pre-flight to weights written, stream synchronized).
        transfer_seconds: posting the transfers to all of them completing on this rank.
    """

    layer: int
    transfers_sent: int
    transfers_received: int
    local_copies: int
    slots_written: int
    bytes_sent: int
    bytes_received: int
    bytes_staged: int
    seconds: float
    transfer_seconds: float


@dataclass(frozen=True)
class MigrationReport:
    """Results of :meth:`ExpertWeights.migrate` on one rank (identical ``applied``/``failed``
    on every rank: outcomes are agreed by the status all-reduce).

    Attributes:
        applied: stats of the layers whose weights are now the new map's, in call order.
        failed: layer -> error message, for layers left untouched.
        wall_seconds: the whole call on this rank (every commit finished).
        errors: layer -> the :class:`MigrationError` (layers that were attempted and failed).
    """

    applied: tuple[LayerMigrationStats, ...]
    failed: Mapping[int, str] = field(default_factory=dict)
    wall_seconds: float = 0.0
    errors: Mapping[int, MigrationError] = field(default_factory=dict, repr=False)

    @property
    def applied_layers(self) -> tuple[int, ...]:
        return tuple(s.layer for s in self.applied)

    @property
    def bytes_received(self) -> int:
        return sum(s.bytes_received for s in self.applied)

    @property
    def bytes_sent(self) -> int:
        return sum(s.bytes_sent for s in self.applied)

    @property
    def transfers_received(self) -> int:
        return sum(s.transfers_received for s in self.applied)

    @property
    def local_copies(self) -> int:
        return sum(s.local_copies for s in self.applied)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.applied)

    @property
    def max_layer_seconds(self) -> float:
        return max((s.seconds for s in self.applied), default=0.0)


@dataclass(frozen=True)
class _Entry:
    name: str
    tensor: torch.Tensor
    rows: torch.Tensor  # [S, row_bytes] uint8 view of ``tensor`` (same storage)
    row_bytes: int


def _byte_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``[S, ...]`` contiguous tensor -> ``[S, row_bytes]`` uint8 view of the same memory."""
    return tensor.reshape(tensor.shape[0], -1).view(torch.uint8)


class ExpertWeights:
    """Registry of one rank's expert weight tensors, per layer, and their migration.

    Args:
        slots_per_rank: ``S``, the leading dimension of every registered tensor.

    Register with :meth:`register` / :meth:`register_layer`; migrate with
    :meth:`migrate_layer` (one layer) or :meth:`migrate` (many). Calls to the ``migrate*``
    methods are collective over the EP group: every rank makes the same calls in the same order.
    """

    def __init__(self, slots_per_rank: int) -> None:
        if slots_per_rank < 1:
            raise ValueError(f"slots_per_rank must be >= 1, got {slots_per_rank}")
        self.slots_per_rank = int(slots_per_rank)
        self._layers: dict[int, dict[str, _Entry]] = {}
        # Two staging buffers, alternating per call, so that on CUDA a layer's commit (on the
        # copy stream) overlaps the next layer's transfers; ``_released[b]`` is the CUDA event
        # after which buffer ``b`` is no longer read by a commit.
        self._staging: list[torch.Tensor | None] = [None, None]
        self._released: list[Any] = [None, None]
        self._committed: dict[int, Any] = {}  # layer -> CUDA event after its last commit
        self._copy_stream: Any = None
        self._calls = 0  # migrate_layer calls so far: the same on every rank (P2P tags)

    # -- registry ------------------------------------------------------------------------------

    def register(self, layer: int, name: str, tensor: torch.Tensor) -> None:
        """Register ``tensor [S, ...]`` (contiguous, any dtype) as weights ``name`` of ``layer``.

        Re-registering a name replaces it. All tensors of a layer must share one device.
        """
        if layer < 0:
            raise ValueError(f"layer must be >= 0, got {layer}")
        if tensor.dim() < 1 or tensor.shape[0] != self.slots_per_rank:
            raise ValueError(
                f"layer {layer} {name!r}: expected shape [{self.slots_per_rank}, ...], "
                f"got {tuple(tensor.shape)}"
            )
        if not tensor.is_contiguous():
            raise ValueError(
                f"layer {layer} {name!r}: tensor must be contiguous (rows are moved as bytes)"
            )
        entries = self._layers.setdefault(layer, {})
        for other in entries.values():
            if other.name != name and other.tensor.device != tensor.device:
                raise ValueError(
                    f"layer {layer} {name!r} is on {tensor.device}, {other.name!r} on "
                    f"{other.tensor.device}"
                )
        rows = _byte_rows(tensor)
        entries[name] = _Entry(name, tensor, rows, int(rows.shape[1]))

    def register_layer(self, layer: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Register several tensors of one layer (see :meth:`register`)."""
        for name, tensor in tensors.items():
            self.register(layer, name, tensor)

    @property
    def layers(self) -> tuple[int, ...]:
        """Registered layers, ascending."""
        return tuple(sorted(self._layers))

    def tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """The registered tensors of ``layer`` by name (the engine's own objects)."""
        return {name: e.tensor for name, e in self._layers.get(layer, {}).items()}

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one expert of ``layer``: one row of every registered tensor."""
        return sum(e.row_bytes for e in self._layers.get(layer, {}).values())

    def _entries(self, layer: int) -> list[_Entry]:
        entries = self._layers.get(layer)
        if not entries:
            raise KeyError(f"no expert weights registered for layer {layer}")
        return [entries[name] for name in sorted(entries)]

    def _layout_digest(self, layer: int) -> int:
        entries = self._layers.get(layer, {})
        text = repr([
            (name, str(entries[name].tensor.dtype), tuple(entries[name].tensor.shape[1:]))
            for name in sorted(entries)
        ])
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 2

    # -- migration -----------------------------------------------------------------------------

    def migrate(
        self,
        plan: TransferPlan,
        group: Any = None,
        *,
        layers: Iterable[int] | None = None,
        timeout_s: float | None = None,
        stop_on_error: bool = False,
        fault: Callable[[int, str], None] | None = None,
    ) -> MigrationReport:
        """Migrate several layers (default: every layer of ``plan`` that changes), one by one.

        A layer that fails is left untouched and recorded in ``failed``; the others go on,
        unless ``stop_on_error`` or the group broke (phase ``"status"``), which stops at that
        layer (the rest are reported failed as not attempted). The outcome is the same on every
        rank. ``fault(layer, phase)`` is passed to :meth:`migrate_layer` as a per-layer hook.

        On CUDA each layer's commit runs on a copy stream while the next layer transfers; the
        call returns after every commit finished (``wall_seconds`` covers it all).
        """
        start = time.perf_counter()
        todo = list(plan.changed_layers if layers is None else layers)
        applied: list[LayerMigrationStats] = []
        failed: dict[int, str] = {}
        errors: dict[int, MigrationError] = {}
        for i, layer in enumerate(todo):
            hook = None if fault is None else _bind(fault, layer)
            try:
                applied.append(
                    self.migrate_layer(layer, plan[layer], group, timeout_s=timeout_s, fault=hook,
                                       synchronize=False)
                )
            except MigrationError as exc:
                failed[layer] = str(exc)
                errors[layer] = exc
                if stop_on_error or exc.phase == "status":
                    for rest in todo[i + 1:]:
                        failed[rest] = f"not attempted: layer {layer} failed first"
                    break
        self.wait_commits(host=True)
        return MigrationReport(tuple(applied), failed, time.perf_counter() - start, errors)

    def migrate_layer(
        self,
        layer: int,
        transfers: LayerTransfers,
        group: Any = None,
        *,
        timeout_s: float | None = None,
        fault: FaultHook | None = None,
        synchronize: bool = True,
    ) -> LayerMigrationStats:
        """Move ``layer``'s expert weights as ``transfers`` says; collective over ``group``.

        Args:
            layer: the layer (its tensors must be registered).
            transfers: the layer's transfer list (``plan[layer]``), the same on every rank.
            group: the EP process group (rank ``r`` of the group is EP rank ``r``); ``None``:
                the default group. Without ``torch.distributed`` initialized, a 1-rank group.
            timeout_s: bound on waiting for this rank's transfers (``None``: the group's
                timeout). A timeout counts as a transfer failure (and usually breaks the group).
            fault: called with ``"post"`` before this rank posts its transfers and with
                ``"received"`` after they completed; an exception from it is a transfer failure
                on this rank (tests inject failures with it; an engine may verify bytes).
            synchronize: on CUDA, wait for the weight copies before returning (the stats then
                time the whole move). With ``False`` the copies are left running on the copy
                stream; call :meth:`wait_commits` before the engine routes with the new map.

        Returns this rank's :class:`LayerMigrationStats`. Raises :class:`MigrationError` on
        every rank, with the layer's weights untouched on every rank, if it failed anywhere.
        """
        start = time.perf_counter()
        self._calls += 1
        tag = self._calls % (1 << 20)
        comm = _Comm(group)
        rank, world = comm.rank, comm.world

        # 1. prepare (rank-local; errors are reported through the pre-flight all-reduce).
        reason: str | None = None
        work: _LayerWork | None = None
        buffer = self._calls % 2
        try:
            work = self._prepare(layer, transfers, rank, world, buffer)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        digest = transfers.digest if isinstance(transfers, LayerTransfers) else 0
        layout = self._layout_digest(layer)

        # 2. pre-flight.
        ok = int(work is not None)
        try:
            pre = comm.allreduce_min(
                [ok, rank if not ok else world, digest, -digest, layout, -layout]
            )
        except Exception as exc:
            raise MigrationError(layer, "status", None, f"pre-flight exchange: {exc}") from exc
        if pre[0] != 1:
            raise MigrationError(layer, "preflight", pre[1], reason)
        if pre[2] != -pre[3]:
            raise MigrationError(layer, "preflight", None, "ranks computed different plans")
        if pre[4] != -pre[5]:
            raise MigrationError(
                layer, "preflight", None, "ranks registered different tensor layouts"
            )
        assert work is not None  # every rank is ready
        device = work.device

        # 3.-4. stage local copies, transfer.
        t_post = time.perf_counter()
        try:
            work.stage()
            if fault is not None:
                fault("post")
            handles = comm.post(work.ops(comm, tag))
            comm.wait(handles, timeout_s)
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
            if fault is not None:
                fault("received")
            ok, reason = 1, None
        except Exception as exc:
            ok, reason = 0, f"{type(exc).__name__}: {exc}"
            # Pending receives may still target the staging buffer: never reuse it.
            self._staging[buffer] = None
        transfer_seconds = time.perf_counter() - t_post

        # 5. status.
        try:
            status = comm.allreduce_min([ok, rank if not ok else world])
        except Exception as exc:
            self._staging[buffer] = None
            raise MigrationError(layer, "status", None, reason or str(exc)) from exc
        if status[0] != 1:
            self._staging[buffer] = None
            raise MigrationError(layer, "transfer", status[1], reason)

        # 6. commit: every rank's transfers for this layer completed.
        if device.type == "cuda":
            stream = self._commit_stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))  # the receives landed
            with torch.cuda.stream(stream):
                work.commit()
            event = torch.cuda.Event()
            event.record(stream)
            self._committed[layer] = event
            if work.staging is not None:
                work.staging.record_stream(stream)
                self._released[buffer] = event
            if synchronize:
                self.wait_commits(host=True)
        else:
            work.commit()
        return work.stats(time.perf_counter() - start, transfer_seconds)

    def wait_commits(self, host: bool = False) -> None:
        """Order the current CUDA stream after every commit so far (the forward that routes with
        the new map then reads the new weights); with ``host``, also wait for them on the host.
        A no-op on CPU, where commits are synchronous."""
        stream = self._copy_stream
        if stream is None:
            return
        torch.cuda.current_stream(stream.device).wait_stream(stream)
        if host:
            stream.synchronize()

    # -- internals -----------------------------------------------------------------------------

    def _commit_stream(self, device: torch.device) -> Any:
        if self._copy_stream is None or self._copy_stream.device != device:
            self._copy_stream = torch.cuda.Stream(device)
        return self._copy_stream

    def _staging_buffer(self, index: int, nbytes: int, device: torch.device) -> torch.Tensor:
        buf = self._staging[index]
        if buf is None or buf.device != device or buf.numel() < nbytes:
            # A replaced buffer still read by a commit was record_stream()-ed: the caching
            # allocator keeps it until that commit is done.
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
            self._staging[index] = buf
        released = self._released[index]
        if device.type == "cuda" and released is not None:
            # Staging copies and receives (the NCCL stream waits on the current stream) must
            # not overwrite the buffer while an earlier commit still reads it.
            torch.cuda.current_stream(device).wait_event(released)
        return buf

    def _prepare(
        self, layer: int, transfers: LayerTransfers, rank: int, world: int, buffer: int
    ) -> _LayerWork:
        if not isinstance(transfers, LayerTransfers):
            raise TypeError(f"expected LayerTransfers, got {type(transfers).__name__}")
        if transfers.layer != layer:
            raise ValueError(f"transfers are for layer {transfers.layer}, not {layer}")
        if transfers.num_ranks != world:
            raise ValueError(f"plan for {transfers.num_ranks} ranks, group has {world}")
        if transfers.slots_per_rank != self.slots_per_rank:
            raise ValueError(
                f"plan has {transfers.slots_per_rank} slots per rank, registry "
                f"{self.slots_per_rank}"
            )
        entries = self._entries(layer)
        device = entries[0].tensor.device
        committed = self._committed.get(layer)
        if device.type == "cuda" and committed is not None:
            # This layer's previous commit may still run on the copy stream: what we stage and
            # send below must read its result.
            torch.cuda.current_stream(device).wait_event(committed)
        # Staging items: receives by source rank, then plan order (see _LayerWork.ops).
        receives = tuple(sorted(transfers.receives(rank), key=lambda t: t.src_rank))
        copies = transfers.copies(rank)
        staged = [c for c in copies if c.staged]
        items = len(receives) + len(staged)
        # Staging layout: per tensor k a block [items, row_bytes_k] at an aligned offset.
        offsets: list[int] = []
        total = 0
        for entry in entries:
            offsets.append(total)
            total += -(-items * entry.row_bytes // _ALIGN) * _ALIGN
        buf = self._staging_buffer(buffer, total, device) if items else None
        return _LayerWork(
            layer=layer,
            entries=entries,
            rank=rank,
            base=rank * self.slots_per_rank,
            sends=transfers.sends(rank),
            receives=receives,
            copies=copies,
            staged_count=len(staged),
            staging=buf,
            offsets=offsets,
            device=device,
        )


def _bind(fault: Callable[[int, str], None], layer: int) -> FaultHook:
    return lambda phase: fault(layer, phase)


class _Comm:
    """The group as this module uses it; a 1-rank stand-in when torch.distributed is down."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized()
        if self.distributed:
            self.rank = dist.get_rank(group)
            self.world = dist.get_world_size(group)
            self.nccl = "nccl" in str(dist.get_backend(group)).lower()
        else:
            if group is not None:
                raise RuntimeError("a process group was given but torch.distributed is down")
            self.rank, self.world, self.nccl = 0, 1, False

    def allreduce_min(self, values: Sequence[int]) -> list[int]:
        if not self.distributed:
            return [int(v) for v in values]
        where = torch.device("cuda", torch.cuda.current_device()) if self.nccl else "cpu"
        tensor = torch.tensor(list(values), dtype=torch.int64, device=where)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.group)
        return [int(v) for v in tensor.tolist()]

    def op(self, kind: Callable[..., Any], tensor: torch.Tensor, peer: int, tag: int) -> Any:
        return dist.P2POp(kind, tensor, group=self.group, group_peer=peer, tag=tag)

    def post(self, ops: list[Any]) -> list[Any]:
        if not ops:
            return []
        return list(dist.batch_isend_irecv(ops))

    def wait(self, handles: list[Any], timeout_s: float | None) -> None:
        for handle in handles:
            if timeout_s is None:
                handle.wait()
            else:
                handle.wait(datetime.timedelta(seconds=timeout_s))


def _runs(transfers: Sequence[Any], peer_of: Callable[[Any], int]) -> list[tuple[int, list[Any]]]:
    """``(peer, run)`` pairs: per peer (ascending), the transfers in the given order cut into runs
    of consecutive ``src_slot``."""
    by_peer: dict[int, list[Any]] = {}
    for t in transfers:
        by_peer.setdefault(peer_of(t), []).append(t)
    out: list[tuple[int, list[Any]]] = []
    for peer in sorted(by_peer):
        run: list[Any] = []
        for t in by_peer[peer]:
            if run and t.src_slot != run[-1].src_slot + 1:
                out.append((peer, run))
                run = []
            run.append(t)
        out.append((peer, run))
    return out


@dataclass
class _LayerWork:
    """One rank's share of one layer: what it sends, receives, stages and writes."""

    layer: int
    entries: list[_Entry]
    rank: int
    base: int  # first global slot of this rank
    sends: tuple[Any, ...]
    receives: tuple[Any, ...]
    copies: tuple[Any, ...]
    staged_count: int
    staging: torch.Tensor | None
    offsets: list[int]
    device: torch.device

    def _slot(self, entry_index: int, item: int) -> torch.Tensor:
        """Staging row of item ``item`` for tensor ``entry_index``."""
        assert self.staging is not None
        size = self.entries[entry_index].row_bytes
        start = self.offsets[entry_index] + item * size
        return self.staging[start:start + size]

    def stage(self) -> None:
        """Copy aside the sources of local copies that this layer overwrites."""
        item = len(self.receives)
        for copy in self.copies:
            if not copy.staged:
                continue
            for k, entry in enumerate(self.entries):
                self._slot(k, item).copy_(entry.rows[copy.src_slot - self.base])
            item += 1

    def _block(self, entry_index: int, item: int, count: int) -> torch.Tensor:
        """Staging rows ``[item, item + count)`` of tensor ``entry_index`` (contiguous)."""
        assert self.staging is not None
        size = self.entries[entry_index].row_bytes
        start = self.offsets[entry_index] + item * size
        return self.staging[start:start + count * size]

    def ops(self, comm: _Comm, tag: int) -> list[Any]:
        """The P2P operations: per peer, per run, one op per registered tensor.

        A run is a maximal sequence of a (src, dst) pair's transfers, in plan order, whose
        source slots are consecutive: the sender sends its rows ``[a, a + n)`` of each tensor
        as one op, the receiver receives them into ``n`` consecutive staging rows (its receives
        are ordered by source rank, then plan order). Both sides derive the same runs from the
        plan, so ops match one to one, in order, with equal sizes.
        """
        ops: list[Any] = []
        for peer, run in _runs(self.sends, lambda t: t.dst_rank):
            first = run[0].src_slot - self.base
            for entry in self.entries:
                ops.append(comm.op(dist.isend, entry.rows[first:first + len(run)], peer, tag))
        item = 0
        for peer, run in _runs(self.receives, lambda t: t.src_rank):
            for k in range(len(self.entries)):
                ops.append(comm.op(dist.irecv, self._block(k, item, len(run)), peer, tag))
            item += len(run)
        return ops

    def commit(self) -> None:
        """Write every changed slot of this rank (only after every rank's transfers completed)."""
        for i, t in enumerate(self.receives):
            for k, entry in enumerate(self.entries):
                src = self._slot(k, i)
                for dst in t.dst_slots:
                    entry.rows[dst - self.base].copy_(src)
        item = len(self.receives)
        for copy in self.copies:
            for k, entry in enumerate(self.entries):
                # An unstaged source slot is unchanged in this layer: read it directly.
                src = (
                    self._slot(k, item) if copy.staged else entry.rows[copy.src_slot - self.base]
                )
                for dst in copy.dst_slots:
                    entry.rows[dst - self.base].copy_(src)
            if copy.staged:
                item += 1

    def stats(self, seconds: float, transfer_seconds: float) -> LayerMigrationStats:
        expert = sum(e.row_bytes for e in self.entries)
        written = sum(len(t.dst_slots) for t in self.receives) + sum(
            len(c.dst_slots) for c in self.copies
        )
        return LayerMigrationStats(
            layer=self.layer,
            transfers_sent=len(self.sends),
            transfers_received=len(self.receives),
            local_copies=len(self.copies),
            slots_written=written,
            bytes_sent=len(self.sends) * expert,
            bytes_received=len(self.receives) * expert,
            bytes_staged=self.staged_count * expert,
            seconds=seconds,
            transfer_seconds=transfer_seconds,
        )


# ---------------------------------------------------------------------------------------------
# A Switcher (worker_agent.agreement) that moves weights before it switches maps


@dataclass(frozen=True)
class RolloutMigrationStats:
    """What one rank moved for one rollout (the fields of ``eplb.v1.MigrationStats``).

    Attributes:
        bytes_moved: network bytes this rank received.
        transfers: experts this rank received over the network.
        local_copies: experts this rank copied internally.
        total_pause_ms: migration time summed over the steps it took.
        max_layer_ms: the slowest layer.
        max_step_pause_ms: the longest migration pause of one forward step.
        steps: forward steps the rollout spanned.
        rolled_back: layers moved back to the old map after a failure.
    """

    bytes_moved: int = 0
    transfers: int = 0
    local_copies: int = 0
    total_pause_ms: float = 0.0
    max_layer_ms: float = 0.0
    max_step_pause_ms: float = 0.0
    steps: int = 0
    rolled_back: int = 0


class MigratingSwitcher:
    """A :class:`worker_agent.agreement.Switcher` that moves expert weights, then switches maps.

    ``begin(step, plan, settings)`` (every rank, the agreed step) plans the transfers from the
    view's map to ``plan.phy2log``. ``advance(step)`` (that step and the next ones) migrates the
    next ``settings.layers_per_step`` changed layers (all when 0) and switches each moved layer's
    map rows in place right after its weights are in place, so no step ever routes a layer with
    a map its weights do not match. After the last layer it cuts the load snapshot and installs
    the whole map at ``plan.version`` (returns True). Whether to go on depends only on the plan
    and ``layers_per_step`` (agreed data) and on migration outcomes (agreed by their status
    all-reduce), so every rank returns the same value at the same step.

    Failure: a :class:`MigrationError` (the same on every rank) makes every rank migrate the
    layers it already switched in this rollout back to their old experts, restore their map
    rows, and re-raise: the agreement reports the switch failed and every layer routes with the
    old map again. (If the group itself broke, rolling back is impossible; the error says so.)

    Counts: the snapshot is cut at the first ``advance`` (everything before is the old
    version's). While a rollout spans several steps the maps are a mix of both versions, which
    no report version describes, so counting is paused (``recorder.enabled(False)``) until the
    final switch, unless ``pause_counting=False``.

    Args:
        weights: the rank's registered expert weights.
        snapshotter: the agent's snapshotter (its recorder's view is the routing map).
        group: the EP process group (``None``: default).
        num_ranks, num_nodes: the EP topology (transfer planning).
        timeout_s: bound on each layer's transfer wait.
        pause_counting: pause counting while a rollout spans several steps (see above).
        fault: ``fault(layer, phase)`` passed to every migration (tests inject failures).
    """

    def __init__(
        self,
        weights: ExpertWeights,
        snapshotter: Any,
        *,
        group: Any = None,
        num_ranks: int,
        num_nodes: int = 1,
        timeout_s: float | None = None,
        pause_counting: bool = True,
        fault: Callable[[int, str], None] | None = None,
    ) -> None:
        self.weights = weights
        self.snapshotter = snapshotter
        self.view = snapshotter.view
        self.recorder = snapshotter.recorder
        self.group = group
        self.num_ranks = num_ranks
        self.num_nodes = num_nodes
        self.timeout_s = timeout_s
        self.pause_counting = pause_counting
        self.fault = fault
        self.last_stats: RolloutMigrationStats | None = None
        self._plan: Any = None
        self._transfers: TransferPlan | None = None
        self._old: Any = None
        self._new: Any = None
        self._todo: list[int] = []
        self._moved: list[int] = []  # layers whose weights are the new map's
        self._switched: list[int] = []  # layers whose map rows are the new map's
        self._per_step = 0
        self._stats = RolloutMigrationStats()
        self._started = False

    @property
    def plan(self) -> Any:
        """The plan being applied (``None`` between rollouts)."""
        return self._plan

    def begin(self, step: int, plan: Any, settings: Any) -> None:
        self._plan = plan
        self._old = self.view.host_phy2log()
        self._new = np.array(plan.phy2log, dtype=np.int64)  # a writable copy
        self._transfers = plan_transfers(self._old, self._new, self.num_ranks, self.num_nodes)
        self._todo = list(self._transfers.changed_layers)
        self._moved, self._switched = [], []
        self._per_step = int(getattr(settings, "layers_per_step", 0) or 0)
        self._stats = RolloutMigrationStats()
        self._started = False

    def advance(self, step: int) -> bool:
        assert self._plan is not None and self._transfers is not None, "advance() before begin()"
        plan, transfers = self._plan, self._transfers
        # One capture per step, before this step's map update: a delta never spans two updates.
        self.snapshotter.capture(step)
        if not self._started:
            self._started = True  # the capture above cut the old version's counts
            if self.pause_counting and self._per_step and len(self._todo) > self._per_step:
                self.recorder.enabled(False)
        count = self._per_step or len(self._todo)
        batch, self._todo = self._todo[:count], self._todo[count:]
        report = self.weights.migrate(transfers, self.group, layers=batch,
                                      timeout_s=self.timeout_s, stop_on_error=True,
                                      fault=self.fault)
        self._account(report)
        self._moved.extend(report.applied_layers)
        if report.failed:
            layer = min(report.errors or report.failed)
            error = report.errors.get(layer) or MigrationError(
                layer, "transfer", None, report.failed[layer]
            )
            self._rollback()
            raise error
        if self._todo:
            if report.applied_layers:
                self.view.update_layers_(list(report.applied_layers), self._new)
                self._switched.extend(report.applied_layers)
            return False
        if not self.recorder.is_enabled:
            self.recorder.enabled(True)
        self.view.update_(self._new, plan.version)  # every layer's weights are in place
        self.last_stats = self._stats
        self._plan = None
        return True

    def _account(self, report: MigrationReport) -> None:
        s = self._stats
        self._stats = RolloutMigrationStats(
            bytes_moved=s.bytes_moved + report.bytes_received,
            transfers=s.transfers + report.transfers_received,
            local_copies=s.local_copies + report.local_copies,
            total_pause_ms=s.total_pause_ms + report.wall_seconds * 1e3,
            max_layer_ms=max(s.max_layer_ms, report.max_layer_seconds * 1e3),
            max_step_pause_ms=max(s.max_step_pause_ms, report.wall_seconds * 1e3),
            steps=s.steps + 1,
            rolled_back=s.rolled_back,
        )

    def _rollback(self) -> None:
        """Move every layer whose weights moved in this rollout back to the old experts and
        restore the map rows of those already switched (every rank alike)."""
        if not self.recorder.is_enabled:
            self.recorder.enabled(True)
        moved, switched = self._moved, set(self._switched)
        self._moved, self._switched, self._todo = [], [], []
        self._plan = None
        self.last_stats = self._stats
        if not moved:
            return
        # Weights of `moved` hold the new map's experts: plan from there back to the old map.
        current = self._old.copy()
        current[moved] = self._new[moved]
        back = plan_transfers(current, self._old, self.num_ranks, self.num_nodes)
        report = self.weights.migrate(back, self.group, layers=moved, timeout_s=self.timeout_s,
                                      stop_on_error=True)
        restore = [layer for layer in report.applied_layers if layer in switched]
        if restore:
            self.view.update_layers_(restore, self._old)
        self._stats = RolloutMigrationStats(**{
            **self._stats.__dict__, "rolled_back": len(report.applied_layers)
        })
        self.last_stats = self._stats
        if report.failed:
            stuck = sorted(set(moved) - set(report.applied_layers))
            unswitched = [layer for layer in stuck if layer not in switched]
            if unswitched:  # new weights under the old map rows: switch those rows forward
                self.view.update_layers_(unswitched, self._new)
            raise MigrationError(
                min(report.failed), "rollback", None,
                f"moving layers {moved} back failed ({report.failed}); the process group is "
                f"probably broken. Layers {stuck} keep the new map and weights",
            )
