"""Input checks and numpy/torch conversion for :func:`eplb_service.policy.rebalance_experts`.

torch is imported only when a torch tensor comes in, so the service runs without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eplb_service.policy._common import FloatArray, IntArray

# Loads are summed in float32; keep every per-layer total far from float32 overflow.
_MAX_LAYER_TOTAL = 2.0**120


def is_torch_tensor(x: object) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch."""
    return type(x).__module__.startswith("torch")


def as_load(weight: Any) -> FloatArray:
    """Converts a load ``[layers, experts]`` (numpy, torch on any device, nested lists) to a
    checked float32 numpy array ``[L, E]``.

    Raises:
        ValueError: naming ``weight`` when it is not numeric, not 2-D, empty, not finite in
            float32, negative, or when a layer's total load is too large to sum in float32.
    """
    if is_torch_tensor(weight):
        weight = weight.detach().float().cpu().numpy()
    try:
        with np.errstate(over="ignore"):  # too large for float32 -> inf, rejected below
            load = np.asarray(weight, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"weight must be a numeric [layers, experts] array: {exc}") from None
    if load.ndim != 2:
        raise ValueError(f"weight must be 2-D [layers, experts], got shape {load.shape}")
    if load.shape[0] < 1 or load.shape[1] < 1:
        raise ValueError(f"weight must have >= 1 layer and >= 1 expert, got shape {load.shape}")
    if not np.isfinite(load).all():
        raise ValueError("weight must be finite (as float32): found NaN or infinity")
    if (load < 0).any():
        raise ValueError("weight must be non-negative: found a negative load")
    if load.sum(axis=1, dtype=np.float64).max() > _MAX_LAYER_TOTAL:
        raise ValueError(f"weight: a layer's total load exceeds {_MAX_LAYER_TOTAL:.3g}")
    return load


def check_sizes(
    num_experts: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> None:
    """Checks the topology sizes against each other.

    Raises:
        ValueError: naming the offending field.
    """
    sizes = {
        "num_replicas": num_replicas,
        "num_groups": num_groups,
        "num_nodes": num_nodes,
        "num_gpus": num_gpus,
    }
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_replicas < num_experts:
        raise ValueError(
            f"num_replicas ({num_replicas}) must be >= the number of experts ({num_experts})"
        )
    if num_replicas % num_gpus:
        raise ValueError(
            f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus})"
        )
    if num_experts % num_groups:
        raise ValueError(
            f"num_groups ({num_groups}) must divide the number of experts ({num_experts})"
        )
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")


def like_input(weight: Any, arrays: tuple[IntArray, ...]) -> tuple[Any, ...]:
    """Returns ``arrays`` as int64 torch tensors on ``weight``'s device if ``weight`` is a
    torch tensor, else unchanged (numpy int64)."""
    if not is_torch_tensor(weight):
        return arrays
    import torch

    return tuple(torch.from_numpy(a).to(weight.device) for a in arrays)
