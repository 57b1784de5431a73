"""The MoE model the test engine serves: L MoE layers of E SwiGLU experts, a skewable router.

Everything is generated from ``MoEConfig.seed`` on the CPU with a private ``torch.Generator``,
so every process (each EP rank, the dense reference) builds bit-identical weights: that is the
"checkpoint" the engine loads slots from.

One layer, for hidden states ``x [T, H]``::

    h = rmsnorm(x)                                     # no learned scale
    logits = h @ gate[l] + bias[l]                     # [T, E]; bias[l] sets the skew
    p = softmax(logits); w, ids = topk(p, K)           # ids [T, K] logical experts
    w = w / w.sum(-1)                                  # renormalized over the top k
    x = x + sum_k w[:, k] * expert(ids[:, k], h)

with the SwiGLU expert ``expert(e, h) = (silu(h W1[e]^T) * (h W3[e]^T)) W2[e]^T``.

Skew: ``bias[l][e] = -skew * log(1 + rank_l(e))`` where ``rank_l`` is a seeded per-layer
permutation of the experts (a Zipf profile with exponent ``skew``; the hot experts differ per
layer). ``skew = 0`` gives a uniform prior; ``skew >= 1`` makes a few experts carry most tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["MoEConfig", "MoEModel", "expert_forward", "rmsnorm"]


@dataclass(frozen=True)
class MoEConfig:
    """Sizes and seeds of the model.

    Attributes:
        num_layers: L MoE layers.
        num_experts: E logical experts per layer.
        top_k: K experts per token.
        hidden: H, the model width.
        ffn: F, each expert's intermediate width.
        skew: Zipf exponent of the router's per-layer logit bias (0 = uniform prior).
        seed: weights and skew permutation seed.
        dtype: parameter and activation dtype (fp32 for exactness tests).
    """

    num_layers: int = 2
    num_experts: int = 8
    top_k: int = 2
    hidden: int = 16
    ffn: int = 32
    skew: float = 1.0
    seed: int = 0
    dtype: torch.dtype = field(default=torch.float32)

    def __post_init__(self) -> None:
        if min(self.num_layers, self.num_experts, self.top_k, self.hidden, self.ffn) < 1:
            raise ValueError(f"all sizes must be >= 1: {self}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} > num_experts {self.num_experts}")

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (w1, w2, w3)."""
        return 3 * self.hidden * self.ffn * torch.empty((), dtype=self.dtype).element_size()


def rmsnorm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / rms(x)`` over the last dimension."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def expert_forward(
    h: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
) -> torch.Tensor:
    """SwiGLU expert: ``h [T, H]``, ``w1, w3 [F, H]``, ``w2 [H, F]`` -> ``[T, H]``."""
    return (F.silu(h @ w1.T) * (h @ w3.T)) @ w2.T


class MoEModel:
    """All weights of the model (every expert of every layer), on the CPU.

    Attributes:
        config: the sizes.
        gate: ``[L, H, E]`` router weights.
        bias: ``[L, E]`` router logit bias (the skew).
        w1, w3: ``[L, E, F, H]`` gate and up projections.
        w2: ``[L, E, H, F]`` down projection.
    """

    def __init__(self, config: MoEConfig) -> None:
        self.config = c = config
        gen = torch.Generator().manual_seed(c.seed)

        def normal(*shape: int, scale: float) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(c.dtype)

        self.gate = normal(c.num_layers, c.hidden, c.num_experts, scale=c.hidden**-0.5)
        self.w1 = normal(c.num_layers, c.num_experts, c.ffn, c.hidden, scale=c.hidden**-0.5)
        self.w3 = normal(c.num_layers, c.num_experts, c.ffn, c.hidden, scale=c.hidden**-0.5)
        self.w2 = normal(c.num_layers, c.num_experts, c.hidden, c.ffn, scale=c.ffn**-0.5)
        self.hot_order = torch.stack(
            [torch.randperm(c.num_experts, generator=gen) for _ in range(c.num_layers)]
        )  # [L, E]: hot_order[l, e] = popularity rank of expert e in layer l (0 = hottest)
        self.bias = self.skew_bias(c.skew)

    def skew_bias(self, skew: float) -> torch.Tensor:
        """``[L, E]`` logit bias of a Zipf profile with exponent ``skew``."""
        return (-float(skew) * torch.log1p(self.hot_order.to(torch.float64))).to(
            self.config.dtype
        )

    def set_skew(self, skew: float) -> None:
        """Change the router's skew in place (e.g. to make the load drift during a run)."""
        self.bias = self.skew_bias(skew)

    def route(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h [T, H]`` (normalized) -> ``(ids [T, K] int64, weights [T, K])``."""
        logits = h @ self.gate[layer].to(h.device) + self.bias[layer].to(h.device)
        probs = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(probs, self.config.top_k, dim=-1)
        return ids, weights / weights.sum(-1, keepdim=True)

    def expert_weights(self, layer: int, experts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stacked weights of ``experts [n]`` (logical ids): ``w1, w3 [n, F, H]``, ``w2 [n, H, F]``
        (fresh tensors, contiguous)."""
        idx = experts.to(torch.int64).cpu()
        return {
            "w1": self.w1[layer, idx].contiguous(),
            "w2": self.w2[layer, idx].contiguous(),
            "w3": self.w3[layer, idx].contiguous(),
        }

    def inputs(self, step: int, num_tokens: int) -> torch.Tensor:
        """The global batch of a step: ``[num_tokens, H]``, seeded by ``(seed, step)``."""
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        return torch.randn(num_tokens, self.config.hidden, generator=gen).to(self.config.dtype)
