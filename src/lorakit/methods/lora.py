"""LoRA and its variants that share the B @ A structure: rsLoRA, DoRA, LoRA-FA / FFA-LoRA.

- LoRA, Hu et al., arXiv 2106.09685:   h = W x + b + s * B A dropout(x),  s = alpha / r,
  A in R^{r x in} (Kaiming-uniform, a = sqrt(5), as PEFT), B in R^{out x r} (zeros),
  so dW = s B A and the adapted model equals the base at initialisation.
- rsLoRA, Kalajdzievski, arXiv 2312.03732:   s = alpha / sqrt(r).
- DoRA, Liu et al., arXiv 2402.09353:   W' = m * (W + s B A) / ||W + s B A||_c,
  m in R^{out} initialised to ||W||_c (the L2 norm of each output row of the (out, in) weight).
  Following the paper's section 4.3 the norm is treated as a constant (detached), so
  h = W' x + b = (m / n - 1) W x + (m / n) s B A x + W x + b  with n = ||W + s B A||_c.
- LoRA-FA (arXiv 2308.03303) / FFA-LoRA (arXiv 2403.12313): A stays at its random
  initialisation and only B trains (`freeze_a=True`); then dW is linear in B, which makes
  federated averaging of B exact.

Initialisations (`init`): "default" (above), "gaussian" (A ~ N(0, 1/r^2), B = 0, as PEFT),
"pissa" and "olora" (rewrite W; see `lorakit.init.svd`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import Adapter
from lorakit.core.config import AdapterConfig, pattern_value, require_choice, require_in_range, require_positive
from lorakit.core.errors import ConfigError
from lorakit.core.registry import init_options, register_method

LORA_INITS = ("default", "gaussian", "pissa", "olora", "eva", "lora-ga")


@dataclass
class LoraConfig(AdapterConfig):
    """Hyperparameters of a LoRA-family adapter.

    r: rank of the update (> 0).
    alpha: scale numerator (> 0); the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).
    dropout: dropout probability on the adapter's input, in [0, 1).
    target_modules: module names or suffixes, a regex over full paths, or "all-linear".
    use_rslora: scale by alpha / sqrt(r) instead of alpha / r.
    use_dora: weight-decomposed LoRA (a trainable magnitude per output feature).
    freeze_a: keep A at its random initialisation; only B (and the DoRA magnitude) train.
    init: "default", "gaussian", "pissa" or "olora"; data-driven (need `inject(..., data=batches)`):
        "eva" and "lora-ga" (see `lorakit.init`).
    init_options: options of a data-driven init, checked by that initialiser's options dataclass.
    pissa_niter_k: with init="pissa", use randomized SVD with this many subspace iterations
        instead of a full SVD (much faster on large layers; PEFT's "pissa_niter_k").
    rank_pattern / alpha_pattern: per-module overrides of r / alpha, keyed by module-name regex.
    """

    regex_keyed_fields = ("rank_pattern", "alpha_pattern")  # module-name regexes, matched as PEFT does

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    freeze_a: bool = False
    init: str = "default"
    pissa_niter_k: int | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        require_positive("r", self.r, integer=True)
        require_positive("alpha", self.alpha)
        require_in_range("dropout", self.dropout, 0.0, 1.0)
        require_choice("init", self.init, LORA_INITS)
        if self.pissa_niter_k is not None:
            require_positive("pissa_niter_k", self.pissa_niter_k, integer=True)
            if self.init != "pissa":
                raise ConfigError(f"pissa_niter_k={self.pissa_niter_k} only applies with init='pissa', not {self.init!r}")
        init_options(self.init, self.init_options)  # a data-driven init's options, checked by its own dataclass
        for key, value in self.rank_pattern.items():
            require_positive(f"rank_pattern[{key!r}]", value, integer=True)
        for key, value in self.alpha_pattern.items():
            require_positive(f"alpha_pattern[{key!r}]", value)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        return (
            pattern_value(self.rank_pattern, module_name, self.r),
            pattern_value(self.alpha_pattern, module_name, self.alpha),
        )

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # --- PEFT's adapter_config.json -------------------------------------------------------
    def init_rewrites_base(self) -> bool:
        return self.init in ("pissa", "olora", "lora-ga")

    def to_file_dict(self, target_names: list[str], for_untouched_base: bool = True) -> dict[str, Any]:
        """PEFT's LoRA config. With `for_untouched_base` an initialiser that rewrote W is written
        as the rank-2r plain LoRA that `LoraAdapter.file_tensors` produces (alpha scaled so the
        per-module scaling is unchanged)."""
        converted = for_untouched_base and self.init_rewrites_base()
        # r -> 2r keeps alpha / r when alpha doubles; alpha / sqrt(r) when alpha grows by sqrt(2).
        alpha_factor = (math.sqrt(2.0) if self.use_rslora else 2.0) if converted else 1.0
        rank_factor = 2 if converted else 1
        if converted:
            init_lora_weights: Any = True
        elif self.init == "default":
            init_lora_weights = True
        elif self.init == "pissa" and self.pissa_niter_k:
            init_lora_weights = f"pissa_niter_{self.pissa_niter_k}"
        else:
            init_lora_weights = self.init
        options = init_options(self.init, self.init_options)  # a data-driven init may add PEFT fields (EVA: eva_config)
        return {
            "peft_type": "LORA",
            "r": self.r * rank_factor,
            "lora_alpha": self.alpha * alpha_factor,
            "lora_dropout": self.dropout,
            "target_modules": sorted(set(n.split(".")[-1] for n in target_names))
            if self.target_modules == "all-linear"
            else self.target_modules,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init_lora_weights": init_lora_weights,
            **(options.to_file_dict() if hasattr(options, "to_file_dict") else {}),
            "rank_pattern": {k: v * rank_factor for k, v in self.rank_pattern.items()},
            "alpha_pattern": {k: v * alpha_factor for k, v in self.alpha_pattern.items()},
            "bias": "none",
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "lorakit": {"method": "lora", "freeze_a": self.freeze_a, "init": self.init,
                        "converted_to_untouched_base": converted},
        }

    @classmethod
    def from_file_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        unsupported = {
            "bias": ("none", None),
            "modules_to_save": (None, []),
            "layers_to_transform": (None, []),
            "use_qalora": (False, None),
            "lora_bias": (False, None),
            "trainable_token_indices": (None,),
        }
        for key, allowed in unsupported.items():
            if key in data and data[key] not in allowed:
                raise ConfigError(
                    f"adapter_config.json sets {key}={data[key]!r}, which lorakit does not load yet; "
                    f"only {allowed[0]!r} is supported"
                )
        init = data.get("init_lora_weights", True)
        niter = None
        if init is True or init is False:  # False: PEFT's random (non-identity) init; the file holds the trained factors
            init = "default"
        elif isinstance(init, str) and init.startswith("pissa_niter_"):
            if not init.removeprefix("pissa_niter_").isdigit():
                raise ConfigError(f"adapter_config.json has init_lora_weights={init!r}; write 'pissa_niter_<k>' with k an integer")
            niter, init = int(init.removeprefix("pissa_niter_")), "pissa"
        elif init not in ("gaussian", "pissa", "olora", "eva"):  # EVA files are plain LoRA with rank/alpha patterns
            raise ConfigError(
                f"adapter_config.json has init_lora_weights={init!r}; lorakit loads "
                "True, False, 'gaussian', 'pissa', 'pissa_niter_<k>', 'olora' and 'eva'"
            )
        extra = data.get("lorakit") or {}
        return cls(
            r=int(data["r"]),
            alpha=float(data.get("lora_alpha", data["r"])),
            dropout=float(data.get("lora_dropout") or 0.0),
            target_modules=data["target_modules"],
            use_rslora=bool(data.get("use_rslora", False)),
            use_dora=bool(data.get("use_dora", False)),
            freeze_a=bool(extra.get("freeze_a", False)),
            init=init,
            pissa_niter_k=niter,
            rank_pattern=dict(data.get("rank_pattern") or {}),
            alpha_pattern=dict(data.get("alpha_pattern") or {}),
        )


@register_method("lora", config=LoraConfig, peft_type="LORA")
class LoraAdapter(Adapter):
    """h = W x + b + s B A dropout(x); with DoRA, W x + b is rescaled per output feature."""

    def __init__(self, config: LoraConfig, in_features: int, out_features: int, module_name: str):
        super().__init__(config, in_features, out_features, module_name)
        self.r, self.alpha = config.rank_and_alpha(module_name)
        self.scaling = config.scaling(self.r, self.alpha)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, self.r, bias=False)
        self.lora_B = nn.Linear(self.r, out_features, bias=False)
        if config.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:  # "default"; PiSSA/OLoRA overwrite both factors afterwards
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.weight.requires_grad_(not config.freeze_a)
        self.register_parameter("lora_magnitude_vector", None)  # DoRA's m, set by initialise_from_base
        self.use_dora = False  # a plain flag: reading a None parameter goes through Module.__getattr__
        self._dora_merge_norm: torch.Tensor | None = None

    # --- hooks called by inject / the initialisers ---------------------------------------
    def initialise_from_base(self, base_weight: torch.Tensor) -> None:
        """DoRA's m = ||W + s B A||_c, computed once the factors are final (after PiSSA/OLoRA)."""
        if self.config.use_dora:
            norm = self._column_norm(base_weight.to(self.lora_A.weight.dtype))
            self.lora_magnitude_vector = nn.Parameter(norm.clone())
            self.use_dora = True

    def remember_initial_factors(self) -> None:
        """Called by initialisers that moved s B0 A0 out of W, so saves stay exact on the untouched base."""
        self.register_buffer("initial_A", self.lora_A.weight.detach().clone(), persistent=False)
        self.register_buffer("initial_B", self.lora_B.weight.detach().clone(), persistent=False)

    @property
    def rewrote_base(self) -> bool:
        return hasattr(self, "initial_A")

    @torch.no_grad()
    def restore_rewritten_weight(self, layer) -> None:
        if self.rewrote_base:
            weight = layer.weight_out_in()
            principal = self.scaling * (self.initial_B @ self.initial_A)
            weight.copy_((weight.float() + principal).to(weight.dtype))

    # --- the update ------------------------------------------------------------------------
    def lora_weight(self) -> torch.Tensor:
        return self.lora_B.weight @ self.lora_A.weight

    def _column_norm(self, base_weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(base_weight + self.scaling * self.lora_weight(), dim=1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        # Under autocast (lorakit.core.precision) the products run in the compute dtype anyway: an
        # upcast of x here would only add a copy of the activations and its backward per layer.
        if x.dtype != self.lora_A.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)  # (checked first: a no-op .to() still costs a dispatch)
        dropped = self.lora_dropout(x)
        update = self.lora_B(self.lora_A(dropped)) * self.scaling
        if not self.use_dora:
            return base_out + (update if update.dtype == base_out.dtype else update.to(base_out.dtype))
        weight = base.weight.T if not isinstance(base, nn.Linear) else base.weight
        weight = weight.to(self.lora_A.weight.dtype)  # the norm in the adapter's dtype, also under autocast
        norm = self._column_norm(weight).detach()  # DoRA section 4.3: no gradient through the norm
        magnitude_scale = self.lora_magnitude_vector / norm
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_no_bias = base_out if base.bias is None else base_out - base.bias
            base_no_bias = base_no_bias.to(weight.dtype)
        else:  # the base term must see the same dropped input as the update
            base_no_bias = F.linear(dropped, weight)
        dora = (magnitude_scale - 1) * base_no_bias + magnitude_scale * update
        return base_out + dora.to(base_out.dtype)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        lora_delta = self.scaling * self.lora_weight()
        if not self.use_dora:
            return lora_delta
        weight = base_weight.to(lora_delta.dtype)
        magnitude_scale = (self.lora_magnitude_vector / self._column_norm(weight)).unsqueeze(1)
        return (magnitude_scale - 1) * weight + magnitude_scale * lora_delta

    def merge_delta(self, base_weight: torch.Tensor) -> torch.Tensor:
        if not self.use_dora:
            return self.delta_weight(base_weight)
        # float64: unmerging divides by m / n, which amplifies fp32 rounding where m / n is small.
        weight = base_weight.double()
        combined = weight + self.scaling * self.lora_weight().double()
        self._dora_merge_norm = torch.linalg.norm(combined, dim=1)
        magnitude_scale = (self.lora_magnitude_vector.double() / self._dora_merge_norm).unsqueeze(1)
        return magnitude_scale * combined - weight

    def unmerge_delta(self, merged_weight: torch.Tensor) -> torch.Tensor:
        if not self.use_dora:
            return self.scaling * self.lora_weight()
        # W' = (m / n) (W + s B A)  =>  W = W' n / m - s B A, with n cached at merge time.
        merged = merged_weight.double()
        magnitude_scale = (self.lora_magnitude_vector.double() / self._dora_merge_norm).unsqueeze(1)
        original = merged / magnitude_scale - self.scaling * self.lora_weight().double()
        self._dora_merge_norm = None
        return merged - original

    def factors(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        return [(self.lora_A.weight, self.lora_B.weight)]

    # --- files ---------------------------------------------------------------------------------
    def file_tensors(self, for_untouched_base: bool = True) -> dict[str, torch.Tensor]:
        """PEFT's tensors. After PiSSA/OLoRA, `for_untouched_base` writes the rank-2r adapter
        [B, -B0] @ [A; A0] whose update s (B A - B0 A0) is exact against the original W."""
        tensors = {"lora_A.weight": self.lora_A.weight.detach(), "lora_B.weight": self.lora_B.weight.detach()}
        if for_untouched_base and self.rewrote_base:
            tensors["lora_A.weight"] = torch.cat([self.lora_A.weight.detach(), self.initial_A], dim=0)
            tensors["lora_B.weight"] = torch.cat([self.lora_B.weight.detach(), -self.initial_B], dim=1)
        if self.use_dora:
            tensors["lora_magnitude_vector"] = self.lora_magnitude_vector.detach()
        return tensors

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.lora_A.weight.copy_(tensors["lora_A.weight"])
            self.lora_B.weight.copy_(tensors["lora_B.weight"])
            if self.use_dora:
                self.lora_magnitude_vector.copy_(tensors["lora_magnitude_vector"])
