"""LoRA-LEGO: merge LoRAs by clustering their rank-1 "Minimal Semantic Units".

Zhao, Shen, Zhu, Li, Su, Wang, Kuang, Wu, "Merging LoRAs like Playing LEGO: Pushing the Modularity
of LoRA to Extremes Through Rank-Wise Clustering", ICLR 2025, arXiv 2409.16167.

One module, N LoRAs with A_n (r_n, in) and B_n (out, r_n), each B_n already multiplied by its
scale s_n and merge weight w_n (so the merged LoRA has scale 1). Equations implemented:

    MSU i of LoRA n:     u_{n,i} = [a_{n,i}; b_{n,i}]            (row i of A_n, column i of B_n)
    clustering feature:  f_{n,i} = [a/||a||_2; b/||b||_2]        (feature="direction"; "raw": u itself)
    k-means (Euclidean, k-means++ init from `seed`, `iterations` Lloyd steps) on the features;
    centroid c_j = mean of the *raw* u of cluster j's members = [a_j; b_j]
    parameter reweighting (norm decay):  c_j <- c_j * mean_{u in C_j} ||u|| / ||c_j||,
        ||.|| = max-abs ("linf", the public re-implementations) or L2 ("l2")
    output reweighting (variance expansion):  dW = sqrt(r_bar / k) * sum_j b_j a_j^T,
        r_bar = mean input rank, k = number of clusters
    merged LoRA: A rows a_j, B columns sqrt(r_bar / k) * b_j.

What is reconstructed: the paper's section 4 (the reweighting equations) was not readable; both
reweightings follow the only public re-implementations (TARA-Merge / nsc_merging `LoRA_LEGO`,
written by other groups as a baseline), which match the abstract's description (parameter
reweighting against norm decay, output reweighting against variance expansion). Deviations from
those: k-means++ initialisation instead of random points (deterministic, never seeds two
clusters on duplicate points, so merging copies of one LoRA gives it back), a canonical order of
the MSU pool before clustering (the result does not depend on the order of the inputs), and
r_bar = mean rank for inputs of different ranks (the re-implementation assumes one rank).
A rank-1 term is defined only up to (c b, a / c) and a sign; the direction feature removes the
scale, not the sign, so (a, b) and (-a, -b) can land in different clusters (as in the source).
"""

from __future__ import annotations

import math

import torch

NORMS = ("linf", "l2")
FEATURES = ("direction", "raw")
_EPS = 1e-12


def _norms(vectors: torch.Tensor, norm: str) -> torch.Tensor:
    return vectors.abs().amax(dim=-1) if norm == "linf" else torch.linalg.vector_norm(vectors, dim=-1)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(_EPS)


def canonical_order(points: torch.Tensor) -> torch.Tensor:
    """Indices sorting the rows of `points` lexicographically (a stable, input-order-free order)."""
    order = torch.arange(points.shape[0])
    for column in reversed(range(points.shape[1])):  # LSD radix: stable sorts from the last key
        order = order[torch.sort(points[order, column], stable=True).indices]
    return order


def kmeans(points: torch.Tensor, k: int, iterations: int = 10, seed: int = 0) -> torch.Tensor:
    """Cluster labels (M,) of `points` (M, D): k-means++ seeding from `seed`, then `iterations`
    Lloyd steps (an empty cluster keeps its centre). k >= M: every point is its own cluster."""
    m = points.shape[0]
    if k >= m:
        return torch.arange(m)
    generator = torch.Generator().manual_seed(seed)
    centres = [int(torch.randint(m, (1,), generator=generator))]
    closest = ((points - points[centres[0]]) ** 2).sum(1)
    for _ in range(1, k):
        if closest.sum() > 0:
            pick = int(torch.multinomial(closest / closest.sum(), 1, generator=generator))
        else:  # fewer distinct points than clusters: the extra centres duplicate a point and stay empty
            pick = next(i for i in range(m) if i not in centres)
        centres.append(pick)
        closest = torch.minimum(closest, ((points - points[pick]) ** 2).sum(1))
    centroids = points[centres].clone()
    labels = torch.cdist(points, centroids).argmin(1)
    for _ in range(iterations):
        for j in range(k):
            members = labels == j
            if members.any():
                centroids[j] = points[members].mean(0)
        labels = torch.cdist(points, centroids).argmin(1)
    return labels


def lego_factors(As: list[torch.Tensor], Bs: list[torch.Tensor], k: int, *, iterations: int = 10, seed: int = 0,
                 param_reweight: bool = True, output_reweight: bool = True, param_norm: str = "linf",
                 feature: str = "direction") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Merged (B (out, k'), A (k', in), info) of one module; Bs carry their scale and weight.
    k' = min(k, number of MSUs); info holds the clusters' sizes and the output factor."""
    d_in = As[0].shape[1]
    raw = torch.cat([torch.cat([A, B.T], dim=1) for A, B in zip(As, Bs)])  # (M, in + out): one MSU a row
    raw = raw[canonical_order(raw)]
    features = torch.cat([_unit_rows(raw[:, :d_in]), _unit_rows(raw[:, d_in:])], dim=1) if feature == "direction" else raw
    labels = kmeans(features, k, iterations, seed)
    centroids = []
    for j in range(int(labels.max()) + 1):
        members = raw[labels == j]
        if members.shape[0] == 0:
            continue
        centroid = members.mean(0)
        if param_reweight:
            centroid = centroid * (_norms(members, param_norm).mean() / _norms(centroid, param_norm).clamp_min(_EPS))
        centroids.append(centroid)
    centres = torch.stack(centroids)
    clusters = centres.shape[0]
    mean_rank = sum(A.shape[0] for A in As) / len(As)
    factor = math.sqrt(mean_rank / clusters) if output_reweight else 1.0
    A = centres[:, :d_in].contiguous()
    B = (centres[:, d_in:].T * factor).contiguous()
    return B, A, {"clusters": clusters, "output_factor": factor}
