"""LoLDU: Low-Rank Adaptation via Lower-Diag-Upper decomposition, Shi et al., arXiv 2410.13618.

The base weight W (out x in, k = min(out, in)) is factorised once, in float32 (float64 on a
float64 base), by the pivoted LU decomposition W = P L U, rewritten as W = P L diag(D) U_1 with
D = diag(U) and U_1 = U / D (row-wise; unit diagonal). The first r pivots form the low-rank part
P L_r diag(D_r) U_r; only the r diagonal entries z (initialised to D_r) train. With
s0 = alpha / r and s the (optionally trainable, initially s0) scale, the paper's layer is

    W_eff = W_res + s P L_r diag(z) U_r,    W_res = W - s0 P L_r diag(D_r) U_r,

which equals W at init. lorakit never rewrites W: the same layer is written as an update of
the untouched base,

    dW = P L_r diag(s z - s0 D_r) U_r,    y = W x + b + P L_r ((s z - s0 D_r) * (U_r x)),

so merge, unmerge and the adapter file all work against the original W, and the identity at
init is exact (s z - s0 D_r = 0). The pivot permutation P is applied once, as a row gather, to
L_r (buffer `lower` = P L_r); no dense out x out P is ever built.

L_r, U_r and P are recomputed from the base weight at inject and at load (never saved); the file
holds z, D_r (to check the base at load and to keep the reloaded update exact) and, with
`train_scale`, s. A zero pivot (singular leading block, e.g. an all-zero first column) would make
U / D divide by zero; such a row is scaled by its largest entry instead, so W = P L diag(D) U_1
still holds exactly and nothing becomes NaN.
Trainable parameters per layer: r (r + 1 with train_scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import Adapter
from lorakit.core.config import AdapterConfig, require_positive
from lorakit.core.errors import AdapterFileError, ConfigError
from lorakit.core.registry import register_method

# The D_r a file was trained with must match the one recomputed from this base to within this
# fraction of max |D_r|: the same weights in bf16 (0.4% rounding) pass, another model does not.
SAME_BASE_TOLERANCE = 1e-2


@dataclass
class LolduConfig(AdapterConfig):
    """Hyperparameters of a LoLDU adapter.

    r: number of LU pivots adapted, 1 <= r <= min(in, out) of every targeted layer; 4 is the
        official `LoLDUParametrization.from_linear` default. Only r numbers per layer train.
    alpha: scale numerator, s0 = alpha / r (official `from_linear` default alpha = 1).
    target_modules: module names or suffixes, a regex over full paths, or "all-linear".
    train_scale: also train the scale s (one more parameter per layer). The official code
        registers it as a parameter but its parameter filter trains z alone, hence False.
    """

    r: int = 4
    alpha: float = 1.0
    target_modules: str | list[str] = "all-linear"
    train_scale: bool = False

    def validate(self) -> None:
        super().validate()
        require_positive("r", self.r, integer=True)
        require_positive("alpha", self.alpha)
        if not isinstance(self.train_scale, bool):
            raise ConfigError(f"train_scale={self.train_scale!r} must be True or False")


def ldu_decomposition(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pivot_rows, L, D, U_1) with weight == (L @ diag(D) @ U_1)[pivot_rows], i.e. P = I[pivot_rows].

    L (out x k) is unit lower-trapezoidal, U_1 (k x in) upper-trapezoidal with unit diagonal
    except at zero pivots, whose row is divided by its largest magnitude (or left as is when it
    is all zero) rather than by 0. Runs in the dtype given (call it with float32 or float64).
    """
    out_features = weight.shape[0]
    lu, pivots, _ = torch.linalg.lu_factor_ex(weight)  # a zero pivot is handled below, not an error
    _, L, U = torch.lu_unpack(lu, pivots, unpack_pivots=False)
    # LAPACK's pivots are successive row swaps (1-based): row i of P^T W is row perm[i] of W.
    perm = list(range(out_features))
    for i, p in enumerate(pivots.tolist()):
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    pivot_rows = torch.argsort(torch.tensor(perm, device=weight.device))
    D = torch.diagonal(U).clone()
    row_max = U.abs().amax(dim=1)
    zero_pivot = D.abs() <= torch.finfo(U.dtype).eps * row_max  # also true for an all-zero row
    D = torch.where(zero_pivot, torch.where(row_max > 0, row_max, torch.ones_like(row_max)), D)
    return pivot_rows, L, D, U / D[:, None]


@register_method("loldu", config=LolduConfig, peft_type=None)
class LolduAdapter(Adapter):
    """y = W x + b + (P L_r) ((s z - s0 D_r) * (U_r x)); P L_r, U_r, D_r from the LU of W, z trains."""

    def __init__(self, config: LolduConfig, in_features: int, out_features: int, module_name: str):
        super().__init__(config, in_features, out_features, module_name)
        self.r = r = config.r
        if r > min(in_features, out_features):
            raise ConfigError(
                f"LoLDU needs r <= min(in, out); r={r} for {module_name} (in={in_features}, out={out_features}), "
                f"whose largest r is {min(in_features, out_features)}. Lower r or exclude that layer from target_modules"
            )
        self.initial_scale = config.alpha / r  # s0: the scale W_res was formed with
        self.vector_z = nn.Parameter(torch.zeros(r))  # set to D_r by initialise_from_base
        self.register_buffer("lu_diagonal", torch.zeros(r))  # D_r, saved
        scale = torch.tensor(self.initial_scale)
        if config.train_scale:
            self.scaling_factor = nn.Parameter(scale)
        else:
            self.register_buffer("scaling_factor", scale, persistent=False)
        self.register_buffer("lower", torch.zeros(out_features, r), persistent=False)  # P L_r
        self.register_buffer("upper", torch.zeros(r, in_features), persistent=False)  # U_r

    @torch.no_grad()
    def initialise_from_base(self, base_weight: torch.Tensor) -> None:
        """Factorise W and set z = D_r (runs at inject and at load, on the untouched W)."""
        weight = base_weight.detach().to(device=self.vector_z.device, dtype=self.vector_z.dtype)
        pivot_rows, L, D, U = ldu_decomposition(weight)
        self.lower.copy_(L[:, : self.r][pivot_rows])
        self.upper.copy_(U[: self.r])
        self.lu_diagonal.copy_(D[: self.r])
        self.vector_z.copy_(D[: self.r])

    def coefficients(self) -> torch.Tensor:
        """s z - s0 D_r: the diagonal of dW in the (P L_r, U_r) basis; zero at init."""
        return self.scaling_factor * self.vector_z - self.initial_scale * self.lu_diagonal

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        x = x.to(self.vector_z.dtype)
        update = F.linear(self.coefficients() * F.linear(x, self.upper), self.lower)
        return base_out + update.to(base_out.dtype)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return (self.lower * self.coefficients()) @ self.upper

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Refuse a file whose D_r does not match this base's; then load z, D_r (and s)."""
        stored = tensors["lu_diagonal"].to(self.lu_diagonal)
        fresh = self.lu_diagonal
        gap = (stored - fresh).abs().max().item()
        if not gap <= SAME_BASE_TOLERANCE * fresh.abs().max().item():
            raise AdapterFileError(
                f"{self.module_name}: the adapter's LU diagonal D_r={stored.tolist()[:4]} does not match the one "
                f"computed from this model's weight, {fresh.tolist()[:4]} (max difference {gap:.3g}). LoLDU's frozen "
                "factors come from the base weight, so this adapter was trained on another base model (or this "
                "weight was changed, e.g. by a merged adapter). Load it onto the base model it was trained on"
            )
        super().load_file_tensors(tensors)
