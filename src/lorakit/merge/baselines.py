"""The baseline merges of one module, each returning LoRA factors (B (out, r'), A (r', in)).

Every input LoRA n arrives as (A_n, B_n) with its scale s_n already folded into B_n, so its update
is dW_n = B_n A_n, and a merge weight w_n:

- ``cat``:    B = [w_1 B_1 | ... | w_N B_N], A = [A_1; ...; A_N]. Exact: B A = sum_n w_n dW_n
              (concatenation-summation equivalence), rank sum_n r_n. Unlike PEFT's "cat", which
              puts sqrt(w_n s_n) on both factors, negative weights and rsLoRA scales stay right.
- ``linear``: the same sum sum_n w_n dW_n re-factorised at its exact rank: thin QR of both
              stacked factors, an SVD of the small (R, R) core, singular values below
              `tolerance` * the largest dropped. Exact up to that tolerance; the rank never
              exceeds sum_n r_n. (PEFT's "linear" averages the factors instead, B = sum sqrt(w s) B_n,
              A = sum sqrt(w s) A_n, whose product has cross terms B_m A_n: not the weighted sum.)
- ``svd``:    the best rank-`rank` approximation of the same sum (Eckart-Young), from the same
              factored SVD; never forms the (out, in) matrix.
- ``ties``:   TIES-Merging (Yadav et al., arXiv 2306.01708) on the dense updates: keep the
              top-`density` fraction of each dW_n by magnitude, elect each entry's sign from the
              trimmed updates (sign of the sum, "total", or of the count of signs, "frequency"),
              average the weighted entries that agree with it (PEFT's `merge_utils.ties` order:
              the paper has one scalar weight, applied after the merge); then the best
              rank-`rank` LoRA of the result. (PEFT's add_weighted_adapter "ties" runs these
              steps on the A and B factors separately, not on the updates.)
- ``dare``:   DARE (Yu et al., arXiv 2311.03099) with task arithmetic: drop each entry of dW_n
              with probability 1 - `density`, rescale the kept ones by 1 / `density`, sum with
              the weights; then the best rank-`rank` LoRA. The drop mask of input n is drawn from
              `seed` and a checksum of dW_n, so it does not depend on the order of the inputs.
"""

from __future__ import annotations

import zlib

import torch

from lorakit.core.linalg import truncated_svd
from lorakit.export.svd import low_rank_factors

SIGN_METHODS = ("total", "frequency")


def cat(As: list[torch.Tensor], Bs: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([w * B for w, B in zip(weights, Bs)], dim=1), torch.cat(As, dim=0)


def factored_svd(B: torch.Tensor, A: torch.Tensor, rank: int | None = None,
                 tolerance: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') with B' A' the top singular part of B A (rank `rank`, or every singular value above
    `tolerance` * the largest), computed from thin QRs of B and A^T and the SVD of the small core."""
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    core = Rb @ Ra.T
    U, S, Vh = truncated_svd(core, core.shape[0])
    if tolerance is not None:
        rank = int((S > tolerance * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    rank = max(1, min(rank, S.numel()))  # a LoRA needs rank >= 1; a zero update stays zero
    root = S[:rank].sqrt()
    return (Qb @ U[:, :rank]) * root, root[:, None] * (Vh[:rank] @ Qa.T)


def linear(As, Bs, weights, tolerance: float = 1e-10):
    return factored_svd(*cat(As, Bs, weights), tolerance=tolerance)


def svd(As, Bs, weights, rank: int):
    return factored_svd(*cat(As, Bs, weights), rank=rank)


def _top_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """delta with all but its int(density * numel) largest-magnitude entries zeroed (PEFT's rule)."""
    if density >= 1:
        return delta
    keep = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.topk(delta.abs().reshape(-1), k=keep).indices] = 1
    return delta * mask.reshape(delta.shape)


def ties_delta(deltas: list[torch.Tensor], weights: list[float], density: float, sign_method: str = "total") -> torch.Tensor:
    trimmed = torch.stack([_top_magnitude(d, density) for d in deltas])
    votes = trimmed.sum(0) if sign_method == "total" else trimmed.sign().sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(trimmed.dtype)
    agree = trimmed.sign() == elected  # a trimmed (zero) entry never agrees
    weighted = trimmed * torch.tensor(weights, dtype=trimmed.dtype).view(-1, 1, 1)
    return (weighted * agree).sum(0) / agree.sum(0).clamp_min(1)


def dare_delta(deltas: list[torch.Tensor], weights: list[float], density: float, seed: int = 0) -> torch.Tensor:
    total = torch.zeros_like(deltas[0])
    for w, delta in zip(weights, deltas):
        if density < 1:
            checksum = zlib.crc32(delta.contiguous().numpy().tobytes())
            generator = torch.Generator().manual_seed(seed * 1_000_003 + checksum)
            keep = torch.rand(delta.shape, generator=generator, dtype=delta.dtype) < density
            delta = delta * keep / density
        total += w * delta
    return total


def ties(As, Bs, weights, rank: int, density: float, sign_method: str = "total"):
    return low_rank_factors(ties_delta([B @ A for A, B in zip(As, Bs)], weights, density, sign_method), rank)


def dare(As, Bs, weights, rank: int, density: float, seed: int = 0):
    return low_rank_factors(dare_delta([B @ A for A, B in zip(As, Bs)], weights, density, seed), rank)
