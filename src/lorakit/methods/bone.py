"""Bone / Bat / MiSS-mini: block-affine shard-sharing adaptation (PEFT's "MiSS").

Kang & Yin, "Bone: Block-Affine Adaptation of Large Language Models", arXiv 2409.15371 (renamed
DiSHA, then MiSS). Naming follows v4+ of the paper and PEFT (v1-v3 called today's Bat "Bone").
W is (out, in); D is the trainable matrix, initialised to zeros, so every variant is the identity
at initialisation. There is no alpha: the scale is 1.

- Bone (default): D in R^{r x out}. With n = ceil(in / r) shards of the zero-padded input,
  y = W x + b + (sum_j x_j)^T D, i.e. dW = [D^T, D^T, ..., D^T] cropped to `in` columns.
- Bat ("Weight Guide"): D in R^{(out/r) x r x r}; for the r x r blocks W_{a,c} of W,
  dW_{a,c} = W_{a,c} D_a + D_a (D_a shared by every input block c of output block a), so
  y = (W + dW) x + b. Needs in % r == 0 and out % r == 0. Unmerge inverts the affine map:
  W_{a,c} = (W'_{a,c} - D_a) (I + D_a)^{-1}.
- MiSS-mini: D in R^{r x mini_r}, tiled out / mini_r times along the output axis, then Bone.

Trainable parameters per layer: r * out (Bone, Bat); r * mini_r (mini).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import Adapter
from lorakit.core.config import AdapterConfig, require_choice, require_in_range, require_positive
from lorakit.core.errors import ConfigError
from lorakit.core.registry import register_method

BONE_VARIANTS = ("bone", "bat", "mini")
_PEFT_INIT = {"bone": True, "bat": "bat", "mini": "mini"}


@dataclass
class BoneConfig(AdapterConfig):
    """Hyperparameters of a Bone-family adapter.

    r: shard (block) size, > 0. Bone needs r <= in; Bat needs in % r == 0 and out % r == 0.
    dropout: dropout on the input before the shard sum (Bone, mini), in [0, 1).
    target_modules: module names or suffixes, a regex over full paths, or "all-linear".
    variant: "bone" (linear shard sharing), "bat" (W-dependent block affine) or "mini".
    mini_r: with variant="mini", the width of D (out % mini_r == 0).
    """

    r: int = 64
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    variant: str = "bone"
    mini_r: int = 1

    def validate(self) -> None:
        super().validate()
        require_positive("r", self.r, integer=True)
        require_in_range("dropout", self.dropout, 0.0, 1.0)
        require_choice("variant", self.variant, BONE_VARIANTS)
        require_positive("mini_r", self.mini_r, integer=True)

    def to_file_dict(self, target_names: list[str], for_untouched_base: bool = True) -> dict[str, Any]:
        """PEFT's MissConfig fields."""
        return {
            "peft_type": "MISS",
            "r": self.r,
            "miss_dropout": self.dropout,
            "mini_r": self.mini_r,
            "init_weights": _PEFT_INIT[self.variant],
            "target_modules": sorted(set(n.split(".")[-1] for n in target_names))
            if self.target_modules == "all-linear" else self.target_modules,
            "bias": "none",
            "modules_to_save": None,
            "layers_to_transform": None,
            "lorakit": {"method": "bone"},
        }

    @classmethod
    def from_file_dict(cls, data: dict[str, Any]) -> "BoneConfig":
        if data.get("bias", "none") != "none" or data.get("modules_to_save"):
            raise ConfigError("adapter_config.json sets bias or modules_to_save, which lorakit does not load for Bone")
        init = data.get("init_weights", True)
        variants = {True: "bone", "bat": "bat", "mini": "mini"}
        if init not in variants:
            raise ConfigError(f"adapter_config.json has init_weights={init!r}; lorakit loads True, 'bat' and 'mini'")
        return cls(r=int(data["r"]), dropout=float(data.get("miss_dropout") or 0.0), target_modules=data["target_modules"],
                   variant=variants[init], mini_r=int(data.get("mini_r") or 1))


@register_method("bone", config=BoneConfig, peft_type="MISS")
class BoneAdapter(Adapter):
    """Bone / Bat / mini update of one Linear layer; see the module docstring for the equations."""

    def __init__(self, config: BoneConfig, in_features: int, out_features: int, module_name: str):
        super().__init__(config, in_features, out_features, module_name)
        self.r = r = config.r
        self.variant = config.variant
        self._check_shape(module_name, in_features, out_features)
        shape = {"bone": (r, out_features), "bat": (out_features // r, r, r), "mini": (r, config.mini_r)}
        self.miss_block = nn.Parameter(torch.zeros(shape[self.variant]))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def _check_shape(self, module_name: str, in_features: int, out_features: int) -> None:
        r, where = self.r, f"{module_name} (in={in_features}, out={out_features})"
        if self.variant == "bat" and (in_features % r or out_features % r):
            raise ConfigError(f"Bat needs in and out divisible by r={r}; {where} is not. Pick r dividing both, "
                              "or use variant='bone', which pads")
        if self.variant != "bat" and r > in_features:
            raise ConfigError(f"Bone needs r <= in; r={r} for {where}. Lower r or exclude that layer")
        if self.variant == "mini" and out_features % self.config.mini_r:
            raise ConfigError(f"MiSS-mini needs out divisible by mini_r={self.config.mini_r}; {where} is not")

    def shared_block(self) -> torch.Tensor:
        """D for Bone, D tiled along the output axis for mini: (r, out)."""
        if self.variant == "mini":
            return self.miss_block.repeat(1, self.out_features // self.config.mini_r)
        return self.miss_block

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.variant == "bat":  # W-dependent: the layer runs with W + dW
            weight = base.weight if isinstance(base, nn.Linear) else base.weight.T
            weight = weight.to(self.miss_block.dtype)
            bias = None if base.bias is None else base.bias.to(weight.dtype)
            adapted = F.linear(x.to(weight.dtype), weight + self.delta_weight(weight), bias)
            return adapted.to(base_out.dtype)
        block = self.shared_block()
        x = x.to(block.dtype)
        padding = -x.shape[-1] % self.r
        if padding:
            x = F.pad(x, (0, padding))
        shard_sum = self.dropout(x).reshape(*x.shape[:-1], x.shape[-1] // self.r, self.r).sum(dim=-2)
        return base_out + (shard_sum @ block).to(base_out.dtype)

    def _blocks(self, weight: torch.Tensor) -> torch.Tensor:
        """W as (in/r, out/r, r, r): entry [c, a] is the block W_{a,c}."""
        r = self.r
        return weight.reshape(self.out_features // r, r, self.in_features // r, r).permute(2, 0, 1, 3)

    def _unblocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.permute(1, 2, 0, 3).reshape(self.out_features, self.in_features)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        if self.variant == "bat":
            block = self.miss_block
            return self._unblocks(self._blocks(base_weight.to(block.dtype)) @ block + block)
        tiles = math.ceil(self.in_features / self.r)
        return self.shared_block().T.repeat(1, tiles)[:, : self.in_features]

    def unmerge_delta(self, merged_weight: torch.Tensor) -> torch.Tensor:
        if self.variant != "bat":
            return self.delta_weight(merged_weight)
        # float64: the inverse of I + D_a loses digits in fp32 when D_a is large.
        block = self.miss_block.double()
        eye = torch.eye(self.r, dtype=torch.float64, device=block.device)
        merged = merged_weight.double()
        original = self._unblocks((self._blocks(merged) - block) @ torch.linalg.inv(eye + block))
        return merged - original
