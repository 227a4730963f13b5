"""LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional Adaptation,
Azizi, Kundu, Pedram, arXiv 2406.12832 (Findings of EMNLP 2024).

LoRA's pair of projections with a small square core between them:

    h = W x + b + s * B (S (A dropout(x))),     dW = s B S A,     s = alpha / r,

A in R^{r x in}   frozen from step 0 ("PMA"); Kaiming-uniform (a = sqrt(5)), PEFT's LoRA init,
S in R^{r x r}    trainable; nn.Linear(r, r) default init, i.e. U(-1/sqrt(r), 1/sqrt(r)),
B in R^{out x r}  zeros (so the adapted model equals the base at init); trainable early on and
                  frozen one column at a time (lowest index first) by the schedule in
                  `lorakit.train.callbacks` (`LamdaFreezer` / `LamdaFreezeCallback`), after which
                  only r^2 numbers per layer train.

Trainable parameters per layer: r^2 + out * r while B trains, r^2 once B is fully frozen.

Initialisations (`init`):
- "lora" (default, the official code's): A random as above, B = 0.
- "svd": A = the top-r right singular vectors of W (rows of V^T), B = 0, S as above. The paper
  speaks of "spectrally decomposed" projections but the released code does no SVD; this option is
  RECONSTRUCTED from the paper's wording and unverified against any released code.

A is frozen but random, so it is SAVED in the adapter file (`lamda_A`), together with S and B:
reloading is exact whatever generator produced A, and "svd" files need no base weight to reload.

Deviation from the official code (ArminAzizi98/LaMDA, lamda.py): S is kept in the adapter dtype
(fp32 on half-precision bases) instead of being cast to bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import Adapter
from lorakit.core.config import AdapterConfig, require_choice, require_in_range, require_positive
from lorakit.core.errors import ConfigError
from lorakit.core.registry import register_method

LAMDA_INITS = ("lora", "svd")


@dataclass
class LamdaConfig(AdapterConfig):
    """Hyperparameters of a LaMDA adapter. Defaults are the official LLaMA-2-7B scripts'
    (train_clm.py / GSM8K: rank 64, lora_alpha 16, lora_dropout 0.1, q,k,v,o,gate,up,down; eta 0.3).

    r: rank (> 0); S is r x r.
    alpha: scale numerator (> 0); the update is scaled by alpha / r.
    dropout: dropout probability on the adapter's input, in [0, 1).
    target_modules: module names or suffixes, a regex over full paths, or "all-linear".
    init: "lora" (random A, the official code) or "svd" (A from W's top-r right singular
        vectors; reconstructed from the paper, unverified).

    The schedule that freezes B lives here too, because it is part of the method (the paper's
    "PMB" is trained only early on) and `lorakit train --method lamda` builds its callback from
    the adapter config; the adapter's forward and saved tensors do not depend on these fields.
    They are read by `lorakit.train.callbacks.LamdaFreezer`, which gets the run length (max_steps,
    gradient accumulation) from the training loop.
    eta: fraction of training over which B is frozen (in (0, 1]); the paper's and code's 0.3.
    freeze_end_step: optimizer step by which every column of B is frozen; None means
        round(eta * max_steps). One more column is frozen every freeze_end_step / r steps.
    code_compatible: reproduce the official formula instead: t = floor(micro_steps /
        (eta * max_steps * grad_accum)) columns frozen, so one column per eta * max_steps steps
        (at most floor(1 / eta) columns ever: B is never fully frozen for r > 3 with eta = 0.3).
    """

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: str | list[str] = "all-linear"
    init: str = "lora"
    eta: float = 0.3
    freeze_end_step: int | None = None
    code_compatible: bool = False

    def validate(self) -> None:
        super().validate()
        require_positive("r", self.r, integer=True)
        require_positive("alpha", self.alpha)
        require_in_range("dropout", self.dropout, 0.0, 1.0)
        require_choice("init", self.init, LAMDA_INITS)
        require_positive("eta", self.eta)
        require_in_range("eta", self.eta, 0.0, 1.0, closed_high=True)
        if self.freeze_end_step is not None:
            require_positive("freeze_end_step", self.freeze_end_step, integer=True)
            if self.code_compatible:
                raise ConfigError(
                    f"freeze_end_step={self.freeze_end_step} has no effect with code_compatible=True (the official "
                    "formula uses eta only); unset one of them"
                )
        if not isinstance(self.code_compatible, bool):
            raise ConfigError(f"code_compatible={self.code_compatible!r} must be True or False")


@register_method("lamda", config=LamdaConfig, peft_type=None)
class LamdaAdapter(Adapter):
    """h = W x + b + s B S A dropout(x); A frozen, S trainable, B trainable until frozen by the schedule."""

    def __init__(self, config: LamdaConfig, in_features: int, out_features: int, module_name: str):
        super().__init__(config, in_features, out_features, module_name)
        self.r = config.r
        self.scaling = config.alpha / config.r
        self.lamda_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.init == "svd" and config.r > min(in_features, out_features):
            raise ConfigError(
                f"init='svd' needs r <= min(in, out) of every target layer, but {module_name} is "
                f"{out_features}x{in_features} and r={config.r}; lower r or use init='lora'"
            )
        # A never trains: a persistent buffer (saved, moved and cast with the model, never optimised).
        lamda_A = torch.empty(config.r, in_features)
        nn.init.kaiming_uniform_(lamda_A, a=math.sqrt(5))  # PEFT's LoRA A; "svd" overwrites it from W
        self.register_buffer("lamda_A", lamda_A)
        self.lamda_S = nn.Parameter(torch.empty(config.r, config.r))
        nn.init.kaiming_uniform_(self.lamda_S, a=math.sqrt(5))  # nn.Linear(r, r, bias=False)'s default
        self.lamda_B = nn.Parameter(torch.zeros(out_features, config.r))
        # Columns 0..frozen_columns-1 of B take no gradient (set by the freezing schedule; not saved).
        self.frozen_columns = 0

    def initialise_from_base(self, base_weight: torch.Tensor) -> None:
        """init="svd": A = V_r^T from W = U diag(sigma) V^T (runs at load too; the file's A then overwrites it)."""
        if self.config.init == "svd":
            _, _, vh = torch.linalg.svd(base_weight.detach().float(), full_matrices=False)
            with torch.no_grad():
                self.lamda_A.copy_(vh[: self.r].to(self.lamda_A.dtype))

    def trainable_B(self) -> torch.Tensor:
        """B for the forward pass: the value of B, with no gradient into its frozen columns."""
        n = self.frozen_columns
        if n == 0 or not self.lamda_B.requires_grad or not torch.is_grad_enabled():
            return self.lamda_B
        return torch.cat([self.lamda_B[:, :n].detach(), self.lamda_B[:, n:]], dim=1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if x.dtype != self.lamda_S.dtype:
            x = x.to(self.lamda_S.dtype)
        update = F.linear(F.linear(F.linear(self.lamda_dropout(x), self.lamda_A), self.lamda_S), self.trainable_B())
        update = update * self.scaling
        return base_out + (update if update.dtype == base_out.dtype else update.to(base_out.dtype))

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self.scaling * (self.lamda_B @ self.lamda_S @ self.lamda_A)
