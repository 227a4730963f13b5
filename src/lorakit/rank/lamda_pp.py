"""LaMDA++ rank allocation: Azizi, Kundu, Pedram, arXiv 2406.12832 (Findings of EMNLP 2024).

Training-free, computed once before training from the pre-trained weights: a module whose
normalised singular-value spectrum is flatter (less energy in its top directions) gets more rank.

RECONSTRUCTED, unverified: the paper describes the idea but its scoring formula was not recovered
and the released code (ArminAzizi98/LaMDA) has no LaMDA++ allocation. This implementation:

    p_j   = sigma_j^2 / sum_k sigma_k^2                 normalised spectrum (energy) of W_i
    rho_i = 1 - sum_{j <= r} p_j                        energy outside the top r = average rank
    r_i   = budget * rho_i / sum_k rho_k                 rounded by largest remainders,

clipped to [min_rank, min(in_i, out_i, max_rank)] with the excess redistributed by the same rule,
so sum_i r_i == budget (default r x number of modules: the same parameter count order as uniform
rank r). The ranks are written as the `rank_pattern` of a LoRA config ({module path: rank}), which
PEFT and lorakit read at load; alpha is left per-config (alpha / r_i with the module's own rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core.config import AdapterConfig
from lorakit.core.errors import ConfigError
from lorakit.core.inject import find_targets
from lorakit.core.layer import AdaptedLinear, layer_features
from lorakit.rank.policy import RankPolicy, register_rank_policy


@dataclass
class LamdaPPOptions:
    """budget: total rank over all targeted modules (None: r x number of modules).
    min_rank / max_rank: bounds on every module's rank (max_rank None: only min(in, out))."""

    budget: int | None = None
    min_rank: int = 1
    max_rank: int | None = None


def spectral_flatness(weight: torch.Tensor, k: int) -> float:
    """rho = 1 - (energy of the top k singular values) / (total energy): 0 for rank <= k, larger when flatter."""
    sigma = torch.linalg.svdvals(weight.detach().double())
    energy = sigma.square()
    total = energy.sum()
    if total == 0:
        return 0.0
    return float(1 - energy[:k].sum() / total)


def apportion(scores: dict[str, float], budget: int, low: dict[str, int], high: dict[str, int]) -> dict[str, int]:
    """Integer ranks summing to `budget`, proportional to `scores`, within [low, high] per module."""
    if sum(low.values()) > budget or sum(high.values()) < budget:
        raise ConfigError(f"a budget of {budget} cannot be split within the per-module bounds "
                          f"(sum of minima {sum(low.values())}, of maxima {sum(high.values())})")
    fixed: dict[str, float] = {}
    free = dict(scores)
    while True:  # water-filling: pin modules that hit a bound, share the rest again
        left = budget - sum(fixed.values())
        weight = sum(free.values())
        ideal = {m: (left * s / weight if weight > 0 else left / len(free)) for m, s in free.items()}
        clipped = {m: min(max(v, low[m]), high[m]) for m, v in ideal.items()}
        pinned = {m: v for m, v in clipped.items() if v != ideal[m]}
        if not pinned:
            break
        fixed.update(pinned)
        for m in pinned:
            free.pop(m)
        if not free:
            break
    real = {**fixed, **(ideal if free else {})}
    ranks = {m: int(v) for m, v in real.items()}
    for m in sorted(real, key=lambda m: real[m] - ranks[m], reverse=True):  # largest remainders
        if sum(ranks.values()) >= budget:
            break
        if ranks[m] < high[m]:
            ranks[m] += 1
    return {m: ranks[m] for m in scores}


def lamda_pp_ranks(model: nn.Module, target_modules, average_rank: int, options: LamdaPPOptions | None = None) -> dict[str, int]:
    """{module path: rank} for the modules `target_modules` selects, from their weight spectra."""
    options = options or LamdaPPOptions()
    paths = find_targets(model, target_modules)
    scores, low, high = {}, {}, {}
    for path in paths:
        layer = model.get_submodule(path)
        base = layer.base if isinstance(layer, AdaptedLinear) else layer
        in_f, out_f = layer_features(base)
        weight = base.weight if isinstance(base, nn.Linear) else base.weight.T
        scores[path] = spectral_flatness(weight, average_rank)
        high[path] = min(in_f, out_f, options.max_rank or min(in_f, out_f))
        low[path] = min(options.min_rank, high[path])
    budget = options.budget if options.budget is not None else average_rank * len(paths)
    return apportion(scores, budget, low, high)


@register_rank_policy("lamda++", options=LamdaPPOptions)
class LamdaPlusPlus(RankPolicy):
    """Writes LaMDA++ ranks into the config's `rank_pattern` before inject; nothing during training."""

    def __init__(self, options: LamdaPPOptions | None = None):
        self.options = options or LamdaPPOptions()
        self.ranks: dict[str, int] = {}
        self.budget: int | None = None

    def prepare_config(self, model: nn.Module, config: AdapterConfig) -> AdapterConfig:
        if not hasattr(config, "rank_pattern") or not hasattr(config, "r") or config.method == "adalora":
            raise ConfigError(
                f"rank_policy 'lamda++' writes per-module ranks into a LoRA config's rank_pattern; "
                f"method {config.method!r} has none. Use --method lora"
            )
        self.ranks = lamda_pp_ranks(model, config.target_modules, config.r, self.options)
        self.budget = sum(self.ranks.values())
        config.rank_pattern = dict(self.ranks)
        config.validate()
        return config

    def final_ranks(self, model: nn.Module | None = None) -> dict[str, int]:
        return dict(self.ranks)
