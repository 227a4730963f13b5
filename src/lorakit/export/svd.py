"""Best rank-r LoRA factors of a weight update, by truncated SVD.

For dW = U S V^T (thin SVD, singular values in decreasing order), the factors

    B = U_r diag(sqrt(S_r))   (out, r),        A = diag(sqrt(S_r)) V_r^T   (r, in)

give B A = U_r S_r V_r^T, the best rank-r approximation of dW in Frobenius norm
(Eckart-Young), with relative error sqrt(sum_{i>r} S_i^2) / sqrt(sum_i S_i^2). The split of S
between the two factors is balanced, so neither factor's scale dwarfs the other's (which would
waste fp16/bf16 range when the file is served in half precision). The error is exactly 0 when
dW has rank <= r; ranks above min(out, in) are padded with zero rows/columns.
"""

from __future__ import annotations

import torch

from lorakit.core.linalg import truncated_svd


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A the best rank-`rank` approximation of `delta` (out, in); same dtype."""
    out_features, in_features = delta.shape
    kept = min(rank, out_features, in_features)
    U, S, Vh = truncated_svd(delta, kept)
    root = S[:kept].sqrt()
    B = delta.new_zeros(out_features, rank)
    A = delta.new_zeros(rank, in_features)
    B[:, :kept] = U[:, :kept] * root
    A[:kept] = root[:, None] * Vh[:kept]
    return B, A


def relative_error(delta: torch.Tensor, approximation: torch.Tensor) -> float:
    """||delta - approximation||_F / ||delta||_F; the absolute error when delta is 0 (so 0 for 0 vs 0)."""
    residual = torch.linalg.matrix_norm(delta - approximation).item()
    norm = torch.linalg.matrix_norm(delta).item()
    return residual / norm if norm > 0 else residual
