"""Kronecker-product adapters: DiffuseKronA and PEFT's LoKr in one layer.

DiffuseKronA, Marjit, Singh, Mathur, Roy, Mittal, "DiffuseKronA: A Parameter Efficient
Fine-tuning Method for Personalized Diffusion Models", arXiv 2402.17412 (official code:
IBM/DiffuseKronA, diffusekrona/krona.py). LoKr as in PEFT (`peft.tuners.lokr`, from LyCORIS;
Yeh et al., arXiv 2309.14859).

For a Linear layer with W in R^{out x in} the update is a scaled Kronecker product

    dW = s * (W1 ⊗ W2),   W1 in R^{a1 x a2},   W2 in R^{(out/a1) x (in/a2)},
    h  = W x + b + dW x,

where each factor is either a full matrix (file key `lokr_w1` / `lokr_w2`) or a low-rank product
(`lokr_w1_a @ lokr_w1_b`, `lokr_w2_a @ lokr_w2_b`, inner size r): the names are PEFT's, so the
adapter files are PEFT's LoKr files. The forward never forms dW: with x reshaped row-major into
X in R^{a2 x b2} (b1 = out/a1, b2 = in/a2),

    (W1 ⊗ W2) x = vec_rowmajor(W1 X W2^T),

costing O(a1 a2 b2 + a1 b2 b1) (or the other association order, whichever is cheaper) per token
instead of O(out * in). rank(W1 ⊗ W2) = rank(W1) rank(W2), so the update can be near full rank.

Two ways of choosing the factor sizes (`factor_layout`):

- "diffusekrona" (default): a1 and a2 are given explicitly (official scripts: a1 = 64, a2 = 8) and
  must divide out and in; both factors are full; s = 1 (no alpha); W1 ~ N(0, (1/a1)^2), W2 = 0
  (official init: A = down.weight^T ~ N(0, 1/a1^2), B = up.weight = 0), so dW = 0 at init.
  Trainable parameters per layer: a1 a2 + (out/a1)(in/a2).
- "lokr": PEFT's LoKr. (a1, b1) = factorization(out, f), (a2, b2) = factorization(in, f) with
  f = `decompose_factor` (-1: the divisor pair nearest sqrt(dim), smaller factor first; f dividing
  dim: (f, dim/f)); W2 is low-rank when r < max(b1, b2) / 2, W1 is low-rank when `decompose_both`
  and r < max(a1, a2) / 2; s = alpha / r, with r and alpha per module from `rank_pattern` /
  `alpha_pattern`. PEFT's init: W1 = 0 (or W1_a = 0), W2 (or both W2 factors) Kaiming-uniform;
  init="lycoris" zeros W2 (or W2_b) and draws W1 instead; init="random" draws everything.

Training-time regularisers (PEFT's): `module_dropout` skips the whole update for a forward pass
with that probability; `rank_dropout` zeroes each output row of dW (one mask per forward pass),
optionally rescaled by the mask's mean (`rank_dropout_scale`). Both are off in eval mode.

Only Linear (and transformers' Conv1D) layers are adapted; LoKr's Conv1d/Conv2d forms are not
supported and such targets are refused by `inject`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.core.adapter import Adapter
from lorakit.core.config import AdapterConfig, pattern_value, require_choice, require_in_range, require_positive
from lorakit.core.errors import ConfigError
from lorakit.core.registry import register_method

FACTOR_LAYOUTS = ("diffusekrona", "lokr")
KRON_INITS = ("default", "lycoris", "random")
_PEFT_INIT_WEIGHTS = {"default": True, "lycoris": "lycoris", "random": False}
LOKR_DEFAULT_R, LOKR_DEFAULT_ALPHA = 8, 8.0  # PEFT's LoKrConfig defaults
_FILE_META_KEYS = ("peft_type", "lorakit", "task_type", "base_model_name_or_path", "inference_mode")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n, as LyCORIS / PEFT LoKr choose them.

    A positive `factor` dividing `dimension` gives (factor, dimension / factor). Otherwise the
    search walks up the divisors m of `dimension` while m + n keeps shrinking (and m <= factor
    when factor > 0), i.e. towards the pair nearest sqrt(dimension): 128 -> (8, 16).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        next_m = m + 1
        while dimension % next_m:
            next_m += 1
        next_n = dimension // next_m
        if next_m + next_n > m + n or next_m > limit:
            break
        m, n = next_m, next_n
    return (n, m) if m > n else (m, n)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class KronConfig(AdapterConfig):
    """Hyperparameters of a Kronecker-product adapter (DiffuseKronA or PEFT LoKr).

    a1, a2: with factor_layout="diffusekrona", the size of W1 (a1 x a2); a1 must divide every
        targeted layer's out and a2 its in (official scripts: 64 and 8). Unused by "lokr".
    target_modules: module names or suffixes, a regex over full paths, or "all-linear" (the
        paper adapts the attention projections q, k, v, out of a diffusion UNet).
    factor_layout: "diffusekrona" (explicit a1, a2; both factors full; scale 1) or "lokr"
        (PEFT LoKr: factor sizes from decompose_factor, low-rank factors, alpha / r; files load in PEFT).
    r: "lokr" only: rank of the low-rank factors (default 8, as PEFT).
    alpha: "lokr" only: the update is scaled by alpha / r (default 8, as PEFT).
    decompose_factor: "lokr" only: PEFT's factorization factor (-1: nearest to sqrt(dim)).
    decompose_both: "lokr" only: allow W1 to be low-rank too.
    init: "default" (DiffuseKronA: W1 ~ N(0, 1/a1^2), W2 = 0; LoKr: PEFT's W1 = 0, W2 Kaiming),
        "lycoris" (W1 Kaiming, W2 = 0) or "random" (all Kaiming; not the identity at init).
    rank_dropout: probability of zeroing each output row of dW while training, in [0, 1).
    module_dropout: probability of skipping the whole update for a training step, in [0, 1).
    rank_dropout_scale: divide the rank-dropout mask by its mean.
    rank_pattern / alpha_pattern: "lokr" only: per-module r / alpha, keyed by module-name regex.

    Saved files are PEFT's LoKr format (peft_type "LOKR") for factor_layout="lokr". The
    "diffusekrona" layout is saved in lorakit's own format (peft_type null): PEFT derives both
    W1 sizes from one decompose_factor (a1 = a2 = f when f divides both dims, a1 = a2 ~ sqrt
    otherwise), so it cannot express independent factors such as a1 = 64, a2 = 8.
    """

    regex_keyed_fields = ("rank_pattern", "alpha_pattern")  # module-name regexes, matched as PEFT does

    a1: int = 64
    a2: int = 8
    target_modules: str | list[str] = "all-linear"
    factor_layout: str = "diffusekrona"
    r: int | None = None
    alpha: float | None = None
    decompose_factor: int = -1
    decompose_both: bool = False
    init: str = "default"
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_dropout_scale: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        require_choice("factor_layout", self.factor_layout, FACTOR_LAYOUTS)
        require_positive("a1", self.a1, integer=True)
        require_positive("a2", self.a2, integer=True)
        require_choice("init", self.init, KRON_INITS)
        require_in_range("rank_dropout", self.rank_dropout, 0.0, 1.0)
        require_in_range("module_dropout", self.module_dropout, 0.0, 1.0)
        if self.r is not None:
            require_positive("r", self.r, integer=True)
        if self.alpha is not None:
            require_positive("alpha", self.alpha)
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int) or not (
            self.decompose_factor == -1 or self.decompose_factor > 0
        ):
            raise ConfigError(f"decompose_factor={self.decompose_factor!r} is invalid: use -1 (factors near "
                              "sqrt(dim)) or a positive integer")
        for key, value in self.rank_pattern.items():
            require_positive(f"rank_pattern[{key!r}]", value, integer=True)
        for key, value in self.alpha_pattern.items():
            require_positive(f"alpha_pattern[{key!r}]", value)
        if self.factor_layout == "diffusekrona":
            lokr_only = {"r": self.r is not None, "alpha": self.alpha is not None,
                         "decompose_factor": self.decompose_factor != -1, "decompose_both": self.decompose_both,
                         "rank_pattern": bool(self.rank_pattern), "alpha_pattern": bool(self.alpha_pattern)}
            set_fields = [name for name, is_set in lokr_only.items() if is_set]
            if set_fields:
                raise ConfigError(
                    f"{', '.join(set_fields)} only appl{'ies' if len(set_fields) == 1 else 'y'} with "
                    "factor_layout='lokr' (PEFT LoKr); DiffuseKronA (factor_layout='diffusekrona') uses full "
                    "factors of sizes a1, a2 and scale 1. Set factor_layout='lokr' or drop those fields"
                )
        elif (self.a1, self.a2) != (64, 8):
            raise ConfigError(
                f"a1={self.a1}, a2={self.a2} only apply with factor_layout='diffusekrona'; with "
                "factor_layout='lokr' the factor sizes come from decompose_factor (PEFT's factorization)"
            )

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """LoKr's (r, alpha) for one module, patterns first (as PEFT resolves them)."""
        r = LOKR_DEFAULT_R if self.r is None else self.r
        alpha = LOKR_DEFAULT_ALPHA if self.alpha is None else self.alpha
        return pattern_value(self.rank_pattern, module_name, r), pattern_value(self.alpha_pattern, module_name, alpha)

    # --- adapter_config.json ----------------------------------------------------------------
    def to_file_dict(self, target_names: list[str], for_untouched_base: bool = True) -> dict[str, Any]:
        """PEFT's LoKrConfig for factor_layout="lokr"; lorakit's own fields (peft_type null) for
        "diffusekrona", which PEFT cannot express (see the class docstring)."""
        if self.factor_layout == "diffusekrona":
            return {"peft_type": None, "lorakit": {"method": "kron"}, **self.to_dict()}
        r, alpha = self.rank_and_alpha("")
        return {
            "peft_type": "LOKR",
            "r": r,
            "alpha": alpha,
            "rank_dropout": self.rank_dropout,
            "module_dropout": self.module_dropout,
            "rank_dropout_scale": self.rank_dropout_scale,
            "use_effective_conv2d": False,
            "decompose_both": self.decompose_both,
            "decompose_factor": self.decompose_factor,
            "init_weights": _PEFT_INIT_WEIGHTS[self.init],
            "target_modules": sorted(set(n.split(".")[-1] for n in target_names))
            if self.target_modules == "all-linear" else self.target_modules,
            "exclude_modules": None,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "lorakit": {"method": "kron"},
        }

    @classmethod
    def from_file_dict(cls, data: dict[str, Any]) -> "KronConfig":
        if data.get("peft_type") != "LOKR":  # lorakit's own format
            return cls.from_dict({k: v for k, v in data.items() if k not in _FILE_META_KEYS})
        for key in ("exclude_modules", "layers_to_transform", "modules_to_save"):
            if data.get(key) not in (None, []):
                raise ConfigError(f"adapter_config.json sets {key}={data[key]!r}, which lorakit does not load "
                                  "for LoKr; only None is supported")
        init_weights = data.get("init_weights", True)
        inits = {value: name for name, value in _PEFT_INIT_WEIGHTS.items() if not isinstance(value, bool)}
        init = "default" if init_weights is True else "random" if init_weights is False else inits.get(init_weights)
        if init is None:
            raise ConfigError(f"adapter_config.json has init_weights={init_weights!r}; LoKr allows True, False, 'lycoris'")
        target_modules = data["target_modules"]
        return cls(
            target_modules=sorted(target_modules) if isinstance(target_modules, (list, set, tuple)) else target_modules,
            factor_layout="lokr",
            r=int(data.get("r", LOKR_DEFAULT_R)),
            alpha=float(data.get("alpha", LOKR_DEFAULT_ALPHA)),
            decompose_factor=int(data.get("decompose_factor", -1)),
            decompose_both=bool(data.get("decompose_both", False)),
            init=init,
            rank_dropout=float(data.get("rank_dropout") or 0.0),
            module_dropout=float(data.get("module_dropout") or 0.0),
            rank_dropout_scale=bool(data.get("rank_dropout_scale", False)),
            rank_pattern=dict(data.get("rank_pattern") or {}),
            alpha_pattern=dict(data.get("alpha_pattern") or {}),
        )


@register_method("kron", config=KronConfig, peft_type="LOKR")
class KronAdapter(Adapter):
    """h = W x + b + s vec(W1 X W2^T), X = x reshaped (a2, b2); dW = s W1 ⊗ W2."""

    def __init__(self, config: KronConfig, in_features: int, out_features: int, module_name: str):
        super().__init__(config, in_features, out_features, module_name)
        if config.factor_layout == "diffusekrona":
            self._check_divisible(config, module_name, in_features, out_features)
            (a1, b1), (a2, b2) = (config.a1, out_features // config.a1), (config.a2, in_features // config.a2)
            w1_rank = w2_rank = None
            self.scaling = 1.0
        else:
            r, alpha = config.rank_and_alpha(module_name)
            (a1, b1), (a2, b2) = factorization(out_features, config.decompose_factor), factorization(
                in_features, config.decompose_factor)
            # PEFT's rule: a factor is low-rank when r is under half its larger side.
            w1_rank = r if config.decompose_both and r < max(a1, a2) / 2 else None
            w2_rank = r if r < max(b1, b2) / 2 else None
            self.scaling = alpha / r
        self.w1_shape, self.w2_shape = (a1, a2), (b1, b2)
        self.w1_low_rank, self.w2_low_rank = w1_rank is not None, w2_rank is not None
        self._make_factor("lokr_w1", (a1, a2), w1_rank)
        self._make_factor("lokr_w2", (b1, b2), w2_rank)
        self._initialise(config)

    @staticmethod
    def _check_divisible(config: KronConfig, module_name: str, in_features: int, out_features: int) -> None:
        problems = []
        if out_features % config.a1:
            problems.append(f"a1={config.a1} does not divide out={out_features} (divisors: {_divisors(out_features)})")
        if in_features % config.a2:
            problems.append(f"a2={config.a2} does not divide in={in_features} (divisors: {_divisors(in_features)})")
        if problems:
            raise ConfigError(
                f"DiffuseKronA cannot split {module_name} (in={in_features}, out={out_features}): "
                f"{'; '.join(problems)}. Pick a1, a2 from those divisors (they must fit every targeted "
                "layer), exclude the layer from target_modules, or use factor_layout='lokr', which "
                "factorises each layer's dims itself"
            )

    def _make_factor(self, name: str, shape: tuple[int, int], rank: int | None) -> None:
        if rank is None:
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        else:
            self.register_parameter(f"{name}_a", nn.Parameter(torch.empty(shape[0], rank)))
            self.register_parameter(f"{name}_b", nn.Parameter(torch.empty(rank, shape[1])))

    @torch.no_grad()
    def _initialise(self, config: KronConfig) -> None:
        def kaiming(param: torch.Tensor) -> None:
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))

        if config.init == "random":
            for param in self.parameters():
                kaiming(param)
        elif config.init == "lycoris":  # W1 drawn, W2 = 0 (W2_a drawn, W2_b = 0)
            for name, param in self.named_parameters():
                (nn.init.zeros_ if name in ("lokr_w2", "lokr_w2_b") else kaiming)(param)
        elif config.factor_layout == "diffusekrona":  # official: A ~ N(0, 1/a1^2), B = 0
            nn.init.normal_(self.lokr_w1, std=1.0 / config.a1)
            nn.init.zeros_(self.lokr_w2)
        else:  # PEFT's LoKr default: W1 = 0 (W1_a = 0, W1_b drawn), W2 drawn
            for name, param in self.named_parameters():
                (nn.init.zeros_ if name in ("lokr_w1", "lokr_w1_a") else kaiming)(param)

    # --- the update ------------------------------------------------------------------------
    def kron_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W1, W2), each a full matrix or formed from its low-rank pair."""
        w1 = self.lokr_w1_a @ self.lokr_w1_b if self.w1_low_rank else self.lokr_w1
        w2 = self.lokr_w2_a @ self.lokr_w2_b if self.w2_low_rank else self.lokr_w2
        return w1, w2

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        config = self.config
        if self.training and config.module_dropout and torch.rand(1).item() <= config.module_dropout:
            return base_out  # PEFT keeps the update when rand > module_dropout
        w1, w2 = self.kron_factors()
        x = x.to(w1.dtype)
        update = kron_matvec(w1 * self.scaling, w2, x)
        if self.training and config.rank_dropout:
            keep = (torch.rand(self.out_features, device=update.device) > config.rank_dropout).to(update.dtype)
            if config.rank_dropout_scale and keep.any():  # PEFT would divide by 0 when all rows drop
                keep = keep / keep.mean()
            update = update * keep
        return base_out + update.to(base_out.dtype)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.kron_factors()
        return self.scaling * torch.kron(w1, w2)


def kron_matvec(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(w1 ⊗ w2) x for x of shape (..., a2 * b2) without forming the Kronecker product:
    vec_rowmajor(w1 X w2^T) with X = x reshaped (a2, b2), in the cheaper association order."""
    (a1, a2), (b1, b2) = w1.shape, w2.shape
    X = x.reshape(*x.shape[:-1], a2, b2)
    if a2 * b2 * b1 + a1 * a2 * b1 <= a1 * a2 * b2 + a1 * b2 * b1:
        Y = w1 @ (X @ w2.T)
    else:
        Y = (w1 @ X) @ w2.T
    return Y.reshape(*x.shape[:-1], a1 * b1)
