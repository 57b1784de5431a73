"""Expert weight migration between ranks, in place (DESIGN.md invariant 6).

The engine registers, per MoE layer, the tensors that hold its expert weights on this rank —
each ``[S, ...]`` (one row per local slot), any dtype, several per layer (w1/w2/w3, scales) —
in an :class:`ExpertWeights`. Given the layer's :class:`~worker_agent.transfers.LayerTransfers`
(the same on every rank), :meth:`ExpertWeights.migrate_layer` moves the weights so that the
rank's slots hold the new map's experts, copying into the registered tensors in place: their
``data_ptr`` never changes (CUDA graphs and the engine's references stay valid).

Protocol (every rank makes the same calls with the same layers and plan; every collective below
is made by every rank, unconditionally; :meth:`ExpertWeights.migrate_layer` is the one-layer
case of :meth:`ExpertWeights.migrate`)::

    1. prepare (local): check each layer's plan against the registry.
    2. ONE pre-flight all-reduce MIN of [ok, rank-if-failed, plan digest, -digest, layout,
       -layout] per layer: every rank learns, per layer, whether every rank is ready and holds
       the same plan and tensor layout; a layer that is not is refused before any byte moves.
       (``preflight=False`` skips it for layers that :meth:`ExpertWeights.preflight` already
       verified: :class:`MigratingSwitcher` verifies a rollout's layers once, at its start.)
    3. the ready layers are cut into groups of about ``group_bytes`` received bytes (from the
       plan and the checked layouts only: the same groups on every rank). Per group:
       stage local copies whose source slot is overwritten into the group's staging buffer;
       pack every expert sent to a peer into that peer's send region (one contiguous region
       per peer, laid out identically by the receiver, see :class:`_Layout`); post ONE send
       and ONE receive per peer in one torch.distributed.batch_isend_irecv (receives land in
       the staging buffer). One large message per peer is what the transport is fastest at:
       one op per expert tensor costs NCCL a fixed overhead each.
    4. wait (on gloo bounded by ``timeout_s``; on NCCL stream-ordered, the host does not
       wait), then start the status all-reduce MIN of [ok, rank-if-failed] per layer of the
       group (on NCCL: device tensors, one D2H).
    5. once the next ``groups_in_flight`` groups are posted (on CPU one), this group's status
       is read (on NCCL this is where ``timeout_s`` bounds the wait): every layer whose entry
       says every rank received it is committed (copied into the registered tensors in place,
       on CUDA on a copy stream, overlapping later groups' transfers); a failed layer is not.

**Failure guarantee.** The registered tensors of a layer are written only in step 5, after the
status all-reduce reported that every rank's receives for that layer completed. A failure anywhere
(a rank not ready, a plan or layout mismatch, a transfer error, a timeout, the ``fault`` hook
raising) makes every rank raise :class:`MigrationError` with that layer's weights untouched on
every rank, so the caller keeps routing that layer with the old map. A rank commits a layer only
when the status all-reduce *returned* "every rank ok" for it, so data is never read from a
half-received buffer. The one case outside the "all ranks alike" part: the group breaking during
the status all-reduce itself (a peer dies; or a timed-out transfer closed the connection — gloo
closes the pair, NCCL's watchdog aborts the communicator). Ranks that see the error raise (phase
``"status"``) without writing; a rank whose all-reduce had already returned "ok" commits. The group
is then unusable for serving anyway (every forward step needs it) and must be rebuilt. On NCCL,
"receives completed" is established by stream order: each rank's status all-reduce runs after its
receives on the device, so a result read on the host proves every rank's receives completed (the
stream is synchronized on the host only when a ``received`` hook must run).

Stats per layer (:class:`LayerMigrationStats`): transfers sent/received, local copies, bytes
sent/received/staged, seconds and transfer seconds (its group's, shared equally by its layers).

:class:`MigratingSwitcher` plugs this into the in-band agreement (``worker_agent.agreement``'s
``Switcher`` protocol): it migrates ``layers_per_step`` layers per step, switches each layer's
map rows right after its weights are in place, and rolls switched layers back on a failure.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from worker_agent.bytecopy import ByteCopier, CopyProgram, CopyRange
from worker_agent.transfers import LayerTransfers, TransferPlan, plan_transfers

__all__ = [
    "COPY_SHARE",
    "ExpertWeights",
    "LayerMigrationStats",
    "MigratingSwitcher",
    "MigrationError",
    "MigrationReport",
    "PhaseTracer",
    "Preparation",
    "RolloutMigrationStats",
    "migration_group",
]

#: ``tracer(phase)``: called by :class:`ExpertWeights` at each phase boundary of a migration
#: (``"start"``, ``"prepared"``, ``"preflight"``, per group ``"packed"``, ``"posted"``,
#: ``"status posted"``, ``"status read"``, ``"commit issued"``, and ``"done"``). Benchmarks
#: time the phases with it; it must not call into the migration.
PhaseTracer = Callable[[str], None]

#: Phases a fault hook is called in: before this rank posts its transfers ("post"), and after
#: they completed, before the status exchange ("received").
FaultHook = Callable[[str], None]

#: Share of the SMs a pack or commit copy beside a transfer may use (``copy_programs="auto"``).
COPY_SHARE = 3 / 8

_ALIGN = 256  # bytes; staging regions start at aligned offsets
_MIN_GROUP = 64 << 20  # bytes received per group (``migrate``'s default group size bounds)
_MAX_GROUP = 512 << 20


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
        seconds: its group's time on this rank (posting to commit issued), split equally over
            the group's layers (the whole call for ``migrate_layer``).
        transfer_seconds: its group's posting to completion, split likewise.
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
    def slots_written(self) -> int:
        return sum(s.slots_written for s in self.applied)

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
    flat: torch.Tensor  # [S * row_bytes] uint8 view of ``tensor`` (same storage)
    row_bytes: int


def migration_group(group: Any = None) -> Any:
    """A process group over the ranks of ``group`` (default: the world) for weight migration.

    On NCCL: a new communicator whose stream has high priority, so that the GPU schedules the
    transfer kernels' blocks ahead of the pack and commit copies queued beside them (with
    capped copies, ``copy_programs``, a 58-layer rebalance on 2 x H200 took 14.9-15.0 ms
    against 17.3 ms on the engine's group; decision 0011, session 4). It costs one more NCCL
    communicator (its buffers and channels). Other backends: ``group`` itself.

    Collective over ``group``'s ranks only (``use_local_synchronization``): every one of them
    calls it once, at set-up, and passes the result as ``group`` to :meth:`ExpertWeights.migrate`
    or :class:`MigratingSwitcher`.
    """
    if group is None:
        group = dist.group.WORLD
    if dist.get_backend(group) != "nccl":
        return group
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = True
    return dist.new_group(
        dist.get_process_group_ranks(group),
        backend="nccl",
        pg_options=options,
        use_local_synchronization=True,
        group_desc="eplb_migration",
    )


def _byte_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``[S, ...]`` contiguous tensor -> ``[S, row_bytes]`` uint8 view of the same memory."""
    return tensor.reshape(tensor.shape[0], -1).view(torch.uint8)


