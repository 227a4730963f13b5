"""The optimiser registry behind `lorakit train --optimizer NAME`."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import tiny_llama
from lorakit.optim import build_optimizer, registered_optimizers


def test_adamw_is_registered_and_covers_exactly_the_trainable_parameters():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = build_optimizer("adamw", model, lr=1e-3, weight_decay=0.1, options={"eps": 1e-6})
    assert "adamw" in registered_optimizers()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert optimizer.param_groups[0]["eps"] == 1e-6 and optimizer.param_groups[0]["weight_decay"] == 0.1


def test_unknown_optimizer_or_option_is_a_clear_error():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(lorakit.ConfigError, match="unknown optimizer 'sgdd'; registered: .*adamw"):
        build_optimizer("sgdd", model, lr=1e-3)
    with pytest.raises(lorakit.ConfigError, match="has no field"):
        build_optimizer("adamw", model, lr=1e-3, options={"momentum": 0.9})
    with pytest.raises(lorakit.ConfigError, match="no trainable parameters"):
        build_optimizer("adamw", tiny_llama().requires_grad_(False), lr=1e-3)


def test_train_config_checks_the_optimizer_name_before_anything_runs():
    from lorakit.train import TrainConfig

    with pytest.raises(lorakit.ConfigError, match="unknown optimizer"):
        TrainConfig(optimizer="nope").validate()
    TrainConfig(optimizer="adamw", optimizer_options={"betas": (0.9, 0.95)}).validate()
    assert isinstance(build_optimizer("adamw", torch.nn.Linear(2, 2), lr=1.0), torch.optim.AdamW)
