"""IncreLoRA (arXiv 2308.12043): the growable SVD-form adapter and its rank policy (the spec's recipe)."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, get_linear_schedule_with_warmup

import lorakit
from conftest import tiny_llama, train_cli_with_rank_policy
from lorakit.core import adapted_layers
from lorakit.methods.increlora import RESERVED_E
from lorakit.rank import IncreLoraAllocator, IncreLoraOptions

INPUT = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(5))
TOY_STEPS = 40


# --- the toy of the verification recipe: 6 Linear(8 -> 8) in sequence -----------------------------

def toy(**overrides):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
    fields = dict(init_r=1, target_r=2, top_h=2, init_warmup=10, incre_interval=5, alpha=8.0, target_modules=r"\d")
    fields.update(overrides)
    return lorakit.inject(model, lorakit.IncreLoraConfig(**fields))


def toy_adapters(model):
    return [layer.adapters["default"] for _, layer in adapted_layers(model)]


def run_toy(model, policy, steps=TOY_STEPS, optimizer=None, scheduler=None, scores=None, on_step=None):
    """Plain loop with SGD on a fixed regression batch; `scores` (list per module) replaces the
    measured importance by constants."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=generator), torch.randn(16, 8, generator=generator)
    optimizer = optimizer or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for t in range(steps):
        ((model(x) - y) ** 2).mean().backward()
        if scores is not None:
            for adapter, value in zip(toy_adapters(model), scores):
                if adapter.take_score() is not None:
                    adapter._score = torch.tensor(float(value))
        policy.step(t, optimizer, scheduler)
        if on_step is not None:
            on_step(t, optimizer)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad()
    return optimizer


def test_allocations_happen_exactly_at_15_20_25_and_stop_at_the_budget():
    model = toy()
    policy = IncreLoraAllocator(model, total_steps=TOY_STEPS)
    assert policy.budget == 12 and policy.rank_step == 1
    run_toy(model, policy)
    assert [step for step, _ in policy.history] == [15, 20, 25]
    assert all(len(added) == 2 and set(added.values()) == {1} for _, added in policy.history)
    ranks = policy.final_ranks()
    assert sum(ranks.values()) == 12
    assert ranks == lorakit.adapter_configs(model)["default"].rank_pattern
    # hooks removed: no scoring, no reserved components, and a backward leaves no score behind
    model(torch.randn(3, 8)).sum().backward()
    for adapter in toy_adapters(model):
        assert not adapter.scoring and adapter.reserved == 0 and adapter.take_score() is None
        assert len(adapter.lora_A) == adapter.rank


def test_score_is_sum_of_abs_delta_times_gradient_over_sqrt_mn():
    model = toy()
    IncreLoraAllocator(model, total_steps=TOY_STEPS)
    adapter = toy_adapters(model)[2]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    layer = model[2]
    x = torch.eye(8)  # then dL/d(dW) = G^T x = G^T for an upstream gradient G on the output
    upstream = torch.randn(8, 8, generator=generator)
    layer(x).backward(upstream)
    a, e, b = (t.detach().double() for t in adapter.stacked())
    delta = b @ (a * e) * (adapter.scaling / (adapter.rank + 1e-5))
    expected = (delta * upstream.double().T).abs().sum() / math.sqrt(64)
    score = adapter.take_score()
    assert abs(score.item() - expected.item()) / expected.item() < 1e-6


def test_smoothing_is_sensitivity_times_uncertainty():
    model = toy()
    policy = IncreLoraAllocator(model, total_steps=TOY_STEPS)
    values = [[2.0, 1.0, 3.0, 0.5, 1.5, 4.0], [1.0, 2.0, 0.0, 0.5, 3.0, 2.5]]
    ipt, unc = [0.0] * 6, [0.0] * 6
    for row in values:
        for adapter, value in zip(toy_adapters(model), row):
            adapter._score = torch.tensor(value)
        policy.update_importance()
        for i, value in enumerate(row):
            ipt[i] = 0.85 * ipt[i] + 0.15 * value
            unc[i] = 0.85 * unc[i] + 0.15 * abs(value - ipt[i])
    scores = list(policy.scores().values())
    assert scores == pytest.approx([i * u for i, u in zip(ipt, unc)], rel=1e-6)


