"""Frozen random bases regenerated from a seed (VeRA, and later NOLA and RandLoRA).

A basis is never stored in an adapter file: the file names the generator and the seed, and the
loader regenerates the same tensor bit for bit. The generator is PEFT's for VeRA — a CPU
`torch.Generator` seeded once, drawing Kaiming-uniform (gain sqrt(2), fan_in = shape[1]) —
so files written without projections load in PEFT too.
"""

from __future__ import annotations

import math

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
