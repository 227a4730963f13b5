"""Block-LoRA against the spec's verification recipe (../shared/methods/block-lora.md, input-partition reading)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from conftest import model_output, tiny_llama
from lorakit.core import adapted_layers


def toy(in_features: int, out_features: int, config: lorakit.BlockLoraConfig, dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features)).to(dtype)
    lorakit.inject(model, config)
    layer = model[0]
    return model, layer, layer.adapters["default"]


def config(**kwargs) -> lorakit.BlockLoraConfig:
    fields = {"r": 4, "alpha": 8.0, "n_blocks": 8, "dropout": 0.0, "target_modules": ["0"]}
    return lorakit.BlockLoraConfig(**{**fields, **kwargs})


def randomise(adapter, std: float = 0.2, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (adapter.A_s, adapter.B):
            param.copy_(std * torch.randn(param.shape, generator=generator).to(param.dtype))


def tiled(A_s: torch.Tensor, n: int, in_features: int) -> torch.Tensor:
    """[A_s, A_s, ..., A_s] (n copies side by side along the input axis), cropped to in columns."""
    return torch.cat([A_s] * n, dim=1)[:, :in_features]


def test_identity_at_init_is_exact_and_init_follows_lora():
    model, layer, adapter = toy(64, 48, lorakit.BlockLoraConfig(target_modules=["0"]))  # defaults: r=2, n=8
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(model(x), layer.base(x))
    assert adapter.A_s.shape == (2, 8) and adapter.B.shape == (48, 2)
    assert torch.count_nonzero(adapter.B) == 0
    # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = block width m = 8.
    assert adapter.A_s.abs().max() <= 1 / math.sqrt(8)
    assert adapter.A_s.abs().max() > 0.5 / math.sqrt(8)


@pytest.mark.parametrize("in_features", [64, 70])  # 70 = 7 * 9 + 7: the last of 8 blocks is padded
def test_forward_equals_the_tiled_reference(in_features):
    model, layer, adapter = toy(in_features, 48, config())
    randomise(adapter)
    s = 8.0 / 4
    dW = s * adapter.B.detach() @ tiled(adapter.A_s.detach(), 8, in_features)
    x = torch.randn(5, in_features)
    expected = x @ (layer.base.weight + dW).T + layer.base.bias
    with torch.no_grad():
        assert (model(x) - expected).abs().max() < 1e-5
        assert (adapter.delta_weight(layer.base.weight) - dW).abs().max() < 1e-5


@pytest.mark.parametrize("in_features", [64, 70])
def test_chunk_sum_shortcut_equals_the_explicit_block_product(in_features):
    model, layer, adapter = toy(in_features, 48, config(), dtype=torch.float64)
    randomise(adapter)
    A_s, B, m = adapter.A_s.detach(), adapter.B.detach(), math.ceil(in_features / 8)
    x = torch.randn(5, in_features, dtype=torch.float64)
    explicit = sum(x[:, j * m:(j + 1) * m] @ A_s[:, : x[:, j * m:(j + 1) * m].shape[1]].T @ B.T for j in range(8))
    with torch.no_grad():
        assert (model(x) - layer.base(x) - 2.0 * explicit).abs().max() < 1e-6


def test_parameter_count_is_out_r_plus_r_in_over_n():
    model, _, _ = toy(64, 48, config())
    assert lorakit.trainable_parameters(model)[0] == 48 * 4 + 4 * 8 == 224
    lora = nn.Sequential(nn.Linear(64, 48))
    lorakit.inject(lora, lorakit.LoraConfig(r=4, target_modules=["0"]))
    assert lorakit.trainable_parameters(lora)[0] == 448


def test_parameter_count_on_tiny_llama_padded_and_divisible():
    per_layer = {  # (in, out) -> out * r + r * ceil(in / n) with r = 4
        5: {"q_proj": 32 * 4 + 4 * 7, "k_proj": 16 * 4 + 4 * 7, "up_proj": 48 * 4 + 4 * 7, "down_proj": 32 * 4 + 4 * 10},
        8: {"q_proj": 32 * 4 + 4 * 4, "k_proj": 16 * 4 + 4 * 4, "up_proj": 48 * 4 + 4 * 4, "down_proj": 32 * 4 + 4 * 6},
    }
    for n, counts in per_layer.items():
        model = lorakit.inject(tiny_llama(), config(n_blocks=n, target_modules=list(counts)))
        assert lorakit.trainable_parameters(model)[0] == 2 * sum(counts.values())  # two decoder layers
        for path, layer in adapted_layers(model):
            adapter = layer.adapters["default"]
            assert adapter.A_s.numel() + adapter.B.numel() == counts[path.split(".")[-1]]


@pytest.mark.parametrize("in_features", [64, 70])
def test_merge_and_unmerge(in_features):
    model, layer, adapter = toy(in_features, 48, config())
    randomise(adapter)
    W = layer.base.weight.detach().clone()
    x = torch.randn(4, in_features)
    with torch.no_grad():
        unmerged = model(x)
        lorakit.merge(model)
        assert (model(x) - unmerged).abs().max() < 1e-5
        lorakit.unmerge(model)
    assert (layer.base.weight - W).abs().max() < 1e-6


def fit(target: torch.Tensor, n: int, r: int, steps: int) -> float:
    """Adam on ||dW - target||_F^2, with dW read through the adapter's forward on the identity
    (model(I) - base(I) = dW^T), so the forward pass is what is constrained."""
    out_features, in_features = target.shape
    model, layer, _ = toy(in_features, out_features, config(r=r, alpha=float(r), n_blocks=n), dtype=torch.float64)
    eye = torch.eye(in_features, dtype=torch.float64)
    with torch.no_grad():
        base = layer.base(eye)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=0.02)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = ((model(eye) - base).T - target).pow(2).sum()
        loss.backward()
        optimiser.step()
        schedule.step()
    with torch.no_grad():
        return ((model(eye) - base).T - target).pow(2).sum().item()


def test_expressivity_boundary():
    generator = torch.Generator().manual_seed(4)
    out_features, in_features, r, n = 12, 16, 2, 4
    m = in_features // n
    B_star = torch.randn(out_features, r, generator=generator, dtype=torch.float64)

    # A tiled target is reachable.
    A_star = torch.randn(r, m, generator=generator, dtype=torch.float64)
    reachable = B_star @ tiled(A_star, n, in_features)
    assert math.sqrt(fit(reachable, n, r, 1500)) / reachable.norm().item() < 1e-3

    # A generic rank-r target is not: the best [C, ..., C] approximation has C = mean of the column
    # blocks (rank <= r here, since every block lies in the span of B*), leaving this residual.
    generic = B_star @ torch.randn(r, in_features, generator=generator, dtype=torch.float64)
    blocks = generic.reshape(out_features, n, m)
    bound = (blocks - blocks.mean(dim=1, keepdim=True)).pow(2).sum().item()
    assert bound > 0.5 * generic.pow(2).sum().item()  # the bound is far from zero: the constraint bites
    loss = fit(generic, n, r, 1500)
    assert loss >= bound - 1e-6
    assert loss <= bound * (1 + 1e-3)  # and the optimiser does reach it


def test_dropout_acts_on_the_chunk_sum():
    model, layer, adapter = toy(64, 48, config(dropout=0.5))
    randomise(adapter)
    model.train()
    x = torch.randn(3, 64)
    u = x.reshape(3, 8, 8).sum(dim=1)
    torch.manual_seed(7)
    with torch.no_grad():
        update = model(x) - layer.base(x)
    torch.manual_seed(7)
    expected = 2.0 * F.dropout(u, 0.5, training=True) @ adapter.A_s.detach().T @ adapter.B.detach().T
    assert (update - expected).abs().max() < 1e-5


def test_half_precision_base_keeps_an_fp32_adapter():
    model, layer, adapter = toy(64, 48, config(), dtype=torch.bfloat16)
    assert adapter.A_s.dtype == torch.float32
    with torch.no_grad():
        assert model(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_shape_errors_and_config_validation():
    with pytest.raises(lorakit.ConfigError, match=r"n_blocks <= in; n_blocks=8 for 0 \(in=5, out=4\)"):
        toy(5, 4, config())
    with pytest.raises(lorakit.ConfigError, match=r"last block would be only zero padding"):
        toy(9, 4, config(n_blocks=4))  # ceil(9/4) = 3: blocks 0-2, 3-5, 6-8 and an empty fourth
    toy(10, 4, config(n_blocks=4))  # ceil(10/4) = 3: the fourth block holds column 9 and two zeros
    for bad in ({"n_blocks": 0}, {"r": 0}, {"alpha": 0.0}, {"dropout": 1.0}, {"n_blocks": 2.5}):
        with pytest.raises(lorakit.ConfigError):
            config(**bad)


def test_factors_is_empty_because_dw_is_not_b_at_a_parameter():
    _, _, adapter = toy(64, 48, config())
    assert adapter.factors() == []


def test_save_load_keeps_the_method_and_block_count(tmp_path, input_ids):
    model = lorakit.inject(tiny_llama(), config(n_blocks=5, target_modules=["q_proj", "down_proj"]))
    for _, layer in adapted_layers(model):
        randomise(layer.adapters["default"])
    expected = model_output(model, input_ids)
    lorakit.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] is None and saved["lorakit"]["method"] == "block_lora" and saved["n_blocks"] == 5
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert lorakit.adapter_configs(reloaded)["default"] == lorakit.adapter_configs(model)["default"]
    assert (model_output(reloaded, input_ids) - expected).abs().max() <= 1e-6


def test_cli_offers_n_blocks():
    from lorakit.cli.main import build_parser

    args = build_parser().parse_args(["train", "--method", "block_lora", "--n-blocks", "4"])
    assert vars(args)["adapter.n_blocks"] == 4
