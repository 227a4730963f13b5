"""CBQ's coarse-to-fine outlier pre-processing (CFP; Algorithm 1 of arXiv 2312.07950).

For a 1-D set of magnitudes X (weights: |W|; activations: each input channel's max |X_c|):
  coarse:  T = Q3 + lambda1 (Q3 - Q1)  (IQR rule, lambda1 = 1.5);  O = {x in X : x > T}
  fine:    sort O ascending; for each split i (1 <= i < |O|): reserved R = O[:i], outliers O[i:],
           M_intra = Var(R), M_inter = (min O[i:] - max R)^2;  i* = argmax M_inter - lambda2 M_intra;
           outliers = O[i*:]  (a single coarse candidate is the outlier).
  weights:      outlier weights are truncated to the largest non-outlier magnitude (sign kept);
  activations:  outlier channel c gets t_c = max|X_c| / thr (thr: largest non-outlier channel max),
                X_c <- X_c / t_c folded into the producing norm's gain (and bias), W[:, c] <- W[:, c] t_c
                in every consuming Linear: X W^T is unchanged before quantization.
The M_inter / M_intra formulas and lambda2 are the spec's reconstruction (the paper's text was not
available); lambda2 = 1 is the library default.
"""

from __future__ import annotations

import torch
from torch import nn

LAMBDA1 = 1.5
LAMBDA2 = 1.0


def coarse_outliers(values: torch.Tensor, lambda1: float = LAMBDA1) -> tuple[torch.Tensor, float]:
    """(mask of values above T, T) with T = Q3 + lambda1 (Q3 - Q1)."""
    flat = values.detach().reshape(-1).float()
    if flat.numel() > 1_000_000:  # torch.quantile's limit is 16M; a strided sample is plenty for quartiles
        sample = flat[:: flat.numel() // 1_000_000 + 1]
    else:
        sample = flat
    q1, q3 = torch.quantile(sample, torch.tensor([0.25, 0.75])).tolist()
    threshold = q3 + lambda1 * (q3 - q1)
    return values > threshold, threshold


def fine_split(candidates: torch.Tensor, lambda2: float = LAMBDA2) -> float | None:
    """The smallest value kept as an outlier after the fine stage (None: no candidates)."""
    ordered = torch.sort(candidates.detach().reshape(-1).double()).values
    n = ordered.numel()
    if n == 0:
        return None
    if n == 1:
        return float(ordered[0])
    i = torch.arange(1, n, dtype=torch.float64)
    prefix, prefix_sq = torch.cumsum(ordered, 0)[:-1], torch.cumsum(ordered ** 2, 0)[:-1]
    intra = prefix_sq / i - (prefix / i) ** 2  # Var(O[:i]) (population variance)
    inter = (ordered[1:] - ordered[:-1]) ** 2  # (min O[i:] - max O[:i])^2
    best = int(torch.argmax(inter - lambda2 * intra.clamp(min=0)))
    return float(ordered[best + 1])


def outlier_mask(values: torch.Tensor, lambda1: float = LAMBDA1, lambda2: float = LAMBDA2) -> torch.Tensor:
    """Coarse then fine: True where a value is an outlier."""
    coarse, _ = coarse_outliers(values, lambda1)
    cut = fine_split(values[coarse], lambda2)
    if cut is None:
        return torch.zeros_like(values, dtype=torch.bool)
    return coarse & (values >= cut)


@torch.no_grad()
def truncate_weight_outliers(weight: torch.Tensor, lambda1: float = LAMBDA1, lambda2: float = LAMBDA2) -> int:
    """Clip CFP outliers of |W| to the largest non-outlier magnitude, in place; returns how many."""
    magnitude = weight.abs()
    mask = outlier_mask(magnitude, lambda1, lambda2)
    count = int(mask.sum())
    if count and count < mask.numel():
        limit = magnitude[~mask].max()
        weight.copy_(torch.where(mask, weight.sign() * limit, weight))
    return count


def activation_scales(channel_max: torch.Tensor, lambda1: float = LAMBDA1, lambda2: float = LAMBDA2) -> torch.Tensor:
    """t_c = max|X_c| / thr for outlier channels, 1 elsewhere (thr: largest non-outlier channel max)."""
    mask = outlier_mask(channel_max, lambda1, lambda2)
    scales = torch.ones_like(channel_max, dtype=torch.float32)
    if mask.any() and not mask.all():
        threshold = channel_max[~mask].max().clamp(min=1e-8)
        scales[mask] = (channel_max[mask] / threshold).float()
    return scales


@torch.no_grad()
def fold_activation_scales(norm: nn.Module, linears: list[nn.Linear], scales: torch.Tensor) -> None:
    """X_c <- X_c / t_c through the norm's gain (and bias); W[:, c] <- W[:, c] t_c in each consumer."""
    norm.weight.div_(scales.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(scales.to(norm.bias.dtype))
    for linear in linears:
        linear.weight.mul_(scales.to(linear.weight.dtype)[None, :])
