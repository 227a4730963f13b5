"""Initialisers that move a principal part of W into the adapter: PiSSA and OLoRA.

- PiSSA, Meng et al., arXiv 2404.02948: W = U S V^T; with the top-r triplets,
  A = diag(sqrt(S_r / s)) V_r^T, B = U_r diag(sqrt(S_r / s)), W_res = W - s B A, so
  s B A is exactly the rank-r principal part and the adapted model equals the base at init.
  `pissa_niter_k` replaces the full SVD by randomized SVD (Halko et al.) with k subspace
  iterations, as PEFT's "pissa_niter_k" (fast on large layers, PEFT issue #3049).
- OLoRA, Büyükakyüz, arXiv 2406.01775: W = Q R (thin QR); B = Q[:, :r], A = R[:r], and
  W_res = W - s B A.

Both rewrite W. The adapter remembers (B0, A0) so that `save_adapter` can write the rank-2r
update s (B A - B0 A0), exact against the untouched base (see `LoraAdapter.file_tensors`).
"""

from __future__ import annotations

import torch

from lorakit.core.errors import ConfigError
from lorakit.core.layer import AdaptedLinear
from lorakit.core.linalg import truncated_svd
from lorakit.core.registry import register_weight_initialiser


def _rank_that_fits(layer: AdaptedLinear, adapter, method: str) -> int:
    if adapter.r > min(layer.in_features, layer.out_features):
        raise ConfigError(
            f"{method} needs r <= min(in, out) = {min(layer.in_features, layer.out_features)} for "
            f"{adapter.module_name}, got r={adapter.r}; lower r or exclude that layer"
        )
    return adapter.r


def _rewrite(layer: AdaptedLinear, adapter_name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    adapter = layer.adapters[adapter_name]
    weight = layer.weight_out_in()
    with torch.no_grad():
        adapter.lora_A.weight.copy_(A)
        adapter.lora_B.weight.copy_(B)
        residual = weight.float() - adapter.scaling * (B @ A)
        weight.copy_(residual.to(weight.dtype))
    adapter.remember_initial_factors()


@register_weight_initialiser("pissa")
def pissa_init(layer: AdaptedLinear, adapter_name: str) -> None:
    adapter = layer.adapters[adapter_name]
    r = _rank_that_fits(layer, adapter, "PiSSA")
    U, S, Vh = truncated_svd(layer.weight_out_in().float(), r, adapter.config.pissa_niter_k)
    root = torch.sqrt(S / adapter.scaling)
    _rewrite(layer, adapter_name, A=root[:, None] * Vh, B=U * root[None, :])


@register_weight_initialiser("olora")
def olora_init(layer: AdaptedLinear, adapter_name: str) -> None:
    adapter = layer.adapters[adapter_name]
    r = _rank_that_fits(layer, adapter, "OLoRA")
    Q, R = torch.linalg.qr(layer.weight_out_in().float())
    _rewrite(layer, adapter_name, A=R[:r].contiguous(), B=Q[:, :r].contiguous())
