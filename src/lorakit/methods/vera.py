"""VeRA: Vector-based Random Matrix Adaptation, Kopiczko et al., arXiv 2310.11454.

One pair of frozen random matrices A in R^{r x in_max}, B in R^{out_max x r} is shared by every
adapted layer (sized to the largest layer, each layer slicing A[:, :in], B[:out, :]); each layer
trains only two scaling vectors, d in R^r and b in R^out:

    h = W x + b_bias + Lambda_b B Lambda_d A x,     dW = diag(b) B diag(d) A,

with b = 0 (identity at init) and d = d_initial (0.1). A and B are Kaiming-uniform draws from a
generator seeded with `projection_prng_key` and are regenerated, never saved
(`lorakit.core.random_basis`); PEFT's files with saved projections load too.
Trainable parameters per layer: r + out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import Adapter
from lorakit.core.config import AdapterConfig, require_in_range, require_positive
from lorakit.core.errors import ConfigError
from lorakit.core.random_basis import GENERATOR_NAME, kaiming_uniform_bases
from lorakit.core.registry import register_method


@dataclass
class VeraConfig(AdapterConfig):
    """Hyperparameters of a VeRA adapter.

    r: rank of the shared random matrices (> 0; the paper uses large r, e.g. 256, since only r + out
        parameters per layer train).
    dropout: dropout on the adapter's input, in [0, 1).
    target_modules: module names or suffixes, a regex over full paths, or "all-linear".
    projection_prng_key: seed of the generator that draws the shared A and B.
    d_initial: initial value of every entry of d (> 0).
    """

    r: int = 256
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    projection_prng_key: int = 0
    d_initial: float = 0.1

    def validate(self) -> None:
        super().validate()
        require_positive("r", self.r, integer=True)
        require_in_range("dropout", self.dropout, 0.0, 1.0)
        require_positive("d_initial", self.d_initial)
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ConfigError(f"projection_prng_key={self.projection_prng_key!r} must be an integer seed")

    def to_file_dict(self, target_names: list[str], for_untouched_base: bool = True) -> dict[str, Any]:
        """PEFT's VeraConfig, projections not saved: PEFT regenerates them from the key as we do."""
        return {
            "peft_type": "VERA",
            "r": self.r,
            "vera_dropout": self.dropout,
            "target_modules": sorted(set(n.split(".")[-1] for n in target_names))
            if self.target_modules == "all-linear" else self.target_modules,
            "projection_prng_key": self.projection_prng_key,
            "save_projection": False,
            "d_initial": self.d_initial,
            "bias": "none",
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "lorakit": {"method": "vera", "basis_generator": GENERATOR_NAME},
        }

    @classmethod
    def from_file_dict(cls, data: dict[str, Any]) -> "VeraConfig":
        if data.get("bias", "none") != "none" or data.get("modules_to_save"):
            raise ConfigError("adapter_config.json sets bias or modules_to_save, which lorakit does not load for VeRA")
        return cls(r=int(data["r"]), dropout=float(data.get("vera_dropout") or 0.0), target_modules=data["target_modules"],
                   projection_prng_key=int(data.get("projection_prng_key", 0)), d_initial=float(data.get("d_initial", 0.1)))


class SharedBases(nn.Module):
    """The frozen random pair shared by all layers of one VeRA adapter (never saved)."""

    def __init__(self, vera_A: torch.Tensor, vera_B: torch.Tensor):
        super().__init__()
        self.register_buffer("vera_A", vera_A, persistent=False)
        self.register_buffer("vera_B", vera_B, persistent=False)


@register_method("vera", config=VeraConfig, peft_type="VERA")
class VeraAdapter(Adapter):
    """h = W x + b_bias + b * (B[:out] (d * (A[:, :in] dropout(x)))); A, B shared and frozen."""

    SHARED_KEYS = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}  # PEFT's save_projection=True

    @classmethod
    def prepare_shared(cls, config: VeraConfig, shapes: list[tuple[int, int]]) -> dict:
        in_max = max(in_features for in_features, _ in shapes)
        out_max = max(out_features for _, out_features in shapes)
        vera_A, vera_B = kaiming_uniform_bases(config.projection_prng_key, [(config.r, in_max), (out_max, config.r)])
        return {"bases": SharedBases(vera_A, vera_B)}

    def __init__(self, config: VeraConfig, in_features: int, out_features: int, module_name: str, bases: "SharedBases"):
        super().__init__(config, in_features, out_features, module_name)
        # The same SharedBases module is a child of every layer's adapter: `model.to(...)` moves
        # it once and later visits find it already moved, so all layers keep one storage.
        self.bases = bases
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features))
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial)))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @property
    def vera_A(self) -> torch.Tensor:
        return self.bases.vera_A

    @property
    def vera_B(self) -> torch.Tensor:
        return self.bases.vera_B

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        A = self.vera_A[:, : self.in_features].to(self.vera_lambda_d.dtype)
        B = self.vera_B[: self.out_features].to(self.vera_lambda_d.dtype)
        x = x.to(self.vera_lambda_d.dtype)
        update = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(self.dropout(x), A), B)
        return base_out + update.to(base_out.dtype)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        A = self.vera_A[:, : self.in_features].to(self.vera_lambda_d.dtype)
        B = self.vera_B[: self.out_features].to(self.vera_lambda_d.dtype)
        return (self.vera_lambda_b[:, None] * B) @ (self.vera_lambda_d[:, None] * A)
