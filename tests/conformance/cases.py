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


def vera_count(config, in_features: int, out_features: int) -> int:
    return config.r + out_features


CASES: dict[str, Case] = {
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
    "vera": Case("vera", lambda t: lorakit.VeraConfig(r=8, target_modules=t), vera_count),
    "vera-dropout": Case("vera", lambda t: lorakit.VeraConfig(r=6, dropout=0.1, projection_prng_key=3, target_modules=t), vera_count),
}
