"""Seeded workload generators: determinism, shapes, totals, and the bundled sample."""

from __future__ import annotations

import numpy as np
import pytest

from eplb_service import workloads as w

SINGLE = [
    ("zipf", {"exponent": 1.0}),
    ("zipf", {"exponent": 1.5}),
    ("lognormal", {"sigma": 1.0}),
    ("hot", {}),
    ("uniform", {}),
]


@pytest.mark.parametrize(("kind", "options"), SINGLE)
def test_single_window_is_seeded_and_sums_to_tokens(kind: str, options: dict) -> None:
    a = w.make_load(kind, 5, 32, 7, 10_000, **options)
    b = w.make_load(kind, 5, 32, 7, 10_000, **options)
    c = w.make_load(kind, 5, 32, 8, 10_000, **options)
    assert a.shape == (5, 32)
    assert a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a.sum(axis=1), 10_000)
    assert (a >= 0).all()
    assert np.array_equal(a, np.round(a))  # token counts


@pytest.mark.parametrize(
    "profile",
    [
        w.zipf_profile(4, 16, 0),
        w.lognormal_profile(4, 16, 0),
        w.hot_profile(4, 16, 0),
        w.uniform_profile(4, 16),
    ],
)
def test_profiles_are_distributions(profile: np.ndarray) -> None:
    assert profile.shape == (4, 16)
    np.testing.assert_allclose(profile.sum(axis=1), 1.0)
    assert (profile > 0).all()


def test_zipf_is_permuted_per_layer() -> None:
    profile = w.zipf_profile(6, 64, 3, exponent=1.0)
    hottest = profile.argmax(axis=1)
    assert len(set(hottest.tolist())) > 1
    # Every layer holds the same values, shuffled.
    np.testing.assert_allclose(np.sort(profile, axis=1), np.sort(profile[:1], axis=1).repeat(6, 0))
    np.testing.assert_allclose(profile.max(axis=1) / profile.min(axis=1), 64.0)


def test_hot_experts_are_5_to_20_times_the_mean() -> None:
    profile = w.hot_profile(8, 256, 1)
    ratio = profile * 256  # x mean
    hot = np.sort(ratio, axis=1)[:, -8:]  # default num_hot = 256 // 32
    assert ((hot >= 5.0 - 1e-9) & (hot <= 20.0 + 1e-9)).all()
    assert (np.sort(ratio, axis=1)[:, :-8] < 1.0).all()


def test_hot_with_few_experts_caps_the_hot_share() -> None:
    profile = w.hot_profile(3, 8, 2, low=10.0)  # 10-20x of 8 experts cannot fit: 80% share
    np.testing.assert_allclose(profile.max(axis=1), 0.8)
    assert (w.hot_profile(20, 8, 2).max(axis=1) <= 0.8 + 1e-12).all()
    with pytest.raises(ValueError, match="num_hot"):
        w.hot_profile(3, 8, 2, num_hot=8)


def test_uniform_is_only_noise() -> None:
    load = w.uniform(2, 100, 0, tokens=1_000_000)
    assert np.abs(load / 10_000 - 1).max() < 0.06


def test_generator_seed_advances() -> None:
    rng = np.random.default_rng(5)
    first = w.zipf(2, 8, rng, tokens=100)
    second = w.zipf(2, 8, rng, tokens=100)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, w.zipf(2, 8, np.random.default_rng(5), tokens=100))


def test_noise_sequence_resamples_one_profile() -> None:
    seq = w.noise_sequence(3, 64, 11, num_windows=5, tokens=200_000)
    assert seq.shape == (5, 3, 64)
    np.testing.assert_array_equal(seq.sum(axis=2), 200_000)
    np.testing.assert_array_equal(seq, w.noise_sequence(3, 64, 11, num_windows=5, tokens=200_000))
    assert not np.array_equal(seq[0], seq[1])
    # Same hot experts every window: only sampling noise.
    np.testing.assert_array_equal(seq.argmax(axis=2), np.repeat(seq[:1].argmax(axis=2), 5, 0))


def test_drift_sequence_moves_slowly() -> None:
    seq = w.drift_sequence(4, 128, 3, num_windows=30, tokens=1_000_000)
    assert seq.shape == (30, 4, 128)
    again = w.drift_sequence(4, 128, 3, num_windows=30, tokens=1_000_000)
    np.testing.assert_array_equal(seq, again)

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(np.log1p(a).ravel(), np.log1p(b).ravel())[0, 1])

    assert corr(seq[0], seq[1]) > 0.9  # neighbours alike
    assert corr(seq[0], seq[29]) < corr(seq[0], seq[1]) - 0.2  # far apart: drifted


@pytest.mark.parametrize(
    "call",
    [
        lambda: w.zipf(0, 8, 0),
        lambda: w.uniform(2, 8, 0, tokens=-1),
        lambda: w.noise_sequence(2, 8, 0, num_windows=0),
        lambda: w.drift_sequence(2, 8, 0, num_windows=3, timescale=0),
        lambda: w.make_load("nope", 2, 8, 0, 10),
    ],
)
def test_bad_arguments(call) -> None:
    with pytest.raises(ValueError):
        call()


def test_committed_sample_equals_regenerated() -> None:
    committed = np.load(w.SAMPLE_PATH)
    regenerated = w.sample_load()
    assert committed.dtype == np.int64
    assert committed.shape == (w.SAMPLE.num_layers, w.SAMPLE.num_experts)
    np.testing.assert_array_equal(committed, regenerated)


def test_module_cli_writes_a_load(tmp_path) -> None:
    out = tmp_path / "load.npy"
    assert (
        w.main(
            [
                "--kind",
                "lognormal",
                "--layers",
                "3",
                "--experts",
                "16",
                "--tokens",
                "500",
                "--seed",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(np.load(out), w.lognormal(3, 16, 4, tokens=500))
    sample = tmp_path / "sample.npy"
    assert w.main(["--sample", "--out", str(sample)]) == 0
    np.testing.assert_array_equal(np.load(sample), np.load(w.SAMPLE_PATH))
