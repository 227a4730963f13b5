"""RandLoRA: full-rank updates from fixed random low-rank bases, Albert et al., arXiv 2502.00987.

For a layer W (out x in) let d_min = min(in, out), d_max = max(in, out) and N = ceil(d_min / r)
(so N r >= d_min). Frozen random bases are shared by every adapted layer: one A in R^{r x d_min}
and N bases B_n in R^{d_max x r}, drawn once per inject at the largest targeted sizes and sliced
per layer. Each layer trains two scalings, Lambda in R^{r x N} (init 0, so the adapter starts as
the identity) and Gamma in R^{N x d_min} (init 1 / max(N, d_min)), always on the small side:

    M  = s * sum_n B_n diag(Lambda[:, n]) A diag(Gamma[n, :])          (d_max x d_min)
    dW = M if in == d_min else M^T,          h = W x + b + dW dropout(x).

The sum of N rank-r terms reaches full rank d_min with N (r + d_min) trainable parameters.
Forward never forms dW: the scaled A'_n = diag(Lambda[:, n]) A diag(Gamma[n]) are stacked into
A_cat (N r x d_min) and the B_n into B_cat (d_max x N r); for in == d_min the update is
B_cat (A_cat x), for in > out it is A_cat^T (B_cat^T x). A custom autograd function returns the
Lambda / Gamma gradients by einsum without keeping the (r, N, d_min) product (the official code's
memory trick).

Bases and pairing are PEFT's (`peft.tuners.randlora`), so its files load bit for bit: the buffers
are A (r, 1, d_min_max) and B (d_max_max, N_max, r); A_cat's rows run in (k, n) order and B_cat's
columns in (n, k) order, so B_n above is a fixed relabelling of the shared random columns,
B_n[:, k] = B_cat[:, k N + n] — the same random family, just a different draw order. The bases
are generated in bfloat16 as PEFT does (`lorakit.core.random_basis.randlora_bases`) and kept in
float32 (exact). lorakit never saves them: the file names the generator and the seed.

Scaling s: the official research code (NLG/loralib and the commonsense-reasoning PEFT fork that
produced the paper's language results) uses alpha / r / sqrt(N); PEFT uses randlora_alpha / r.
The default is the official one (`scaling="official"`); `scaling="peft"` gives PEFT's. Files are
always PEFT's RANDLORA format with PEFT's scaling: with the official scaling the stored Lambda is
multiplied by 1/sqrt(N) so that PEFT's alpha / r reproduces our outputs, and lorakit undoes it on
load (the file's metadata says so).

Each `inject` draws its own bases (a second adapter with another r, seed or targets simply gets
bases of its own size), so adapters never have to fit each other's bases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import Adapter
from lorakit.core.config import AdapterConfig, require_choice, require_in_range, require_positive
from lorakit.core.errors import ConfigError
from lorakit.core.random_basis import RANDLORA_GENERATOR_NAME, randlora_bases
from lorakit.core.registry import register_method

BASES = ("dense", "sparse", "very_sparse")
SCALINGS = ("official", "peft")


@dataclass
class RandLoraConfig(AdapterConfig):
    """Hyperparameters of a RandLoRA adapter.

    r: rank of each random basis (> 0). The trainable count N (r + d_min) *falls* as r grows;
        r >= d_min gives N = 1, a single basis. Default 32 (PEFT's default; the paper picks r so
        the count matches the LoRA baseline, e.g. 30 for LLaMA-3-8B).
    alpha: scale numerator (> 0). Default 64 = 2r, the official recipe (README: alpha = 2 * rank).
    scaling: "official" (default): s = alpha / r / sqrt(N), the research code's rule;
        "peft": s = alpha / r, PEFT's rule (PEFT's default alpha there is 640 = 20 r).
    dropout: dropout on the adapter's input, in [0, 1). Default 0 (PEFT; the README uses 0.05).
    target_modules: module names or suffixes, a regex over full paths, or "all-linear". Default:
        q, k, v, up and down projections, the paper's language-model targets.
    projection_prng_key: seed of the generator that draws the shared bases.
    basis: "dense" (Kaiming-uniform, default), "sparse" (ternary, P(+-1) = 1/6 each) or
        "very_sparse" (ternary, P(+-1) = 1/(2 sqrt(d_min))): PEFT's sparse / very_sparse.
    """

    r: int = 32
    alpha: float = 64.0
    scaling: str = "official"
    dropout: float = 0.0
    target_modules: str | list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    projection_prng_key: int = 0
    basis: str = "dense"

    def validate(self) -> None:
        super().validate()
        require_positive("r", self.r, integer=True)
        require_positive("alpha", self.alpha)
        require_choice("scaling", self.scaling, SCALINGS)
        require_in_range("dropout", self.dropout, 0.0, 1.0)
        require_choice("basis", self.basis, BASES)
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ConfigError(f"projection_prng_key={self.projection_prng_key!r} must be an integer seed")

    def to_file_dict(self, target_names: list[str], for_untouched_base: bool = True) -> dict[str, Any]:
        """PEFT's RandLoraConfig, bases not saved (PEFT regenerates them from the key as we do)."""
        return {
            "peft_type": "RANDLORA",
            "r": self.r,
            "randlora_alpha": self.alpha,
            "randlora_dropout": self.dropout,
            "target_modules": sorted(set(n.split(".")[-1] for n in target_names))
            if self.target_modules == "all-linear" else self.target_modules,
            "projection_prng_key": self.projection_prng_key,
            "save_projection": False,
            "sparse": self.basis == "sparse",
            "very_sparse": self.basis == "very_sparse",
            "bias": "none",
            "fan_in_fan_out": False,
            "init_weights": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "lorakit": {"method": "randlora", "basis_generator": RANDLORA_GENERATOR_NAME, "scaling": self.scaling,
                        "file_lambda": "stored for s = alpha / r; lorakit multiplies it by (alpha / r) / s on load"},
        }

    @classmethod
    def from_file_dict(cls, data: dict[str, Any]) -> "RandLoraConfig":
        if data.get("bias", "none") != "none" or data.get("modules_to_save") or data.get("layers_to_transform") is not None:
            raise ConfigError("adapter_config.json sets bias, modules_to_save or layers_to_transform, "
                              "which lorakit does not load for RandLoRA")
        extras = data.get("lorakit") or {}
        generator = extras.get("basis_generator", RANDLORA_GENERATOR_NAME)
        if generator != RANDLORA_GENERATOR_NAME and not data.get("save_projection"):
            raise ConfigError(f"this RandLoRA file's bases come from {generator!r}, not {RANDLORA_GENERATOR_NAME!r}; "
                              "load it with the lorakit version that wrote it")
        basis = "very_sparse" if data.get("very_sparse") else "sparse" if data.get("sparse") else "dense"
        return cls(r=int(data["r"]), alpha=float(data.get("randlora_alpha", 640)), scaling=extras.get("scaling", "peft"),
                   dropout=float(data.get("randlora_dropout") or 0.0), target_modules=data["target_modules"],
                   projection_prng_key=int(data.get("projection_prng_key", 0)), basis=basis)