def test_first_round_selects_the_two_highest_scores_only():
    model = toy()
    policy = IncreLoraAllocator(model, total_steps=TOY_STEPS)
    run_toy(model, policy, steps=16, scores=[5, 1, 4, 1, 1, 1])
    assert policy.history == [(15, {"0": 1, "2": 1})]
    assert [a.rank for a in toy_adapters(model)] == [2, 1, 2, 1, 1, 1]


def test_ties_and_increments_above_one_never_exceed_the_budget():
    model = toy(target_total=13, incre_rank_num=2, top_h=4, init_warmup=0, incre_interval=1)
    policy = IncreLoraAllocator(model, total_steps=10)

    def within_budget(t, optimizer):
        assert sum(a.rank for a in toy_adapters(model)) <= 13

    run_toy(model, policy, steps=10, scores=[1.0] * 6, on_step=within_budget)  # every score ties
    assert policy.history == [(1, {"0": 2, "1": 2, "2": 2, "3": 1})]  # capped at 13, ties by module order
    assert sum(policy.final_ranks().values()) == 13 and policy.done
    model = toy(top_h=2, init_warmup=0, incre_interval=1)
    policy = IncreLoraAllocator(model, total_steps=10)
    run_toy(model, policy, steps=10, scores=[1.0] * 6)
    assert [sorted(added) for _, added in policy.history] == [["0", "1"], ["0", "1"], ["0", "1"]]
    assert sum(policy.final_ranks().values()) == 12


def test_advance_learning_trains_reserved_factors_with_e_frozen_then_activates_e():
    model = toy()
    policy = IncreLoraAllocator(model, total_steps=TOY_STEPS)
    seen = {}

    def watch(t, optimizer):
        adapter = toy_adapters(model)[0]
        if t == 0:  # the reserved component exists from step 0 on
            assert adapter.reserved == 1
            seen["a"], seen["b"] = adapter.lora_A[1].detach().clone(), adapter.lora_B[1].detach().clone()
            seen["e"] = adapter.lora_E[1]
            in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
            assert id(adapter.lora_A[1]) in in_optimizer and id(adapter.lora_E[1]) not in in_optimizer
        if t == 14:  # just before the first round
            e = adapter.lora_E[1]
            assert e is seen["e"] and not e.requires_grad
            assert torch.equal(e.detach(), torch.full((1, 1), RESERVED_E))  # bitwise, despite weight decay
            assert not torch.equal(adapter.lora_A[1].detach(), seen["a"])
            assert not torch.equal(adapter.lora_B[1].detach(), seen["b"])

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, weight_decay=0.1)
    run_toy(model, policy, steps=16, optimizer=optimizer, scores=[5, 1, 4, 1, 1, 1], on_step=watch)
    e = toy_adapters(model)[0].lora_E[1]
    assert e is seen["e"] and e.requires_grad
    assert any(p is e for group in optimizer.param_groups for p in group["params"])


def test_activated_e_trains_after_activation():
    model = toy()
    policy = IncreLoraAllocator(model, total_steps=TOY_STEPS)
    optimizer = run_toy(model, policy, steps=17, scores=[5, 1, 4, 1, 1, 1])
    e = toy_adapters(model)[0].lora_E[1]
    assert e.requires_grad and e.item() != pytest.approx(RESERVED_E, abs=1e-9)
    assert len(optimizer.param_groups) == 3  # the first group, the step-0 reserve, the round at t = 15


