"""NOLA: Compressing LoRA using Linear Combination of Random Basis, Koohpayegani et al., arXiv 2310.02556.

NOLA keeps LoRA's product B A but trains neither factor: each is a linear combination of frozen
pseudo-random matrices regenerated from a per-matrix seed, and only the k + l mixing
coefficients train, whatever the rank and the layer shape:

    A = A0 + sum_{i=1..k} alpha_i Abar_i     (r x in)
    B =      sum_{j=1..l} beta_j  Bbar_j     (out x r)
    h = W x + b + s B (A x),     dW = s B A,     s = alpha / r,

with Abar_i, Bbar_j entries Uniform(-1, 1) / sqrt(k) (resp. / sqrt(l)).

variant="llm" (default) is the official LLM code (gpt/src/model_nola.py and the LoRA fork
llama/peft/tuners/lora.py of UCDvision/NOLA): A0 is a frozen kaiming_uniform(a=sqrt(5)) matrix
(LoRA's usual A init) and alpha = beta = 0 at init, so dW = 0 at init while beta gets a non-zero
first gradient (through A = A0). variant="paper" is the paper's formulation without A0; since
alpha = beta = 0 would then never move, the coefficients start at alpha = 1/k and beta = 1/l as in
the official ViT code (vit/NOLA.py, NOLA2), so dW != 0 at init. (That code also draws its bases
Kaiming-uniform and scales by 1/r; here both variants share the LLM code's bases and s = alpha / r.)

Bases and A0 are never stored: each layer holds three integer seeds (A bases, B bases, A0),
derived from `basis_seed` and the module path and saved in the adapter file; the file names the
generator (`lorakit.core.random_basis.UNIFORM_GENERATOR_NAME`). A and B are produced by
`CombineSeededBases`, an autograd Function that draws the bases in forward, combines them, drops
them, and draws them again in backward to form the coefficient gradients (the official
GenerateParams / GenerateParamsChunks memory trick), `basis_chunk_size` bases at a time. Bases are
drawn on the CPU so a file gives the same adapter on every device. Trainable per layer: k + l.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from lorakit.core.adapter import Adapter
from lorakit.core.config import AdapterConfig, reject_unknown_fields, require_choice, require_in_range, require_positive
from lorakit.core.errors import ConfigError
from lorakit.core.random_basis import UNIFORM_GENERATOR_NAME, derive_seed, uniform_basis_chunks
from lorakit.core.registry import register_method

VARIANTS = ("llm", "paper")
FILE_KEYS = ("peft_type", "lorakit", "task_type", "base_model_name_or_path", "inference_mode")

BasisChunks = Callable[[], Iterator[tuple[int, torch.Tensor]]]


@dataclass
class NolaConfig(AdapterConfig):
    """Hyperparameters of a NOLA adapter.

    Defaults are those of the official LoRA fork's config (UCDvision/NOLA,
    llama/peft/tuners/lora.py: r=8, lora_alpha=8, nola_num_basis=128 for both A and B); its
    LLaMA-2 scripts use r=16, lora_alpha=4, 512 bases; its GPT-2 E2E scripts r=8, alpha=8,
    1024 bases on q and v.

    r: rank of A (r x in) and B (out x r), > 0. The trainable count does not depend on it.
    alpha: LoRA scale numerator, s = alpha / r (> 0).
    num_basis_a: k, the number of random bases (and trainable coefficients) for A, > 0.
    num_basis_b: l, the same for B, > 0.
    dropout: dropout on the adapter's input, in [0, 1).
    target_modules: module names or suffixes, a regex over full paths, or "all-linear".
    variant: "llm" (official LLM code: A = A0 + sum alpha_i Abar_i with a frozen Kaiming A0,
        alpha = beta = 0, identity at init) or "paper" (no A0, alpha = 1/k and beta = 1/l at
        init as the official ViT code; not identity at init).
    basis_seed: integer from which every layer's three seeds are derived (with its module path).
    basis_chunk_size: bases drawn at a time in forward and backward (> 0); bounds the peak
        memory at chunk * r * max(in, out) floats per layer. The bases do not depend on it (A and B
        only to rounding, through the order of the sum).
    """

    r: int = 8
    alpha: float = 8.0
    num_basis_a: int = 128
    num_basis_b: int = 128
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    variant: str = "llm"
    basis_seed: int = 0
    basis_chunk_size: int = 64

    def validate(self) -> None:
        super().validate()
        require_positive("r", self.r, integer=True)
        require_positive("alpha", self.alpha)
        require_positive("num_basis_a", self.num_basis_a, integer=True)
        require_positive("num_basis_b", self.num_basis_b, integer=True)
        require_in_range("dropout", self.dropout, 0.0, 1.0)
        require_choice("variant", self.variant, VARIANTS)
        require_positive("basis_chunk_size", self.basis_chunk_size, integer=True)
        if not isinstance(self.basis_seed, int) or isinstance(self.basis_seed, bool):
            raise ConfigError(f"basis_seed={self.basis_seed!r} must be an integer seed")

    def to_file_dict(self, target_names: list[str], for_untouched_base: bool = True) -> dict[str, Any]:
        """lorakit's own layout (PEFT has no NOLA); the extras name the basis generator."""
        return {"peft_type": None, **self.to_dict(),
                "lorakit": {"method": "nola", "basis_generator": UNIFORM_GENERATOR_NAME}}

    @classmethod
    def from_file_dict(cls, data: dict[str, Any]) -> "NolaConfig":
        generator = (data.get("lorakit") or {}).get("basis_generator", UNIFORM_GENERATOR_NAME)
        if generator != UNIFORM_GENERATOR_NAME:
            raise ConfigError(
                f"this NOLA adapter's bases were drawn by {generator!r}, but this lorakit draws them with "
                f"{UNIFORM_GENERATOR_NAME!r}; load it with the lorakit version that wrote it"
            )
        fields = {k: v for k, v in data.items() if k not in FILE_KEYS}
        reject_unknown_fields(cls, fields)
        return cls(**fields)


