"""LoRA-XS: Low-Rank Adaptation with Extremely Small number of parameters.

Bałazy, Banaei, Aberer, Tabor, arXiv 2405.17604. W (out x in) is never modified; two frozen
factors B (out x r) and A (r x in) surround one trainable r x r matrix R:

    h = W x + b + s * B (R (A dropout(x))),     dW = s B R A,     s = alpha / r,

so a layer trains r^2 parameters whatever its shape. Initialisation (`init="svd"`, the paper's):
the truncated SVD W ~= U_r S_r V_r^T gives B = U_r and A = S_r V_r^T (the singular values on the
A side, as the official code), computed by `initialise_from_base` in float32 (float64 on a
float64 base) whatever the base dtype, either exactly (`torch.linalg.svd`, default) or by
randomized SVD (`torch.svd_lowrank` with `svd_niter` power iterations, for large layers). Signs
are fixed so that every column of B has its largest-magnitude entry positive.

R starts at zeros by default (`latent_init="zeros"`): the adapted model is then exactly the base
model, and R still gets the non-zero gradient s B^T (dL/dW) A^T because B and A are fixed and
non-zero. The official code draws R ~ N(0, 1e-5^2) (`latent_init="gaussian"`), which moves the
output by ~1e-5 relative and otherwise trains the same.

B and A are saved with R (an SVD's signs, and a randomized SVD's result, differ across machines
and libraries), as frozen persistent buffers. File keys (after the module path):
``lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r) -- the official code's names, it stores
them in PEFT's LoRA slots -- and ``lora_latent.weight`` (r, r), R in nn.Linear layout (the
official code's ``default_lora_latent_mapping``). The file's ``peft_type`` is null: PEFT has no
LoRA-XS tuner.

LoRA-SB (arXiv 2411.19557) keeps this layer and sets B, A and R from a gradient estimate with
s = 1 (alpha = r, this config's default); its initialiser sets the factors through
`LoraXSAdapter.set_factors` and needs `init` to name it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import Adapter
from lorakit.core.config import AdapterConfig, require_choice, require_in_range, require_positive
from lorakit.core.errors import ConfigError
from lorakit.core.linalg import truncated_svd
from lorakit.core.registry import init_options, register_method

LORAXS_INITS = ("svd", "lora-sb")
LATENT_INITS = ("zeros", "gaussian")
LATENT_STD = 1e-5  # the official code's init_module_weights(sigma=1e-5)


@dataclass
class LoraXSConfig(AdapterConfig):
    """Hyperparameters of a LoRA-XS adapter. Defaults follow the official math runs (Mistral-7B /
    Gemma-7B on MetaMathQA: r=64, lora_alpha=r, dropout 0, all seven linear projections); the
    official GLUE runs (RoBERTa-large) use r in {4, ..., 25} and alpha=16.

    r: size of the trainable r x r matrix (> 0, at most min(in, out) of every targeted layer).
    alpha: scale numerator, s = alpha / r (> 0); None means alpha = r, i.e. s = 1.
    dropout: dropout on the adapter's input, in [0, 1).
    target_modules: module names or suffixes, a regex over full paths, or "all-linear".
    init: how B and A are set: "svd" (truncated SVD of W, the paper's), or "lora-sb" (LoRA-SB:
        B, R, A from the SVD of an estimated first update; needs `inject(..., data=batches)`
        and s = 1, i.e. alpha unset or = r; see `lorakit.init.lora_sb`).
    init_options: options of a data-driven init, checked by that initialiser's options dataclass.
    svd_niter: None for the exact SVD; k >= 1 for randomized SVD with k power iterations (much
        faster on large layers; the official sklearn TruncatedSVD used 10).
    latent_init: R at initialisation: "zeros" (exact identity) or "gaussian" (N(0, 1e-5^2),
        the official code's).
    """

    r: int = 64
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    init: str = "svd"
    svd_niter: int | None = None
    latent_init: str = "zeros"
    init_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        require_positive("r", self.r, integer=True)
        if self.alpha is not None:
            require_positive("alpha", self.alpha)
        require_in_range("dropout", self.dropout, 0.0, 1.0)
        require_choice("init", self.init, LORAXS_INITS)
        require_choice("latent_init", self.latent_init, LATENT_INITS)
        if self.svd_niter is not None:
            require_positive("svd_niter", self.svd_niter, integer=True)
        init_options(self.init, self.init_options)  # a data-driven init's options, checked by its own dataclass
        if self.init == "lora-sb" and self.alpha is not None and self.alpha != self.r:
            raise ConfigError(f"init='lora-sb' trains with s = 1 (alpha = r, as the official code forces); "
                              f"got alpha={self.alpha} with r={self.r}: leave alpha unset")

    @property
    def scaling(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r


class Factor(nn.Module):
    """One matrix under the name `weight`: a trainable parameter, or a frozen persistent buffer
    (saved and moved with the module, never seen by an optimiser or `trainable_parameters`)."""

    def __init__(self, weight: torch.Tensor, trainable: bool):
        super().__init__()
        if trainable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)

    def extra_repr(self) -> str:
        kind = "trainable" if isinstance(self.weight, nn.Parameter) else "frozen"
        return f"{tuple(self.weight.shape)}, {kind}"


@register_method("loraxs", config=LoraXSConfig, peft_type=None)
class LoraXSAdapter(Adapter):
    """h = W x + b + s B (R (A dropout(x))); B, A frozen, R trainable (see the module docstring)."""

    BASE_STATE_IN_FILE = True  # the file holds B and A: loading skips the SVD

    def __init__(self, config: LoraXSConfig, in_features: int, out_features: int, module_name: str):
        super().__init__(config, in_features, out_features, module_name)
        self.r = r = config.r
        largest = min(in_features, out_features)
        if r > largest:
            raise ConfigError(
                f"LoRA-XS needs r <= min(in, out); {module_name} (in={in_features}, out={out_features}) "
                f"allows at most r={largest}, got r={r}. Lower r to {largest} or exclude that layer"
            )
        self.scaling = config.scaling
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = Factor(torch.zeros(r, in_features), trainable=False)  # set by initialise_from_base
        self.lora_B = Factor(torch.zeros(out_features, r), trainable=False)
        self.lora_latent = Factor(torch.zeros(r, r), trainable=True)
        if config.latent_init == "gaussian":
            nn.init.normal_(self.lora_latent.weight, mean=0.0, std=LATENT_STD)

    def initialise_from_base(self, base_weight: torch.Tensor) -> None:
        """B = U_r, A = S_r V_r^T from the truncated SVD of W (float32, or float64 on a float64 base)."""
        if self.config.init == "svd":
            U, S, Vh = truncated_svd(base_weight.to(self.lora_latent.weight.dtype), self.r, self.config.svd_niter)
            self.set_factors(B=U, A=S[:, None] * Vh)

    @torch.no_grad()
    def set_factors(self, B: torch.Tensor, A: torch.Tensor, R: torch.Tensor | None = None) -> None:
        """Set the frozen B (out, r) and A (r, in), and optionally R (r, r), in place (cast to the
        adapter's dtype and device). The hook for initialisers that choose the factors themselves
        (LoRA-SB: B = U_r, R = S_r, A = V_r^T of an estimated first update)."""
        expected = {"B": ((self.out_features, self.r), B), "A": ((self.r, self.in_features), A)}
        if R is not None:
            expected["R"] = ((self.r, self.r), R)
        for name, (shape, value) in expected.items():
            if tuple(value.shape) != shape:
                raise ConfigError(f"{self.module_name}: {name} must have shape {shape}, got {tuple(value.shape)}")
        self.lora_B.weight.copy_(B)
        self.lora_A.weight.copy_(A)
        if R is not None:
            self.lora_latent.weight.copy_(R)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        R = self.lora_latent.weight
        x = x.to(R.dtype)
        update = F.linear(F.linear(F.linear(self.lora_dropout(x), self.lora_A.weight), R), self.lora_B.weight)
        return base_out + (update * self.scaling).to(base_out.dtype)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self.scaling * (self.lora_B.weight @ self.lora_latent.weight @ self.lora_A.weight)
