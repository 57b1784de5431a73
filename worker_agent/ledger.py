"""Exactly-once bookkeeping of one agent incarnation's load reports (DESIGN.md invariant 4).

Two stages, both bounded, hold every count the service has not acknowledged yet:

- **pending**: deltas not sent yet, merged per placement version (``[L, P]`` int64 each). Counts of
  one version add up exactly, so a long outage costs one matrix per version, not one per report
  interval. Versions are never mixed (invariant 3).
- **in flight**: reports sent but not acknowledged, kept as the exact ``LoadReport`` messages that
  were sent, in sequence order, at most ``max_inflight`` of them. After a reconnect they are resent
  unchanged (same sequence, same counts, same step range): the service counts a sequence at most
  once, so a report it had counted before the disconnect is acknowledged again, not re-counted.

Sequences start at 1 per incarnation and grow by 1 per report taken. Acks are cumulative.
docs/decisions/0005-agent-exactly-once.md says why it is split this way.

Memory: at most ``max_inflight + max_pending_versions`` count matrices of ``L * P * 8`` bytes.

Thread-safety: none for its methods. A ledger belongs to one client and is only changed from that
client's event-loop thread; its integer counters and properties (kept incrementally, never by
iterating a container) may be read from any thread for statistics.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from eplb_proto.v1 import eplb_pb2
from worker_agent.codec import encode_counts

__all__ = ["LedgerError", "ReportLedger"]

_log = logging.getLogger(__name__)


class LedgerError(ValueError):
    """An input that breaks the bookkeeping (wrong shape, an ack for a report never sent)."""


@dataclass
class _Pending:
    """Unsent counts of one version over steps ``[step_begin, step_end]``; ``counts [L, P]``."""

    version: int
    step_begin: int
    step_end: int
    counts: npt.NDArray[np.int64]
    tokens: int


@dataclass(frozen=True)
class _Inflight:
    report: eplb_pb2.LoadReport
    tokens: int


class ReportLedger:
    """Pending deltas (merged per version) and in-flight reports (resent unchanged).

    Args:
        num_layers: ``L``; every delta is ``[L, P]``.
        num_slots: ``P``.
        max_inflight: reports sent but not acknowledged at most; :meth:`take` returns ``None``
            while the window is full, and new deltas keep merging into pending.
        max_pending_versions: distinct versions pending at most. A rank only switches version
            through plans from the service, so an outage holds one or two; beyond the cap the
            oldest version's counts are dropped (logged, counted in ``dropped_tokens``) rather
            than grow without bound.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        *,
        max_inflight: int = 8,
        max_pending_versions: int = 16,
    ) -> None:
        if max_inflight < 1 or max_pending_versions < 1:
            raise ValueError("max_inflight and max_pending_versions must be >= 1")
        self.shape = (int(num_layers), int(num_slots))
        self.max_inflight = max_inflight
        self.max_pending_versions = max_pending_versions
        self._pending: dict[int, _Pending] = {}
        self._inflight: deque[_Inflight] = deque()
        self._next_sequence = 1
        self._last_acked = 0
        self._pending_tokens = 0
        self._inflight_tokens = 0
        # Counters (tokens are (token, slot) assignments, i.e. sums of counts).
        self.tokens_added = 0
        self.tokens_acked = 0
        self.reports_acked = 0
        self.dropped_tokens = 0
        self.rejected_reports = 0

    # -- state ---------------------------------------------------------------------------------

    @property
    def next_sequence(self) -> int:
        """The sequence the next report taken will carry."""
        return self._next_sequence

    @property
    def last_acked(self) -> int:
        """Highest sequence acknowledged (0 before the first ack)."""
        return self._last_acked

    @property
    def inflight_count(self) -> int:
        return len(self._inflight)

    @property
    def pending_versions(self) -> list[int]:
        """Versions with unsent counts, oldest first."""
        return sorted(self._pending)

    @property
    def pending_tokens(self) -> int:
        """Tokens added but not sent yet (maintained incrementally: safe to read anywhere)."""
        return self._pending_tokens

    @property
    def inflight_tokens(self) -> int:
        """Tokens sent but not acknowledged yet."""
        return self._inflight_tokens

    @property
    def drained(self) -> bool:
        """Nothing pending and nothing in flight: every count added has been acknowledged."""
        return not self._pending and not self._inflight

    def can_take(self) -> bool:
        """A report is pending and the in-flight window has room."""
        return bool(self._pending) and len(self._inflight) < self.max_inflight

    # -- transitions ---------------------------------------------------------------------------

    def add(
        self, version: int, step_begin: int, step_end: int, counts: npt.NDArray[np.integer]
    ) -> None:
        """Merge a delta ``counts [L, P]`` (>= 0) recorded under ``version`` into pending.

        The ledger takes ownership of an int64 ``counts`` (it may keep and add into it without a
        copy): pass a fresh array, as ``Snapshotter.collect`` does. All-zero deltas are ignored
        (nothing to count; the heartbeat says the rank is alive).
        """
        if counts.shape != self.shape:
            raise LedgerError(f"delta shape {tuple(counts.shape)} != [L, P] {list(self.shape)}")
        if counts.size and int(counts.min()) < 0:
            raise LedgerError("delta has negative counts")
        tokens = int(counts.sum())
        if tokens == 0:
            return
        self.tokens_added += tokens
        self._pending_tokens += tokens
        entry = self._pending.get(version)
        if entry is None:
            owned = np.asarray(counts, dtype=np.int64)  # no copy for an int64 array
            self._pending[version] = _Pending(
                version, int(step_begin), int(step_end), owned, tokens
            )
            self._enforce_pending_cap()
            return
        entry.counts += counts
        entry.tokens += tokens
        entry.step_begin = min(entry.step_begin, int(step_begin))
        entry.step_end = max(entry.step_end, int(step_end))

    def _enforce_pending_cap(self) -> None:
        while len(self._pending) > self.max_pending_versions:
            oldest = self._pending.pop(min(self._pending))
            self._pending_tokens -= oldest.tokens
            self.dropped_tokens += oldest.tokens
            _log.error(
                "dropping %d unsent tokens of placement version %d: more than %d versions "
                "pending (the service has been unreachable across several switches)",
                oldest.tokens,
                oldest.version,
                self.max_pending_versions,
            )

    def take(self) -> eplb_pb2.LoadReport | None:
        """The next report to send (oldest pending version), now in flight; ``None`` when
        nothing is pending or the in-flight window is full."""
        if not self.can_take():
            return None
        entry = self._pending.pop(min(self._pending))
        report = eplb_pb2.LoadReport(
            sequence=self._next_sequence,
            placement_version=entry.version,
            step_begin=entry.step_begin,
            step_end=entry.step_end,
            counts=encode_counts(entry.counts, entry.tokens),
        )
        self._next_sequence += 1
        self._inflight.append(_Inflight(report, entry.tokens))
        self._pending_tokens -= entry.tokens
        self._inflight_tokens += entry.tokens
        return report

    def unacked(self) -> list[eplb_pb2.LoadReport]:
        """In-flight reports in sequence order: resend these, unchanged, after a reconnect."""
        return [r.report for r in self._inflight]

    def ack(self, sequence: int) -> int:
        """Cumulative ack: drop in-flight reports with ``sequence <=`` it.

        Returns the number of tokens newly acknowledged (0 for a repeated or stale ack).

        Raises:
            LedgerError: ``sequence`` was never sent (a service bug; nothing is dropped).
        """
        if sequence >= self._next_sequence:
            raise LedgerError(
                f"ack {sequence} for a report never sent (last sent {self._next_sequence - 1})"
            )
        tokens = 0
        while self._inflight and self._inflight[0].report.sequence <= sequence:
            tokens += self._inflight.popleft().tokens
            self.reports_acked += 1
        self._last_acked = max(self._last_acked, sequence)
        self._inflight_tokens -= tokens
        self.tokens_acked += tokens
        return tokens

    def reject_oldest(self) -> eplb_pb2.LoadReport | None:
        """Drop the oldest in-flight report after the service refused the stream because of it.

        The service processes a stream in order and counts every report before the one it
        refuses, so the oldest unacknowledged report is the culprit (or was counted but not yet
        acknowledged); resending it would fail the same way forever.
        """
        if not self._inflight:
            return None
        dropped = self._inflight.popleft()
        self._inflight_tokens -= dropped.tokens
        self.rejected_reports += 1
        self.dropped_tokens += dropped.tokens
        return dropped.report
