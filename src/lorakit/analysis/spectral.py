"""What a fine-tuned weight matrix looks like next to its base: pure functions on tensors.

Intruder dimensions (Shuttleworth, Andreas, Torralba, Sharma, "LoRA vs Full Fine-tuning: An
Illusion of Equivalence", arXiv 2410.21228). For the base W0 and the fine-tuned W_t = W0 + dW,
both (out, in), take thin SVDs W0 = U0 S0 V0^T and W_t = U_t S_t V_t^T (singular values in
decreasing order). The j-th fine-tuned left singular vector's similarity to the base is

    c_j = max_i |<u_t,j , u_0,i>|      over ALL i = 1..min(out, in),

and u_t,j is an intruder dimension iff c_j < eps, examined for j = 1..k only. Defaults k = 10,
eps = 0.5 (the official code, `find_intruder_dimensions.py`, and PEFT's
`reduce_intruder_dimension`; both use left singular vectors, as here). The definition is not
rotation-invariant inside a block of (nearly) equal singular values: a 45 degree mix of two base
directions has c = 0.707, so it counts as an intruder once eps > 0.707.

Effective rank of an update: Roy & Vetterli's exp(entropy of the normalised singular values),
p_i = s_i / sum s (1 for a rank-1 matrix, n for n equal singular values), and the number of
singular values holding a fraction `energy` of ||dW||_F^2 (the "rank needed to explain 90% of the
variance" of Biderman et al., "LoRA Learns Less and Forgets Less", arXiv 2405.09673).

Norm limits (Hu, Su, Kuo, Song, Liu, "Computational Limits of Low-Rank Adaptation (LoRA) for
Transformer-Based Models", arXiv 2406.03136). For the L x in input X of an attention projection,
with base weight W* and adapter update dW (scale included), the max-entry norms

    G_base = max |X W*^T|,   G_adapter = max |X dW^T|,   G_effective = max |X (W* + dW)^T|

and the shared bound G = max(G_base, G_adapter) are compared with sqrt(ln L): the paper shows an
almost-linear-time approximation of the LoRA gradient exists when G = o(sqrt(log L)), and none in
time L^(2 - Omega(1)) when G = Omega(sqrt(log L)) (under SETH). We report rho = G / sqrt(ln L);
rho < 1 is read as the easy side of the threshold. The results are asymptotic, so rho is a logged
diagnostic, never a correctness check. The 1/sqrt(d_head) softmax scale is not folded in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorakit.core.config import require_in_range, require_positive
from lorakit.core.errors import ConfigError
from lorakit.core.linalg import truncated_svd

TOP_K = 10  # fine-tuned singular vectors examined (official code and PEFT)
THRESHOLD = 0.5  # cosine threshold eps (official code and PEFT)


def _check_pair(base_weight: torch.Tensor, tuned_weight: torch.Tensor) -> None:
    if base_weight.dim() != 2 or tuned_weight.dim() != 2:
        raise ConfigError(f"intruder analysis compares 2-D weight matrices; got shapes {tuple(base_weight.shape)} "
                          f"and {tuple(tuned_weight.shape)}")
    if base_weight.shape != tuned_weight.shape:
        raise ConfigError(f"base weight {tuple(base_weight.shape)} and tuned weight {tuple(tuned_weight.shape)} differ "
                          "in shape; pass the same layer of the base and the fine-tuned model")


def left_singular_vectors(weight: torch.Tensor) -> torch.Tensor:
    """All min(out, in) left singular vectors of `weight` (columns, by decreasing singular value), float64."""
    return truncated_svd(weight.detach().double(), min(weight.shape))[0]


def intruder_similarities(base_weight: torch.Tensor, tuned_weight: torch.Tensor, top_k: int | None = TOP_K,
                          base_vectors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, s): c_j = max_i |<u_t,j, u_0,i>| for the top-`top_k` fine-tuned left singular vectors
    (all of them with top_k=None), and the fine-tuned singular values s_j, both float64 (out, in) SVDs.

    `base_vectors` (from `left_singular_vectors(base_weight)`) skips the base's SVD when given.
    """
    _check_pair(base_weight, tuned_weight)
    if top_k is not None:
        require_positive("top_k", top_k, integer=True)
    count = min(tuned_weight.shape) if top_k is None else min(top_k, *tuned_weight.shape)
    U0 = left_singular_vectors(base_weight) if base_vectors is None else base_vectors.double()
    Ut, St, _ = truncated_svd(tuned_weight.detach().double().to(U0.device), min(tuned_weight.shape))
    similarity = (Ut[:, :count].T @ U0).abs().amax(dim=1)
    return similarity, St


