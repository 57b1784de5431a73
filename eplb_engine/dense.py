"""The single-process dense reference: the same model, every expert local, no placement."""

from __future__ import annotations

import torch

from eplb_engine.model import MoEModel, expert_forward, rmsnorm

__all__ = ["dense_forward", "dense_layer", "relative_error"]


def dense_layer(model: MoEModel, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One MoE layer on ``x [T, H]`` -> ``(x + moe(x) [T, H], logical ids [T, K])``."""
    h = rmsnorm(x)
    ids, weights = model.route(layer, h)
    out = torch.zeros_like(x)
    for k in range(ids.shape[1]):
        for e in torch.unique(ids[:, k]).tolist():
            rows = torch.nonzero(ids[:, k] == e).squeeze(1)
            y = expert_forward(h[rows], model.w1[layer, e], model.w2[layer, e],
                               model.w3[layer, e])
            out[rows] += weights[rows, k : k + 1] * y
    return x + out, ids


def dense_forward(model: MoEModel, x: torch.Tensor) -> torch.Tensor:
    """All L layers on ``x [T, H]`` -> ``[T, H]``."""
    for layer in range(model.config.num_layers):
        x, _ = dense_layer(model, layer, x)
    return x


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |got - ref| / max |ref|`` (0 when both are empty)."""
    if ref.numel() == 0:
        return 0.0
    scale = ref.abs().max().item()
    diff = (got.to(ref.dtype) - ref).abs().max().item()
    return float(diff / scale) if scale > 0 else float(diff)
