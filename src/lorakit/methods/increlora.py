"""IncreLoRA's growable SVD-form adapter: Zhang, Li, Chen, Jiang, Wang, Qian, "IncreLoRA: Incremental
Parameter Allocation Method for Parameter-Efficient Fine-tuning", arXiv 2308.12043. Official code:
FeiyuZhang98/IncreLoRA (`loralib/loralib/increlora.py`, `SVDLinear`).

A module holds K rank-1 components (a_j in R^{1 x in}, e_j in R, b_j in R^{out x 1}), of which the
first `ranknum` are active and the rest are "reserved" (advance learning: trained a_j, b_j with e_j
frozen at 1e-5, waiting to be activated by the rank policy):

    dW = (alpha / (ranknum + 1e-5)) * sum_j b_j e_j a_j = (alpha / (ranknum + 1e-5)) * B (A * E),
    h  = W x + b + dropout(x) dW^T                                (reserved components included).

Initial components: a, b ~ N(0, 0.02^2), e = 0 (identity at init); ranknum = init_r. The rank policy
(`lorakit.rank.increlora`, "increlora") scores modules, activates reserved components (`activate`),
appends new ones (`reserve`) and drops the unused reserve once the budget is reached (`drop_reserved`).
While `scoring` is on, the forward materialises dW and a gradient hook on it accumulates the module's
importance S = sum |dW * dL/ddW| / sqrt(out * in) (`take_score`).

Every component is its own parameter (as in the official code), so a component can be frozen on
its own (a reserved e) and new components can join the optimizer as a new param group.

File format: PEFT's ADALORA (so PEFT loads the final adapter): lora_A (rank, in), lora_E (rank, 1),
lora_B (out, rank) with the active components only; `init_r` = K_max, the largest rank over the
modules, and `rank_pattern` = {"<path>.lora_E": [True] * rank + [False] * (K_max - rank)}. PEFT scales
every module by alpha / (K_max + 1e-5) where IncreLoRA uses alpha / (rank + 1e-5), so the file's
lora_E is multiplied by (K_max + 1e-5) / (rank + 1e-5) (undone on load). lorakit's own fields, the
per-module ranks included, travel under "lorakit" (method "increlora").

Trainable parameters per layer at injection: init_r * (in + out + 1); with rank_pattern, rank * (in + out + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.core.adapter import Adapter
from lorakit.core.config import AdapterConfig, require_in_range, require_positive
from lorakit.core.errors import ConfigError
from lorakit.core.registry import register_method

# The official default increment per selected module, by average target rank.
INCRE_RANK_NUM = {2: 1, 4: 2, 6: 3, 8: 4}
RESERVED_E = 1e-5  # a reserved component's frozen "singular value" under advance learning


@dataclass
class IncreLoraConfig(AdapterConfig):
    """Hyperparameters of an IncreLoRA adapter and its rank policy. Defaults are the official README
    example / MNLI script (low-budget setting): lora_r 1, target_rank 2, top_h 2, init_warmup and
    incre_interval 1000, beta 0.85, reg_orth_coef 0.1, lora_alpha 16, advance learning on.

    init_r: rank every module starts with (official `lora_r`, > 0).
    target_r: average final rank (official `target_rank`, >= init_r); the budget is target_r x modules.
    target_total: explicit total rank budget over all modules (official `target_total_rank`); None:
        target_r x number of modules.
    incre_rank_num: rank added to a selected module per round; None: {2: 1, 4: 2, 6: 3, 8: 4}[target_r].
    top_h: modules selected per round (> 0).
    init_warmup: optimizer steps before the first round (>= 0); rounds run at every step t with
        t > init_warmup and t % incre_interval == 0 until the budget is reached.
    incre_interval: steps between rounds (> 0).
    alpha: scale numerator; the update is scaled by alpha / (ranknum + 1e-5), ranknum = active rank.
    dropout: dropout on the adapter's input, in [0, 1).
    target_modules: module names or suffixes, a regex over full paths, or "all-linear".
    beta1 / beta2: EMA coefficients of the module score's sensitivity and uncertainty, in (0, 1).
    orth_reg_weight: weight of the orthogonality regulariser on the stacked A and B (>= 0).
    advance_learn: reserved components train (a, b; e frozen at 1e-5) before activation.
    rank_pattern: {module path: active rank}; written as modules grow, read when an adapter is loaded.
    """

    init_r: int = 1
    target_r: int = 2
    target_total: int | None = None
    incre_rank_num: int | None = None
    top_h: int = 2
    init_warmup: int = 1000
    incre_interval: int = 1000
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    advance_learn: bool = True
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        require_positive("init_r", self.init_r, integer=True)
        require_positive("target_r", self.target_r, integer=True)
        if self.target_r < self.init_r:
            raise ConfigError(f"target_r={self.target_r} is below init_r={self.init_r}: IncreLoRA only adds rank; "
                              "raise target_r or lower init_r")
        if self.target_total is not None:
            require_positive("target_total", self.target_total, integer=True)
        if self.incre_rank_num is not None:
            require_positive("incre_rank_num", self.incre_rank_num, integer=True)
        elif self.target_r not in INCRE_RANK_NUM:
            raise ConfigError(f"incre_rank_num is unset and target_r={self.target_r} is not in the official map "
                              f"{INCRE_RANK_NUM}; set incre_rank_num (e.g. --incre-rank-num 1)")
        require_positive("top_h", self.top_h, integer=True)
        if isinstance(self.init_warmup, bool) or not isinstance(self.init_warmup, int) or self.init_warmup < 0:
            raise ConfigError(f"init_warmup={self.init_warmup!r} is invalid: it must be an integer >= 0")
        require_positive("incre_interval", self.incre_interval, integer=True)
        require_positive("alpha", self.alpha)
        require_in_range("dropout", self.dropout, 0.0, 1.0)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not 0 < value < 1:
                raise ConfigError(f"{name}={value!r} is invalid: it must lie in (0, 1)")
        if isinstance(self.orth_reg_weight, bool) or not self.orth_reg_weight >= 0:
            raise ConfigError(f"orth_reg_weight={self.orth_reg_weight!r} is invalid: it must be >= 0")
        if not isinstance(self.advance_learn, bool):
            raise ConfigError(f"advance_learn={self.advance_learn!r} must be True or False")
        if not isinstance(self.rank_pattern, dict):
            raise ConfigError(f"rank_pattern={self.rank_pattern!r} must map module paths to ranks")
        for key, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ConfigError(f"rank_pattern[{key!r}]={rank!r} is invalid: ranks are positive integers")

    @property
    def rank_step(self) -> int:
        """Rank added to a selected module per round."""
        return self.incre_rank_num or INCRE_RANK_NUM[self.target_r]

    def rank_of(self, module_name: str) -> int:
        return self.rank_pattern.get(module_name, self.init_r)

    def file_rank(self) -> int:
        """K_max: PEFT's init_r in the file (every module's mask has this length)."""
        return max([self.init_r, *self.rank_pattern.values()])

    # --- PEFT's adapter_config.json (ADALORA) -------------------------------------------------
    def to_file_dict(self, target_names: list[str], for_untouched_base: bool = True) -> dict[str, Any]:
        k_max = self.file_rank()
        return {
            "peft_type": "ADALORA",
            "r": 8,  # PEFT ignores r for AdaLoRA (and warns unless it is its default, 8)
            "init_r": k_max,
            "target_r": self.target_r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(set(n.split(".")[-1] for n in target_names))
            if self.target_modules == "all-linear" else self.target_modules,
            "tinit": 0,
            "tfinal": 0,
            "deltaT": 1,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight,
            "total_step": 1,  # PEFT refuses a config without one; the file is for inference
            "rank_pattern": {f"{name}.lora_E": [True] * self.rank_of(name) + [False] * (k_max - self.rank_of(name))
                             for name in target_names},
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "bias": "none",
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "lorakit": {"method": "increlora", **self.to_dict()},
        }

    @classmethod
    def from_file_dict(cls, data: dict[str, Any]) -> "IncreLoraConfig":
        fields = dict(data.get("lorakit") or {})
        fields.pop("method", None)
        if not fields:
            raise ConfigError("this adapter_config.json has no lorakit IncreLoRA fields; a plain PEFT AdaLoRA folder "
                              "loads as method 'adalora'")
        return cls.from_dict(fields)


@register_method("increlora", config=IncreLoraConfig, peft_type=None)
class IncreLoraAdapter(Adapter):
    """h = W x + b + alpha / (ranknum + 1e-5) * dropout(x) (B (A * E))^T over active and reserved components."""

    def __init__(self, config: IncreLoraConfig, in_features: int, out_features: int, module_name: str):
        super().__init__(config, in_features, out_features, module_name)
        rank = config.rank_of(module_name)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterList()
        self.lora_E = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.register_buffer("ranknum", torch.tensor([float(rank)]), persistent=False)
        self.scaling = config.alpha
        self.scoring = False  # the rank policy turns the importance hook on until the budget is reached
        self._score: torch.Tensor | None = None
        self._append(rank, e_value=0.0, factors_trainable=True, e_trainable=True)

    # --- components ----------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """Active components (ranknum)."""
        return int(self.ranknum.item())

    @property
    def reserved(self) -> int:
        return len(self.lora_A) - self.rank

    def _append(self, k: int, e_value: float, factors_trainable: bool, e_trainable: bool) -> list[nn.Parameter]:
        like = self.lora_A[0] if len(self.lora_A) else None
        options = dict(device=like.device, dtype=like.dtype) if like is not None else {}
        new = []
        for _ in range(k):
            a = nn.Parameter(torch.empty(1, self.in_features, **options).normal_(0.0, 0.02), requires_grad=factors_trainable)
            e = nn.Parameter(torch.full((1, 1), e_value, **options), requires_grad=e_trainable)
            b = nn.Parameter(torch.empty(self.out_features, 1, **options).normal_(0.0, 0.02), requires_grad=factors_trainable)
            self.lora_A.append(a), self.lora_E.append(e), self.lora_B.append(b)
            new += [a, e, b]
        return [p for p in new if p.requires_grad]

    def reserve(self, k: int) -> list[nn.Parameter]:
        """Append k reserved components (advance learning: trainable a, b and e frozen at 1e-5;
        otherwise all frozen, e = 0). Returns the new trainable parameters."""
        advance = self.config.advance_learn
        return self._append(k, RESERVED_E if advance else 0.0, factors_trainable=advance, e_trainable=False)

    @torch.no_grad()
    def activate(self, k: int) -> list[nn.Parameter]:
        """Make the first k reserved components active (ranknum += k; their e, and their a, b if they
        were frozen, become trainable). Returns the parameters that became trainable."""
        if not 0 < k <= self.reserved:
            raise ValueError(f"{self.module_name}: cannot activate {k} components, {self.reserved} are reserved")
        start = self.rank
        newly = []
        for j in range(start, start + k):
            for param in (self.lora_A[j], self.lora_E[j], self.lora_B[j]):
                if not param.requires_grad:
                    param.requires_grad_(True)
                    newly.append(param)
        self.ranknum += k
        self.config.rank_pattern[self.module_name] = self.rank
        return newly

    def drop_reserved(self) -> list[nn.Parameter]:
        """Remove every reserved component (once the budget is reached they would only add e = 0
        terms). Returns the removed parameters, for `lorakit.rank.budget.remove_parameters`."""
        n = self.rank
        removed = [p for plist in (self.lora_A, self.lora_E, self.lora_B) for p in list(plist)[n:]]
        self.lora_A = nn.ParameterList(list(self.lora_A)[:n])
        self.lora_E = nn.ParameterList(list(self.lora_E)[:n])
        self.lora_B = nn.ParameterList(list(self.lora_B)[:n])
        return removed

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A (K, in), E (K, 1), B (out, K)) over every component, active then reserved."""
        return torch.cat(list(self.lora_A), 0), torch.cat(list(self.lora_E), 0), torch.cat(list(self.lora_B), 1)

    # --- importance ----------------------------------------------------------------------------
    def _add_score(self, delta: torch.Tensor, grad: torch.Tensor) -> None:
        score = (delta.abs() * grad).abs().sum() / math.sqrt(delta.numel())
        self._score = score if self._score is None else self._score + score

    def take_score(self) -> torch.Tensor | None:
        """S = sum |dW * dL/ddW| / sqrt(out * in), summed over the backward passes since the last call."""
        score, self._score = self._score, None
        return score

    # --- the update ----------------------------------------------------------------------------
    def _scale(self) -> torch.Tensor:
        return self.scaling / (self.ranknum + 1e-5)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        a, e, b = self.stacked()
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        if self.scoring and torch.is_grad_enabled():
            delta = b @ (a * e) * self._scale()  # materialised so that its gradient scores the module
            if delta.requires_grad:
                frozen = delta.detach()
                delta.register_hook(lambda grad: self._add_score(frozen, grad))
            update = self.lora_dropout(x) @ delta.T
        else:
            update = (self.lora_dropout(x) @ (a * e).T @ b.T) * self._scale()
        return base_out + (update if update.dtype == base_out.dtype else update.to(base_out.dtype))

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        a, e, b = self.stacked()
        return b @ (a * e) * self._scale()

    # --- files -----------------------------------------------------------------------------------
    def _file_factor(self) -> float:
        """PEFT scales by alpha / (K_max + 1e-5), IncreLoRA by alpha / (rank + 1e-5): lora_E in the file
        carries the ratio."""
        return (self.config.file_rank() + 1e-5) / (self.rank + 1e-5)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT's AdaLoRA tensors, active components only (reserved ones are not part of the adapter)."""
        a, e, b = (t.detach() for t in self.stacked())
        n = self.rank
        return {"lora_A": a[:n], "lora_B": b[:, :n], "lora_E": e[:n] * self._file_factor()}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.reserved:
            raise ValueError(f"{self.module_name}: cannot load a file into an adapter with reserved components")
        factor = self._file_factor()
        with torch.no_grad():
            for j in range(self.rank):
                self.lora_A[j].copy_(tensors["lora_A"][j:j + 1])
                self.lora_E[j].copy_(tensors["lora_E"][j:j + 1] / factor)
                self.lora_B[j].copy_(tensors["lora_B"][:, j:j + 1])
