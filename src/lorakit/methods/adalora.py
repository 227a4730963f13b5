"""AdaLoRA's SVD-form adapter: Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning", arXiv 2303.10512 (ICLR 2023). PEFT (`peft.tuners.adalora`) is the parity target.

The update is kept in the form of a singular value decomposition, one triplet (P_i, lambda_i, Q_i)
per rank-1 component:

    h = W x + b + (alpha / (ranknum + 1e-5)) * P (Lambda * (Q dropout(x))),
    dW = (alpha / (ranknum + 1e-5)) * P diag(lambda) Q,

Q = lora_A in R^{n x in} (right singular vectors), lambda = lora_E in R^{n x 1} (singular values),
P = lora_B in R^{out x n} (left singular vectors); n = init_r at injection. As in PEFT, A and B
are N(0, 0.02^2) and lambda = 0 (identity at init), and ranknum = init_r never changes, so pruning
a triplet never rescales the others.

The rank of a module is the number of triplets the allocator keeps (`lorakit.rank.adalora`):
the allocator zeroes the lambda of the others (as PEFT does) and, once the budget phase is over,
may remove them for good (`resize`). `keep` (which rows of the tensors are kept) and `slots`
(which of the init_r positions each row holds) are the adapter's rank state; the file holds the
kept rows only, and the config's `rank_pattern` holds PEFT's per-module masks over the init_r
positions (`"<module path>.lora_E": [bool] * init_r`), so PEFT's AdaLoRA folders load here and
ours load in PEFT.

Training without the allocator is an error (PEFT silently trains a plain LoRA, huggingface/peft
#3373): the adapter counts the backward passes that reached it since the allocator last ran; a
training-mode forward after such a backward, once the gradients were cleared (`zero_grad`, i.e. a
finished optimizer step), raises. Set `require_allocator = False` on the adapters to train a
loaded adapter at fixed rank on purpose.

Trainable parameters per layer: init_r * (in + out + 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.core.adapter import Adapter
from lorakit.core.config import AdapterConfig, require_in_range, require_positive
from lorakit.core.errors import ConfigError
from lorakit.core.registry import register_method


@dataclass
class AdaLoraConfig(AdapterConfig):
    """Hyperparameters of an AdaLoRA adapter and its rank allocator. Defaults are PEFT's
    (`peft.AdaLoraConfig`: init_r 12, target_r 8, lora_alpha 8, beta 0.85, orth_reg_weight 0.5),
    with the paper's targets (every linear layer of the transformer blocks).

    init_r: rank every module starts with (> 0).
    target_r: average rank at the end of the budget phase (0 < target_r <= init_r); the global
        budget is target_r x number of modules.
    alpha: scale numerator; the update is scaled by alpha / (init_r + 1e-5) (PEFT's rule).
    dropout: dropout on the adapter's input, in [0, 1).
    target_modules: module names or suffixes, a regex over full paths, or "all-linear".
    tinit: optimizer steps before the budget starts to shrink (warm-up, no pruning).
    tfinal: optimizer steps at the end trained with the final ranks fixed.
    deltaT: the budget is re-allocated every deltaT steps during the cubic phase (> 0).
    beta1 / beta2: EMA coefficients of the sensitivity and of its uncertainty, in (0, 1).
    orth_reg_weight: weight of the orthogonality regulariser ||P^T P - I|| + ||Q Q^T - I|| (>= 0).
    total_step: optimizer steps of the run; None lets the allocator take it from the trainer
        (`lorakit train` uses max_steps). Must exceed tinit + tfinal.
    rank_pattern: per-module masks over the init_r triplets, PEFT's format
        ({"model.layers.0.self_attn.q_proj.lora_E": [True, False, ...]}); written by the allocator,
        read when an adapter is loaded (the file then holds the kept triplets only).
    """

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        require_positive("init_r", self.init_r, integer=True)
        require_positive("target_r", self.target_r, integer=True)
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r={self.target_r} exceeds init_r={self.init_r}: AdaLoRA only prunes; "
                              "raise init_r or lower target_r")
        require_positive("alpha", self.alpha)
        require_in_range("dropout", self.dropout, 0.0, 1.0)
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} is invalid: it must be an integer >= 0")
        require_positive("deltaT", self.deltaT, integer=True)
        require_in_range("beta1", self.beta1, 0.0, 1.0)
        require_in_range("beta2", self.beta2, 0.0, 1.0)
        if not (self.beta1 > 0 and self.beta2 > 0):
            raise ConfigError(f"beta1={self.beta1}, beta2={self.beta2}: both must lie in (0, 1)")
        if isinstance(self.orth_reg_weight, bool) or not self.orth_reg_weight >= 0:
            raise ConfigError(f"orth_reg_weight={self.orth_reg_weight!r} is invalid: it must be >= 0")
        if self.total_step is not None:
            require_positive("total_step", self.total_step, integer=True)
            if self.tinit >= self.total_step - self.tfinal:
                raise ConfigError(
                    f"tinit={self.tinit}, tfinal={self.tfinal} leave no budget phase in total_step={self.total_step} "
                    "steps; lower tinit/tfinal or train longer"
                )
        if not isinstance(self.rank_pattern, dict):
            raise ConfigError(f"rank_pattern={self.rank_pattern!r} must be a mapping of module masks")
        for key, mask in self.rank_pattern.items():
            if not isinstance(mask, (list, tuple)) or len(mask) != self.init_r or not all(isinstance(m, bool) for m in mask):
                raise ConfigError(
                    f"rank_pattern[{key!r}] must be a list of init_r={self.init_r} booleans (PEFT's AdaLoRA mask), "
                    f"got {mask!r}"
                )

    def mask_for(self, module_name: str) -> list[bool] | None:
        """This module's mask in `rank_pattern` (PEFT's keys end in '.lora_E', perhaps with the adapter name)."""
        for key, mask in self.rank_pattern.items():
            path = re.sub(r"\.lora_E(\.[^.]+)?$", "", key)
            if path == module_name:
                return list(mask)
        return None

    # --- PEFT's adapter_config.json -------------------------------------------------------
    def to_file_dict(self, target_names: list[str], for_untouched_base: bool = True) -> dict[str, Any]:
        total_step = self.total_step or self.tinit + self.tfinal + 1  # PEFT refuses a config without one
        return {
            "peft_type": "ADALORA",
            "r": self.target_r,  # PEFT ignores r for AdaLoRA
            "init_r": self.init_r,
            "target_r": self.target_r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(set(n.split(".")[-1] for n in target_names))
            if self.target_modules == "all-linear" else self.target_modules,
            "tinit": self.tinit,
            "tfinal": self.tfinal,
            "deltaT": self.deltaT,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight,
            "total_step": total_step,
            "rank_pattern": {k: list(v) for k, v in self.rank_pattern.items()} or None,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "bias": "none",
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "lorakit": {"method": "adalora", "total_step": self.total_step},
        }

    @classmethod
    def from_file_dict(cls, data: dict[str, Any]) -> "AdaLoraConfig":
        for key, allowed in {"bias": ("none", None), "modules_to_save": (None, []), "use_dora": (False, None),
                             "layers_to_transform": (None, [])}.items():
            if key in data and data[key] not in allowed:
                raise ConfigError(f"adapter_config.json sets {key}={data[key]!r}, which lorakit's AdaLoRA does not "
                                  f"load; only {allowed[0]!r} is supported")
        extra = data.get("lorakit") or {}
        target_modules = data["target_modules"]
        return cls(
            init_r=int(data.get("init_r", 12)),
            target_r=int(data.get("target_r", 8)),
            alpha=float(data.get("lora_alpha", 8)),
            dropout=float(data.get("lora_dropout") or 0.0),
            target_modules=sorted(target_modules) if isinstance(target_modules, (list, tuple, set)) else target_modules,
            tinit=int(data.get("tinit", 0)),
            tfinal=int(data.get("tfinal", 0)),
            deltaT=int(data.get("deltaT", 1)),
            beta1=float(data.get("beta1", 0.85)),
            beta2=float(data.get("beta2", 0.85)),
            orth_reg_weight=float(data.get("orth_reg_weight", 0.5)),
            total_step=extra.get("total_step", data.get("total_step")),
            rank_pattern={k: [bool(m) for m in v] for k, v in (data.get("rank_pattern") or {}).items()},
        )


@register_method("adalora", config=AdaLoraConfig, peft_type="ADALORA")
class AdaLoraAdapter(Adapter):
    """h = W x + b + alpha / (ranknum + 1e-5) * P (lambda * Q dropout(x)), one (P_i, lambda_i, Q_i) per triplet."""

    def __init__(self, config: AdaLoraConfig, in_features: int, out_features: int, module_name: str):
        super().__init__(config, in_features, out_features, module_name)
        mask = config.mask_for(module_name)
        slots = torch.arange(config.init_r) if mask is None else torch.tensor(mask).nonzero().view(-1)
        n = len(slots)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(n, in_features).normal_(0.0, 0.02))
        self.lora_E = nn.Parameter(torch.zeros(n, 1))
        self.lora_B = nn.Parameter(torch.empty(out_features, n).normal_(0.0, 0.02))
        # Rank state, never saved: rebuilt from the config's rank_pattern.
        self.register_buffer("ranknum", torch.tensor([float(config.init_r)]), persistent=False)
        self.register_buffer("slots", slots, persistent=False)  # position of each row among the init_r triplets
        self.register_buffer("keep", torch.ones(n, dtype=torch.bool), persistent=False)  # rows the allocator keeps
        self.scaling = config.alpha
        self.require_allocator = True
        self._backwards_since_allocator = 0

    # --- rank state -----------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return int(self.keep.sum())

    def rank_mask(self) -> list[bool]:
        """PEFT's mask over the init_r triplets: True where a kept row sits."""
        mask = torch.zeros(self.config.init_r, dtype=torch.bool)
        mask[self.slots[self.keep].cpu()] = True
        return mask.tolist()

    @torch.no_grad()
    def set_keep(self, keep: torch.Tensor) -> None:
        """Keep exactly the rows where `keep` is True; the others' singular values become 0 (PEFT's masking)."""
        self.keep.copy_(keep.to(self.keep.device).view(-1))
        self.lora_E.masked_fill_(~self.keep.view(-1, 1), 0.0)

    def resize(self, keep_rows: torch.Tensor) -> dict[nn.Parameter, tuple[nn.Parameter, int]]:
        """Remove every row not in `keep_rows` (indices) for good: new, smaller parameters.
        Returns {old parameter: (new parameter, dimension sliced)} for `lorakit.rank.budget.replace_parameters`."""
        keep_rows = keep_rows.to(self.lora_A.device)
        replaced = {}
        for name, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            old = getattr(self, name)
            new = nn.Parameter(old.detach().index_select(dim, keep_rows).clone(), requires_grad=old.requires_grad)
            setattr(self, name, new)
            replaced[old] = (new, dim)
        self.slots = self.slots.index_select(0, keep_rows)
        self.keep = self.keep.index_select(0, keep_rows)
        return replaced

    def allocator_called(self) -> None:
        self._backwards_since_allocator = 0

    def _count_backward(self, grad: torch.Tensor) -> torch.Tensor:
        self._backwards_since_allocator += 1
        return grad

    def _check_allocator(self) -> None:
        if self._backwards_since_allocator and self.lora_E.grad is None and self.require_allocator:
            raise RuntimeError(
                f"AdaLoRA adapter on {self.module_name} went through an optimizer step without its rank allocator: "
                "AdaLoRA would silently train a plain LoRA at rank init_r. Call "
                "lorakit.rank.AdaLoraAllocator(model).step(optimizer, global_step) after every optimizer.step() "
                "(before zero_grad), or pass the allocator as a callback to transformers.Trainer (lorakit train "
                "--method adalora --rank-policy adalora does this). To train at fixed rank on purpose, set "
                "require_allocator = False on the adapters."
            )

    # --- the update ------------------------------------------------------------------------
    def _scale(self) -> torch.Tensor:
        return self.scaling / (self.ranknum + 1e-5)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.training:
            self._check_allocator()
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        update = (self.lora_dropout(x) @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self._scale()
        if update.requires_grad and self.training:
            update.register_hook(self._count_backward)
        return base_out + (update if update.dtype == base_out.dtype else update.to(base_out.dtype))

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self._scale()

    def factors(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        return []  # dW = P diag(lambda) Q has three factors; joint A/B optimisers do not apply

    # --- files ---------------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT's tensors, kept triplets only (PEFT writes them resized by rank_pattern)."""
        rows = self.keep.nonzero().view(-1)
        if len(rows) == len(self.keep):
            return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach(), "lora_E": self.lora_E.detach()}
        return {"lora_A": self.lora_A.detach()[rows], "lora_B": self.lora_B.detach()[:, rows],
                "lora_E": self.lora_E.detach()[rows]}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        rows = self.keep.nonzero().view(-1)
        with torch.no_grad():
            self.lora_A[rows] = tensors["lora_A"].to(self.lora_A.dtype)
            self.lora_B[:, rows] = tensors["lora_B"].to(self.lora_B.dtype)
            self.lora_E[rows] = tensors["lora_E"].to(self.lora_E.dtype)
            self.lora_E.masked_fill_(~self.keep.view(-1, 1), 0.0)
