"""Shared linear algebra: the one truncated SVD every SVD-based method and tool uses
(PiSSA/OLoRA init, LoRA-XS init, export to LoRA)."""

from __future__ import annotations

import torch

SEED = 42  # seed of the randomized SVD's test matrix (the official TruncatedSVD's random_state)
OVERSAMPLE = 10  # extra columns of the randomized range finder (Halko et al.; sklearn's default)


def truncated_svd(matrix: torch.Tensor, r: int, niter: int | None = None,
                  oversample: int = OVERSAMPLE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets (U_r, S_r, V_r^T) of an (out, in) matrix, in the matrix's dtype.

    niter=None: exact (`torch.linalg.svd`). Otherwise `torch.svd_lowrank` with q = r + `oversample`
    columns (default 10; clipped to min(out, in)) and `niter` power iterations, its test matrix drawn from a fixed
    seed in a forked RNG, so the result is reproducible and the caller's RNG is left alone.
    Signs: each column of U_r has its largest-magnitude entry positive (V_r flips with it).
    """
    if niter is None:
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
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
