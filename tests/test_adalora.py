"""AdaLoRA (arXiv 2303.10512): the SVD-form adapter and its allocator against PEFT's, both ways."""

from __future__ import annotations

import copy
import peft
import pytest
import torch
from peft.tuners.adalora.layer import RankAllocator

import lorakit
from conftest import tiny_llama
from lorakit.core import adapted_layers
from lorakit.core.inject import merge, unmerge
from lorakit.rank import AdaLoraAllocator
from lorakit.rank.adalora import AdaLoraOptions, budget_schedule

TARGETS = ["q_proj", "k_proj", "down_proj", "up_proj"]
INPUT = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(5))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def ours(**overrides):
    fields = dict(init_r=6, target_r=3, alpha=8.0, target_modules=TARGETS, tinit=2, tfinal=3, deltaT=2, total_step=14)
    fields.update(overrides)
    torch.manual_seed(3)
    return lorakit.inject(tiny_llama(0), lorakit.AdaLoraConfig(**fields))


def theirs(model_ours, **overrides):
    """PEFT's AdaLoRA on the same base, its tensors copied from ours."""
    config = lorakit.adapter_configs(model_ours)["default"]
    fields = dict(init_r=config.init_r, target_r=config.target_r, lora_alpha=config.alpha, target_modules=TARGETS,
                  tinit=config.tinit, tfinal=config.tfinal, deltaT=config.deltaT, total_step=config.total_step,
                  beta1=config.beta1, beta2=config.beta2, orth_reg_weight=config.orth_reg_weight, task_type="CAUSAL_LM")
    fields.update(overrides)
    model = peft.get_peft_model(tiny_llama(0), peft.AdaLoraConfig(**fields))
    copy_into_peft(model_ours, model)
    return model


def peft_layer(peft_model, path):
    return peft_model.base_model.model.get_submodule(path)


def copy_into_peft(model_ours, peft_model) -> None:
    with torch.no_grad():
        for path, layer in adapted_layers(model_ours):
            adapter, target = layer.adapters["default"], peft_layer(peft_model, path)
            for name in ("lora_A", "lora_B", "lora_E"):
                getattr(target, name)["default"].copy_(getattr(adapter, name))


def move_off_init(model, seed=2, scale=0.2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lorakit.core.adapter_parameters(model).values():
            param.add_(scale * torch.randn(param.shape, generator=generator))


def test_forward_and_delta_match_peft_svdlinear():
    model = ours()
    move_off_init(model)
    reference = theirs(model)
    assert (logits(model) - logits(reference)).abs().max() <= 1e-5
    for path, layer in adapted_layers(model):
        expected = peft_layer(reference, path).get_delta_weight("default")
        assert torch.allclose(layer.adapters["default"].delta_weight(layer.base.weight), expected, atol=1e-7)


def test_identity_at_init_and_merge_unmerge():
    base = logits(tiny_llama(0))
    model = ours()
    assert (logits(model) - base).abs().max() == 0  # lambda = 0 at init
    move_off_init(model)
    before = logits(model)
    weights = {p: layer.base.weight.clone() for p, layer in adapted_layers(model)}
    merge(model)
    assert (logits(model) - before).abs().max() <= 1e-5
    unmerge(model)
    for path, layer in adapted_layers(model):
        assert torch.allclose(layer.base.weight, weights[path], atol=1e-6)


def test_budget_schedule_equals_peft():
    config = peft.AdaLoraConfig(init_r=12, target_r=4, tinit=10, tfinal=20, deltaT=3, total_step=100, target_modules=["q"])
    allocator = RankAllocator.__new__(RankAllocator)
    allocator.peft_config, allocator.init_bgt, allocator.target_bgt = config, 12 * 7, 4 * 7
    for step in range(0, 101):
        assert budget_schedule(step, 84, 28, 10, 20, 100, 3) == allocator.budget_schedule(step)


def test_allocator_matches_peft_on_the_same_scores():
    """Same tensors and the same gradients at every step: the same budgets, masks and lambdas."""
    model = ours()
    move_off_init(model)
    reference = theirs(model)
    allocator = AdaLoraAllocator(model, options=AdaLoraOptions(prune_at_final=False))
    config = lorakit.adapter_configs(model)["default"]
    generator = torch.Generator().manual_seed(7)
    changed = 0
    for step in range(config.total_step + 2):
        with torch.no_grad():
            for path, layer in adapted_layers(model):
                adapter, target = layer.adapters["default"], peft_layer(reference, path)
                for name in ("lora_A", "lora_B", "lora_E"):
                    param, twin = getattr(adapter, name), getattr(target, name)["default"]
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))  # an "optimizer step"
                    grad = torch.randn(param.shape, generator=generator)
                    twin.copy_(param)
                    param.grad, twin.grad = grad.clone(), grad.clone()
        pattern = allocator.step(step)
        reference.base_model.update_and_allocate(step)
        if pattern is not None:
            changed += 1
            expected = {k.replace(".default", ""): v for k, v in reference.peft_config["default"].rank_pattern.items()}
            assert pattern == expected
            assert config.rank_pattern == expected
        for path, layer in adapted_layers(model):
            assert torch.equal(layer.adapters["default"].lora_E, peft_layer(reference, path).lora_E["default"])
        assert allocator.budget == reference.base_model.rankallocator.budget_schedule(step)[0]
    assert changed >= 3
    ranks = allocator.final_ranks()
    assert sum(ranks.values()) == config.target_r * len(ranks)  # budget reached at t = T - tfinal