class CombineSeededBases(torch.autograd.Function):
    """M = sum_i c_i (scale U_i) for draws U_i produced by `chunks()`, without keeping them.

    `chunks()` yields (start, tensor (n, rows, cols)) and must give the same values on every
    call (draws regenerated from a seed). Forward draws and combines them chunk by chunk;
    backward draws them again for dL/dc_i = scale <U_i, dL/dM>. Only the shape is saved.
    The scale is applied to the coefficients, saving a pass over the draws.
    """

    @staticmethod
    def forward(ctx, coefficients: torch.Tensor, chunks: BasisChunks, rows: int, cols: int, scale: float) -> torch.Tensor:
        ctx.chunks, ctx.scale = chunks, scale
        out = torch.zeros(rows * cols, dtype=coefficients.dtype, device=coefficients.device)
        for start, draws in chunks():
            draws = draws.to(device=coefficients.device, dtype=coefficients.dtype).reshape(draws.shape[0], -1)
            out.addmv_(draws.T, coefficients[start: start + draws.shape[0]], alpha=scale)
        return out.view(rows, cols)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grad_flat = grad_out.reshape(-1)
        parts = []
        for _, draws in ctx.chunks():
            parts.append(draws.to(device=grad_out.device, dtype=grad_out.dtype).reshape(draws.shape[0], -1) @ grad_flat)
        return torch.cat(parts).mul_(ctx.scale), None, None, None, None


@register_method("nola", config=NolaConfig, peft_type=None)
class NolaAdapter(Adapter):
    """h = W x + b + s * B (A dropout(x)); A = A0 + sum alpha_i Abar_i, B = sum beta_j Bbar_j."""

    def __init__(self, config: NolaConfig, in_features: int, out_features: int, module_name: str):
        super().__init__(config, in_features, out_features, module_name)
        k, l = config.num_basis_a, config.num_basis_b
        paper = config.variant == "paper"
        self.scaling = config.alpha / config.r
        self.nola_alpha = nn.Parameter(torch.full((k,), 1.0 / k) if paper else torch.zeros(k))
        self.nola_beta = nn.Parameter(torch.full((l,), 1.0 / l) if paper else torch.zeros(l))
        seeds = [derive_seed(config.basis_seed, module_name, which) for which in ("A", "B", "A0")]
        self.register_buffer("nola_seeds", torch.tensor(seeds, dtype=torch.int64))
        self.register_buffer("nola_A0", None if paper else self._draw_A0(), persistent=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def _draw_A0(self) -> torch.Tensor:
        # kaiming_uniform_(a=sqrt(5)) on an (r, in) weight: bound = gain sqrt(2 / (1 + 5)) * sqrt(3 / in) = 1 / sqrt(in)
        _, A0 = next(uniform_basis_chunks(int(self.nola_seeds[2]), 1, (self.config.r, self.in_features), 1,
                                          bound=1.0 / math.sqrt(self.in_features)))
        return A0[0]

    def basis_chunks(self, which: str) -> Iterator[tuple[int, torch.Tensor]]:
        """The Uniform(-1, 1) draws U_i behind the bases of A ("A": k of r x in) or B ("B": l of
        out x r), regenerated from the stored seed, `basis_chunk_size` at a time. The bases are
        Abar_i = U_i / sqrt(k) and Bbar_j = U_j / sqrt(l)."""
        count, shape, seed = ((self.config.num_basis_a, (self.config.r, self.in_features), self.nola_seeds[0])
                              if which == "A" else
                              (self.config.num_basis_b, (self.out_features, self.config.r), self.nola_seeds[1]))
        return uniform_basis_chunks(int(seed), count, shape, self.config.basis_chunk_size)

    def factors_now(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) for the current coefficients; differentiable in them, nothing large kept."""
        r, k, l = self.config.r, self.config.num_basis_a, self.config.num_basis_b
        A = CombineSeededBases.apply(self.nola_alpha, lambda: self.basis_chunks("A"), r, self.in_features, 1 / math.sqrt(k))
        if self.nola_A0 is not None:
            A = A + self.nola_A0.to(A.dtype)
        B = CombineSeededBases.apply(self.nola_beta, lambda: self.basis_chunks("B"), self.out_features, r, 1 / math.sqrt(l))
        return A, B

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        A, B = self.factors_now()
        x = x.to(A.dtype)
        update = self.scaling * F.linear(F.linear(self.dropout(x), A), B)
        return base_out + update.to(base_out.dtype)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        A, B = self.factors_now()
        return self.scaling * (B @ A)

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load coefficients and seeds, then redraw A0 from the (possibly different) loaded seed."""
        super().load_file_tensors(tensors)
        if self.nola_A0 is not None:
            self.nola_A0 = self._draw_A0().to(device=self.nola_A0.device, dtype=self.nola_A0.dtype)