class ScaledSharedBasis(torch.autograd.Function):
    """A'[k, n, :] = Lambda[k, n] * A[k, :] * Gamma[n, :] with einsum gradients, so backward does
    not keep the (r, N, d_min) product (A is frozen and gets no gradient)."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(A, lam, gamma)
        return lam[:, :, None] * A[:, None, :] * gamma[None, :, :]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        A, lam, gamma = ctx.saved_tensors
        grad_lam = torch.einsum("knd,kd,nd->kn", grad, A, gamma) if ctx.needs_input_grad[1] else None
        grad_gamma = torch.einsum("knd,kd,kn->nd", grad, A, lam) if ctx.needs_input_grad[2] else None
        return None, grad_lam, grad_gamma


class SharedBases(nn.Module):
    """The frozen random A (r, 1, d_min) and B (d_max, N, r) shared by all layers of one inject."""

    def __init__(self, randlora_A: torch.Tensor, randlora_B: torch.Tensor):
        super().__init__()
        self.register_buffer("randlora_A", randlora_A, persistent=False)
        self.register_buffer("randlora_B", randlora_B, persistent=False)


def num_bases(d_min: int, r: int) -> int:
    """N = ceil(d_min / r): enough rank-r bases for a full-rank sum."""
    return -(-d_min // r)


@register_method("randlora", config=RandLoraConfig, peft_type="RANDLORA")
class RandLoraAdapter(Adapter):
    """h = W x + b + s * B_cat (A_cat x) (transposed roles when in > out); only Lambda, Gamma train."""

    SHARED_KEYS = {"base_model.randlora_A": "randlora_A", "base_model.randlora_B": "randlora_B"}  # PEFT's save_projection

    @classmethod
    def prepare_shared(cls, config: RandLoraConfig, shapes: list[tuple[int, int]]) -> dict:
        # PEFT's sizes: the element-wise largest (out, in) over the targets, then its min and max.
        in_max = max(in_features for in_features, _ in shapes)
        out_max = max(out_features for _, out_features in shapes)
        d_min, d_max = min(in_max, out_max), max(in_max, out_max)
        sparsity = {"dense": None, "sparse": 3.0, "very_sparse": math.sqrt(d_min)}[config.basis]
        A, B = randlora_bases(config.projection_prng_key, config.r, num_bases(d_min, config.r), d_min, d_max, sparsity)
        return {"bases": SharedBases(A, B)}

    def __init__(self, config: RandLoraConfig, in_features: int, out_features: int, module_name: str, bases: SharedBases):
        super().__init__(config, in_features, out_features, module_name)
        self.d_min, self.d_max = min(in_features, out_features), max(in_features, out_features)
        self.num_bases = num_bases(self.d_min, config.r)
        A, B = bases.randlora_A, bases.randlora_B
        if A.shape[0] != config.r or A.shape[2] < self.d_min or B.shape[0] < self.d_max or B.shape[1] < self.num_bases:
            raise ConfigError(
                f"{module_name}: the shared RandLoRA bases A {tuple(A.shape)}, B {tuple(B.shape)} do not fit a "
                f"({out_features} x {in_features}) layer at r={config.r}; build them with prepare_shared over all targets"
            )
        self.bases = bases  # one module under every layer's adapter, so moving the model keeps one storage
        self.randlora_lambda = nn.Parameter(torch.zeros(config.r, self.num_bases))
        self.randlora_gamma = nn.Parameter(torch.full((self.num_bases, self.d_min), 1.0 / max(self.num_bases, self.d_min)))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        peft_scale = config.alpha / config.r
        self.scale = peft_scale / math.sqrt(self.num_bases) if config.scaling == "official" else peft_scale
        self.file_lambda_factor = self.scale / peft_scale  # files hold Lambda for PEFT's s = alpha / r

    @property
    def randlora_A(self) -> torch.Tensor:
        return self.bases.randlora_A

    @property
    def randlora_B(self) -> torch.Tensor:
        return self.bases.randlora_B

    def stacked_bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A_cat (N r, d_min), rows A'_n in (k, n) order, and B_cat (d_max, N r), columns in (n, k) order."""
        dtype = self.randlora_lambda.dtype
        A = self.bases.randlora_A[:, 0, : self.d_min].to(dtype)
        B = self.bases.randlora_B[: self.d_max, : self.num_bases, :].to(dtype)
        A_scaled = ScaledSharedBasis.apply(A, self.randlora_lambda, self.randlora_gamma)
        return A_scaled.flatten(0, 1), B.flatten(1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        A_cat, B_cat = self.stacked_bases()
        x = self.dropout(x.to(self.randlora_lambda.dtype))
        if self.in_features == self.d_min:
            update = F.linear(F.linear(x, A_cat), B_cat)
        else:
            update = F.linear(F.linear(x, B_cat.T), A_cat.T)
        return base_out + (self.scale * update).to(base_out.dtype)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        A_cat, B_cat = self.stacked_bases()
        M = self.scale * (B_cat @ A_cat)
        return M if self.in_features == self.d_min else M.T

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"randlora_lambda": self.randlora_lambda.detach() * self.file_lambda_factor,
                "randlora_gamma": self.randlora_gamma.detach()}

    def optional_file_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT's save_projection=True copies the shared bases under every layer's key too."""
        return {"randlora_A": self.bases.randlora_A, "randlora_B": self.bases.randlora_B}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.randlora_lambda.copy_(tensors["randlora_lambda"].to(self.randlora_lambda.dtype) / self.file_lambda_factor)
            self.randlora_gamma.copy_(tensors["randlora_gamma"])
            if "randlora_A" in tensors:
                self.bases.randlora_A.copy_(tensors["randlora_A"])
                self.bases.randlora_B.copy_(tensors["randlora_B"])
