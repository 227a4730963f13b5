"""Shared linear algebra: the one truncated SVD every SVD-based method and tool uses
(PiSSA/OLoRA init, LoRA-XS init, export to LoRA)."""

from __future__ import annotations

import torch

SEED = 42  # seed of the randomized SVD's test matrix (the official TruncatedSVD's random_state)
OVERSAMPLE = 10  # extra columns of the randomized range finder (Halko et al.; sklearn's default)
# The Gram route squares the spread of the singular values: it is used only while the r-th kept
# value is at least this fraction of the largest (eigenvalue ratio GRAM_MIN_RATIO**2, far above
# fp32 round-off), else the LAPACK SVD runs.
GRAM_MIN_RATIO = 1e-2


def truncated_svd(matrix: torch.Tensor, r: int, niter: int | None = None,
                  oversample: int = OVERSAMPLE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets (U_r, S_r, V_r^T) of an (out, in) matrix, in the matrix's dtype.

    niter=None: exact. For a few triplets (4 r <= min(out, in)) of a well-conditioned top r (the
    r-th singular value >= GRAM_MIN_RATIO x the largest) they come from the eigendecomposition of the
    small-side Gram matrix, V_r = top eigenvectors of M^T M, S_r = ||M V_r||, U_r = M V_r / S_r
    (M the matrix or its transpose): on the default model's weights that is twice as fast as
    `torch.linalg.svd` and closer to the float64 W_r (2e-4 against 4.5e-4 relative, fp32). Otherwise
    `torch.linalg.svd`. With `niter`: `torch.svd_lowrank` with q = r + `oversample`
    columns (default 10; clipped to min(out, in)) and `niter` power iterations, its test matrix drawn from a fixed
    seed in a forked RNG, so the result is reproducible and the caller's RNG is left alone.
    Signs: each column of U_r has its largest-magnitude entry positive (V_r flips with it).
    """
    if niter is None:
        triplets = _gram_svd(matrix, r) if 4 * r <= min(matrix.shape) else None
        if triplets is None:
            U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
            triplets = U[:, :r], S[:r], Vh[:r]
        U, S, Vh = triplets
    else:
        q = min(r + oversample, *matrix.shape)
        cuda = matrix.device.type == "cuda"
        device = (matrix.device.index if matrix.device.index is not None else torch.cuda.current_device()) if cuda else None
        with torch.random.fork_rng(devices=[device] if cuda else []):  # seeds and restores only the RNG it uses
            if cuda:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(SEED)
            else:
                torch.random.default_generator.manual_seed(SEED)
            U, S, V = torch.svd_lowrank(matrix, q=q, niter=niter)
        U, S, Vh = U[:, :r], S[:r], V[:, :r].T
    rows = U.abs().argmax(dim=0)
    signs = torch.sign(U[rows, torch.arange(U.shape[1], device=U.device)])
    signs[signs == 0] = 1
    return U * signs, S, signs[:, None] * Vh


def _gram_svd(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Top-r triplets from the small-side Gram matrix, or None when the top r is too ill-conditioned
    for it (see GRAM_MIN_RATIO)."""
    tall = matrix.shape[0] >= matrix.shape[1]
    m = matrix if tall else matrix.T
    eigenvalues, vectors = torch.linalg.eigh(m.T @ m)  # ascending
    if eigenvalues[-1] <= 0 or eigenvalues[-r] < GRAM_MIN_RATIO**2 * eigenvalues[-1]:
        return None
    right = vectors[:, -r:].flip(1)
    left = m @ right
    values = left.norm(dim=0)
    left = left / values
    return (left, values, right.T) if tall else (right, values, left.T)
