"""How balanced a placement is under a load, and how balanced any placement could be.

All functions are pure and work on all layers at once. A logical expert's load splits evenly over
its replicas (what modulo or random replica choice does), so slot ``s`` of layer ``l`` carries
``weight[l, phy2log[l, s]] / logcnt[l, phy2log[l, s]]``.

Terms (see DESIGN.md):
- balancedness, per layer: mean rank load / max rank load (1 = perfect);
- imbalance ratio, per layer: max / mean - 1 (0 = perfect), as TensorRT-LLM reports it;
- lower bound: the smallest max rank load any placement of P slots over R ranks can reach.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from eplb_service.placement import Placement

FloatArray = npt.NDArray[np.float64]


def as_load(weight: Any, name: str = "weight") -> FloatArray:
    """Converts a ``[L, E]`` load (numpy, torch or nested lists) to float64 and checks it.

    Raises:
        ValueError: naming ``name`` when the load is not 2-D, not finite or negative.
    """
    if type(weight).__module__.startswith("torch"):
        weight = weight.detach().cpu().double().numpy()
    try:
        arr = np.asarray(weight, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name} must be a numeric [layers, experts] array: {exc}") from None
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [layers, experts], got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        layer, expert = (int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise ValueError(f"{name}[{layer}][{expert}] is not finite ({arr[layer, expert]})")
    if np.any(arr < 0):
        layer, expert = (int(i) for i in np.argwhere(arr < 0)[0])
        raise ValueError(f"{name}[{layer}][{expert}] is negative ({arr[layer, expert]})")
    return arr


def slot_loads(weight: FloatArray, placement: Placement) -> FloatArray:
    """``[L, E]`` logical load -> ``[L, P]`` load carried by each slot."""
    _check_weight_shape(weight, placement)
    per_replica = weight / placement.logcnt
    return np.take_along_axis(per_replica, placement.phy2log, axis=1)


def rank_loads(weight: FloatArray, placement: Placement) -> FloatArray:
    """``[L, E]`` logical load -> ``[L, R]`` load of each rank."""
    t = placement.topology
    return slot_loads(weight, placement).reshape(t.num_layers, t.num_ranks, -1).sum(axis=2)


def balancedness(loads: FloatArray) -> FloatArray:
    """``[L, R]`` rank loads -> ``[L]`` mean / max (1.0 for a layer with no load)."""
    peak = loads.max(axis=1)
    mean = loads.mean(axis=1)
    # mean <= max exactly; clip the last-ulp rounding of the mean (equal loads gave 1 + 2e-16).
    return np.minimum(np.divide(mean, peak, out=np.ones_like(mean), where=peak > 0), 1.0)


def imbalance_ratio(loads: FloatArray) -> FloatArray:
    """``[L, R]`` rank loads -> ``[L]`` max / mean - 1 (0.0 for a layer with no load)."""
    peak = loads.max(axis=1)
    mean = loads.mean(axis=1)
    ratio = np.divide(peak, mean, out=np.ones_like(mean), where=mean > 0)
    return np.maximum(ratio - 1.0, 0.0)  # never -1e-16 from rounding (see balancedness)


def lower_bound(weight: FloatArray, num_slots: int, num_ranks: int) -> FloatArray:
    """``[L]``: the smallest max rank load any placement of P slots over R ranks can reach.

    ``LB = max(W / R, min over c of max_e w_e / min(c_e, R))`` where ``c`` ranges over replica
    counts with ``c_e >= 1`` and ``sum c = P``. The inner minimum is exact by water-filling: each
    extra replica goes to the expert with the highest ``w / min(c, R)``; once that expert already
    spans every rank, no further replica can lower the maximum.

    Args:
        weight: ``[L, E]`` non-negative loads.
        num_slots: P >= E.
        num_ranks: R.
    """
    num_layers, num_experts = weight.shape
    if num_slots < num_experts:
        raise ValueError(f"num_slots ({num_slots}) must be >= num_experts ({num_experts})")
    counts = np.ones_like(weight)
    rows = np.arange(num_layers)
    for _ in range(num_slots - num_experts):
        effective = weight / np.minimum(counts, num_ranks)
        hottest = effective.argmax(axis=1)
        # A capped expert cannot get cheaper; giving it a replica changes nothing, harmlessly.
        counts[rows, hottest] += 1
    replica_bound = (weight / np.minimum(counts, num_ranks)).max(axis=1)
    return np.maximum(weight.sum(axis=1) / num_ranks, replica_bound)


@dataclass(frozen=True)
class BalanceReport:
    """Summary of how a placement serves a load; all values are plain floats for JSON."""

    balancedness_mean: float
    balancedness_worst: float
    worst_layer: int
    imbalance_mean: float
    imbalance_max: float
    max_over_lower_bound: float  # mean over layers of achieved max rank load / LB

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(weight: FloatArray, placement: Placement) -> BalanceReport:
    """Balance of ``placement`` under the ``[L, E]`` load ``weight``."""
    bound = lower_bound(weight, placement.num_slots, placement.topology.num_ranks)
    return report(rank_loads(weight, placement), bound)


def report(loads: FloatArray, bound: FloatArray) -> BalanceReport:
    """Summarises ``[L, R]`` rank loads against the ``[L]`` lower bound of their layers.

    Callers that evaluate several placements of one load compute the bound once and call this.
    """
    per_layer = balancedness(loads)
    imbalance = imbalance_ratio(loads)
    peak = loads.max(axis=1)
    over = np.divide(peak, bound, out=np.ones_like(peak), where=bound > 0)
    worst = int(per_layer.argmin())
    return BalanceReport(
        balancedness_mean=float(per_layer.mean()),
        balancedness_worst=float(per_layer[worst]),
        worst_layer=worst,
        imbalance_mean=float(imbalance.mean()),
        imbalance_max=float(imbalance.max()),
        max_over_lower_bound=float(over.mean()),
    )


def _check_weight_shape(weight: FloatArray, placement: Placement) -> None:
    expected = (placement.num_layers, placement.num_experts)
    if weight.shape != expected:
        raise ValueError(
            f"load shape {tuple(weight.shape)} does not match the placement's "
            f"[layers={expected[0]}, experts={expected[1]}]"
        )
