"""The one truncated SVD: its Gram route for a few well-separated triplets, and the fallback."""

from __future__ import annotations

import pytest
import torch

from lorakit.core import linalg
from lorakit.core.linalg import truncated_svd


def decaying(out: int, inp: int, decay: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, min(out, inp), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, min(out, inp), generator=g, dtype=torch.float64))
    s = decay ** torch.arange(min(out, inp), dtype=torch.float64)
    return (u * s) @ v.T


@pytest.mark.parametrize("shape", [(96, 48), (48, 96), (64, 64)])
def test_gram_route_gives_the_top_triplets_of_the_float64_svd(shape, monkeypatch):
    matrix = decaying(*shape, decay=0.9)
    used = []
    real = linalg._gram_svd
    monkeypatch.setattr(linalg, "_gram_svd", lambda m, r: used.append(r) or real(m, r))
    U, S, Vh = truncated_svd(matrix.float(), 8)
    assert used == [8]
    U64, S64, Vh64 = torch.linalg.svd(matrix, full_matrices=False)
    assert torch.allclose(S.double(), S64[:8], rtol=1e-5)
    approx, exact = (U * S) @ Vh, (U64[:, :8] * S64[:8]) @ Vh64[:8]
    assert float((approx.double() - exact).norm() / exact.norm()) < 1e-5
    assert torch.allclose(U.T @ U, torch.eye(8), atol=1e-5) and torch.allclose(Vh @ Vh.T, torch.eye(8), atol=1e-5)
    assert (U.abs().argmax(0) == U.argmax(0)).all()  # sign convention: largest entry of each column positive


def test_ill_conditioned_or_rank_deficient_top_r_falls_back_to_lapack(monkeypatch):
    low_rank = decaying(64, 48, decay=0.9)[:, :48]
    low_rank = low_rank @ torch.diag((torch.arange(48) < 5).double())  # rank 5 < r = 8
    U, S, Vh = truncated_svd(low_rank.float(), 8)
    assert torch.allclose(U.T @ U, torch.eye(8), atol=1e-5)  # the Gram route would divide by ~0 here
    assert torch.allclose(((U * S) @ Vh).double(), low_rank, atol=1e-5)
    calls = []
    monkeypatch.setattr(linalg, "_gram_svd", lambda m, r: calls.append(r))
    truncated_svd(torch.randn(16, 16), 8)  # 4 r > min(shape): straight to LAPACK
    assert calls == []
