"""LoRAPrune's importance criterion, its group scores, and the sparsity schedule.

Zhang et al., "LoRAPrune: Structured Pruning Meets Low-Rank Parameter-Efficient Fine-Tuning",
arXiv 2305.18403 (official code aim-uofa/LoRAPrune, `loraprune/utils.py`). Per adapted linear layer
with frozen W (out x in), LoRA A (r x in), B (out x r), s = alpha / r and G_A = dL/dA, G_B = dL/dB:

    G_hat = G_B A + B G_A - G_B G_A          (estimate of dL/dW; no s factor, as the official code)
    I     = | G_hat * (W + s B A) |          (element importance, out x in)

Metrics: "lora" (above), "magnitude" (G_hat := 1, so I = |W + s B A|) and "grad" (G_hat := the
true dL/dW, LLM-Pruner's first-order Taylor score; needs the full base-weight gradients).
Group scores: q/k/v/gate/up sum I over the input dim (a score per output channel); o/down are
transposed first (a score per input channel). Attention vectors are summed over head_dim, every
module's vector is scaled to unit L2 norm (eps 1e-8), and the modules of one group are added.
"""

from __future__ import annotations

import torch

METRICS = ("lora", "magnitude", "grad")
EPS = 1e-8


def lora_weight_gradient(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor) -> torch.Tensor:
    """G_hat = G_B A + B G_A - G_B G_A: the change of W' = W + B A under one unit SGD step on A and B.
    Computed as one rank-2r product, [G_B, B] [A - G_A; G_A] = G_B (A - G_A) + B G_A (the same terms)."""
    return torch.cat([grad_B, B], dim=1) @ torch.cat([A - grad_A, grad_A], dim=0)


def element_importance(metric: str, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                       grad_A: torch.Tensor | None = None, grad_B: torch.Tensor | None = None,
                       weight_grad: torch.Tensor | None = None) -> torch.Tensor:
    """I = |G_hat * (W + s B A)| with G_hat chosen by `metric` (out x in, in A's dtype)."""
    merged = torch.addmm(weight.to(A.dtype), B, A, alpha=scaling)  # W + s B A
    if metric == "magnitude":
        return merged.abs_()
    if metric == "lora":
        return merged.mul_(lora_weight_gradient(A, B, grad_A, grad_B)).abs_()
    if metric == "grad":
        return merged.mul_(weight_grad.to(A.dtype)).abs_()
    raise ValueError(f"metric={metric!r}; choose one of {METRICS}")


def module_scores(importance: torch.Tensor, fan_in: bool, head_dim: int | None = None) -> torch.Tensor:
    """One module's unit-norm score vector: per channel, or per head when `head_dim` is given."""
    channel = importance.sum(0) if fan_in else importance.sum(1)
    if head_dim is not None:
        channel = channel.reshape(-1, head_dim).sum(1)
    return channel / (torch.linalg.norm(channel) + EPS)


def heads_to_kv_groups(scores: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Sum per-query-head scores over the n_rep query heads of each KV group."""
    return scores.reshape(n_kv, -1).sum(1)


def sparsity_at(step: int, total: int, warmup: float, cooldown: float, initial: float, final: float) -> float:
    """Cubic schedule: `initial` while step <= warmup*T, `final` once step > T - cooldown*T, else
    final + (initial - final) * (1 - (step - warmup*T) / (T - (warmup + cooldown)*T))**3."""
    if step <= warmup * total:
        return initial
    if step > total - cooldown * total:
        return final
    progress = 1 - (step - warmup * total) / (total - (warmup + cooldown) * total)
    return final + (initial - final) * progress**3


def prune_lowest(scores: torch.Tensor, mask: torch.Tensor, n_prune: int) -> torch.Tensor:
    """A new 0/1 mask with the `n_prune` lowest-scoring groups at 0. Already-pruned groups rank
    lowest (the official code ranks S * mask, which ties them with zero-score groups; -inf makes the
    pruned set only grow)."""
    ranked = torch.where(mask > 0, scores.to(torch.float64), torch.full_like(scores, float("-inf"), dtype=torch.float64))
    new = torch.ones_like(mask)
    new[torch.argsort(ranked, stable=True)[:n_prune]] = 0
    return new
