"""Block-LoRA: LoRA with one down-projection block shared across n input blocks.

Zhou, Shen, Yu, Bu & Wang, "One Head Eight Arms: Block Matrix based Low Rank Adaptation for
CLIP-based Few-Shot Learning", arXiv 2501.16720. Not in PEFT.

RECONSTRUCTED. The paper's method section could not be read (no official code exists); the
abstract says only that Block-LoRA partitions LoRA's factors into sub-matrices and shares every
down-projection sub-matrix, which turns some matrix products into additions. This module
implements the input-partition reading of ../shared/methods/block-lora.md; the block axis, the
default n, the rank and the initialisation are not confirmed by the paper.

W is (out, in), r the rank, n the number of blocks, s = alpha / r. The input axis is cut into n
blocks of width m = ceil(in / n); every column block of the down-projection is the same trainable
A_s in R^{r x m} ("one head", n "arms"), B in R^{out x r}:

    dW = s * B [A_s, A_s, ..., A_s]          (A_s tiled n times along the input axis, cropped to in)
    u  = sum_j x_j                           (x = [x_1, ..., x_n], x zero-padded to n * m)
    h  = W x + b + s * B A_s drop(u)

so the adapter path costs in additions + r*m + out*r multiply-adds per token instead of LoRA's
r*in + out*r. (The paper writes the row-vector form dW = A B with A the down-projection; A_s here
is the transpose of the paper's.) Dropout acts on the chunk sum u, as the spec states (CLIP-LoRA
drops x before A; both are the identity in eval mode).

- Init (CLIP-LoRA / PEFT convention): A_s Kaiming-uniform (a = sqrt(5)), B = 0, so dW = 0.
- in % n != 0: x is zero-padded to n * m (as Bone pads its shards) and dW is the tiled matrix
  cropped to `in` columns. A configuration in which a whole block would be padding (n > in, or
  (n - 1) * ceil(in / n) >= in) is refused: it would silently have fewer than n blocks.
- `factors()` is empty: dW is B @ tile(A_s), not B @ A for a parameter A, so optimisers that
  treat (A, B) pairs jointly (LoRA+, LoRA-Pro) would compute the wrong update from (A_s, B).
- rank(dW) <= r; dW x depends on x only through u, which is what the sharing enforces.

Trainable parameters per layer: out * r + r * ceil(in / n).

Defaults follow the CLIP-LoRA recipe the paper builds on (Zanella & Ben Ayed, arXiv 2405.18541,
MaxZanella/CLIP-LoRA): r = 2, alpha = 1, dropout = 0.25 on q, k, v; n = 8 is read from the title.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import Adapter
from lorakit.core.config import AdapterConfig, require_in_range, require_positive
from lorakit.core.errors import ConfigError
from lorakit.core.registry import register_method


@dataclass
class BlockLoraConfig(AdapterConfig):
    """Hyperparameters of a Block-LoRA adapter.

    r: rank of the update (> 0). Default 2 (CLIP-LoRA's rank).
    alpha: scale numerator (> 0); the update is scaled by alpha / r. Default 1 (CLIP-LoRA).
    n_blocks: number of input blocks sharing the one down-projection A_s (> 0); needs
        (n_blocks - 1) * ceil(in / n_blocks) < in on every targeted layer. Default 8 (the title).
    dropout: dropout on the chunk sum u, in [0, 1). Default 0.25 (CLIP-LoRA).
    target_modules: module names or suffixes, a regex over full paths, or "all-linear".
        Default q_proj, k_proj, v_proj (CLIP-LoRA adapts q, k, v of every layer).
    """

    r: int = 2
    alpha: float = 1.0
    n_blocks: int = 8
    dropout: float = 0.25
    target_modules: str | list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])

    def validate(self) -> None:
        super().validate()
        require_positive("r", self.r, integer=True)
        require_positive("alpha", self.alpha)
        require_positive("n_blocks", self.n_blocks, integer=True)
        require_in_range("dropout", self.dropout, 0.0, 1.0)


def block_width(in_features: int, n_blocks: int) -> int:
    """m = ceil(in / n): the width of A_s and of every input block (the last one zero-padded)."""
    return math.ceil(in_features / n_blocks)


@register_method("block_lora", config=BlockLoraConfig, peft_type=None)
class BlockLoraAdapter(Adapter):
    """Block-LoRA update of one Linear layer; see the module docstring for the equations."""

    def __init__(self, config: BlockLoraConfig, in_features: int, out_features: int, module_name: str):
        super().__init__(config, in_features, out_features, module_name)
        self.r, self.n_blocks = config.r, config.n_blocks
        self._check_shape(module_name, in_features, out_features)
        self.block = block_width(in_features, self.n_blocks)
        self.scaling = config.alpha / config.r
        self.A_s = nn.Parameter(torch.empty(self.r, self.block))
        self.B = nn.Parameter(torch.zeros(out_features, self.r))
        nn.init.kaiming_uniform_(self.A_s, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def _check_shape(self, module_name: str, in_features: int, out_features: int) -> None:
        n, where = self.n_blocks, f"{module_name} (in={in_features}, out={out_features})"
        if n > in_features:
            raise ConfigError(f"Block-LoRA needs n_blocks <= in; n_blocks={n} for {where}. "
                              "Lower n_blocks or exclude that layer")
        m = block_width(in_features, n)
        if (n - 1) * m >= in_features:
            raise ConfigError(
                f"n_blocks={n} on {where} gives blocks of width ceil({in_features}/{n})={m}, so the last "
                f"block would be only zero padding (fewer than {n} real blocks). Pick n_blocks dividing "
                f"{in_features}, or one with (n_blocks - 1) * ceil(in / n_blocks) < in"
            )

    def chunk_sum(self, x: torch.Tensor) -> torch.Tensor:
        """u = sum_j x_j over the n blocks of x (..., in), zero-padded to n * m: (..., m)."""
        padding = self.n_blocks * self.block - self.in_features
        if padding:
            x = F.pad(x, (0, padding))
        return x.reshape(*x.shape[:-1], self.n_blocks, self.block).sum(dim=-2)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        u = self.chunk_sum(x.to(self.A_s.dtype))
        update = self.scaling * F.linear(F.linear(self.dropout(u), self.A_s), self.B)
        return base_out + update.to(base_out.dtype)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        tiled = self.A_s.repeat(1, self.n_blocks)[:, : self.in_features]
        return self.scaling * (self.B @ tiled)