def intruder_dimensions(base_weight: torch.Tensor, tuned_weight: torch.Tensor, top_k: int = TOP_K,
                        threshold: float = THRESHOLD) -> list[int]:
    """Indices (0-based, by decreasing singular value) of the tuned matrix's intruder dimensions.

    Index j is returned when the fine-tuned matrix's j-th left singular vector (j < `top_k`) has
    absolute cosine similarity below `threshold` with every left singular vector of the base, so
    `len(...)` is the paper's per-matrix count. Both weights are (out, in), as `nn.Linear` stores
    them; the SVDs run in float64 on the tensors' device.

    Example: a direction orthogonal to all of W0's, planted with a large singular value,
    `intruder_dimensions(W0, W0 + 30 * torch.outer(u_orth, v))` gives `[0]`.
    """
    require_positive("top_k", top_k, integer=True)
    require_in_range("threshold", threshold, 0.0, 1.0, closed_high=True)
    similarity, _ = intruder_similarities(base_weight, tuned_weight, top_k)
    return [int(j) for j in torch.nonzero(similarity < threshold).flatten()]


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank exp(-sum p_i ln p_i), p = s / sum(s); 0 for a zero matrix.
    Pass singular values (`torch.linalg.svdvals(dW)`)."""
    s = singular_values.double().clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def energy_rank(singular_values: torch.Tensor, energy: float = 0.9) -> int:
    """Fewest singular values whose squares hold `energy` of the total (0 for a zero matrix)."""
    require_in_range("energy", energy, 0.0, 1.0, closed_high=True)
    squares = singular_values.double().square()
    total = squares.sum()
    if total <= 0:
        return 0
    cumulative = torch.cumsum(squares, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype) - 1e-12)) + 1


@dataclass
class NormBounds:
    """Max-entry norms of one attention projection on one input of `length` tokens."""

    length: int
    gamma_base: float  # max |X W*^T|
    gamma_adapter: float  # max |X dW^T|
    gamma_effective: float  # max |X (W* + dW)^T|

    @property
    def gamma(self) -> float:
        """The shared bound of the paper: max(G_base, G_adapter)."""
        return max(self.gamma_base, self.gamma_adapter)

    @property
    def log_threshold(self) -> float:
        """sqrt(ln L), the scale of the threshold (nan for L = 1)."""
        return math.sqrt(math.log(self.length)) if self.length > 1 else math.nan

    @property
    def rho(self) -> float:
        return self.gamma / self.log_threshold

    @property
    def rho_effective(self) -> float:
        return self.gamma_effective / self.log_threshold

    @property
    def below_threshold(self) -> bool:
        """rho < 1: the side of the threshold where almost-linear-time gradients can exist."""
        return self.rho < 1


def norm_bounds(x: torch.Tensor, base_weight: torch.Tensor, delta: torch.Tensor) -> NormBounds:
    """`NormBounds` of input `x` (L, in) or (batch, L, in), base weight and update (out, in), float64.
    With a batch, every sequence has the length L = x.shape[-2] (pass unpadded sequences)."""
    if x.dim() not in (2, 3) or x.shape[-1] != base_weight.shape[1]:
        raise ConfigError(f"input of shape {tuple(x.shape)} does not fit a weight of shape {tuple(base_weight.shape)}: "
                          "pass (L, in) or (batch, L, in) activations of that layer")
    if delta.shape != base_weight.shape:
        raise ConfigError(f"update {tuple(delta.shape)} and base weight {tuple(base_weight.shape)} differ in shape")
    x, W, dW = x.double(), base_weight.double().to(x.device), delta.double().to(x.device)
    base_out, adapter_out = x @ W.T, x @ dW.T
    return NormBounds(length=x.shape[-2], gamma_base=float(base_out.abs().max()),
                      gamma_adapter=float(adapter_out.abs().max()),
                      gamma_effective=float((base_out + adapter_out).abs().max()))
