"""LoRA-GA: Low-Rank Adaptation with Gradient Approximation (`LoraConfig(init="lora-ga")`).

Wang, Yu, Li, arXiv 2407.05000 (NeurIPS 2024); follows the official code (Outsider565/LoRA-GA,
`LoraLayer.lora_ga_init`, `estimate_gradient`). Per target layer, W (m x n = out x in), rank r,
s = alpha / r (alpha / sqrt(r) with rsLoRA):

1. G = dL/dW, the mean over the given batches of each batch's gradient (`lorakit.init.gradients`).
2. G ~= U S V^T, top 2r triplets (randomized SVD with q = min(4r, m, n) columns and 4 power
   iterations, as the official code; `svd_niter=None` for the exact SVD).
3. direction "ArB2r" (default): A = V_{1:r}^T, B = U_{r+1:2r}; "A2rBr": A = V_{r+1:2r}^T,
   B = U_{1:r}; "ArBr": A = rows 1, 3, .., 2r-1 of V^T, B = columns 0, 2, .., 2r-2 of U;
   "random": a random split of 0..2r-1 (first r indices to A). No singular values in A or B.
4. scale "stable" (default): A and B both times c = m^{1/4} / sqrt(stable_gamma); "gd": both
   divided by s; "unit": c = 1; "weightS": both times mean(sqrt(S_W[:r] / s)) of W's own
   singular values. `norm_clip`: if max|s B A| > max|W|, A and B shrink by sqrt of the ratio.
5. W_res = W - s B A (float32 or wider), so the adapted model equals the base at initialisation.

Why: one SGD step of size eta moves W_eff = W_res + s B A by
-eta s^2 (G A^T A + B B^T G) + O(eta^2) = -eta s^2 c^2 G_{2r}, G_{2r} the best rank-2r
approximation of G, for every direction above. (PEFT's port multiplies B by diag(S) and scales B
only, which breaks this identity; lorakit follows the official code.)

W is rewritten, so the adapter remembers (B0, A0): `save_adapter` writes the rank-2r update
s (B A - B0 A0), exact against the untouched base, as for PiSSA (`lorakit.init.svd`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.core.config import require_choice, require_positive
from lorakit.core.errors import ConfigError
from lorakit.core.linalg import truncated_svd
from lorakit.core.registry import register_data_initialiser
from lorakit.init.gradients import estimate_gradients, targets_of

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "gd", "unit", "weightS")


@dataclass
class LoraGAOptions:
    """Options of `init="lora-ga"` (`LoraConfig.init_options`); defaults are the official code's.

    direction: which singular vectors go to A and to B: "ArB2r", "A2rBr", "ArBr" or "random".
    scale: "stable" (A, B times m^{1/4} / sqrt(stable_gamma)), "gd" (divided by s), "unit",
        or "weightS" (times the mean root of W's top-r singular values over s).
    stable_gamma: gamma of the "stable" scale (> 0).
    norm_clip: shrink A and B when max|s B A| exceeds max|W|.
    svd_niter: power iterations of the randomized SVD of G (>= 1); None for the exact SVD.
    offload: accumulate the gradient estimates on CPU (the official memory bound); False keeps
        them on the weights' device (faster, one full gradient per layer in device memory).
    """

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: float = 16.0
    norm_clip: bool = False
    svd_niter: int | None = 4
    offload: bool = True

    def __post_init__(self) -> None:
        require_choice("init_options['direction']", self.direction, DIRECTIONS)
        require_choice("init_options['scale']", self.scale, SCALES)
        require_positive("init_options['stable_gamma']", self.stable_gamma)
        if self.svd_niter is not None:
            require_positive("init_options['svd_niter']", self.svd_niter, integer=True)


def lora_ga_factors(grad: torch.Tensor, r: int, scaling: float, options: LoraGAOptions,
                    weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, n), B (m, r)) from the gradient G (m, n), in float32 (float64 for a float64 G)."""
    m, n = grad.shape
    if 2 * r > min(m, n):
        raise ConfigError(
            f"LoRA-GA needs 2r <= min(in, out) = {min(m, n)} (it splits the top 2r singular vectors of the "
            f"gradient between A and B), got r={r}; lower r to {min(m, n) // 2} or exclude that layer"
        )
    grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
    U, _, Vh = truncated_svd(grad, 2 * r, options.svd_niter, oversample=2 * r)  # q = 4r, as the official code
    if options.direction == "ArB2r":
        A, B = Vh[:r], U[:, r:2 * r]
    elif options.direction == "A2rBr":
        A, B = Vh[r:2 * r], U[:, :r]
    elif options.direction == "ArBr":
        A, B = Vh[1:2 * r:2], U[:, 0:2 * r:2]
    else:  # "random": disjoint halves of the top 2r, drawn from the global RNG (seeded by the caller)
        order = torch.randperm(2 * r).to(grad.device)
        A, B = Vh[order[:r]], U[:, order[r:]]
    if options.scale == "stable":
        factor = m ** 0.25 / math.sqrt(options.stable_gamma)
    elif options.scale == "gd":
        factor = 1.0 / scaling
    elif options.scale == "weightS":
        if weight is None:
            raise ValueError("scale='weightS' needs the layer's weight")
        _, weight_s, _ = truncated_svd(weight.to(grad.dtype), r, options.svd_niter, oversample=3 * r)
        factor = torch.sqrt(weight_s / scaling).mean().item()
    else:  # "unit"
        factor = 1.0
    A, B = A * factor, B * factor
    if options.norm_clip and weight is not None:
        ratio = (weight.abs().max() / (scaling * (B @ A)).abs().max()).item()
        if ratio < 1:
            A, B = A * math.sqrt(ratio), B * math.sqrt(ratio)
    return A.contiguous(), B.contiguous()


@torch.no_grad()
def _rewrite(layer: nn.Module, adapter, A: torch.Tensor, B: torch.Tensor) -> None:
    """A, B into the adapter; W <- W - s B A from the stored (cast) factors; B0, A0 remembered."""
    adapter.lora_A.weight.copy_(A)
    adapter.lora_B.weight.copy_(B)
    weight = layer.weight_out_in()
    wide = torch.promote_types(weight.dtype, torch.float32)
    offset = adapter.scaling * (adapter.lora_B.weight.to(wide) @ adapter.lora_A.weight.to(wide))
    weight.copy_((weight.to(wide) - offset).to(weight.dtype))
    adapter.remember_initial_factors()


def _forget_rewrite(layer: nn.Module, adapter) -> None:
    adapter.restore_rewritten_weight(layer)
    del adapter.initial_A, adapter.initial_B


@register_data_initialiser("lora-ga", options=LoraGAOptions)
def lora_ga_init(model: nn.Module, adapter_name: str, data, options: LoraGAOptions, progress: bool = True) -> None:
    """Estimate G on `data`, set A, B of adapter `adapter_name` from its SVD and rewrite W (see module)."""
    layers = targets_of(model, adapter_name)
    for path, layer in layers.items():
        adapter = layer.adapters[adapter_name]
        if 2 * adapter.r > min(adapter.in_features, adapter.out_features):
            raise ConfigError(
                f"LoRA-GA needs 2r <= min(in, out); {path} (in={adapter.in_features}, out={adapter.out_features}) "
                f"allows at most r={min(adapter.in_features, adapter.out_features) // 2}, got r={adapter.r}. "
                "Lower r or exclude that layer"
            )
    start = time.perf_counter()
    grads = estimate_gradients(model, layers, data, offload=options.offload, progress=progress,
                               desc="LoRA-GA: estimating gradients")
    factors = {}
    for path, layer in tqdm(layers.items(), desc="LoRA-GA: SVD of the gradients", unit="layer",
                            disable=not progress, leave=False):
        adapter = layer.adapters[adapter_name]
        weight = layer.weight_out_in()
        grad = grads.pop(path).to(weight.device)
        factors[path] = lora_ga_factors(grad, adapter.r, adapter.scaling, options, weight=weight)
    done = []
    try:
        for path, layer in layers.items():
            adapter = layer.adapters[adapter_name]
            _rewrite(layer, adapter, *factors[path])
            done.append((layer, adapter))
    except BaseException:
        for layer, adapter in done:  # leave W as it was
            _forget_rewrite(layer, adapter)
        raise
    if progress:
        print(f"LoRA-GA: initialised {len(layers)} layers in {time.perf_counter() - start:.1f}s", flush=True)