def test_orthogonal_regulariser_is_added_to_the_loss_like_peft():
    model = ours(orth_reg_weight=0.3)
    move_off_init(model)
    reference = theirs(model, orth_reg_weight=0.3)
    plain = theirs(model, orth_reg_weight=0.0)
    allocator = AdaLoraAllocator(model)
    model.train(), reference.train(), plain.train()
    loss = model(input_ids=INPUT, labels=INPUT).loss
    assert torch.allclose(loss, reference(input_ids=INPUT, labels=INPUT).loss, atol=1e-6)
    regulariser = allocator.orthogonal_regularizer()
    assert torch.allclose(loss - plain(input_ids=INPUT, labels=INPUT).loss, 0.3 * regulariser, atol=1e-6)
    assert regulariser > 0
    model.eval()
    allocator.close()


def train_steps(model, steps, allocator=None, accumulate=1):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        for _ in range(accumulate):
            model(input_ids=INPUT, labels=INPUT).loss.backward()
        optimizer.step()
        if allocator is not None:
            allocator.step(step, optimizer)
        optimizer.zero_grad()
    return optimizer


def test_training_without_the_allocator_is_an_error_not_a_silent_lora():
    model = ours()
    with pytest.raises(RuntimeError, match="without its rank allocator"):
        train_steps(model, 2)


def test_training_with_the_allocator_and_gradient_accumulation_runs():
    model = ours(total_step=6, tinit=1, tfinal=2, deltaT=1)
    allocator = AdaLoraAllocator(model)
    train_steps(model, 6, allocator, accumulate=2)
    assert sum(allocator.final_ranks().values()) == 3 * 8
    model.eval()
    logits(model)  # evaluation after training never needs the allocator


def test_final_pruning_frees_rows_and_optimizer_state_without_changing_the_function():
    model = ours(total_step=6, tinit=1, tfinal=2, deltaT=1)  # the final mask comes at t = T - tfinal = 4
    allocator = AdaLoraAllocator(model)
    optimizer = train_steps(model, 4, allocator)  # steps 0..3: budget phase
    model.train()
    model(input_ids=INPUT, labels=INPUT).loss.backward()
    optimizer.step()
    unpruned = copy.deepcopy(model).eval()
    allocator.step(4, optimizer)  # final mask, then the pruned rows are removed
    optimizer.zero_grad()
    model.eval()
    for path, layer in adapted_layers(model):
        adapter = layer.adapters["default"]
        assert adapter.lora_A.shape[0] == adapter.rank == adapter.lora_E.shape[0] == adapter.lora_B.shape[1]
        for param in (adapter.lora_A, adapter.lora_B, adapter.lora_E):
            assert any(param is q for group in optimizer.param_groups for q in group["params"])
            assert optimizer.state[param]["exp_avg"].shape == param.shape
        twin = unpruned.get_submodule(path).adapters["default"]
        keep = torch.zeros(twin.keep.shape, dtype=torch.bool)
        keep[adapter.slots] = True
        twin.set_keep(keep)  # the same mask, rows kept in place (PEFT's way)
        kept_rows = keep.nonzero().view(-1)
        assert torch.equal(adapter.lora_A, twin.lora_A[kept_rows])
    assert (logits(model) - logits(unpruned)).abs().max() <= 1e-6
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in optimizer.state} <= trainable  # no state left for removed tensors
    assert sum(allocator.final_ranks().values()) == 3 * 8
    before = logits(model)
    train_steps_from(model, optimizer, allocator, [5])  # trains on at the final ranks
    assert not torch.equal(logits(model), before)