class ExpertWeights:
    """Registry of one rank's expert weight tensors, per layer, and their migration.

    Args:
        slots_per_rank: ``S``, the leading dimension of every registered tensor.
        tracer: called at each phase boundary of a migration (see :data:`PhaseTracer`); for
            profiling, ``None`` in production.
        side_stream_packing: on CUDA, when a call moves several groups, stage and pack each
            group on a side stream so that it overlaps the previous group's transfers
            (``False``, or a one-group call: on the caller's stream).
        batched_copies: on CUDA with Triton, run a group's staging, packing and commit copies
            as one kernel launch each (:mod:`worker_agent.bytecopy`); ``False``: one
            ``copy_`` per range.
        groups_in_flight: on CUDA, groups of layers queued on the GPU while the host reads the
            oldest one's status and issues its commit (at least 1; on CPU, gloo, always 1).
            More gives the GPU a queued transfer while the host works, for one more staging
            buffer of up to 512 MiB each; on 2 x H200 2 measured the same as 1 (the host's
            work per group, not the queue, sets the pace), so the default is 1. Every rank
            must use the same value (after a failure in stop mode, the groups already posted
            are the ones every rank lets finish).
        copy_programs: on CUDA, the most programs of a pack or commit copy that runs beside
            another group's transfers (a capped grid loops over the chunks; see
            :mod:`worker_agent.bytecopy`), so that it takes a bounded share of the GPU instead
            of bursting over every SM; ``"auto"``: ``COPY_SHARE`` of the device's SMs (49 of
            132); ``None``: uncapped. Copies with nothing to hide behind (the first pack, the
            last commit) are never capped. Measured on the 58-layer rebalance, 2 x H200, with
            :func:`migration_group`'s high-priority stream: 33 or 48 programs 14.9-15.0 ms, 66
            15.5-15.8, 16 18.0-19.6, uncapped 17.2-18.1; on the engine's own group the cap
            alone measured within run-to-run spread (decision 0011, session 4).
        ramp_groups: ``N``: the first ``N`` and the last ``N`` groups of a call are smaller
            (budgets ``1/2**N, ..., 1/4, 1/2`` of the group size at each end, at least one
            layer each), so that the first pack and the last commit, which nothing hides, are
            short; 0: equal groups. Every rank must use the same value (the groups must match;
            the pre-flight checks it).

    Register with :meth:`register` / :meth:`register_layer`; migrate with
    :meth:`migrate_layer` (one layer) or :meth:`migrate` (many). Calls to the ``migrate*``
    methods are collective over the EP group: every rank makes the same calls in the same order.
    """

    def __init__(self, slots_per_rank: int, *, tracer: PhaseTracer | None = None,
                 side_stream_packing: bool = True, batched_copies: bool = True,
                 groups_in_flight: int = 1,
                 copy_programs: int | Literal["auto"] | None = "auto",
                 ramp_groups: int = 1) -> None:
        if slots_per_rank < 1:
            raise ValueError(f"slots_per_rank must be >= 1, got {slots_per_rank}")
        self.slots_per_rank = int(slots_per_rank)
        self.tracer = tracer
        self.side_stream_packing = side_stream_packing
        if groups_in_flight < 1:
            raise ValueError(f"groups_in_flight must be >= 1, got {groups_in_flight}")
        self.groups_in_flight = int(groups_in_flight)
        if copy_programs != "auto" and copy_programs is not None and (
            not isinstance(copy_programs, int) or copy_programs < 1
        ):
            raise ValueError(f"copy_programs must be 'auto', None or an int >= 1, got "
                             f"{copy_programs!r}")
        self.copy_programs = copy_programs
        if not isinstance(ramp_groups, int) or not 0 <= ramp_groups <= 8:
            raise ValueError(f"ramp_groups must be an int in [0, 8], got {ramp_groups!r}")
        self.ramp_groups = ramp_groups
        self._copier = ByteCopier(batched=batched_copies)
        self._layers: dict[int, dict[str, _Entry]] = {}
        self._digests: dict[int, int] = {}  # layer -> layout digest (until re-registered)
        # layer -> (transfers, work) that the last pre-flight verified, used once by the next
        # migration of that layer with the same transfers object (not prepared again)
        self._verified: dict[int, tuple[LayerTransfers, _LayerWork]] = {}
        # Staging buffers used in turn by consecutive groups of layers (one more than the
        # groups in flight), so that a group's commit (on the CUDA copy stream) overlaps later
        # groups' transfers; ``_released[b]`` is the CUDA event after which buffer ``b`` is no
        # longer read by a commit.
        self._staging: list[torch.Tensor | None] = [None] * (self.groups_in_flight + 1)
        self._released: list[Any] = [None] * (self.groups_in_flight + 1)
        self._committed: dict[int, Any] = {}  # layer -> CUDA event after its last commit
        self._copy_stream: Any = None
        self._pack_stream: Any = None  # stages and packs a group while the previous transfers
        self._entry: Any = None  # CUDA event: the caller's stream when this call began
        self._overlap = False  # this call packs on the side stream
        self._calls = 0  # layers attempted so far: the same on every rank (P2P tags)
        self._comms: dict[int | None, _Comm] = {}  # per process group (vote buffers)
        # Calls laid out ahead by the last prepare(): layers -> their groups, buffers, copies
        self._prepared: dict[tuple[int, ...], _Prepared] = {}
        self._preparation: Preparation | None = None  # the last prepare()'s pre-flight
        self._runs = 0  # migration calls so far (a call's pre-packed group is stale after one)

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
        entries[name] = _Entry(name, tensor, rows.view(-1), int(rows.shape[1]))
        self._digests.pop(layer, None)
        self._verified.pop(layer, None)

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
        digest = self._digests.get(layer)
        if digest is None:
            digest = self._digests[layer] = self._compute_layout_digest(layer)
        return digest

    def _compute_layout_digest(self, layer: int) -> int:
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
        group_bytes: int | None = None,
        preflight: bool = True,
    ) -> MigrationReport:
        """Migrate several layers (default: every layer of ``plan`` that changes), pipelined.

        One pre-flight all-reduce covers every layer; the layers then move in groups of about
        ``group_bytes`` received bytes (default: a quarter of the call's bytes, clamped to
        64-512 MiB; the same groups on every rank): per group, one packed send and one receive
        per peer in one ``batch_isend_irecv`` and one status all-reduce, and group ``g``'s
        commit overlaps group ``g + 1``'s transfers. Each layer keeps its own outcome: a layer
        that fails is left untouched on every rank and recorded in ``failed``; the others are
        applied, unless ``stop_on_error`` or the group broke (phase ``"status"``), which stops
        at that layer (the layers after it are reported failed as not attempted, and never
        written). The outcome is the same on every rank. ``fault(layer, phase)`` is called per
        layer as :meth:`migrate_layer` describes.

        ``preflight=False`` skips the pre-flight all-reduce. Only pass it for layers that
        :meth:`preflight` already verified with the same plan on every rank (as
        :class:`MigratingSwitcher` does once per rollout): a rank whose layer cannot be
        prepared then posts nothing and its peers' transfers time out.

        The call returns after every commit finished (``wall_seconds`` covers it all).
        """
        start = time.perf_counter()
        todo = list(plan.changed_layers if layers is None else layers)
        items = [(layer, plan[layer], None if fault is None else _bind(fault, layer))
                 for layer in todo]
        applied, errors, skipped = self._run(items, group, timeout_s, stop_on_error, group_bytes,
                                             preflight)
        self.wait_commits(host=True)
        self._trace("done")
        failed: dict[int, str] = {layer: str(exc) for layer, exc in errors.items()}
        for layer, first in skipped:
            failed[layer] = f"not attempted: layer {first} failed first"
        return MigrationReport(tuple(applied), failed, time.perf_counter() - start, errors)

    def preflight(
        self, plan: TransferPlan, group: Any = None, *, layers: Iterable[int] | None = None
    ) -> dict[int, MigrationError]:
        """Check, with one all-reduce (collective over ``group``), that every rank can migrate
        ``layers`` (default: every changed layer of ``plan``) with the same plan and the same
        registered tensor layouts. Returns layer -> error for the layers that cannot (the same
        on every rank); nothing moves. After an empty result the caller may migrate these
        layers with ``preflight=False``; they are then not prepared again. Unlike
        :meth:`prepare`, nothing is laid out ahead: the migration lays each group out while
        the previous one moves, which is faster when both run in one step.
        """
        return self.prepare(plan, group, layers=layers, calls=[]).errors()

    def prepare(
        self,
        plan: TransferPlan,
        group: Any = None,
        *,
        layers: Iterable[int] | None = None,
        calls: Sequence[Sequence[int]] | None = None,
        group_bytes: int | None = None,
        ahead_groups: int | None = 1,
    ) -> Preparation:
        """Start the pre-flight of ``layers`` (default: every changed layer of ``plan``) and
        lay out, ahead of time, the migration calls that will move them (collective over
        ``group``: every rank calls it with the same arguments).

        ``calls`` lists the ``layers`` argument of each later :meth:`migrate` call (disjoint
        subsets of ``layers``; default: one call of every layer; ``[]``: none, the pre-flight
        only, as :meth:`preflight`) and ``group_bytes`` the value those calls pass. For each
        call this does now the host work that a migration cannot hide: each layer's
        transfers, the groups, the staging layouts and buffers, and the copies of the first
        ``ahead_groups`` groups (``None``: all) with their tables uploaded to the device; and
        it queues the first call's first pack. A matching :meth:`migrate` then posts its first
        transfers at once; the copies of later groups are built while earlier groups move,
        hidden behind their transfers (building them all here gave the same migration step
        and a 0.9-2.3 ms longer preparation on 2 x H200, 58 layers). A call matches when it
        moves the same layers of the same ``plan`` object with the same ``group_bytes``; if
        another migration ran in between, its first group is packed again; if one of its
        layers was re-registered, it lays out on the fly, as without ``prepare``. Only the
        last ``prepare``'s calls are kept.

        The pre-flight all-reduce is posted, not waited for: :meth:`Preparation.errors` reads
        it (do that before migrating with ``preflight=False``). So a rollout can prepare at
        one step, while the engine's forward runs on the device, and migrate at the next
        (:class:`MigratingSwitcher` does).
        """
        if ahead_groups is not None and (not isinstance(ahead_groups, int) or ahead_groups < 1):
            raise ValueError(f"ahead_groups must be an int >= 1 or None, got {ahead_groups!r}")
        comm = self._comm(group)
        todo = list(plan.changed_layers if layers is None else layers)
        parts = [list(todo)] if calls is None else [list(c) for c in calls]
        seen: set[int] = set()
        for part in parts:
            for layer in part:
                if layer in seen or layer not in todo:
                    raise ValueError(
                        f"calls: layer {layer} is in two calls or not in layers; calls must "
                        f"be disjoint subsets of layers {todo}"
                    )
                seen.add(layer)
        items: list[tuple[int, Any, FaultHook | None]] = [(layer, plan[layer], None)
                                                          for layer in todo]
        works, reasons = self._prepare_all(items, comm)
        try:
            status: _Status | None = self._post_votes(items, works, comm)
            post_error = None
        except Exception as exc:
            status, post_error = None, str(exc)
        # The prepared layers' works, for the migrations that follow (not prepared again).
        self._verified = {layer: (transfers, work)
                          for (layer, transfers, _), work in zip(items, works, strict=True)
                          if work is not None}
        self._preparation = Preparation(items, reasons, status, post_error)
        self._prepared = {}
        by_layer = dict(zip(todo, works, strict=True))
        for n, part in enumerate(parts):
            part_works = [by_layer[layer] for layer in part]
            if not part or any(w is None for w in part_works):
                continue  # a layer this rank cannot prepare: that call lays out on the fly
            try:
                self._prepared[tuple(part)] = self._lay_out_ahead(
                    plan, [w for w in part_works if w is not None], comm, group_bytes,
                    pack=n == 0, compiled=ahead_groups)
            except Exception:  # e.g. out of memory: that call lays out on the fly (and fails)
                self._prepared.pop(tuple(part), None)
        return self._preparation

    def migrate_layer(
        self,
        layer: int,
        transfers: LayerTransfers,
        group: Any = None,
        *,
        timeout_s: float | None = None,
        fault: FaultHook | None = None,
        synchronize: bool = True,
        preflight: bool = True,
    ) -> LayerMigrationStats:
        """Move ``layer``'s expert weights as ``transfers`` says; collective over ``group``.

        Args:
            layer: the layer (its tensors must be registered).
            transfers: the layer's transfer list (``plan[layer]``), the same on every rank.
            group: the EP process group (rank ``r`` of the group is EP rank ``r``); ``None``:
                the default group. Without ``torch.distributed`` initialized, a 1-rank group.
            timeout_s: bound on waiting for this rank's transfers (``None``: the group's
                timeout). On gloo a timeout counts as a transfer failure; on NCCL it is a
                ``"status"`` failure, since the transfers and the status all-reduce behind them
                are one wait there. Either usually breaks the group.
            fault: called with ``"post"`` before this rank posts its transfers (raising: the
                rank posts nothing, its peers' transfers fail or time out) and with
                ``"received"`` after they completed (on CUDA the stream is synchronized first);
                an exception from it is a transfer failure on this rank (tests inject failures
                with it; an engine may verify bytes).
            synchronize: on CUDA, wait for the weight copies before returning (the stats then
                time the whole move). With ``False`` the copies are left running on the copy
                stream; call :meth:`wait_commits` before the engine routes with the new map.
            preflight: run the pre-flight all-reduce (see :meth:`migrate`).

        Returns this rank's :class:`LayerMigrationStats`. Raises :class:`MigrationError` on
        every rank, with the layer's weights untouched on every rank, if it failed anywhere.
        """
        applied, errors, _ = self._run([(layer, transfers, fault)], group, timeout_s, True, None,
                                       preflight)
        if synchronize:
            self.wait_commits(host=True)
            self._trace("done")
        if errors:
            raise errors[layer]
        return applied[0]

    def _comm(self, group: Any) -> _Comm:
        """The group's :class:`_Comm`, kept so that its vote buffers are allocated once."""
        key = id(group) if group is not None else None
        comm = self._comms.get(key)
        if comm is None or comm.group is not group or not comm.alive():
            comm = _Comm(group)
            self._comms[key] = comm
        return comm

    def _prepare_all(
        self, items: list[tuple[int, Any, FaultHook | None]], comm: _Comm
    ) -> tuple[list[_LayerWork | None], list[str | None]]:
        """Prepare every item (rank-local): its work, or ``None`` and the reason it failed.
        Each item takes the next P2P tag (``_calls`` advances alike on every rank)."""
        works: list[_LayerWork | None] = []
        reasons: list[str | None] = []
        # A layer's previous commit may still run on the copy stream: what is staged and sent
        # must read its result. Layers of one group share one event: wait once per event.
        pending = {id(e): e for layer, _, _ in items if (e := self._committed.get(layer))}
        if pending and self._copy_stream is not None:
            stream = torch.cuda.current_stream(self._copy_stream.device)
            for event in pending.values():
                stream.wait_event(event)
        for layer, transfers, _ in items:
            self._calls += 1
            tag = self._calls % (1 << 20)
            work = self._reusable(layer, transfers, comm)
            self._verified.pop(layer, None)
            if work is not None:
                work.tag = tag
                works.append(work)  # what the pre-flight prepared
                reasons.append(None)
                continue
            try:
                works.append(self._prepare(layer, transfers, comm.rank, comm.world, tag))
                reasons.append(None)
            except Exception as exc:
                works.append(None)
                reasons.append(f"{type(exc).__name__}: {exc}")
        return works, reasons

    def _vote_ready(
        self,
        items: list[tuple[int, Any, FaultHook | None]],
        works: list[_LayerWork | None],
        reasons: list[str | None],
        comm: _Comm,
        stop_on_error: bool,
    ) -> tuple[dict[int, MigrationError], int]:
        """The pre-flight all-reduce (:meth:`_post_votes`), read at once: see
        :func:`_vote_errors`."""
        if not items:
            return {}, 0
        try:
            status = self._post_votes(items, works, comm)
        except Exception as exc:
            return _vote_errors(items, reasons, None, str(exc), stop_on_error)
        return _vote_errors(items, reasons, status, None, stop_on_error)

    def _post_votes(self, items: list[tuple[int, Any, FaultHook | None]],
                    works: list[_LayerWork | None], comm: _Comm) -> _Status:
        """Start the pre-flight all-reduce MIN of ``[ok, rank-if-failed, digest, -digest,
        layout, -layout]`` per item, then ``[settings, -settings]``."""
        votes: list[int] = []
        for (layer, transfers, _), work in zip(items, works, strict=True):
            digest = transfers.digest if isinstance(transfers, LayerTransfers) else 0
            layout = self._layout_digest(layer)
            ok = int(work is not None)
            votes += [ok, comm.rank if not ok else comm.world, digest, -digest, layout, -layout]
        # the call's settings: they decide the groups every rank posts
        settings = self._settings_digest()
        votes += [settings, -settings]
        return comm.allreduce_min(votes)

    def _run(
        self,
        items: list[tuple[int, Any, FaultHook | None]],
        group: Any,
        timeout_s: float | None,
        stop_on_error: bool,
        group_bytes: int | None,
        preflight: bool,
    ) -> tuple[list[LayerMigrationStats], dict[int, MigrationError], list[tuple[int, int]]]:
        """The protocol for ``items`` (layer, transfers, hook) in order; see the module doc.

        Returns (applied stats in order, layer -> error, [(layer not attempted, first failed)]).
        Every branch below depends only on all-reduce results (shared by every rank) and on
        the plan (the same everywhere, checked by digest), never on rank-local state. (Whether
        this rank laid the call out ahead, :meth:`prepare`, changes only its host work: the
        groups, and so the collectives, are the same either way.)
        """
        self._trace("start")
        comm = self._comm(group)
        skipped: list[tuple[int, int]] = []
        ahead = self._take_prepared(items, comm, group_bytes)
        runs, self._runs = self._runs, self._runs + 1

        # 1. prepare (rank-local; errors are reported through the pre-flight all-reduce).
        works, reasons = self._prepare_all(items, comm)

        # 2. one pre-flight all-reduce for every layer (unless the caller verified them: then
        # the verdict of the prepare() that verified them, if it covers these layers).
        self._trace("prepared")
        verdict = None if preflight else self._prepared_verdict(items, stop_on_error)
        if preflight or verdict is not None:
            if verdict is None:
                verdict = self._vote_ready(items, works, reasons, comm, stop_on_error)
            errors, stop_at = verdict
            self._trace("preflight")
            if any(e.phase == "status" for e in errors.values()):  # the exchange broke
                skipped += [(layer, items[0][0]) for layer, _, _ in items[1:]]
                return [], errors, skipped
        else:
            errors, stop_at = {}, len(items)
        ready = [i for i in range(stop_at) if items[i][0] not in errors]
        if not preflight and any(works[i] is None for i in ready):
            # The caller promised verified layers; this rank cannot take part. It posts nothing
            # (its peers' transfers fail or time out) and fails every layer of the call.
            for i in ready:
                errors[items[i][0]] = MigrationError(items[i][0], "transfer", comm.rank,
                                                     reasons[i] or "not prepared")
            ready = []

        # 3.-6. per group: stage + pack + post, wait + status all-reduce, commit (pipelined).
        plans: list[_GroupPlan | None]
        if ahead is not None and len(ready) == len(items):
            # the same cut as _groups() would make now (same plan, layers and group_bytes)
            groups = [p.indices for p in ahead.groups]
            plans = list(ahead.groups)
            if ahead.packed_at != runs:  # another call used the buffer since: pack again
                ahead.groups[0].packed = False
        else:
            groups = self._groups(ready, items, comm.world, group_bytes)
            plans = [None] * len(groups)
        first = works[groups[0][0]] if groups else None
        cuda = first is not None and first.device.type == "cuda"
        depth = self.groups_in_flight if cuda else 1
        # Packing on the side stream pays (~40 us of host time per group) only when there is
        # a previous group's transfer to overlap. It starts after what the caller queued so
        # far, including the waits on earlier commits of these layers (see _pack).
        self._overlap = self.side_stream_packing and len(groups) > 1 and cuda
        if self._overlap:
            assert first is not None
            self._entry = torch.cuda.current_stream(first.device).record_event()
        # Groups in flight: on CUDA the host reads group g's status while groups g + 1 ..
        # g + depth are queued on the GPU, so the host work of a group (its commit, the next
        # pack and post) hides behind the queued transfers. On CPU (gloo) one: the commit, a
        # memcpy on this thread, overlaps the next group's transfer, which gloo runs in the
        # background.
        pending: deque[_Group] = deque()
        done: dict[int, LayerMigrationStats] = {}
        stop_all = False
        for g, indices in enumerate(groups):
            # staging buffers rotate over depth + 1: the groups in flight and the one committing
            plan = plans[g] or self._lay_out(indices, works, g % (depth + 1))
            # a copy issued while an earlier group's transfers run is capped (copy_programs)
            batch = self._post(plan, items, comm, beside=bool(pending))
            if len(pending) == depth:
                stop_all = self._finish(pending.popleft(), items, errors, done, stop_on_error,
                                        timeout_s, beside=True)
                if stop_all:
                    for later in (*pending, batch):
                        self._abandon(later, timeout_s, comm)
                    break
            self._complete(batch, items, comm, timeout_s)
            pending.append(batch)
        while pending and not stop_all:
            oldest = pending.popleft()
            stop_all = self._finish(oldest, items, errors, done, stop_on_error, timeout_s,
                                    beside=bool(pending))
            if stop_all:
                for later in pending:
                    self._abandon(later, timeout_s, comm)

        applied: list[LayerMigrationStats] = []
        halt: int | None = None  # the error that stopped the call
        for i, (layer, _, _) in enumerate(items):
            stats = done.pop(i, None)
            if stats is not None:
                applied.append(stats)
            elif layer in errors and halt is None:
                if stop_on_error or errors[layer].phase == "status":
                    halt = i
            else:
                errors.pop(layer, None)
                skipped.append((layer, items[halt][0] if halt is not None else layer))
        return applied, errors, skipped

    def _take_prepared(self, items: list[tuple[int, Any, FaultHook | None]], comm: _Comm,
                       group_bytes: int | None) -> _Prepared | None:
        """The call :meth:`prepare` laid out for ``items``, if it still holds (used once)."""
        prepared = self._prepared.pop(tuple(layer for layer, _, _ in items), None)
        if prepared is None or prepared.group_bytes != group_bytes:
            return None
        for (layer, transfers, _), work in zip(items, prepared.works, strict=True):
            if self._reusable(layer, transfers, comm) is not work:
                return None  # re-registered or re-prepared since
        return prepared

    def _reusable(self, layer: int, transfers: Any, comm: _Comm) -> _LayerWork | None:
        """The work the last :meth:`prepare` made for ``layer``, if it still applies: the
        same ``transfers`` object, the same group, the layer not registered again since."""
        known, work = self._verified.get(layer, (None, None))
        if (work is not None and known is transfers and work.world == comm.world
                and work.base == comm.rank * self.slots_per_rank):
            return work
        return None

    def _prepared_verdict(
        self, items: list[tuple[int, Any, FaultHook | None]], stop_on_error: bool
    ) -> tuple[dict[int, MigrationError], int] | None:
        """The last :meth:`prepare`'s pre-flight verdict on ``items`` (read now if it was not),
        or ``None`` if it did not cover them with the same plan. Every rank made the same
        ``prepare`` and migration calls, so every rank takes the same branch here."""
        prep = self._preparation
        if prep is None or not prep.covers(items):
            return None
        found = prep.errors()
        broken = [e for e in found.values() if e.phase == "status"]
        if broken:  # the pre-flight exchange broke: fail the call's first layer likewise
            first = items[0][0]
            return {first: MigrationError(first, "status", None, broken[0].reason)}, 0
        errors: dict[int, MigrationError] = {}
        for i, (layer, _, _) in enumerate(items):
            if layer in found:
                errors[layer] = found[layer]
                if stop_on_error:
                    return errors, i
        return errors, len(items)

    def _groups(self, indices: list[int], items: list[Any], world: int,
                group_bytes: int | None) -> list[list[int]]:
        """Cut ``indices`` into consecutive groups of about ``group_bytes`` received bytes,
        from plan data and verified layouts only (the same groups on every rank).

        With ``ramp_groups = N``, the first and the last ``N`` groups are smaller: budgets of
        ``1/2**N, ..., 1/2`` of the target at each end (at least one layer each).
        The first group's pack and the last group's commit have nothing to hide behind, so a
        small group at each end shortens the call by most of a full group's pack and commit.
        """
        if not indices:
            return []
        sizes = []
        for i in indices:
            lt: LayerTransfers = items[i][1]
            per_rank = [0] * world
            for t in lt.transfers:
                per_rank[t.dst_rank] += 1
            for c in lt.local_copies:
                if c.staged:
                    per_rank[c.rank] += 1
            sizes.append(max(per_rank) * self.expert_bytes(items[i][0]))
        target = group_bytes
        if target is None:
            target = min(max(sum(sizes) // 4, _MIN_GROUP), _MAX_GROUP)
        ramp = [target >> k for k in range(self.ramp_groups, 0, -1)]
        return _cut(indices, sizes, target, ramp)

    def _lay_out(self, indices: list[int], works: Sequence[_LayerWork | None],
                 buffer: int) -> _GroupPlan:
        """The staging layout of the group of ``indices`` (staging buffer ``buffer``)."""
        group = [w for i in indices if (w := works[i]) is not None]
        layout = _Layout(group)
        return _GroupPlan(indices, group, buffer, layout.receives, layout.sends, layout.total)

    def _lay_out_ahead(self, plan: TransferPlan, works: list[_LayerWork], comm: _Comm,
                       group_bytes: int | None, pack: bool,
                       compiled: int | None = 1) -> _Prepared:
        """A later call's host work, done now (see :meth:`prepare`): its groups, their staging
        layouts and buffers, and the copies of its first ``compiled`` groups (``None``: all),
        compiled; with ``pack``, the first group's pack queued on the current stream."""
        items: list[Any] = [(w.layer, plan[w.layer], None) for w in works]
        groups = self._groups(list(range(len(works))), items, comm.world, group_bytes)
        device = works[0].device
        depth = self.groups_in_flight if device.type == "cuda" else 1
        plans = [self._lay_out(indices, works, g % (depth + 1))
                 for g, indices in enumerate(groups)]
        for b in range(depth + 1):  # one buffer per index, as large as its largest group
            need = max((p.total for p in plans if p.buffer == b), default=0)
            if need:
                self._staging_buffer(b, need, device)
        for p in plans:
            p.buf = self._staging[p.buffer] if p.total else None
        ahead = plans if compiled is None else plans[:compiled]
        batches: list[list[CopyRange]] = []
        for p in ahead:
            ranges = p.pack_ranges()
            p.build_commits()
            assert p.commits is not None
            batches += [ranges, [r for c in p.commits for r in c]]
        programs = self._copier.compile(batches)
        for n, p in enumerate(ahead):
            p.pack, p.commit = programs[2 * n], programs[2 * n + 1]
        if pack and ahead:
            # On the current stream, which prepare() already ordered after these layers' last
            # commits (_prepare_all) and _staging_buffer() after the buffer's last reader.
            first = plans[0]
            assert isinstance(first.pack, CopyProgram)
            self._copier.launch(first.pack)
            first.packed = True
        return _Prepared(works, group_bytes, plans, self._runs)

    def _post(self, plan: _GroupPlan, items: list[Any], comm: _Comm,
              beside: bool = False) -> _Group:
        """Stage local copies and pack the sends into the group's staging buffer (unless
        :meth:`prepare` did), post one receive and one send per peer (see :class:`_Layout`)."""
        start = time.perf_counter()
        batch = _Group(plan, start)
        device = plan.works[0].device
        try:
            if plan.total:
                if plan.buf is None:
                    plan.buf = self._staging_buffer(plan.buffer, plan.total, device)
                else:
                    self._wait_released(plan.buffer, device)
                if not plan.packed:
                    self._pack(plan, beside)
            self._trace("packed")
            for i in plan.indices:
                hook = items[i][2]
                if hook is not None:
                    hook("post")
            ops: list[Any] = []
            tag = plan.works[0].tag
            if batch.buf is not None:
                for peer, lo, hi in plan.receives:
                    ops.append(comm.op(dist.irecv, batch.buf[lo:hi], peer, tag))
                for peer, lo, hi in plan.sends:
                    ops.append(comm.op(dist.isend, batch.buf[lo:hi], peer, tag))
            batch.handles = comm.post(ops)
            self._trace("posted")
        except Exception as exc:
            batch.error = f"{type(exc).__name__}: {exc}"
        return batch

    def _complete(self, batch: _Group, items: list[Any], comm: _Comm,
                  timeout_s: float | None) -> None:
        """Wait for the group's transfers, run the ``received`` hooks, start the status
        all-reduce ``[ok, rank-if-failed]`` per layer (not waited for here)."""
        ok = [1] * len(batch.indices)
        reasons: list[str | None] = [batch.error] * len(batch.indices)
        device = batch.works[0].device
        if batch.error is None:
            try:
                comm.wait(batch.handles, timeout_s)
            except Exception as exc:
                batch.error = f"{type(exc).__name__}: {exc}"
                reasons = [batch.error] * len(batch.indices)
        if batch.error is not None:
            ok = [0] * len(ok)
            self._drop_buffer(batch.buffer)  # pending receives may still target it
        else:
            hooks = [items[i][2] for i in batch.indices]
            if any(h is not None for h in hooks) and device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()  # hooks may read the bytes
            for j, hook in enumerate(hooks):
                if hook is None:
                    continue
                try:
                    hook("received")
                except Exception as exc:
                    ok[j], reasons[j] = 0, f"{type(exc).__name__}: {exc}"
        batch.reasons = reasons
        batch.transfer_end = time.perf_counter()
        votes: list[int] = []
        for flag in ok:
            votes += [flag, comm.rank if not flag else comm.world]
        try:
            # On NCCL the all-reduce is stream-ordered after this rank's receives: its result,
            # read on the host, proves every rank's receives of the group completed.
            batch.status = comm.allreduce_min(votes)
            self._trace("status posted")
        except Exception as exc:
            batch.status_error = str(exc)
        if batch.error is None and batch.plan.commits is None:
            # The commit's copy ranges, built while the GPU works: after the status is read,
            # only the copies' launch is left on the host's path.
            batch.plan.build_commits()

    def _finish(self, batch: _Group, items: list[Any], errors: dict[int, MigrationError],
                done: dict[int, LayerMigrationStats], stop_on_error: bool,
                timeout_s: float | None, beside: bool = False) -> bool:
        """Read the group's status (on NCCL: the bound on this rank's transfers, see
        :meth:`_Comm.wait`); commit every layer every rank received (in stop mode: up to the
        first failure). Returns whether to stop (the same on every rank)."""
        status: list[int] | None = None
        if batch.status is not None and batch.status_error is None:
            try:
                status = batch.status.result(timeout_s)
                self._trace("status read")
            except Exception as exc:
                batch.status_error = str(exc)
        if status is None:
            self._drop_buffer(batch.buffer)
            for j, i in enumerate(batch.indices):
                layer = items[i][0]
                errors[layer] = MigrationError(layer, "status", None,
                                               batch.reasons[j] or batch.status_error)
            return True
        stop = False
        committed: list[_LayerWork] = []
        ranges: list[CopyRange] = []
        for j, (i, work) in enumerate(zip(batch.indices, batch.works, strict=True)):
            layer = items[i][0]
            if stop:
                continue
            if status[2 * j] != 1:
                errors[layer] = MigrationError(layer, "transfer", status[2 * j + 1],
                                               batch.reasons[j])
                self._drop_buffer(batch.buffer)
                stop = stop_on_error
                continue
            committed.append(work)
            batch.committed.append(i)
            assert batch.plan.commits is not None  # built in _complete
            ranges += batch.plan.commits[j]
        device = batch.works[0].device
        # every layer of the group: its commit compiled ahead, if prepare() did
        whole = batch.plan.commit if len(committed) == len(batch.works) else None
        copies = ranges if whole is None else whole
        if committed:
            if device.type == "cuda":
                stream = self._commit_stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))  # the receives landed
                with torch.cuda.stream(stream):
                    self._copy(copies, self._copy_cap(device, beside))
                event = torch.cuda.Event()
                event.record(stream)
                for work in committed:
                    self._committed[work.layer] = event
                if batch.buf is not None:
                    # The commit reads the buffer: keep it (even if dropped) until it is done.
                    batch.buf.record_stream(stream)
                    self._released[batch.buffer] = event
            else:
                self._copy(copies)
        self._trace("commit issued")
        seconds = (time.perf_counter() - batch.start) / len(batch.indices)
        transfer = (batch.transfer_end - batch.start) / len(batch.indices)
        for i, work in zip(batch.indices, batch.works, strict=True):
            if i in batch.committed:
                done[i] = work.stats(seconds, transfer)
        return stop

    def _abandon(self, batch: _Group, timeout_s: float | None, comm: _Comm) -> None:
        """A group posted (on every rank) after an earlier one failed in stop mode: let its
        transfers finish, never commit it."""
        try:
            if batch.error is None:
                comm.wait(batch.handles, timeout_s)
        except Exception:
            pass
        self._drop_buffer(batch.buffer)

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

    def _trace(self, phase: str) -> None:
        if self.tracer is not None:
            self.tracer(phase)

    def _copy_cap(self, device: torch.device, beside: bool) -> int | None:
        """Programs of a copy on ``device`` (``None``: one per chunk); see ``copy_programs``."""
        if not beside or device.type != "cuda" or self.copy_programs is None:
            return None
        if self.copy_programs == "auto":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            return max(1, int(sms * COPY_SHARE))
        return self.copy_programs

    def _pack(self, plan: _GroupPlan, beside: bool = False) -> None:
        """Stage local copies and pack sends into the group's staging buffer.

        On CUDA this runs on a side stream that waits only for the caller's stream at the start
        of the call and for the last commit reading this buffer, not for the transfers in
        flight: group ``g + 1`` is packed while group ``g`` moves. The caller's stream (which
        NCCL's stream follows when the transfers are posted) then waits for the packing.
        Reusing the buffer's send region is safe: the transfers that last read it (two groups
        back) completed before that group's status was read, which happened before this call.
        """
        assert plan.buf is not None
        buf = plan.buf
        if plan.pack is None:  # not compiled ahead: the ranges now
            plan.pack = plan.pack_ranges()
        device = buf.device
        if device.type != "cuda" or not self._overlap:
            self._copy(plan.pack)
            return
        if self._pack_stream is None or self._pack_stream.device != device:
            self._pack_stream = torch.cuda.Stream(device)
        stream = self._pack_stream
        stream.wait_event(self._entry)
        released = self._released[plan.buffer]
        if released is not None:
            stream.wait_event(released)
        with torch.cuda.stream(stream):
            self._copy(plan.pack, self._copy_cap(device, beside))
        buf.record_stream(stream)
        torch.cuda.current_stream(device).wait_stream(stream)

    def _copy(self, copies: CopyProgram | list[CopyRange], cap: int | None = None) -> None:
        if isinstance(copies, CopyProgram):
            self._copier.launch(copies, cap)
        else:
            self._copier.run(copies, cap)

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
        self._wait_released(index, device)
        return buf

    def _wait_released(self, index: int, device: torch.device) -> None:
        """Staging copies and receives (the NCCL stream waits on the current stream) must not
        overwrite buffer ``index`` while an earlier commit still reads it."""
        released = self._released[index]
        if device.type == "cuda" and released is not None:
            torch.cuda.current_stream(device).wait_event(released)

    def _drop_buffer(self, index: int) -> None:
        """Forget staging buffer ``index`` after a failure (receives may still land in it),
        and every call laid out ahead (they may use it)."""
        self._staging[index] = None
        self._prepared = {}

    def _settings_digest(self) -> int:
        """The settings that every rank must share (they decide the groups it posts)."""
        return self.groups_in_flight * 16 + self.ramp_groups

    def _prepare(
        self, layer: int, transfers: LayerTransfers, rank: int, world: int, tag: int
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
        recv_from: dict[int, list[Any]] = {}
        for t in transfers.receives(rank):  # plan order within each source
            recv_from.setdefault(t.src_rank, []).append(t)
        send_to: dict[int, list[Any]] = {}
        for t in transfers.sends(rank):
            send_to.setdefault(t.dst_rank, []).append(t)
        copies = transfers.copies(rank)
        return _LayerWork(
            layer=layer,
            entries=entries,
            world=world,
            base=rank * self.slots_per_rank,
            recv_from=recv_from,
            send_to=send_to,
            copies=copies,
            staged_count=sum(1 for c in copies if c.staged),
            device=device,
            tag=tag,
        )


def _vote_errors(
    items: list[tuple[int, Any, FaultHook | None]],
    reasons: list[str | None],
    status: _Status | None,
    post_error: str | None,
    stop_on_error: bool,
) -> tuple[dict[int, MigrationError], int]:
    """Read the pre-flight all-reduce (see :meth:`ExpertWeights._post_votes`). Returns
    (layer -> error, index of the first item not to attempt: ``len(items)`` unless
    ``stop_on_error`` stopped earlier). A broken exchange fails the first item in phase
    ``"status"`` and stops at it."""
    errors: dict[int, MigrationError] = {}
    if not items:
        return errors, 0
    try:
        if status is None:
            raise RuntimeError(post_error)
        pre = status.result()
    except Exception as exc:
        first = items[0][0]
        errors[first] = MigrationError(first, "status", None, f"pre-flight exchange: {exc}")
        return errors, 0
    same_settings = pre[-2] == -pre[-1]
    for i, (layer, _, _) in enumerate(items):
        v = pre[6 * i:6 * i + 6]
        if not same_settings:
            err = MigrationError(
                layer, "preflight", None, "ranks use different migration settings "
                "(groups_in_flight, ramp_groups): construct ExpertWeights alike everywhere"
            )
        elif v[0] != 1:
            err = MigrationError(layer, "preflight", v[1], reasons[i])
        elif v[2] != -v[3]:
            err = MigrationError(layer, "preflight", None, "ranks computed different plans")
        elif v[4] != -v[5]:
            err = MigrationError(
                layer, "preflight", None, "ranks registered different tensor layouts"
            )
        else:
            continue
        errors[layer] = err
        if stop_on_error:
            return errors, i
    return errors, len(items)


class Preparation:
    """A pre-flight started by :meth:`ExpertWeights.prepare`; :meth:`errors` reads it."""

    def __init__(self, items: list[tuple[int, Any, FaultHook | None]],
                 reasons: list[str | None], status: _Status | None,
                 post_error: str | None) -> None:
        self._items, self._reasons = items, reasons
        self._status, self._post_error = status, post_error
        self._errors: dict[int, MigrationError] | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers it checks."""
        return tuple(layer for layer, _, _ in self._items)

    def covers(self, items: list[tuple[int, Any, FaultHook | None]]) -> bool:
        """Whether it checked every ``(layer, transfers, _)`` of ``items``, with the same
        transfers object."""
        known = {layer: transfers for layer, transfers, _ in self._items}
        return all(known.get(layer) is transfers for layer, transfers, _ in items)

    def errors(self) -> dict[int, MigrationError]:
        """Layer -> error for the layers that cannot migrate (the same on every rank; empty:
        all can). The first call waits for the all-reduce; later calls return the same."""
        if self._errors is None:
            self._errors, _ = _vote_errors(self._items, self._reasons, self._status,
                                           self._post_error, stop_on_error=False)
            self._status = None
        return dict(self._errors)


def _bind(fault: Callable[[int, str], None], layer: int) -> FaultHook:
    return lambda phase: fault(layer, phase)


class _Status:
    """An all-reduce result, fetched on demand (one device-to-host copy on NCCL)."""

    def __init__(self, values: list[int] | None = None, work: Any = None,
                 tensor: torch.Tensor | None = None, event: Any = None) -> None:
        self._values, self._work, self._tensor, self._event = values, work, tensor, event

    def result(self, timeout_s: float | None = None) -> list[int]:
        """The reduced values; with ``timeout_s``, raise ``TimeoutError`` if a device result
        is not there within that many seconds."""
        if self._values is None:
            if self._work is not None:
                self._work.wait()
            if self._event is not None:
                if timeout_s is None:
                    self._event.synchronize()
                else:
                    deadline = time.perf_counter() + timeout_s
                    while not self._event.query():
                        if time.perf_counter() > deadline:
                            raise TimeoutError(
                                f"the transfers and status all-reduce did not complete within "
                                f"{timeout_s:g} s"
                            )
                        time.sleep(0)
            assert self._tensor is not None
            self._values = [int(v) for v in self._tensor.tolist()]
            self._tensor = None  # the buffer may be reused now
        return self._values


class _VoteSlot:
    """Reusable buffers for one all-reduce of up to ``capacity`` int64 votes on NCCL: pinned
    host input, device vector, pinned host output, and the event after the output copy."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity = capacity
        self.host_in = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
        self.device = torch.empty(capacity, dtype=torch.int64, device=device)
        self.host_out = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
        self.event = torch.cuda.Event()
        self.owner: _Status | None = None  # the result still reading ``host_out``


class _Comm:
    """The group as this module uses it; a 1-rank stand-in when torch.distributed is down.

    On NCCL, the all-reduce vectors live in a small ring of :class:`_VoteSlot` allocated once
    (pinned memory is slow to allocate), so a vote costs one H2D copy, the all-reduce and one
    D2H copy, with no host wait until its ``result()`` is read."""

    _SLOTS = 4

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
        self._slots: list[_VoteSlot | None] = [None] * self._SLOTS
        self._next = 0

    def alive(self) -> bool:
        """Whether torch.distributed is in the state this object was made in."""
        return self.distributed == (dist.is_available() and dist.is_initialized())

    def allreduce_min(self, values: Sequence[int]) -> _Status:
        """Start an all-reduce MIN of ``values``; ``.result()`` waits for it. On NCCL the
        vector goes up and comes back without blocking the host until ``result()``."""
        if not self.distributed:
            return _Status([int(v) for v in values])
        if not self.nccl:
            host = torch.tensor(list(values), dtype=torch.int64)
            work = dist.all_reduce(host, op=dist.ReduceOp.MIN, group=self.group, async_op=True)
            return _Status(work=work, tensor=host)
        n = len(values)
        slot = self._slot(n)
        slot.host_in.numpy()[:n] = values
        vec = slot.device[:n]
        vec.copy_(slot.host_in[:n], non_blocking=True)
        work = dist.all_reduce(vec, op=dist.ReduceOp.MIN, group=self.group, async_op=True)
        work.wait()  # orders the current stream after the all-reduce (no host wait)
        out = slot.host_out[:n]
        out.copy_(vec, non_blocking=True)
        slot.event.record()
        slot.owner = _Status(tensor=out, event=slot.event)
        return slot.owner

    def _slot(self, n: int) -> _VoteSlot:
        """The next ring slot, free to overwrite: its previous result is read (and so its
        copies are done) first."""
        index = self._next
        self._next = (index + 1) % self._SLOTS
        slot = self._slots[index]
        if slot is not None and slot.owner is not None:
            slot.owner.result()
            slot.owner = None
        if slot is None or slot.capacity < n:
            device = torch.device("cuda", torch.cuda.current_device())
            slot = _VoteSlot(max(n, 64, 2 * (slot.capacity if slot else 0)), device)
            self._slots[index] = slot
        return slot

    def op(self, kind: Callable[..., Any], tensor: torch.Tensor, peer: int, tag: int) -> Any:
        return dist.P2POp(kind, tensor, group=self.group, group_peer=peer, tag=tag)

    def post(self, ops: list[Any]) -> list[Any]:
        if not ops:
            return []
        return list(dist.batch_isend_irecv(ops))

    def wait(self, handles: list[Any], timeout_s: float | None) -> None:
        """Wait for P2P ``handles``. On gloo the host waits, up to ``timeout_s``. On NCCL the
        current stream is ordered after them and the host does not wait: NCCL's
        ``Work.wait(timeout)`` would block the host until the transfers end, which serializes
        the groups in flight; the bound is applied where the host does wait, on the status
        all-reduce queued after these transfers (:meth:`_Status.result`)."""
        for handle in handles:
            if timeout_s is None or self.nccl:
                handle.wait()
            else:
                handle.wait(datetime.timedelta(seconds=timeout_s))


def _spans(pairs: Iterable[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """``(src, dst)`` row pairs -> ``(src0, dst0, n)`` spans where both advance by one."""
    out: list[tuple[int, int, int]] = []
    for src, dst in pairs:
        if out and src == out[-1][0] + out[-1][2] and dst == out[-1][1] + out[-1][2]:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((src, dst, 1))
    return out


def _cut(indices: list[int], sizes: list[int], target: int,
         ramp: list[int]) -> list[list[int]]:
    """Consecutive groups of ``indices`` (byte ``sizes`` each): a group closes once it holds
    ``target`` bytes, except that the first groups close at ``ramp[0]``, ``ramp[1]``, ... bytes
    and the last ones, counted from the end, at the same budgets. Every group has at least one
    index; the result is a pure function of the arguments."""

    n = len(indices)
    head: list[list[int]] = []
    tail: list[list[int]] = []
    lo, hi = 0, n
    for budget in ramp:  # front
        if lo >= hi:
            break
        group: list[int] = []
        acc = 0
        while lo < hi and (not group or acc < budget):
            group.append(lo)
            acc += sizes[lo]
            lo += 1
        head.append(group)
    for budget in ramp:  # back
        if lo >= hi:
            break
        group = []
        acc = 0
        while lo < hi and (not group or acc < budget):
            hi -= 1
            group.insert(0, hi)
            acc += sizes[hi]
        tail.insert(0, group)
    middle: list[list[int]] = []
    acc = 0
    for at in range(lo, hi):
        if not middle or acc >= target:
            middle.append([])
            acc = 0
        middle[-1].append(at)
        acc += sizes[at]
    return [[indices[at] for at in group] for group in (*head, *middle, *tail)]


def _align(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


@dataclass
class _Group:
    """Layers moved by one ``batch_isend_irecv`` and agreed by one status all-reduce."""

    plan: _GroupPlan  # its layers, staging buffer and copies
    start: float
    handles: list[Any] = field(default_factory=list)
    error: str | None = None
    reasons: list[str | None] = field(default_factory=list)
    transfer_end: float = 0.0
    status: _Status | None = None
    status_error: str | None = None
    committed: list[int] = field(default_factory=list)

    @property
    def indices(self) -> list[int]:
        return self.plan.indices

    @property
    def works(self) -> list[_LayerWork]:
        return self.plan.works

    @property
    def buffer(self) -> int:
        return self.plan.buffer

    @property
    def buf(self) -> torch.Tensor | None:
        return self.plan.buf


@dataclass(eq=False)
class _GroupPlan:
    """A group's host work: its staging layout (``[(peer, start, end)]`` regions), buffer
    and copies, done ahead by :meth:`ExpertWeights.prepare` or just before it is posted.
    ``pack`` and ``commit`` are compiled copies (ahead) or ``pack`` the ranges (on the fly;
    then ``commit`` is ``None`` and the commit runs ``commits``, built per work)."""

    indices: list[int]  # the call's items in the group
    works: list[_LayerWork]
    buffer: int  # staging buffer index
    receives: list[tuple[int, int, int]]
    sends: list[tuple[int, int, int]]
    total: int  # bytes of staging
    buf: torch.Tensor | None = None
    pack: CopyProgram | list[CopyRange] | None = None
    commits: list[list[CopyRange]] | None = None  # per work
    commit: CopyProgram | None = None  # every work's commit, compiled ahead
    packed: bool = False  # the pack was queued ahead

    def pack_ranges(self) -> list[CopyRange]:
        """The group's staging and packing copies into ``buf`` (which must be set)."""
        for work in self.works:
            work.staging = self.buf
        ranges: list[CopyRange] = []
        for work in self.works:
            work.stage(ranges)
            work.pack(ranges)
        return ranges

    def build_commits(self) -> None:
        """``commits``: each work's commit copies out of ``buf`` (set by
        :meth:`pack_ranges` first)."""
        self.commits = []
        for work in self.works:
            self.commits.append([])
            work.commit(self.commits[-1])


@dataclass(eq=False)
class _Prepared:
    """One call laid out by :meth:`ExpertWeights.prepare` (see :meth:`ExpertWeights._run`)."""

    works: list[_LayerWork]  # per layer of the call, in order
    group_bytes: int | None
    groups: list[_GroupPlan]
    packed_at: int  # ``ExpertWeights._runs`` when the first group was packed


@dataclass
class _LayerWork:
    """One rank's share of one layer: what it sends, receives, stages and writes.

    Staging blocks: a block of ``n`` experts holds, per registered tensor ``k`` (name order),
    ``[n, row_bytes_k]`` bytes at an aligned offset. The layer has one receive block per source
    peer (its receives from that peer in plan order), one send block per destination peer (its
    sends to it in plan order: the same experts, in the same order, as the peer's receive
    block) and one block for staged local copies; :class:`_Layout` places them.
    """

    layer: int
    entries: list[_Entry]
    world: int
    base: int  # first global slot of this rank
    recv_from: dict[int, list[Any]]  # source rank -> transfers, plan order
    send_to: dict[int, list[Any]]  # destination rank -> transfers, plan order
    copies: tuple[Any, ...]
    staged_count: int
    device: torch.device
    tag: int = 0
    staging: torch.Tensor | None = None  # the group's staging buffer
    recv_off: dict[int, int] = field(default_factory=dict)  # peer -> block offset
    send_off: dict[int, int] = field(default_factory=dict)
    staged_off: int = 0

    def block_bytes(self, n: int) -> int:
        """Bytes of a block of ``n`` experts (a multiple of the alignment)."""
        return sum(_align(n * e.row_bytes) for e in self.entries)

    def _starts(self, n: int) -> list[int]:
        """Offset of each tensor's rows inside an ``n``-expert block."""
        out, at = [], 0
        for e in self.entries:
            out.append(at)
            at += _align(n * e.row_bytes)
        return out

    def _into_block(self, out: list[CopyRange], offset: int, n: int,
                    pairs: Iterable[tuple[int, int]]) -> None:
        """Queue ``(local slot, block row)`` copies from the weights into the ``n``-expert
        block at ``offset``: one range per tensor per span."""
        assert self.staging is not None
        starts = self._starts(n)
        for slot, row, count in _spans(pairs):
            for start, entry in zip(starts, self.entries, strict=True):
                size = entry.row_bytes
                out.append((self.staging, offset + start + row * size,
                            entry.flat, slot * size, count * size))

    def _from_block(self, out: list[CopyRange], offset: int, n: int,
                    pairs: Iterable[tuple[int, int]]) -> None:
        """Queue ``(block row, local slot)`` copies from the ``n``-expert block at ``offset``
        into the weights: one range per tensor per span."""
        starts = self._starts(n)
        for row, slot, count in _spans(pairs):
            assert self.staging is not None  # a block with rows has a staging buffer
            for start, entry in zip(starts, self.entries, strict=True):
                size = entry.row_bytes
                out.append((entry.flat, slot * size, self.staging,
                            offset + start + row * size, count * size))

    def stage(self, out: list[CopyRange]) -> None:
        """Queue copies of the sources of local copies that this layer overwrites into its
        staged block."""
        staged = (c for c in self.copies if c.staged)
        self._into_block(out, self.staged_off, self.staged_count,
                         ((c.src_slot - self.base, j) for j, c in enumerate(staged)))

    def pack(self, out: list[CopyRange]) -> None:
        """Queue copies of every expert this rank sends into its peer's send block (one range
        per tensor per run of consecutive source slots)."""
        for peer, sends in self.send_to.items():
            self._into_block(out, self.send_off[peer], len(sends),
                             ((t.src_slot - self.base, j) for j, t in enumerate(sends)))

    def commit(self, out: list[CopyRange]) -> None:
        """Queue the writes of every changed slot of this rank (run only after every rank's
        transfers completed): one range per tensor per span of consecutive block rows ->
        consecutive slots."""
        for peer, receives in self.recv_from.items():
            self._from_block(out, self.recv_off[peer], len(receives),
                             ((j, d - self.base) for j, t in enumerate(receives)
                              for d in t.dst_slots))
        staged: list[tuple[int, int]] = []
        direct: list[tuple[int, int]] = []  # (local src slot, local dst slot)
        j = 0
        for copy in self.copies:
            if copy.staged:
                staged += [(j, d - self.base) for d in copy.dst_slots]
                j += 1
            else:  # an unstaged source slot is unchanged in this layer: read it directly
                direct += [(copy.src_slot - self.base, d - self.base) for d in copy.dst_slots]
        self._from_block(out, self.staged_off, self.staged_count, staged)
        for src, dst, count in _spans(direct):
            for entry in self.entries:
                size = entry.row_bytes
                out.append((entry.flat, dst * size, entry.flat, src * size, count * size))

    def stats(self, seconds: float, transfer_seconds: float) -> LayerMigrationStats:
        expert = sum(e.row_bytes for e in self.entries)
        received = sum(len(r) for r in self.recv_from.values())
        sent = sum(len(s) for s in self.send_to.values())
        written = sum(len(t.dst_slots) for r in self.recv_from.values() for t in r) + sum(
            len(c.dst_slots) for c in self.copies
        )
        return LayerMigrationStats(
            layer=self.layer,
            transfers_sent=sent,
            transfers_received=received,
            local_copies=len(self.copies),
            slots_written=written,
            bytes_sent=sent * expert,
            bytes_received=received * expert,
            bytes_staged=self.staged_count * expert,
            seconds=seconds,
            transfer_seconds=transfer_seconds,
        )


class _Layout:
    """Where a group's blocks go in its staging buffer (sets each work's offsets).

    ``[receive region of peer p0 | p1 | ... | staged blocks | send region of peer q0 | ...]``:
    a peer's region is its blocks in group order, so a pair of ranks exchanges one contiguous
    region each way (one ``isend`` and one ``irecv`` per peer per group) and both sides lay it
    out identically (same layers, same plan, same tensor layouts: the pre-flight checks it).
    """

    def __init__(self, works: Sequence[_LayerWork]) -> None:
        # (peer, start, end) per peer: receives, then the staged local copies, then sends
        self.receives, offset = self._regions(works, 0, lambda w: w.recv_from,
                                              lambda w: w.recv_off)
        for w in works:
            w.staged_off = offset
            offset += w.block_bytes(w.staged_count)
        self.sends, self.total = self._regions(works, offset, lambda w: w.send_to,
                                               lambda w: w.send_off)

    @staticmethod
    def _regions(
        works: Sequence[_LayerWork], offset: int,
        slots: Callable[[_LayerWork], Mapping[int, Any]],
        offsets: Callable[[_LayerWork], dict[int, int]],
    ) -> tuple[list[tuple[int, int, int]], int]:
        """One region per peer from ``offset`` (peers in order), each the blocks of ``works``
        for that peer in group order; records each block's offset in ``offsets(w)[peer]``.
        Returns the regions and the offset after them."""
        regions: list[tuple[int, int, int]] = []
        for peer in sorted({p for w in works for p in slots(w)}):
            start = offset
            for w in works:
                if peer in slots(w):
                    offsets(w)[peer] = offset
                    offset += w.block_bytes(len(slots(w)[peer]))
            regions.append((peer, start, offset))
        return regions, offset


# ---------------------------------------------------------------------------------------------
# A Switcher (worker_agent.agreement) that moves weights before it switches maps


@dataclass(frozen=True)
class RolloutMigrationStats:
    """What one rank moved for one rollout (the fields of ``eplb.v1.MigrationStats``).

    Attributes:
        bytes_moved: network bytes this rank received.
        transfers: experts this rank received over the network.
        local_copies: experts this rank copied internally (one copy may fill several slots).
        slots_written: this rank's slots that now hold another expert (received or copied).
        total_pause_ms: migration time summed over the steps it took (the preparation's
            included).
        max_layer_ms: the slowest layer.
        max_step_pause_ms: the longest migration pause of one forward step (the preparation
            step's included).
        steps: forward steps the rollout spanned (the preparation step's included).
        prepare_ms: the preparation step's host time (:meth:`ExpertWeights.prepare`; 0 when
            the rollout prepared in its first migrating step).
        rolled_back: layers moved back to the old map after a failure.
    """

    bytes_moved: int = 0
    transfers: int = 0
    local_copies: int = 0
    slots_written: int = 0
    total_pause_ms: float = 0.0
    max_layer_ms: float = 0.0
    max_step_pause_ms: float = 0.0
    steps: int = 0
    rolled_back: int = 0
    prepare_ms: float = 0.0


class MigratingSwitcher:
    """A :class:`worker_agent.agreement.Switcher` that moves expert weights, then switches maps.

    ``begin(step, plan, settings)`` (every rank, the agreed step) plans the transfers from the
    view's map to ``plan.phy2log``. The first ``advance(step)`` (that step) prepares every
    changed layer's migration and starts its pre-flight all-reduce
    (:meth:`ExpertWeights.prepare`) and, with ``prepare_ahead``, returns: the host work of
    laying out the transfers overlaps the engine's forward, and the pre-flight's round trip
    the step in between. The next ``advance`` (the same step without ``prepare_ahead``) reads
    the pre-flight's verdict; ``advance`` (that step and the next ones) then migrates the next
    ``settings.layers_per_step`` changed layers (all when 0), each step only launching copies
    and posting transfers, and switches each moved layer's
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
        prepare_ahead: prepare at the agreed step and migrate from the next one (default);
            ``False``: only the pre-flight, then the first migration in the agreed step, each
            group laid out while the previous one moves (one step less, one longer pause; see
            ``benchmarks/results_migration.md``).
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
        prepare_ahead: bool = True,
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
        self.prepare_ahead = prepare_ahead
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
        self._preparation: Preparation | None = None
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
        self._preparation = None
        self._started = False

    def advance(self, step: int) -> bool:
        assert self._plan is not None and self._transfers is not None, "advance() before begin()"
        plan, transfers = self._plan, self._transfers
        # One capture per step, before this step's map update: a delta never spans two updates.
        self.snapshotter.capture(step)
        start = time.perf_counter()
        if self._preparation is None and self._todo:
            # One pre-flight for the whole rollout (every rank, this agreed step) and, ahead,
            # its first migration call laid out; the steps below migrate without a pre-flight.
            # Later calls (``layers_per_step``) lay out on the fly, in their own step: laying
            # every call out here would make this step the longest. (In one step, laying out
            # on the fly is faster: it overlaps the transfers.)
            per = self._per_step or len(self._todo)
            self._preparation = self.weights.prepare(
                transfers, self.group, layers=self._todo,
                calls=[self._todo[:per]] if self.prepare_ahead else [])
            ms = (time.perf_counter() - start) * 1e3
            self._stats = dataclasses.replace(self._stats, prepare_ms=ms)
            if self.prepare_ahead:
                self._account(None, ms)
                return False  # migrate from the next step: no map changed in this one
        if not self._started:
            self._started = True  # the capture above cut the old version's counts
            errors = self._preparation.errors() if self._preparation is not None else {}
            if errors:
                self._plan, self._todo = None, []
                self.last_stats = self._stats
                raise errors[min(errors)]
            if self.pause_counting and self._per_step and len(self._todo) > self._per_step:
                self.recorder.enabled(False)
        count = self._per_step or len(self._todo)
        batch, self._todo = self._todo[:count], self._todo[count:]
        report = self.weights.migrate(transfers, self.group, layers=batch,
                                      timeout_s=self.timeout_s, stop_on_error=True,
                                      fault=self.fault, preflight=False)
        self._account(report, (time.perf_counter() - start) * 1e3)
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

    def _account(self, report: MigrationReport | None, pause_ms: float) -> None:
        """Add one step: its migration ``report`` (``None``: the preparation step) and the
        host time the step spent in :meth:`advance` (preparation, verdict, migration)."""
        s = self._stats
        if report is None:
            report = MigrationReport(())
        self._stats = dataclasses.replace(
            s,
            bytes_moved=s.bytes_moved + report.bytes_received,
            transfers=s.transfers + report.transfers_received,
            local_copies=s.local_copies + report.local_copies,
            slots_written=s.slots_written + report.slots_written,
            total_pause_ms=s.total_pause_ms + pause_ms,
            max_layer_ms=max(s.max_layer_ms, report.max_layer_seconds * 1e3),
            max_step_pause_ms=max(s.max_step_pause_ms, pause_ms),
            steps=s.steps + 1,
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
        self._stats = dataclasses.replace(self._stats, rolled_back=len(report.applied_layers))
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
