"""Bone / Bat / MiSS-mini against the spec's verification recipe (../shared/methods/bone.md) and PEFT's MiSS."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import lorakit
from conftest import model_output, tiny_llama
from lorakit.core import adapted_layers


def toy(in_features: int, out_features: int, config: lorakit.BoneConfig, dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features)).to(dtype)
    lorakit.inject(model, config)
    layer = model[0]
    return model, layer, layer.adapters["default"]


def set_block(adapter, std: float = 1.0, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.miss_block.copy_(std * torch.randn(adapter.miss_block.shape, generator=generator).to(adapter.miss_block.dtype))


@pytest.mark.parametrize("variant", ["bone", "bat", "mini"])
def test_identity_at_init_is_exact(variant):
    model, layer, _ = toy(64, 48, lorakit.BoneConfig(r=16, variant=variant, mini_r=4, target_modules=["0"]))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(model(x), layer.base(x))


@pytest.mark.parametrize("in_features", [64, 70])
def test_bone_forward_equals_the_tiled_reference(in_features):
    model, layer, adapter = toy(in_features, 48, lorakit.BoneConfig(r=16, target_modules=["0"]))
    set_block(adapter)
    D = adapter.miss_block.detach()
    tiled = torch.cat([D.T] * 5, dim=1)[:, :in_features]  # out x in: D^T repeated, last shard cropped
    x = torch.randn(4, in_features)
    expected = x @ (layer.base.weight + tiled).T + layer.base.bias
    with torch.no_grad():
        assert (model(x) - expected).abs().max() < 1e-5
    assert torch.allclose(adapter.delta_weight(layer.base.weight), tiled)


def bat_reference(W: torch.Tensor, D: torch.Tensor, r: int) -> torch.Tensor:
    """dW_{a,c} = W_{a,c} D_a + D_a by an explicit loop over blocks."""
    delta = torch.zeros_like(W)
    for a in range(W.shape[0] // r):
        for c in range(W.shape[1] // r):
            block = W[a * r:(a + 1) * r, c * r:(c + 1) * r]
            delta[a * r:(a + 1) * r, c * r:(c + 1) * r] = block @ D[a] + D[a]
    return delta


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_bat_matches_the_block_loop_and_unmerges_exactly(dtype, tolerance):
    model, layer, adapter = toy(64, 48, lorakit.BoneConfig(r=16, variant="bat", target_modules=["0"]), dtype)
    set_block(adapter, std=0.1)
    W = layer.base.weight.detach().clone()
    dW = bat_reference(W, adapter.miss_block.detach(), 16)
    x = torch.randn(4, 64, dtype=dtype)
    with torch.no_grad():
        assert (model(x) - (x @ (W + dW).T + layer.base.bias)).abs().max() < 1e-5
    lorakit.merge(model)
    assert (layer.base.weight - (W + dW)).abs().max() < 1e-5
    lorakit.unmerge(model)
    assert (layer.base.weight - W).abs().max() < tolerance


def test_parameter_counts():
    for variant, expected in (("bone", 768), ("bat", 768), ("mini", 16 * 4)):
        model, _, _ = toy(64, 48, lorakit.BoneConfig(r=16, variant=variant, mini_r=4, target_modules=["0"]))
        assert lorakit.trainable_parameters(model)[0] == expected


def test_shapes_bat_refuses_non_divisible_and_bone_pads():
    with pytest.raises(lorakit.ConfigError, match=r"Bat needs in and out divisible by r=16; 0 \(in=70, out=48\)"):
        toy(70, 48, lorakit.BoneConfig(r=16, variant="bat", target_modules=["0"]))
    toy(70, 48, lorakit.BoneConfig(r=16, target_modules=["0"]))
    with pytest.raises(lorakit.ConfigError, match="r <= in"):
        toy(8, 48, lorakit.BoneConfig(r=16, target_modules=["0"]))
    with pytest.raises(lorakit.ConfigError, match="variant"):
        lorakit.BoneConfig(variant="bone-row")


PEFT_INIT = {"bone": True, "bat": "bat", "mini": "mini"}
TARGETS = ["q_proj", "k_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("variant", ["bone", "bat", "mini"])
def test_peft_miss_adapter_loads_in_lorakit_and_back(tmp_path, input_ids, variant):
    theirs = peft.get_peft_model(tiny_llama(), peft.MissConfig(r=4, init_weights=PEFT_INIT[variant], mini_r=2,
                                                              target_modules=TARGETS))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "miss_block" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    expected = model_output(theirs, input_ids)
    theirs.save_pretrained(tmp_path / "peft")

    ours = lorakit.load_adapter(tiny_llama(), tmp_path / "peft")
    assert lorakit.adapter_configs(ours)["default"].variant == variant
    assert (model_output(ours, input_ids) - expected).abs().max() <= 1e-6
    lorakit.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert (model_output(again, input_ids) - expected).abs().max() <= 1e-6


def test_bone_trains_only_its_blocks(input_ids):
    model = lorakit.inject(tiny_llama(), lorakit.BoneConfig(r=8, target_modules=TARGETS))
    assert all(name.endswith("miss_block") for name, p in model.named_parameters() if p.requires_grad)
    assert len([layer for _, layer in adapted_layers(model)]) == 8
