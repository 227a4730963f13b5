"""Optimisers for adapter training, chosen by name (`lorakit train --optimizer NAME`).

Each is a plain `torch.optim.Optimizer` usable in any loop; `build_optimizer` makes one for a
model with injected adapters from its name, learning rate, weight decay and options. Optimisers
register themselves with `register_optimizer`, so the trainer never names one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lorakit.core.config import reject_unknown_fields
from lorakit.core.errors import ConfigError

# fn(model, lr, weight_decay, options) -> torch.optim.Optimizer over the model's trainable parameters
OptimizerFactory = Callable[[nn.Module, float, float, Any], torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    factory: OptimizerFactory
    options: type  # dataclass of the options it takes (`optimizer_options`)


_OPTIMIZERS: dict[str, OptimizerSpec] = {}


def register_optimizer(name: str, options: type):
    def decorate(factory: OptimizerFactory) -> OptimizerFactory:
        _OPTIMIZERS[name] = OptimizerSpec(name, factory, options)
        return factory

    return decorate


def registered_optimizers() -> list[str]:
    return sorted(_OPTIMIZERS)


def optimizer_options(name: str, options: dict[str, Any] | None = None):
    """The options dataclass of optimiser `name` built from `options`; unknown names or keys fail."""
    if name not in _OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; registered: {', '.join(registered_optimizers())}")
    spec = _OPTIMIZERS[name]
    reject_unknown_fields(spec.options, options or {})
    return spec.options(**(options or {}))


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float = 0.0,
                    options: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """Optimiser `name` over `model`'s trainable parameters."""
    parsed = optimizer_options(name, options)
    return _OPTIMIZERS[name].factory(model, lr, weight_decay, parsed)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters; inject an adapter first (lorakit.inject)")
    return params


@dataclass
class AdamWOptions:
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@register_optimizer("adamw", AdamWOptions)
def adamw(model: nn.Module, lr: float, weight_decay: float, options: AdamWOptions) -> torch.optim.Optimizer:
    """torch.optim.AdamW over the trainable parameters (what `lorakit train` uses by default)."""
    return torch.optim.AdamW(trainable(model), lr=lr, weight_decay=weight_decay, betas=tuple(options.betas), eps=options.eps)


# The optimisers register themselves on import (they use the registry above, hence at the end).
from lorakit.optim.allora import ALLoRA  # noqa: E402
from lorakit.optim.ggpo import GGPO  # noqa: E402
from lorakit.optim.lisa import LISA  # noqa: E402
from lorakit.optim.lora_pro import LoRAPro  # noqa: E402
from lorakit.optim.loraplus import LoraPlus  # noqa: E402

__all__ = ["ALLoRA", "GGPO", "LISA", "LoRAPro", "LoraPlus", "OptimizerSpec", "build_optimizer", "optimizer_options",
           "register_optimizer", "registered_optimizers", "trainable"]