def train_steps_from(model, optimizer, allocator, steps):
    model.train()
    for step in steps:
        model(input_ids=INPUT, labels=INPUT).loss.backward()
        optimizer.step()
        allocator.step(step, optimizer)
        optimizer.zero_grad()
    model.eval()


def test_pruned_adapter_equals_masked_adapter():
    model = ours(total_step=6, tinit=1, tfinal=2, deltaT=1)
    move_off_init(model)
    twin = ours(total_step=6, tinit=1, tfinal=2, deltaT=1)
    twin.load_state_dict(model.state_dict())
    for path, layer in adapted_layers(model):
        adapter = layer.adapters["default"]
        mask = torch.rand(adapter.keep.shape, generator=torch.Generator().manual_seed(len(path))) > 0.5
        adapter.set_keep(mask)
        layer_twin = twin.get_submodule(path).adapters["default"]
        layer_twin.set_keep(mask)
        layer_twin.resize(mask.nonzero().view(-1))
    assert (logits(model) - logits(twin)).abs().max() <= 1e-6


def test_peft_folder_with_rank_pattern_loads_in_lorakit(tmp_path):
    model = ours()
    move_off_init(model)
    reference = theirs(model)
    allocator_peft = reference.base_model
    reference.train()
    generator = torch.Generator().manual_seed(1)
    for step in range(9):  # the allocator works on real gradients to reach the final ranks
        for p in reference.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=generator)
        allocator_peft.update_and_allocate(step)
    reference.eval()
    assert reference.peft_config["default"].rank_pattern
    reference.save_pretrained(tmp_path)
    loaded = lorakit.load_adapter(tiny_llama(0), tmp_path)
    assert (logits(loaded) - logits(reference)).abs().max() <= 1e-5
    config = lorakit.adapter_configs(loaded)["default"]
    for path, layer in adapted_layers(loaded):
        mask = config.rank_pattern[f"{path}.lora_E"]
        assert layer.adapters["default"].rank == sum(mask)


def test_lorakit_folder_with_final_ranks_loads_in_peft(tmp_path):
    model = ours(total_step=6, tinit=1, tfinal=2, deltaT=1)
    allocator = AdaLoraAllocator(model)
    train_steps(model, 6, allocator)
    model.eval()
    expected = logits(model)
    lorakit.save_adapter(model, tmp_path)
    ranks = allocator.final_ranks()
    assert sum(ranks.values()) == 3 * 8
    loaded = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    assert (logits(loaded) - expected).abs().max() <= 1e-5
    for path, rank in ranks.items():
        assert peft_layer(loaded, path).lora_A["default"].shape[0] == rank
    again = lorakit.load_adapter(tiny_llama(0), tmp_path)
    assert (logits(again) - expected).abs().max() <= 1e-5


def test_config_errors_name_the_field():
    with pytest.raises(lorakit.ConfigError, match="target_r"):
        lorakit.AdaLoraConfig(init_r=4, target_r=8)
    with pytest.raises(lorakit.ConfigError, match="no budget phase"):
        lorakit.AdaLoraConfig(tinit=5, tfinal=5, total_step=10)
    with pytest.raises(lorakit.ConfigError, match="rank_pattern"):
        lorakit.AdaLoraConfig(init_r=3, target_r=2, rank_pattern={"x.lora_E": [True]})
    with pytest.raises(lorakit.ConfigError, match="adalora"):
        AdaLoraAllocator(lorakit.inject(tiny_llama(0), lorakit.LoraConfig(r=2, target_modules=["q_proj"])))
