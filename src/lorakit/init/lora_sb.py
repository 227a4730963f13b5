"""LoRA-SB (LoRA Silver Bullet): `LoraXSConfig(init="lora-sb")`.

Ponkshe, Singhal, Gorbunov, Tumanov, Horvath, Vepakomma, arXiv 2411.19557; follows the official
code (RaghavSinghal10/lora-sb: `estimate_and_process_grads_torch_3`, `find_and_initialize_grad`,
`get_svd_grad`). The layer is LoRA-XS (`lorakit.methods.loraxs`): h = W x + b + s B R A x with
B, A frozen and R (r x r) trained; W is never modified. Per target layer:

1. G = dL/dW estimated on the given batches (`lorakit.init.gradients`; the mean of per-batch
   gradients -- the official code sums per-batch gradients of loss / batch size, which differs
   by a positive factor only, so the default sign update is the same).
2. The first update of full fine-tuning is approximated by an update function:
   "sign" (default, Adam's first step): dW_1 = -eta_eff sign(G); "gradient" (SGD):
   dW_1 = -eta_eff G; with eta_eff = lr / (warmup_ratio * total_steps), the learning rate of the
   first warmup step. `UPDATE_FUNCTIONS` maps names to `fn(G, eta) -> dW_1`; add to it for more.
3. dW_1 ~= U_r S_r V_r^T (randomized SVD with `svd_niter` power iterations, 10 as the official
   code; None for the exact SVD), then B = U_r, R = diag(S_r), A = V_r^T, with s = 1.

So at initialisation W_eff = W + (best rank-r approximation of dW_1): the model has deliberately
taken an approximate first step and is NOT identical to the base model. The adapter file holds
B, A and R, so loading needs no data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.core.config import require_choice, require_in_range, require_positive
from lorakit.core.errors import ConfigError
from lorakit.core.linalg import truncated_svd
from lorakit.core.registry import register_data_initialiser
from lorakit.init.gradients import estimate_gradients, targets_of

# fn(G, eta) -> dW_1, the approximate first full fine-tuning update.
UPDATE_FUNCTIONS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "sign": lambda grad, eta: -eta * torch.sign(grad),
    "gradient": lambda grad, eta: -eta * grad,
}


@dataclass
class LoraSBOptions:
    """Options of `init="lora-sb"` (`LoraXSConfig.init_options`). Defaults are the official
    arithmetic script's (lr 1e-4, warmup_ratio 0.02, total steps = 50,000 samples / estimation
    batch 3 = 16,667, as its `len(train_loader) * epochs`); set lr / warmup_ratio / total_steps
    to your run's.

    update: "sign" (-eta sign(G), Adam's first step) or "gradient" (-eta G, SGD's), or any name
        added to `lorakit.init.lora_sb.UPDATE_FUNCTIONS`.
    lr: the run's peak learning rate (> 0).
    warmup_ratio: the run's warmup fraction, in (0, 1].
    total_steps: the run's number of optimiser steps (>= 1).
    svd_niter: power iterations of the randomized SVD of dW_1 (>= 1); None for the exact SVD.
    offload: accumulate the gradient estimates on CPU (False: on the weights' device).
    """

    update: str = "sign"
    lr: float = 1e-4
    warmup_ratio: float = 0.02
    total_steps: int = 16667
    svd_niter: int | None = 10
    offload: bool = True

    def __post_init__(self) -> None:
        require_choice("init_options['update']", self.update, tuple(UPDATE_FUNCTIONS))
        require_positive("init_options['lr']", self.lr)
        require_positive("init_options['warmup_ratio']", self.warmup_ratio)
        require_in_range("init_options['warmup_ratio']", self.warmup_ratio, 0.0, 1.0, closed_high=True)
        require_positive("init_options['total_steps']", self.total_steps, integer=True)
        if self.svd_niter is not None:
            require_positive("init_options['svd_niter']", self.svd_niter, integer=True)

    @property
    def eta_eff(self) -> float:
        """The learning rate of the first warmup step: lr / (warmup_ratio * total_steps)."""
        return self.lr / (self.warmup_ratio * self.total_steps)


def first_update(grad: torch.Tensor, options: LoraSBOptions) -> torch.Tensor:
    """dW_1 = the options' update function of G with eta_eff."""
    return UPDATE_FUNCTIONS[options.update](grad, options.eta_eff)


def lora_sb_factors(update: torch.Tensor, r: int, niter: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B = U_r, R = diag(S_r), A = V_r^T) of the truncated SVD of dW_1."""
    U, S, Vh = truncated_svd(update, r, niter)
    return U, torch.diag(S), Vh


@register_data_initialiser("lora-sb", options=LoraSBOptions)
def lora_sb_init(model: nn.Module, adapter_name: str, data, options: LoraSBOptions, progress: bool = True) -> None:
    """Estimate G on `data` and set B, R, A of LoRA-XS adapter `adapter_name` (see the module)."""
    layers = targets_of(model, adapter_name)
    for path, layer in layers.items():
        if not hasattr(layer.adapters[adapter_name], "set_factors"):
            raise ConfigError(f"init='lora-sb' needs LoRA-XS adapters (method 'loraxs'); {path} has "
                              f"{type(layer.adapters[adapter_name]).__name__}")
    start = time.perf_counter()
    grads = estimate_gradients(model, layers, data, offload=options.offload, progress=progress,
                               desc="LoRA-SB: estimating gradients")
    for path, layer in tqdm(layers.items(), desc="LoRA-SB: SVD of the first updates", unit="layer",
                            disable=not progress, leave=False):
        adapter = layer.adapters[adapter_name]
        dtype = torch.promote_types(adapter.lora_latent.weight.dtype, torch.float32)
        grad = grads.pop(path).to(device=adapter.lora_latent.weight.device, dtype=dtype)
        B, R, A = lora_sb_factors(first_update(grad, options), adapter.r, options.svd_niter)
        adapter.set_factors(B=B, A=A, R=R)
    if progress:
        print(f"LoRA-SB: initialised {len(layers)} layers in {time.perf_counter() - start:.1f}s", flush=True)
