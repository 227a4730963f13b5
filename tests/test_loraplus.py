"""LoRA+ (arXiv 2402.12354): PEFT's parameter groups and steps, the registry, `lorakit train`."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer

import lorakit
from conftest import tiny_llama
from lorakit.optim import LoraPlus, build_optimizer
from lorakit.optim.loraplus import loraplus_param_groups

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
VARIANTS = {"lora": {}, "dora": {"use_dora": True}}


def perturb(model, seed=3):
    """B away from zero (and A, m moved), so a step moves every parameter differently."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def common_name(name: str) -> str:
    """"<path>.lora_A" from ours (…q_proj.adapters.default.lora_A.weight) or PEFT's (…q_proj.lora_A.default.weight)."""
    name = name.removeprefix("base_model.model.").replace(".adapters.default.", ".")
    return name.removesuffix(".default.weight").removesuffix(".weight")


def twin_models(tmp_path, variant):
    ours = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS, **VARIANTS[variant]))
    perturb(ours)
    lorakit.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    return ours, theirs


def settings_by_parameter(model, optimizer) -> dict[str, dict]:
    names = {id(p): common_name(n) for n, p in model.named_parameters()}
    found = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            found[names[id(param)]] = {k: v for k, v in group.items() if k not in ("params", "name")}
    return found


def loss(model, input_ids):
    return model(input_ids=input_ids, labels=input_ids).loss


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_groups_and_two_steps_equal_peft_create_loraplus_optimizer(tmp_path, input_ids, variant):
    ours, theirs = twin_models(tmp_path, variant)
    kwargs = dict(lr=1e-3, betas=(0.8, 0.99), eps=1e-7)
    mine = LoraPlus(ours, ratio=16, weight_decay=0.1, **kwargs)
    reference = create_loraplus_optimizer(theirs, torch.optim.AdamW, loraplus_lr_ratio=16, loraplus_weight_decay=0.1, **kwargs)

    our_settings, their_settings = settings_by_parameter(ours, mine), settings_by_parameter(theirs, reference)
    assert our_settings == their_settings  # every parameter: same lr, weight decay, betas, eps, ...
    assert {s["lr"] for s in our_settings.values()} == {1e-3, 16e-3}
    b_lr = {name: s["lr"] for name, s in our_settings.items() if name.endswith(("lora_B", "lora_magnitude_vector"))}
    assert b_lr and set(b_lr.values()) == {16e-3}  # B (and DoRA's m, as PEFT) at ratio * lr

    for _ in range(2):
        for model, optimizer in ((ours, mine), (theirs, reference)):
            optimizer.zero_grad()
            loss(model, input_ids).backward()
            optimizer.step()
    our_params = {common_name(n): p for n, p in ours.named_parameters() if p.requires_grad}
    their_params = {common_name(n): p for n, p in theirs.named_parameters() if p.requires_grad}
    assert our_params.keys() == their_params.keys()
    for name, param in our_params.items():
        assert (param - their_params[name]).abs().max() <= 1e-6, name


def test_ratio_sets_b_learning_rate_and_a_larger_ratio_moves_b_further(input_ids):
    moved = {}
    for ratio in (1.0, 16.0):
        model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=TARGETS))
        perturb(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer = LoraPlus(model, lr=1e-3, ratio=ratio)
        loss(model, input_ids).backward()
        optimizer.step()
        moved[ratio] = {n: (p - before[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad}
    for name in moved[1.0]:
        # Adam's first step moves each entry by ~lr: B by ratio * lr, A by lr whatever the ratio.
        expected = 16.0 if "lora_B" in name else 1.0
        assert moved[16.0][name] / moved[1.0][name] == pytest.approx(expected, rel=1e-3), name


def test_groups_work_with_any_optimizer_class_and_frozen_a_is_left_out():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"], freeze_a=True))
    groups = loraplus_param_groups(model, lr=0.1, ratio=4)
    sgd = torch.optim.SGD(groups, lr=0.1)
    assert [(g["name"], len(g["params"]), g["lr"]) for g in sgd.param_groups] == [("A", 0, 0.1), ("B", 2, 0.4)]
    assert LoraPlus(groups, lr=0.1).param_groups[1]["lr"] == 0.4  # groups pass through unchanged


def test_parameters_outside_factorised_adapters_get_the_base_learning_rate():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.model.norm.weight.requires_grad_(True)  # 1-D, outside any adapter (PEFT would give it ratio * lr)
    model.lm_head.weight.requires_grad_(True)
    optimizer = LoraPlus(model, lr=1e-3, ratio=16)
    a_group = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert id(model.model.norm.weight) in a_group and id(model.lm_head.weight) in a_group
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_a_model_without_factors_is_a_clear_error():
    vera = lorakit.inject(tiny_llama(), lorakit.VeraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(lorakit.ConfigError, match="LoRA\\+ needs trainable \\(A, B\\) factors"):
        LoraPlus(vera, lr=1e-3)


def test_registry_and_train_config_options():
    from lorakit.train import TrainConfig

    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = build_optimizer("loraplus", model, lr=2e-4, weight_decay=0.01, options={"ratio": 8, "eps": 1e-6})
    assert isinstance(optimizer, LoraPlus)
    assert [(g["lr"], g["weight_decay"], g["eps"]) for g in optimizer.param_groups] == [(2e-4, 0.01, 1e-6), (16e-4, 0.01, 1e-6)]
    with pytest.raises(lorakit.ConfigError, match="ratio=0"):
        TrainConfig(optimizer="loraplus", optimizer_options={"ratio": 0}).validate()
    with pytest.raises(lorakit.ConfigError, match="has no field"):
        TrainConfig(optimizer="loraplus", optimizer_options={"loraplus_lr_ratio": 16}).validate()


def test_lorakit_train_uses_loraplus(tmp_path, tiny_model_folder, monkeypatch):
    from lorakit.cli.main import build_parser, train_config_from_args
    from lorakit.train import runner, train

    built = []

    def spy(*args, **kwargs):
        built.append(build_optimizer(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(runner, "build_optimizer", spy)
    rows = [{"prompt": f"Repeat the word: w{i}", "response": f"w{i}"} for i in range(24)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    argv = ["train", "--model", str(tiny_model_folder), "--data", str(tmp_path / "train.jsonl"), "--output-dir",
            str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4", "--save-steps", "0", "--eval-examples", "2",
            "--max-new-tokens", "1", "--eval-fraction", "0.2", "--warmup-steps", "0", "--learning-rate", "1e-3",
            "--lr-scheduler", "constant", "--r", "4", "--alpha", "8",
            "--optimizer", "loraplus", "--optimizer-options", '{"ratio": 16}']
    config, _ = train_config_from_args(build_parser().parse_args(argv))
    assert (config.optimizer, config.optimizer_options) == ("loraplus", {"ratio": 16})
    assert train(config, progress=False)["train"]["steps"] == 2
    (optimizer,) = built
    assert isinstance(optimizer, LoraPlus)
    assert [(g["name"], g["lr"], g["initial_lr"]) for g in optimizer.param_groups] == [("A", 1e-3, 1e-3), ("B", 16e-3, 16e-3)]
    assert {float(state["step"]) for state in optimizer.state.values()} == {2.0}  # the Trainer stepped it, twice
    assert len(optimizer.state) == sum(len(g["params"]) for g in optimizer.param_groups) == 28