def test_new_groups_get_restart_warmup_and_the_first_group_is_unchanged():
    warmup, base = 5, 0.05

    def lrs(with_policy):
        model = toy()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=base)
        scheduler = get_linear_schedule_with_warmup(optimizer, 3, TOY_STEPS)
        curve = []
        if with_policy:
            policy = IncreLoraAllocator(model, total_steps=TOY_STEPS, options=IncreLoraOptions(warmup_steps=warmup))
        else:
            policy = type("NoPolicy", (), {"step": lambda self, *a: None})()
        run_toy(model, policy, optimizer=optimizer, scheduler=scheduler,
                on_step=lambda t, opt: curve.append([g["lr"] for g in opt.param_groups]))
        return curve

    plain, grown = lrs(False), lrs(True)
    assert [c[0] for c in grown] == [c[0] for c in plain]
    created = {1: 0, 2: 15, 3: 20, 4: 25}  # group index -> creation step (the reserve at 0, then the rounds)
    assert len(grown[-1]) == 5
    for group, t0 in created.items():
        for t in range(t0, TOY_STEPS):
            j = t - t0
            expected = base * j / warmup if j < warmup else base * (TOY_STEPS - t0 - j) / (TOY_STEPS - t0 - warmup)
            assert grown[t][group] == pytest.approx(expected, abs=1e-12)


def test_delta_is_scaled_by_alpha_over_ranknum():
    model = toy()
    adapter = toy_adapters(model)[0]
    adapter.reserve(1)
    adapter.activate(1)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for plist in (adapter.lora_A, adapter.lora_E, adapter.lora_B):
            plist[0].copy_(torch.randn(plist[0].shape, generator=generator))
    weight = model[0].base.weight
    a, e, b = (t.detach().double() for t in adapter.stacked())
    expected = b @ (a * e) * 8.0 / (2 + 1e-5)
    assert torch.allclose(adapter.delta_weight(weight).double(), expected, rtol=1e-6, atol=0)
    with torch.no_grad():
        before = adapter.delta_weight(weight).double()
        adapter.ranknum.fill_(4.0)  # doubled rank, identical components
        after = adapter.delta_weight(weight).double()
    assert torch.allclose(after, before * (2 + 1e-5) / (4 + 1e-5), rtol=1e-6, atol=0)


def test_regulariser_uses_the_stacked_factors():
    model = lorakit.inject(tiny_llama(0), lorakit.IncreLoraConfig(init_r=2, target_r=4, orth_reg_weight=0.3,
                                                                  target_modules=["q_proj", "v_proj"]))
    policy = IncreLoraAllocator(model)
    adapter = next(iter(policy.adapters.values()))
    with torch.no_grad():  # unit-norm rows that are not orthogonal: a per-vector norm penalty would be 0 here
        for plist in (adapter.lora_A, adapter.lora_B):
            for p in plist:
                p.fill_(1.0).div_(p.norm())
    a, _, b = adapter.stacked()
    assert torch.norm(a @ a.T - torch.eye(2)) > 0.5
    model.train()
    with_reg = model(input_ids=INPUT, labels=INPUT).loss
    policy.close()
    without = model(input_ids=INPUT, labels=INPUT).loss
    norms = []
    for adapter in policy.adapters.values():  # recomputed here from the stacked factors
        a, _, b = (t.detach() for t in adapter.stacked())
        norms += [torch.norm(a @ a.T - torch.eye(len(a))), torch.norm(b.T @ b - torch.eye(len(a)))]
    assert torch.allclose(with_reg - without, 0.3 * torch.stack(norms).mean(), atol=1e-6)


# --- tiny Llama: plain loop, Trainer, files -----------------------------------------------------------

TARGETS = ["q_proj", "v_proj"]


