"""LoRA+: a larger learning rate for B than for A.

Hayou, Ghosh, Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv 2402.12354
(ICML 2024). Registered as `lorakit train --optimizer loraplus --optimizer-options '{"ratio": 16}'`.

With dW = s B A, LoRA+ trains A with learning rate η and B with η_B = λ η, λ = `ratio` >> 1
(the paper's default λ = 2^4 = 16); otherwise the update is AdamW's, unchanged:

    A <- A - η   (AdamW direction for A + λ_wd A)
    B <- B - λ η (AdamW direction for B + λ_wd B)

Parameter groups, matching PEFT's `peft.optimizers.create_loraplus_optimizer` (which follows the
authors' code) on every parameter a lorakit adapter can have:
- B of every (A, B) pair of `Adapter.factors()` -> lr * ratio, weight decay `weight_decay`;
- other 1-D trainable parameters of an adapter that has factors (DoRA's magnitude vector) ->
  lr * ratio, weight decay `weight_decay` (PEFT: `param.ndim == 1` joins B's group);
- everything else trainable (A, adapters without factors such as VeRA or Bone, and any
  parameter outside an adapter) -> lr, weight decay `weight_decay`.
B is found through `Adapter.factors()`, not by parameter names. Differences from PEFT, on purpose:
- the parameters of adapters without factors get the base lr (PEFT's name/ndim rule would give
  their 1-D vectors, e.g. VeRA's lambdas, lr * ratio, though they have no B);
- trainable parameters outside adapters get the base lr and `weight_decay` (PEFT gives 1-D ones
  lr * ratio, and biases and LayerNorm weights no weight decay);
- no embedding group: lorakit adapts Linear (and Conv1D) layers only, so PEFT's group for LoRA
  on embedding layers (lr `loraplus_lr_embedding`, 1e-6) cannot arise;
- a model none of whose trainable parameters is a B factor is an error, not silent AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core.adapter import Adapter
from lorakit.core.config import require_positive
from lorakit.core.errors import ConfigError
from lorakit.optim import register_optimizer, trainable

DEFAULT_RATIO = 16.0  # λ = η_B / η_A = 2^4, the paper's recommendation for LLM fine-tuning


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = DEFAULT_RATIO,
                          weight_decay: float = 0.0) -> list[dict]:
    """Two parameter groups, "A" (lr) and "B" (lr * ratio), over `model`'s trainable parameters.

    They work with any `torch.optim.Optimizer` class, as PEFT's `optimizer_cls` does:
    `torch.optim.SGD(loraplus_param_groups(model, lr=1e-3), lr=1e-3)`.
    """
    require_positive("lr", lr)
    require_positive("ratio", ratio)
    params = trainable(model)
    factors_b: set[int] = set()
    fast: set[int] = set()  # ids of the parameters in B's group
    for adapter in model.modules():
        if isinstance(adapter, Adapter) and (pairs := adapter.factors()):
            factors_b.update(id(B) for _, B in pairs)
            fast.update(id(B) for _, B in pairs)
            fast.update(id(p) for p in adapter.parameters() if p.ndim == 1)  # DoRA's magnitude, as PEFT
    b_params = [p for p in params if id(p) in fast]
    if not any(id(p) in factors_b for p in b_params):
        raise ConfigError(
            "LoRA+ needs trainable (A, B) factors (Adapter.factors(), e.g. method 'lora'); the model's "
            "adapters expose none; use the plain optimizer (--optimizer adamw) for this method"
        )
    return [
        {"name": "A", "params": [p for p in params if id(p) not in fast], "lr": lr, "weight_decay": weight_decay},
        {"name": "B", "params": b_params, "lr": lr * ratio, "weight_decay": weight_decay},
    ]


class LoraPlus(torch.optim.AdamW):
    """AdamW with B's learning rate `ratio` times A's (LoRA+, arXiv 2402.12354).

    `LoraPlus(model, lr=2e-4, ratio=16)` groups `model`'s trainable parameters as the module
    docstring says; `LoraPlus(loraplus_param_groups(model, lr, ratio), lr=lr)` (or any list of
    groups) uses the given groups as they are. `weight_decay` defaults to 0 (PEFT's
    `loraplus_weight_decay`); other keyword arguments go to `torch.optim.AdamW`.
    """

    def __init__(self, params, lr: float, ratio: float = DEFAULT_RATIO, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, **adamw_kwargs):
        if isinstance(params, nn.Module):
            params = loraplus_param_groups(params, lr, ratio, weight_decay)
        self.ratio = ratio
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **adamw_kwargs)


@dataclass
class LoraPlusOptions:
    """ratio: η_B / η_A (> 0; the paper: >> 1, default 16). betas, eps: AdamW's."""

    ratio: float = DEFAULT_RATIO
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        require_positive("ratio", self.ratio)
        require_positive("eps", self.eps)


@register_optimizer("loraplus", LoraPlusOptions)
def loraplus(model: nn.Module, lr: float, weight_decay: float, options: LoraPlusOptions) -> LoraPlus:
    return LoraPlus(model, lr=lr, ratio=options.ratio, weight_decay=weight_decay, betas=options.betas, eps=options.eps)
