"""The rank mechanism (budget, optimizer/scheduler consistency) and LaMDA++ allocation."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

import lorakit
from conftest import tiny_llama, train_cli_with_rank_policy
from lorakit.core import adapted_layers
from lorakit.rank import (
    LamdaPlusPlus,
    LamdaPPOptions,
    RankBudget,
    add_param_group,
    lamda_pp_ranks,
    remove_parameters,
    replace_parameters,
)
from lorakit.rank.lamda_pp import apportion, spectral_flatness

INPUT = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(5))


# --- the budget ---------------------------------------------------------------------------------

def test_budget_refuses_ranks_above_the_global_budget_or_a_capacity():
    budget = RankBudget({"a": 1, "b": 1}, budget=4, capacity={"a": 2})
    budget.grow("b", 2)
    assert budget.total == 4 and budget.remaining == 0
    with pytest.raises(ValueError, match="global budget"):
        budget.grow("a")
    budget.set_rank("b", 1)
    with pytest.raises(ValueError, match="capacity"):
        budget.set_rank("a", 3)
    assert budget.rank_pattern() == {"a": 1, "b": 1}


# --- parameters that appear: new groups with their own warm-up --------------------------------

def lr_curve(add_at: int | None, total: int = 20, warmup: int = 5):
    first = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([first], lr=0.1)
    scheduler = get_linear_schedule_with_warmup(optimizer, 3, total)
    curves: list[list[float]] = []
    for step in range(total):
        if step == add_at:
            add_param_group(optimizer, [nn.Parameter(torch.ones(2))], scheduler=scheduler, step=step,
                            warmup_steps=warmup, total_steps=total, weight_decay=0.0)
        curves.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return curves


def test_new_group_gets_its_own_restart_warmup_and_old_groups_are_untouched():
    t0, warmup, total = 6, 5, 20
    plain, grown = lr_curve(None), lr_curve(t0)
    assert [c[0] for c in grown] == [c[0] for c in plain]  # the original group's lr sequence is unchanged
    new = [c[1] for c in grown[t0:]]
    for j, lr in enumerate(new):
        expected = 0.1 * j / warmup if j < warmup else 0.1 * (total - t0 - j) / (total - t0 - warmup)
        assert lr == pytest.approx(expected, abs=1e-12)
    assert new[-1] == pytest.approx(0.1 / (total - t0 - warmup))  # decays to 0 at the global end


def test_add_param_group_refuses_other_schedulers_and_duplicates():
    param = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    with pytest.raises(ValueError, match="already"):
        add_param_group(optimizer, [param])
    with pytest.raises(lorakit.ConfigError, match="LambdaLR"):
        add_param_group(optimizer, [nn.Parameter(torch.ones(2))],
                        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 2))


# --- parameters that vanish or shrink -------------------------------------------------------------

def test_shrinking_matches_an_unpruned_run_row_for_row():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(5, 4))
    twin = nn.Parameter(weight.detach().clone())
    opt_a = torch.optim.AdamW([weight], lr=0.05, weight_decay=0.1)
    opt_b = torch.optim.AdamW([twin], lr=0.05, weight_decay=0.1)
    keep = torch.tensor([0, 2, 4])
    generator = torch.Generator().manual_seed(1)
    for step in range(8):
        grad = torch.randn(5, 4, generator=generator)
        if step == 3:
            new = nn.Parameter(weight.detach()[keep].clone())
            replace_parameters(opt_a, {weight: (new, 0)}, keep)
            weight = new
        weight.grad = grad[keep] if weight.shape[0] == 3 else grad.clone()
        twin.grad = grad.clone()
        opt_a.step(), opt_b.step()
    assert torch.equal(weight.detach(), twin.detach()[keep])
    assert torch.equal(opt_a.state[weight]["exp_avg_sq"], opt_b.state[twin]["exp_avg_sq"][keep])


def test_removed_parameters_leave_the_optimizer_and_free_their_state():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(4))
    optimizer = torch.optim.Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    (a.sum() + b.sum()).backward()
    optimizer.step()
    remove_parameters(optimizer, [b])
    assert b not in optimizer.state and a in optimizer.state
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["params"] == []
    optimizer.zero_grad()
    a.sum().backward()
    optimizer.step()  # still steps


# --- LaMDA++ -----------------------------------------------------------------------------------------

def test_flatness_is_the_energy_outside_the_top_k():
    weight = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))
    assert spectral_flatness(weight, 1) == pytest.approx(1 - 9 / 14)
    assert spectral_flatness(weight, 3) == pytest.approx(0.0)


def test_flatter_spectrum_gets_more_rank():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("steep", nn.Linear(32, 32, bias=False))
    model.add_module("flat", nn.Linear(32, 32, bias=False))
    u, _, v = torch.linalg.svd(torch.randn(32, 32))
    with torch.no_grad():
        model.steep.weight.copy_(u @ torch.diag(0.5 ** torch.arange(32.0)) @ v)  # energy in a few directions
        model.flat.weight.copy_(u @ torch.diag(torch.linspace(1.0, 0.8, 32)) @ v)  # almost flat
    ranks = lamda_pp_ranks(model, ["steep", "flat"], average_rank=4)
    assert ranks["flat"] > ranks["steep"] >= 1
    assert sum(ranks.values()) == 8


def test_apportion_respects_bounds_and_budget():
    ranks = apportion({"a": 10.0, "b": 1.0, "c": 1.0}, 12, low={"a": 1, "b": 1, "c": 1}, high={"a": 6, "b": 8, "c": 8})
    assert ranks["a"] == 6 and sum(ranks.values()) == 12 and min(ranks.values()) >= 1
    with pytest.raises(lorakit.ConfigError, match="cannot be split"):
        apportion({"a": 1.0}, 10, low={"a": 1}, high={"a": 4})


def test_lamda_pp_ranks_become_a_lora_rank_pattern_that_peft_loads(tmp_path):
    base = tiny_llama(0)
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "down_proj"])
    policy = LamdaPlusPlus(LamdaPPOptions(min_rank=1))
    config = policy.prepare_config(base, config)
    model = lorakit.inject(base, config)
    ranks = policy.final_ranks()
    assert sum(ranks.values()) == 4 * 6
    for path, layer in adapted_layers(model):
        assert layer.adapters["default"].r == ranks[path]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in lorakit.core.adapter_parameters(model).values():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
        expected = model(input_ids=INPUT).logits
    lorakit.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == ranks
    loaded = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    with torch.no_grad():
        assert (loaded(input_ids=INPUT).logits - expected).abs().max() <= 1e-5
    assert "total" in policy.rank_table(model)


def test_lamda_pp_refuses_configs_without_a_rank_pattern():
    with pytest.raises(lorakit.ConfigError, match="rank_pattern"):
        LamdaPlusPlus().prepare_config(tiny_llama(0), lorakit.VeraConfig(r=4, target_modules=["q_proj"]))


# --- lorakit train --rank-policy ----------------------------------------------------------------------

@pytest.mark.parametrize("policy, adapter", [
    ("adalora", {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2}),
    ("lamda++", {"r": 2, "alpha": 4}),
])
def test_lorakit_train_with_a_rank_policy_prints_and_saves_the_final_ranks(tmp_path, tiny_model_folder, capsys,
                                                                          policy, adapter):
    run = tmp_path / "run"
    train_cli_with_rank_policy(run, tiny_model_folder, policy, 6,
                               *[f"--{k.replace('_', '-')}={v}" for k, v in adapter.items()])
    out = capsys.readouterr().out
    assert f"final ranks ({policy})" in out and "model.layers.1.self_attn.v_proj" in out
    metrics = json.loads((run / "metrics.json").read_text())
    ranks = metrics["train"]["ranks"]
    assert len(ranks) == 4 and sum(ranks.values()) == 2 * 4
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["rank_pattern"]
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_folder), run / "adapter")
    for path, rank in ranks.items():  # PEFT honours the saved per-module ranks
        layer = loaded.base_model.model.get_submodule(path)
        factor = layer.lora_A["default"]  # a Linear for LoRA, a Parameter for AdaLoRA
        assert getattr(factor, "weight", factor).shape[0] == rank
