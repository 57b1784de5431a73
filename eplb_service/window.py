"""Per-deployment sliding window of logical load.

Agents report tokens per *slot* ``[L, P]`` recorded under some placement version. The window
maps them to *logical experts* ``[L, E]`` with that version's ``phy2log`` (DESIGN.md
invariant 3) and sums them over the last ``span_s`` seconds, in ``buckets`` time buckets: a
bucket leaves the window whole once it is older than the span, so the window covers between
``span_s - span_s/buckets`` and ``span_s`` seconds of history.

The window keeps the maps of the last few placement versions (:meth:`LoadWindow.add_version`);
the active version is never evicted. Counts are exact int64 throughout.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


@dataclass
class _Bucket:
    index: int  # floor(time / bucket_s)
    load: IntArray  # [L, E]


class UnknownVersion(KeyError):
    """No map is kept for the version (stale or never issued)."""


class LoadWindow:
    """Sliding window of logical load ``[L, E]``.

    Args:
        num_layers, num_experts, num_slots: the deployment's L, E and P.
        span_s: seconds of history the window covers.
        buckets: time granularity (``span_s / buckets`` seconds per bucket).
        versions_kept: how many placement versions' maps to keep for attribution.
        clock: seconds; wall-clock time by default so that a snapshot restored after a restart
            (:meth:`snapshot`, :meth:`restore`) lines up. A clock going backwards is harmless.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        num_slots: int,
        *,
        span_s: float,
        buckets: int = 60,
        versions_kept: int = 8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if span_s <= 0 or buckets < 1 or versions_kept < 1:
            raise ValueError("span_s must be > 0, buckets and versions_kept >= 1")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.num_slots = num_slots
        self.span_s = float(span_s)
        self.buckets = int(buckets)
        self.bucket_s = self.span_s / self.buckets
        self.versions_kept = versions_kept
        self._clock = clock
        self._buckets: deque[_Bucket] = deque()
        self._sum: IntArray = np.zeros((num_layers, num_experts), dtype=np.int64)
        # version -> flat logical index [L * P] (phy2log + layer * E), for one bincount per add.
        self._maps: OrderedDict[int, IntArray] = OrderedDict()
        self._protected: int | None = None
        self._offsets = (np.arange(num_layers, dtype=np.int64) * num_experts)[:, None]
        self.generation = 0  # bumps whenever the window's content changes
        self.last_add_at: float | None = None

    # -- versions --------------------------------------------------------------------------

    def add_version(self, version: int, phy2log: IntArray) -> None:
        """Keeps ``phy2log [L, P]`` for attributing reports of ``version``."""
        if phy2log.shape != (self.num_layers, self.num_slots):
            raise ValueError(
                f"phy2log shape {tuple(phy2log.shape)} != ({self.num_layers}, {self.num_slots})"
            )
        self._maps[version] = (phy2log.astype(np.int64) + self._offsets).ravel()
        self._maps.move_to_end(version)
        self._evict_versions()

    def protect(self, version: int) -> None:
        """Never evict ``version`` (the active one) while it stays protected."""
        self._protected = version
        self._evict_versions()

    def _evict_versions(self) -> None:
        while len(self._maps) > self.versions_kept:
            victim = min(v for v in self._maps if v != self._protected)
            del self._maps[victim]

    def has_version(self, version: int) -> bool:
        return version in self._maps

    @property
    def versions(self) -> list[int]:
        """Versions whose maps are kept, ascending."""
        return sorted(self._maps)

    # -- load ------------------------------------------------------------------------------

    def to_logical(self, version: int, counts: IntArray) -> IntArray:
        """``[L, P]`` slot counts under ``version`` -> ``[L, E]`` logical counts.

        Raises:
            UnknownVersion: when no map of ``version`` is kept.
        """
        flat = self._maps.get(version)
        if flat is None:
            raise UnknownVersion(version)
        size = self.num_layers * self.num_experts
        if counts.size and int(counts.max()) >= 2**53:
            # float64 bincount weights are exact below 2**53; beyond that add exactly.
            out = np.zeros(size, dtype=np.int64)
            np.add.at(out, flat, counts.ravel().astype(np.int64))
        else:
            out = np.rint(np.bincount(flat, weights=counts.ravel(), minlength=size)).astype(
                np.int64
            )
        return out.reshape(self.num_layers, self.num_experts)

    def add_report(self, version: int, counts: IntArray, now: float | None = None) -> IntArray:
        """Adds ``[L, P]`` slot counts recorded under ``version``; returns the ``[L, E]`` delta.

        Raises:
            UnknownVersion: when no map of ``version`` is kept.
        """
        logical = self.to_logical(version, counts)
        self.add(logical, now)
        return logical

    def add(self, logical: IntArray, now: float | None = None) -> None:
        """Adds a ``[L, E]`` logical load at time ``now`` (the clock's now by default)."""
        now = self._clock() if now is None else now
        index = math.floor(now / self.bucket_s)
        self._expire(index)
        if self._buckets and self._buckets[-1].index >= index:
            self._buckets[-1].load += logical  # clock went backwards or same bucket
        else:
            self._buckets.append(_Bucket(index, logical.astype(np.int64, copy=True)))
        self._sum += logical
        self.generation += 1
        self.last_add_at = now

    def _expire(self, index: int) -> None:
        oldest_kept = index - self.buckets + 1
        while self._buckets and self._buckets[0].index < oldest_kept:
            self._sum -= self._buckets.popleft().load
            self.generation += 1

    def total(self, now: float | None = None) -> IntArray:
        """``[L, E]`` int64: the load inside the window now (a copy)."""
        now = self._clock() if now is None else now
        self._expire(math.floor(now / self.bucket_s))
        return self._sum.copy()

    def snapshot(self) -> list[tuple[int, IntArray]]:
        """``(bucket index, [L, E] load)`` of every bucket, oldest first (copies)."""
        return [(b.index, b.load.copy()) for b in self._buckets]

    def restore(self, buckets: list[tuple[int, IntArray]]) -> None:
        """Replaces the content with a :meth:`snapshot` (bucket indexes from the same clock)."""
        self.clear()
        for index, load in sorted(buckets, key=lambda b: b[0]):
            if load.shape != self._sum.shape:
                raise ValueError(f"bucket shape {load.shape} != {self._sum.shape}")
            self._buckets.append(_Bucket(int(index), load.astype(np.int64, copy=True)))
            self._sum += load

    def clear(self) -> None:
        self._buckets.clear()
        self._sum[:] = 0
        self.generation += 1
