"""The sliding load window: slot -> logical mapping by version, expiry, version keeping."""

from __future__ import annotations

import numpy as np
import pytest

from eplb_service.window import LoadWindow, UnknownVersion

L, E, P = 2, 4, 6
IDENTITY = np.tile(np.arange(P) % E, (L, 1))  # 0 1 2 3 0 1
OTHER = np.array([[3, 2, 1, 0, 3, 2], [0, 0, 1, 2, 3, 3]])


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(span=10.0, buckets=10, kept=3, clock=None):
    window = LoadWindow(L, E, P, span_s=span, buckets=buckets, versions_kept=kept,
                        clock=clock or Clock())
    window.add_version(0, IDENTITY)
    window.protect(0)
    return window


def test_slot_counts_map_to_logical_with_their_version():
    window = make()
    window.add_version(1, OTHER)
    counts = np.arange(L * P, dtype=np.int64).reshape(L, P)
    delta0 = window.add_report(0, counts)
    np.testing.assert_array_equal(delta0[0], [0 + 4, 1 + 5, 2, 3])
    np.testing.assert_array_equal(delta0[1], [6 + 10, 7 + 11, 8, 9])
    delta1 = window.add_report(1, counts)
    np.testing.assert_array_equal(delta1[0], [3, 2, 1 + 5, 0 + 4])
    np.testing.assert_array_equal(delta1[1], [6 + 7, 8, 9, 10 + 11])
    np.testing.assert_array_equal(window.total(), delta0 + delta1)
    assert window.total().dtype == np.int64
    assert window.total().sum() == 2 * counts.sum()


def test_exact_for_huge_counts():
    window = make()
    counts = np.full((L, P), 2**60, dtype=np.int64)
    delta = window.add_report(0, counts)
    assert delta[0, 0] == 2**61
    assert delta[0, 2] == 2**60


def test_a_report_leaves_the_window_after_the_span():
    clock = Clock(1000.0)
    window = make(span=10.0, buckets=10, clock=clock)  # 1 s buckets
    ones = np.ones((L, P), dtype=np.int64)
    window.add_report(0, ones)  # bucket 1000
    clock.now = 1005.5
    window.add_report(0, 2 * ones)  # bucket 1005
    assert window.total().sum() == 3 * L * P
    clock.now = 1009.99  # buckets 1000..1009 kept
    assert window.total().sum() == 3 * L * P
    clock.now = 1010.0  # buckets 1001..1010: the first report is gone
    assert window.total().sum() == 2 * L * P
    clock.now = 1015.0  # 1006..1015
    assert window.total().sum() == 0


def test_expiry_drops_old_buckets_only():
    clock = Clock(0.0)
    window = make(span=4.0, buckets=4, clock=clock)
    one = np.ones((L, P), dtype=np.int64)
    for t in range(8):
        clock.now = float(t)
        window.add_report(0, one * (t + 1))
    # Buckets of 1 s; the last 4 (t = 4..7) remain.
    assert window.total().sum() == (5 + 6 + 7 + 8) * L * P
    generation = window.generation
    clock.now = 9.5  # buckets 6..9 remain: t = 6, 7
    assert window.total().sum() == (7 + 8) * L * P
    assert window.generation > generation


def test_clock_going_backwards_adds_to_the_newest_bucket():
    clock = Clock(100.0)
    window = make(clock=clock)
    one = np.ones((L, P), dtype=np.int64)
    window.add_report(0, one)
    clock.now = 50.0
    window.add_report(0, one)
    assert window.total(now=100.0).sum() == 2 * L * P


def test_versions_kept_and_active_protected():
    window = make(kept=3)
    for version in (1, 2, 3, 4):
        window.add_version(version, OTHER)
    assert window.versions == [0, 3, 4]  # 0 is protected (active)
    window.protect(4)
    window.add_version(5, IDENTITY)
    assert window.versions == [3, 4, 5]
    with pytest.raises(UnknownVersion):
        window.add_report(1, np.ones((L, P), dtype=np.int64))
    assert window.has_version(5) and not window.has_version(0)


def test_bad_map_shape():
    window = make()
    with pytest.raises(ValueError, match="phy2log shape"):
        window.add_version(1, np.zeros((L, P + 1), dtype=np.int64))


def test_snapshot_and_restore():
    clock = Clock(10.0)
    window = make(clock=clock)
    window.add_report(0, np.ones((L, P), dtype=np.int64))
    clock.now = 13.0
    window.add_report(0, 2 * np.ones((L, P), dtype=np.int64))
    other = make(clock=clock)
    other.restore(window.snapshot())
    np.testing.assert_array_equal(other.total(), window.total())
    other.clear()
    assert other.total().sum() == 0