def tiny_increlora(**overrides):
    fields = dict(init_r=1, target_r=2, top_h=2, init_warmup=1, incre_interval=1, alpha=4.0, target_modules=TARGETS)
    fields.update(overrides)
    torch.manual_seed(2)
    return lorakit.inject(tiny_llama(0), lorakit.IncreLoraConfig(**fields))


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def test_plain_loop_on_tiny_llama_reaches_the_budget_and_round_trips(tmp_path):
    model = tiny_increlora()
    total = 8
    policy = IncreLoraAllocator(model, total_steps=total, warmup_steps=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = get_linear_schedule_with_warmup(optimizer, 2, total)
    model.train()
    for t in range(total):
        model(input_ids=INPUT, labels=INPUT).loss.backward()
        policy.step(t, optimizer, scheduler)
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    policy.close(optimizer)
    ranks = policy.final_ranks()
    assert sum(ranks.values()) == 2 * 4 and max(ranks.values()) > 1
    assert len(scheduler.lr_lambdas) == len(optimizer.param_groups) > 1
    model.eval()
    expected = logits(model)
    assert (expected - logits(tiny_llama(0))).abs().max() > 1e-4  # it trained
    lorakit.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["init_r"] == max(ranks.values())
    assert {k[: -len(".lora_E")]: sum(v) for k, v in saved["rank_pattern"].items()} == ranks
    again = lorakit.load_adapter(tiny_llama(0), tmp_path)
    assert (logits(again) - expected).abs().max() <= 1e-6
    assert {p: layer.adapters["default"].rank for p, layer in adapted_layers(again)} == ranks
    theirs = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path)  # PEFT's AdaLoRA with our rank_pattern
    assert (logits(theirs) - expected).abs().max() <= 1e-5
    for path, rank in ranks.items():
        assert theirs.base_model.model.get_submodule(path).lora_A["default"].shape[0] == rank


def test_trainer_run_grows_ranks_through_the_callback(tmp_path):
    model = tiny_increlora(top_h=1)
    rows = [{"input_ids": r, "labels": r} for r in torch.randint(0, 128, (8, 7), generator=torch.Generator().manual_seed(0))]
    args = TrainingArguments(str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                             warmup_steps=2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    policy = IncreLoraAllocator()
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[policy])
    trainer.train()
    assert [step for step, _ in policy.history] == [2, 3, 4, 5]
    assert sum(policy.final_ranks().values()) == 8 and policy.done
    assert policy.warmup_steps == 2 and policy.total_steps == 6
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert len(inner.param_groups) >= 2 + 4  # Trainer's two groups, the reserve, four rounds
    assert policy._hook is None
    assert "total" in policy.rank_table(model)


def test_lorakit_train_with_increlora_prints_and_saves_the_final_ranks(tmp_path, tiny_model_folder, capsys):
    run = tmp_path / "run"
    train_cli_with_rank_policy(run, tiny_model_folder, "increlora", 4,
                               "--init-warmup", "0", "--incre-interval", "1", "--target-r", "2", "--top-h", "2")
    out = capsys.readouterr().out
    assert "final ranks (increlora)" in out and "model.layers.1.self_attn.v_proj" in out
    ranks = json.loads((run / "metrics.json").read_text())["train"]["ranks"]
    assert len(ranks) == 4 and sum(ranks.values()) == 2 * 4
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_folder), run / "adapter")
    for path, rank in ranks.items():
        assert loaded.base_model.model.get_submodule(path).lora_A["default"].shape[0] == rank


def test_config_and_schedule_errors_name_the_field():
    with pytest.raises(lorakit.ConfigError, match="target_r"):
        lorakit.IncreLoraConfig(init_r=3, target_r=2)
    with pytest.raises(lorakit.ConfigError, match="incre_rank_num"):
        lorakit.IncreLoraConfig(target_r=5)
    with pytest.raises(lorakit.ConfigError, match="rank_pattern"):
        lorakit.IncreLoraConfig(rank_pattern={"x": 0})
    with pytest.raises(lorakit.ConfigError, match="init_warmup"):
        IncreLoraAllocator(toy(), total_steps=25)  # the last round would run at step 25
    with pytest.raises(lorakit.ConfigError, match="increlora"):
        IncreLoraAllocator(lorakit.inject(tiny_llama(0), lorakit.LoraConfig(r=2, target_modules=["q_proj"])))
