"""One entry per adapter configuration the conformance suite runs.

Each registered method must appear here (test_every_registered_method_has_a_case enforces it).
`trainable_count(config, in_features, out_features)` is the method's parameter formula per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import lorakit


@dataclass(frozen=True)
class Case:
    method: str
    make_config: Callable[[list[str]], lorakit.AdapterConfig]
    trainable_count: Callable[[lorakit.AdapterConfig, int, int], int]
    identity_at_init: bool = True


def lora_count(config, in_features: int, out_features: int) -> int:
    a = 0 if config.freeze_a else config.r * in_features
    return a + config.r * out_features + (out_features if config.use_dora else 0)


def bone_count(config, in_features: int, out_features: int) -> int:
    return config.r * (config.mini_r if config.variant == "mini" else out_features)


def block_lora_count(config, in_features: int, out_features: int) -> int:
    return out_features * config.r + config.r * -(-in_features // config.n_blocks)


def loldu_count(config, in_features: int, out_features: int) -> int:
    return config.r + (1 if config.train_scale else 0)


def vera_count(config, in_features: int, out_features: int) -> int:
    return config.r + out_features


def lamda_count(config, in_features: int, out_features: int) -> int:
    return config.r * config.r + out_features * config.r  # S and B train; A is frozen from step 0


def adalora_count(config, in_features: int, out_features: int) -> int:
    return config.init_r * (in_features + out_features + 1)  # P, Q and the singular values


def increlora_count(config, in_features: int, out_features: int) -> int:
    return config.init_r * (in_features + out_features + 1)  # a, e, b per component


def nola_count(config, in_features: int, out_features: int) -> int:
    return config.num_basis_a + config.num_basis_b  # independent of r, in and out


def kron_count(config, in_features: int, out_features: int) -> int:
    if config.factor_layout == "diffusekrona":  # A (a1 x a2) + B (out/a1 x in/a2)
        return config.a1 * config.a2 + (out_features // config.a1) * (in_features // config.a2)
    from peft.tuners.lokr.layer import factorization  # PEFT is the oracle for LoKr's factor sizes

    r = config.r or 8
    (a1, b1), (a2, b2) = factorization(out_features, config.decompose_factor), factorization(in_features, config.decompose_factor)
    w1 = r * (a1 + a2) if config.decompose_both and r < max(a1, a2) / 2 else a1 * a2
    w2 = r * (b1 + b2) if r < max(b1, b2) / 2 else b1 * b2
    return w1 + w2


def loraxs_count(config, in_features: int, out_features: int) -> int:
    return config.r * config.r  # only R trains; B and A are frozen buffers


def randlora_count(config, in_features: int, out_features: int) -> int:
    d_min = min(in_features, out_features)
    n = -(-d_min // config.r)  # N = ceil(d_min / r) bases
    return n * (config.r + d_min)


CASES: dict[str, Case] = {
    "randlora": Case("randlora", lambda t: lorakit.RandLoraConfig(r=4, alpha=8, target_modules=t), randlora_count),
    "randlora-peft-sparse-nondivisible": Case("randlora", lambda t: lorakit.RandLoraConfig(r=5, alpha=10, scaling="peft", basis="sparse", dropout=0.1, projection_prng_key=3, target_modules=t), randlora_count),
    "randlora-very-sparse-r-above-dmin": Case("randlora", lambda t: lorakit.RandLoraConfig(r=40, alpha=40, basis="very_sparse", target_modules=t), randlora_count),
    "lora": Case("lora", lambda t: lorakit.LoraConfig(r=4, alpha=8, target_modules=t), lora_count),
    "lora-dropout": Case("lora", lambda t: lorakit.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=t), lora_count),
    "rslora": Case("lora", lambda t: lorakit.LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=t), lora_count),
    "dora": Case("lora", lambda t: lorakit.LoraConfig(r=4, alpha=8, use_dora=True, target_modules=t), lora_count),
    "freeze-a": Case("lora", lambda t: lorakit.LoraConfig(r=4, alpha=8, freeze_a=True, target_modules=t), lora_count),
    "gaussian": Case("lora", lambda t: lorakit.LoraConfig(r=4, alpha=8, init="gaussian", target_modules=t), lora_count),
    "pissa": Case("lora", lambda t: lorakit.LoraConfig(r=4, alpha=8, init="pissa", target_modules=t), lora_count),
    "pissa-dora": Case("lora", lambda t: lorakit.LoraConfig(r=4, alpha=8, init="pissa", use_dora=True, target_modules=t), lora_count),
    "olora": Case("lora", lambda t: lorakit.LoraConfig(r=4, alpha=8, init="olora", target_modules=t), lora_count),
    "bone": Case("bone", lambda t: lorakit.BoneConfig(r=4, target_modules=t), bone_count),
    "bone-padded": Case("bone", lambda t: lorakit.BoneConfig(r=5, dropout=0.1, target_modules=t), bone_count),
    "bat": Case("bone", lambda t: lorakit.BoneConfig(r=4, variant="bat", target_modules=t), bone_count),
    "bone-mini": Case("bone", lambda t: lorakit.BoneConfig(r=4, variant="mini", mini_r=2, target_modules=t), bone_count),
    "block-lora": Case("block_lora", lambda t: lorakit.BlockLoraConfig(r=4, alpha=8, n_blocks=8, dropout=0.0, target_modules=t), block_lora_count),
    "block-lora-padded": Case("block_lora", lambda t: lorakit.BlockLoraConfig(r=4, alpha=8, n_blocks=5, dropout=0.1, target_modules=t), block_lora_count),
    "vera": Case("vera", lambda t: lorakit.VeraConfig(r=8, target_modules=t), vera_count),
    "vera-dropout": Case("vera", lambda t: lorakit.VeraConfig(r=6, dropout=0.1, projection_prng_key=3, target_modules=t), vera_count),
    "lamda": Case("lamda", lambda t: lorakit.LamdaConfig(r=4, alpha=8, dropout=0.0, target_modules=t), lamda_count),
    "lamda-dropout": Case("lamda", lambda t: lorakit.LamdaConfig(r=5, alpha=16, dropout=0.1, target_modules=t), lamda_count),
    "lamda-svd": Case("lamda", lambda t: lorakit.LamdaConfig(r=4, alpha=8, init="svd", target_modules=t), lamda_count),
    "adalora": Case("adalora", lambda t: lorakit.AdaLoraConfig(init_r=6, target_r=4, alpha=8, target_modules=t), adalora_count),
    "adalora-dropout-pattern": Case("adalora", lambda t: lorakit.AdaLoraConfig(init_r=5, target_r=3, alpha=4, dropout=0.1, rank_pattern={f"model.layers.{n}.self_attn.q_proj.lora_E": [True, False, True, False, False] for n in (0, 1)}, target_modules=t), lambda c, i, o: 2 * (i + o + 1) if i == o else adalora_count(c, i, o)),  # q_proj (the square targets) keep 2 of 5 triplets
    "increlora": Case("increlora", lambda t: lorakit.IncreLoraConfig(init_r=2, target_r=4, alpha=8, target_modules=t), increlora_count),
    "increlora-dropout-pattern": Case("increlora", lambda t: lorakit.IncreLoraConfig(init_r=1, target_r=2, alpha=16, dropout=0.1, rank_pattern={f"model.layers.{n}.self_attn.q_proj": 3 for n in (0, 1)}, target_modules=t), lambda c, i, o: 3 * (i + o + 1) if i == o else increlora_count(c, i, o)),  # q_proj (the square targets) at rank 3
    "nola": Case("nola", lambda t: lorakit.NolaConfig(r=4, alpha=8, num_basis_a=16, num_basis_b=12, target_modules=t), nola_count),
    "nola-chunked-dropout": Case("nola", lambda t: lorakit.NolaConfig(r=3, num_basis_a=10, num_basis_b=7, basis_chunk_size=3, dropout=0.1, basis_seed=5, target_modules=t), nola_count),
    "nola-paper": Case("nola", lambda t: lorakit.NolaConfig(r=4, num_basis_a=16, num_basis_b=16, variant="paper", target_modules=t), nola_count, identity_at_init=False),
    "loldu": Case("loldu", lambda t: lorakit.LolduConfig(target_modules=t), loldu_count),
    "loldu-train-scale": Case("loldu", lambda t: lorakit.LolduConfig(r=3, alpha=2.0, train_scale=True, target_modules=t), loldu_count),
    "loldu-full-k": Case("loldu", lambda t: lorakit.LolduConfig(r=16, target_modules=t), loldu_count),  # r = min(in, out) of k_proj
    "kron": Case("kron", lambda t: lorakit.KronConfig(a1=4, a2=8, target_modules=t), kron_count),
    "kron-lycoris": Case("kron", lambda t: lorakit.KronConfig(a1=16, a2=2, init="lycoris", rank_dropout=0.1, target_modules=t), kron_count),
    "kron-lokr": Case("kron", lambda t: lorakit.KronConfig(factor_layout="lokr", r=2, alpha=4.0, target_modules=t), kron_count),
    # decompose_factor=3 divides 48 but not 32 or 16: those dims fall back to PEFT's search (32 -> 2 x 16)
    "kron-lokr-both-factor3": Case("kron", lambda t: lorakit.KronConfig(factor_layout="lokr", r=1, decompose_both=True, decompose_factor=3, rank_dropout=0.2, rank_dropout_scale=True, target_modules=t), kron_count),
    "loraxs": Case("loraxs", lambda t: lorakit.LoraXSConfig(r=4, alpha=8, target_modules=t), loraxs_count),
    "loraxs-full-k": Case("loraxs", lambda t: lorakit.LoraXSConfig(r=16, target_modules=t), loraxs_count),  # r = min(in, out) of k_proj
    "loraxs-lowrank": Case("loraxs", lambda t: lorakit.LoraXSConfig(r=5, alpha=3, svd_niter=2, dropout=0.1, target_modules=t), loraxs_count),
    # the official R ~ N(0, 1e-5^2): close to, but not exactly, the base model at init
    "loraxs-gaussian": Case("loraxs", lambda t: lorakit.LoraXSConfig(r=4, latent_init="gaussian", target_modules=t), loraxs_count, identity_at_init=False),
}
