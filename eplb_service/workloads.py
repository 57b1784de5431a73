"""Seeded synthetic expert loads, for the bundled sample, the benchmarks and tests.

A load is a token count per (layer, logical expert): each generator builds a routing profile
(the probability that a routed token lands on each expert of a layer) and samples ``tokens``
routed (token, expert) assignments per layer from it (multinomial), so loads carry the sampling
noise real counters show. Every function is pure given an integer seed; passing a
``numpy.random.Generator`` instead draws from (and advances) that generator.

Profiles, ``[L, E]`` float64, each row sums to 1:

- :func:`zipf_profile`: ``p ~ 1 / rank**exponent``, ranks shuffled independently per layer;
- :func:`lognormal_profile`: ``p ~ exp(sigma * N(0, 1))``;
- :func:`hot_profile`: a few hot experts at 5-20x the mean, the rest equal;
- :func:`uniform_profile`: every expert equal.

Loads, ``[L, E]`` float64 token counts: :func:`zipf`, :func:`lognormal`, :func:`hot`,
:func:`uniform`. Window sequences, ``[W, L, E]``: :func:`drift_sequence` (the hot set moves slowly)
and :func:`noise_sequence` (one fixed profile re-sampled each window: only sampling noise).

``python -m eplb_service.workloads --sample`` rewrites the bundled sample load (see
:data:`SAMPLE`); ``python -m eplb_service.workloads --kind zipf ... --out FILE`` writes any other.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
Seed = int | np.random.Generator

# Routed (token, expert) assignments per layer in one window when the caller gives none.
DEFAULT_TOKENS = 1_000_000


def _rng(seed: Seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _check_sizes(num_layers: int, num_experts: int) -> None:
    if num_layers < 1 or num_experts < 1:
        raise ValueError(
            f"num_layers and num_experts must be >= 1, got {num_layers} and {num_experts}"
        )


def _normalize(weights: FloatArray) -> FloatArray:
    """``[L, E]`` non-negative weights -> rows summing to 1."""
    return weights / weights.sum(axis=1, keepdims=True)


def sample_counts(profile: FloatArray, tokens: int, seed: Seed) -> FloatArray:
    """Samples ``tokens`` assignments per layer from a profile.

    Args:
        profile: ``[..., E]`` probabilities, each row summing to 1.
        tokens: routed (token, expert) assignments per row, >= 0.
        seed: an int seed or a generator.

    Returns:
        ``[..., E]`` float64 token counts; each row sums to ``tokens``.
    """
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    counts = _rng(seed).multinomial(int(tokens), profile)
    return np.asarray(counts, dtype=np.float64)


def zipf_profile(
    num_layers: int, num_experts: int, seed: Seed, *, exponent: float = 1.0
) -> FloatArray:
    """``[L, E]``: ``p ~ 1 / rank**exponent``, with the ranks shuffled per layer."""
    _check_sizes(num_layers, num_experts)
    base = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** exponent
    shuffled = _rng(seed).permuted(np.tile(base, (num_layers, 1)), axis=1)
    return _normalize(shuffled)


def lognormal_profile(
    num_layers: int, num_experts: int, seed: Seed, *, sigma: float = 1.0
) -> FloatArray:
    """``[L, E]``: ``p ~ exp(sigma * z)`` with ``z ~ N(0, 1)`` independent per expert."""
    _check_sizes(num_layers, num_experts)
    z = _rng(seed).standard_normal((num_layers, num_experts))
    return _normalize(np.exp(sigma * z))


def hot_profile(
    num_layers: int,
    num_experts: int,
    seed: Seed,
    *,
    num_hot: int | None = None,
    low: float = 5.0,
    high: float = 20.0,
    max_hot_share: float = 0.8,
) -> FloatArray:
    """``[L, E]``: ``num_hot`` random experts per layer at ``low..high`` x the mean load.

    The other experts share the rest equally. ``num_hot`` defaults to ``max(1, E // 32)``. When
    the hot experts would take more than ``max_hot_share`` of a layer's tokens (few experts,
    e.g. Mixtral's 8), their factors are scaled down to that share.
    """
    _check_sizes(num_layers, num_experts)
    if num_hot is None:
        num_hot = max(1, num_experts // 32)
    if not 1 <= num_hot < num_experts:
        raise ValueError(f"num_hot must be in 1..{num_experts - 1}, got {num_hot}")
    if not 0.0 < low <= high:
        raise ValueError(f"need 0 < low <= high, got low={low}, high={high}")
    rng = _rng(seed)
    factor = rng.uniform(low, high, size=(num_layers, num_hot))  # x mean, mean = 1 / E
    share = factor.sum(axis=1, keepdims=True) / num_experts
    factor *= np.minimum(1.0, max_hot_share / share)
    share = factor.sum(axis=1, keepdims=True) / num_experts
    cold = (1.0 - share) / (num_experts - num_hot)  # [L, 1]
    profile = np.repeat(cold, num_experts, axis=1)
    hot_idx = np.argsort(rng.random((num_layers, num_experts)), axis=1)[:, :num_hot]
    np.put_along_axis(profile, hot_idx, factor / num_experts, axis=1)
    return _normalize(profile)


def uniform_profile(num_layers: int, num_experts: int) -> FloatArray:
    """``[L, E]``: every expert equally likely."""
    _check_sizes(num_layers, num_experts)
    return np.full((num_layers, num_experts), 1.0 / num_experts)


def zipf(
    num_layers: int,
    num_experts: int,
    seed: Seed,
    *,
    exponent: float = 1.0,
    tokens: int = DEFAULT_TOKENS,
) -> FloatArray:
    """``[L, E]`` token counts from :func:`zipf_profile`."""
    rng = _rng(seed)
    return sample_counts(zipf_profile(num_layers, num_experts, rng, exponent=exponent), tokens, rng)


def lognormal(
    num_layers: int,
    num_experts: int,
    seed: Seed,
    *,
    sigma: float = 1.0,
    tokens: int = DEFAULT_TOKENS,
) -> FloatArray:
    """``[L, E]`` token counts from :func:`lognormal_profile`."""
    rng = _rng(seed)
    return sample_counts(lognormal_profile(num_layers, num_experts, rng, sigma=sigma), tokens, rng)


def hot(
    num_layers: int,
    num_experts: int,
    seed: Seed,
    *,
    num_hot: int | None = None,
    low: float = 5.0,
    high: float = 20.0,
    tokens: int = DEFAULT_TOKENS,
) -> FloatArray:
    """``[L, E]`` token counts from :func:`hot_profile`."""
    rng = _rng(seed)
    profile = hot_profile(num_layers, num_experts, rng, num_hot=num_hot, low=low, high=high)
    return sample_counts(profile, tokens, rng)


def uniform(
    num_layers: int, num_experts: int, seed: Seed, *, tokens: int = DEFAULT_TOKENS
) -> FloatArray:
    """``[L, E]`` token counts, every expert equally likely (only sampling noise)."""
    return sample_counts(uniform_profile(num_layers, num_experts), tokens, _rng(seed))


def _check_windows(num_windows: int) -> None:
    if num_windows < 1:
        raise ValueError(f"num_windows must be >= 1, got {num_windows}")


def drift_sequence(
    num_layers: int,
    num_experts: int,
    seed: Seed,
    *,
    num_windows: int,
    sigma: float = 1.0,
    timescale: float = 25.0,
    tokens: int = DEFAULT_TOKENS,
) -> FloatArray:
    """``[W, L, E]`` token counts of consecutive windows whose hot set drifts slowly.

    Each expert's log-popularity follows a stationary Ornstein-Uhlenbeck process: at every
    window ``x <- rho * x + sqrt(1 - rho**2) * sigma * z`` with ``rho = exp(-1 / timescale)``,
    so every window is a lognormal(``sigma``) profile and the hot set renews over about
    ``timescale`` windows (the default moves each expert's load by ~25% per window).
    """
    _check_sizes(num_layers, num_experts)
    _check_windows(num_windows)
    if timescale <= 0:
        raise ValueError(f"timescale must be > 0, got {timescale}")
    rng = _rng(seed)
    rho = float(np.exp(-1.0 / timescale))
    step = np.sqrt(1.0 - rho * rho) * sigma
    x = sigma * rng.standard_normal((num_layers, num_experts))
    out = np.empty((num_windows, num_layers, num_experts))
    for window in range(num_windows):
        if window:
            x = rho * x + step * rng.standard_normal(x.shape)
        out[window] = sample_counts(_normalize(np.exp(x)), tokens, rng)
    return out


def noise_sequence(
    num_layers: int,
    num_experts: int,
    seed: Seed,
    *,
    num_windows: int,
    exponent: float = 1.0,
    tokens: int = DEFAULT_TOKENS,
) -> FloatArray:
    """``[W, L, E]``: one fixed :func:`zipf_profile` re-sampled each window (noise only)."""
    _check_windows(num_windows)
    rng = _rng(seed)
    profile = zipf_profile(num_layers, num_experts, rng, exponent=exponent)
    stacked = np.broadcast_to(profile, (num_windows, *profile.shape))
    return sample_counts(stacked, tokens, rng)


# Single-window generators by name: (num_layers, num_experts, seed, tokens=...) -> [L, E].
LoadFn = Callable[..., FloatArray]
KINDS: dict[str, LoadFn] = {
    "zipf": zipf,
    "lognormal": lognormal,
    "hot": hot,
    "uniform": uniform,
}


@dataclass(frozen=True)
class SampleSpec:
    """How the bundled sample load ``eplb_service/data/sample_load.npy`` is made."""

    kind: str = "zipf"
    num_layers: int = 16
    num_experts: int = 64
    seed: int = 2026
    tokens: int = 200_000
    options: tuple[tuple[str, float], ...] = (("exponent", 1.2),)


SAMPLE = SampleSpec()
SAMPLE_PATH = Path(__file__).resolve().parent / "data" / "sample_load.npy"


def make_load(
    kind: str, num_layers: int, num_experts: int, seed: int, tokens: int, **options: Any
) -> FloatArray:
    """``[L, E]`` token counts of the named single-window workload (a key of :data:`KINDS`)."""
    fn = KINDS.get(kind)
    if fn is None:
        raise ValueError(f"unknown workload kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    return fn(num_layers, num_experts, seed, tokens=tokens, **options)


def sample_load(spec: SampleSpec = SAMPLE) -> npt.NDArray[np.int64]:
    """``[16, 64]`` int64: the bundled sample load, regenerated deterministically."""
    load = make_load(
        spec.kind, spec.num_layers, spec.num_experts, spec.seed, spec.tokens, **dict(spec.options)
    )
    return load.astype(np.int64)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eplb_service.workloads",
        description="Write a seeded synthetic expert load [layers, experts] as .npy (int64).",
    )
    parser.add_argument("--sample", action="store_true", help="write the bundled sample load")
    parser.add_argument(
        "--out", type=Path, help=f"output .npy (default with --sample: {SAMPLE_PATH})"
    )
    parser.add_argument("--kind", choices=sorted(KINDS), default="zipf")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    parser.add_argument("--exponent", type=float, help="zipf exponent (default 1.0)")
    parser.add_argument("--sigma", type=float, help="lognormal sigma (default 1.0)")
    args = parser.parse_args(argv)
    if args.sample:
        load = sample_load()
        out = args.out or SAMPLE_PATH
    else:
        if args.out is None:
            parser.error("--out is required (or --sample)")
        options = {
            name: value
            for name, value in (("exponent", args.exponent), ("sigma", args.sigma))
            if value is not None
        }
        try:
            load = make_load(
                args.kind, args.layers, args.experts, args.seed, args.tokens, **options
            ).astype(np.int64)
        except (TypeError, ValueError) as exc:
            parser.error(str(exc))
        out = args.out
    np.save(out, load)
    print(f"wrote {out}: {load.shape[0]} layers x {load.shape[1]} experts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
