"""Full-weight gradient estimation for the gradient-based initialisers (LoRA-GA, LoRA-SB).

For every targeted layer, G = dL/dW (out, in) is estimated over a few batches as the mean of the
per-batch gradients of the model's (mean) loss, as LoRA-GA's official `estimate_gradient` does:
G = (1 / #batches) sum_b dL_b/dW.

Memory is bounded the way the official code bounds it: during backward, a hook on each target
weight (`register_post_accumulate_grad_hook`) adds the just-produced `.grad` into a float32 (float64
on a float64 weight) accumulation buffer, on CPU by default, and sets `.grad = None` at once, so the device holds at
most the few full gradients backward is producing at that moment; only the target weights require
grad during the pass (adapters and every other parameter are frozen for it). Adapters are switched
off for the pass, so G is the base model's gradient. Every flag (requires_grad, train/eval mode,
disabled adapters) is restored afterwards, also when a batch fails.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.core.errors import ConfigError
from lorakit.core.inject import adapted_layers, requires_grad_flags
from lorakit.core.layer import AdaptedLinear


def batch_loss(output) -> torch.Tensor:
    """The loss a model returns for a batch with `labels` (a ModelOutput, a dict, or a tensor)."""
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", output)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ConfigError(
            "gradient estimation needs a scalar loss from the model: give every batch `labels` "
            "(e.g. {'input_ids': ..., 'attention_mask': ..., 'labels': ...})"
        )
    return loss


def targets_of(model: nn.Module, adapter_name: str) -> dict[str, AdaptedLinear]:
    """Every adapted layer that holds adapter `adapter_name`, by module path."""
    return {path: layer for path, layer in adapted_layers(model) if adapter_name in layer.adapters}


def estimate_gradients(model: nn.Module, layers: dict[str, AdaptedLinear], data: Iterable[dict], *,
                       offload: bool = True, progress: bool = True, desc: str = "estimating gradients") -> dict[str, torch.Tensor]:
    """{path: G} with G the mean over `data`'s batches of dL/dW of each layer's base weight, (out, in),
    float32 (float64 for a float64 weight), on CPU with `offload` (else on the weight's device).
    The model runs in train mode with its adapters off."""
    if not layers:
        raise ConfigError("no adapted layers to estimate gradients for")
    flags = requires_grad_flags(model)
    was_training = model.training
    disabled = {id(layer): layer.adapters_disabled for _, layer in adapted_layers(model)}
    weights = {path: layer.base.weight for path, layer in layers.items()}
    sums = {
        path: torch.zeros(layer.weight_out_in().shape, dtype=torch.promote_types(weights[path].dtype, torch.float32),
                          device="cpu" if offload else weights[path].device)
        for path, layer in layers.items()
    }
    hooks = []

    def accumulate(path: str, transpose: bool):
        def hook(weight: torch.Tensor) -> None:
            grad = weight.grad.T if transpose else weight.grad
            sums[path].add_(grad.to(device=sums[path].device, dtype=sums[path].dtype))
            weight.grad = None  # the next layer's gradient may now take this one's memory

        return hook

    start = time.perf_counter()
    batches = 0
    try:
        for param in model.parameters():
            param.requires_grad_(False)
        for _, layer in adapted_layers(model):
            layer.adapters_disabled = True
        for path, layer in layers.items():
            weights[path].grad = None
            weights[path].requires_grad_(True)
            hooks.append(weights[path].register_post_accumulate_grad_hook(accumulate(path, layer.fan_in_fan_out)))
        model.train()
        with torch.enable_grad():
            for batch in tqdm(data, desc=desc, unit="batch", disable=not progress, leave=False):
                batch_loss(model(**batch)).backward()
                batches += 1
    finally:
        for hook in hooks:
            hook.remove()
        for weight in weights.values():
            weight.grad = None
        for param in model.parameters():
            param.requires_grad_(flags.get(id(param), param.requires_grad))
        for _, layer in adapted_layers(model):
            layer.adapters_disabled = disabled.get(id(layer), False)
        model.train(was_training)
    if batches == 0:
        raise ConfigError("the data for gradient estimation gave no batches; pass at least one batch")
    if progress:
        print(f"{desc}: {len(layers)} layers, {batches} batches, {time.perf_counter() - start:.1f}s", flush=True)
    return {path: total.div_(batches) for path, total in sums.items()}
