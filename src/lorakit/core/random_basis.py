"""Frozen random bases regenerated from a seed (VeRA, RandLoRA, NOLA).

A basis is never stored in an adapter file: the file names the generator and the seed, and the
loader regenerates the same tensor bit for bit. VeRA's and RandLoRA's generators are PEFT's (a CPU
`torch.Generator` seeded once, drawing in a fixed order), so files written without projections
load in PEFT too; NOLA's draws per-layer seeded uniform chunks (PEFT has no NOLA).
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterator

import torch

GENERATOR_NAME = "torch.Generator(cpu).manual_seed(seed); kaiming_uniform(gain=sqrt(2), fan_in=shape[1]) in draw order"


def kaiming_uniform_bases(seed: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Tensors of the given shapes drawn in order from one generator seeded with `seed`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    bases = []
    for shape in shapes:
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
        bases.append(torch.empty(shape).uniform_(-bound, bound, generator=generator))
    return bases


UNIFORM_GENERATOR_NAME = (
    "torch.Generator(cpu).manual_seed(seed); float32 uniform_(-bound, bound) over (count, *shape) "
    "in draw order, chunks drawing consecutive slices; seeds from derive_seed (sha256)"
)


def derive_seed(base_seed: int, *parts: object) -> int:
    """A 63-bit seed that depends only on `base_seed` and `parts` (e.g. a module path and a
    matrix name): stable across processes and Python versions, unlike `hash()`."""
    text = ":".join(str(part) for part in (base_seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def uniform_basis_chunks(
    seed: int, count: int, shape: tuple[int, ...], chunk: int, bound: float = 1.0
) -> Iterator[tuple[int, torch.Tensor]]:
    """`count` float32 CPU tensors of `shape`, entries Uniform(-bound, bound), drawn from a private
    generator seeded with `seed` (torch's global RNG is never touched) and yielded as
    (start, tensor of shape (n, *shape)) with n <= `chunk`, so at most `chunk` live at once.
    The chunks are consecutive slices of one draw, so the values do not depend on `chunk`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        yield start, torch.empty((n, *shape)).uniform_(-bound, bound, generator=generator)


RANDLORA_GENERATOR_NAME = (
    "torch.Generator(cpu).manual_seed(seed); dense: bfloat16 kaiming_uniform_(a=sqrt(5)) of A (r,1,d_min), then "
    "B one basis at a time (d_max,1,r) x N, concatenated, each divided by its global std in bfloat16; "
    "sparse(s): float32 rand of A then B, -1 where u<1/(2s), +1 where u>1-1/(2s), else 0, divided by std "
    "(PEFT 0.21's RandLoRA)"
)


def randlora_bases(seed: int, r: int, num_bases: int, d_min: int, d_max: int,
                   sparsity: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RandLoRA's shared frozen bases, A (r, 1, d_min) and B (d_max, num_bases, r), as float32.

    Dense (`sparsity=None`): PEFT's draw, bit for bit — bfloat16 Kaiming-uniform (a = sqrt(5),
    so the bound is 1/sqrt(fan_in)) of A, then of each basis B_n in turn, each tensor divided by
    its global std in bfloat16. PEFT falls back to float16 where bfloat16 is unavailable (old
    GPUs); such files match only if they carry their projections. The values are exact in
    float32, so the cast loses nothing. Sparse: ternary {-1, 0, +1} with P(+-1) = 1/(2s) each,
    divided by std, drawn in float32 (A first, then all of B in one draw)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if sparsity is None:
        A = torch.nn.init.kaiming_uniform_(torch.empty((r, 1, d_min), dtype=torch.bfloat16), a=math.sqrt(5), generator=generator)
        B = torch.cat([
            torch.nn.init.kaiming_uniform_(torch.empty((d_max, 1, r), dtype=torch.bfloat16), a=math.sqrt(5), generator=generator)
            for _ in range(num_bases)
        ], dim=1)
        return (A / A.std()).float(), (B / B.std()).float()
    bases = []
    for shape in ((r, 1, d_min), (d_max, num_bases, r)):
        u = torch.rand(shape, generator=generator)
        ternary = torch.zeros(shape)
        ternary[u < 1 / (2 * sparsity)] = -1
        ternary[u > 1 - 1 / (2 * sparsity)] = 1
        bases.append(ternary / ternary.std())
    return bases[0], bases[1]
