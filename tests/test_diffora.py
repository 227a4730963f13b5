"""DiffoRA module selection (lorakit.rank.diffora): the spec's toy recipe, discretisation, weight sharing,
optimizer consistency, the saved plain-LoRA file (lorakit and PEFT), transformers.Trainer and `lorakit train`."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import lorakit
from conftest import tiny_llama, train_cli_with_rank_policy
from lorakit.core import adapted_layers, trainable_parameters
from lorakit.rank import DiffoRA, DiffoRAOptions, build_rank_policy
from lorakit.rank.diffora import kept_count

INPUT = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(5))
TOY_MODULES = ["m0", "m1", "m2", "m3"]


# --- the spec's toy: only modules 1 and 3 can affect the loss ------------------------------------------

class Toy(nn.Module):
    """Four Linear(8 -> 8) whose outputs are summed; modules 0 and 2 receive x * 0."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        for name in TOY_MODULES:
            layer = nn.Linear(8, 8, bias=False)
            with torch.no_grad():
                layer.weight.copy_(0.3 * torch.randn(8, 8, generator=generator))
            self.add_module(name, layer)

    def forward(self, x):
        return self.m0(x * 0) + self.m1(x) + self.m2(x * 0) + self.m3(x)


def toy_loss(model, batch):
    return F.mse_loss(model(batch["x"]), batch["y"])


def toy_task(seed: int = 0):
    """(model with LoRA r=2, s=1 on all four modules, batch maker for target = frozen + x (R1 + R3)^T)."""
    model = Toy()
    generator = torch.Generator().manual_seed(seed + 1)
    planted = sum(0.5 * torch.outer(torch.randn(8, generator=generator), torch.randn(8, generator=generator))
                  for _ in range(2))
    frozen = Toy()

    def batch(split: str, generator: torch.Generator) -> dict:
        x = torch.randn(32, 8, generator=generator)
        with torch.no_grad():
            y = frozen(x) + x @ planted.T
        return {"x": x, "y": y, "split": split}

    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=2.0, target_modules=TOY_MODULES))
    return model, batch


def toy_options(**overrides) -> DiffoRAOptions:
    # the spec's recipe: Adam lr 1e-2 for beta (torch's default betas, no weight decay), 300 steps
    return DiffoRAOptions(**{"ratio": 0.5, "search_steps": 300, "gate_lr": 1e-2, "gate_betas": (0.9, 0.999),
                             "gate_weight_decay": 0.0, **overrides})


def run_toy_search(options: DiffoRAOptions, steps: int = 300, check_alternation: bool = False):
    torch.manual_seed(0)
    model, make_batch = toy_task()
    train_gen, val_gen = torch.Generator().manual_seed(10), torch.Generator().manual_seed(20)
    seen = []

    def recording_loss(model, batch):
        seen.append(batch["split"])
        return toy_loss(model, batch)

    policy = DiffoRA(options, val_batches=[make_batch("val", val_gen) for _ in range(steps)], loss_fn=recording_loss)
    policy.attach(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for step in range(steps):
        toy_loss(model, make_batch("train", train_gen)).backward()
        beta = policy.logits.detach().clone()
        optimizer.step()
        optimizer.zero_grad()
        if check_alternation:
            assert torch.equal(policy.logits, beta)  # (a) leaves beta bitwise unchanged
            factors = [p.detach().clone() for p in params]
        if step + 1 < steps:
            policy.gate_step()
        if check_alternation:
            assert all(torch.equal(p, q) for p, q in zip(params, factors))  # (b) leaves A, B bitwise unchanged
            assert all(p.grad is None for p in params)
    return model, policy, optimizer, params, seen, make_batch


@pytest.fixture(scope="module")
def searched():
    """The toy after 300 alternating steps (the last beta step is left to the tests)."""
    return run_toy_search(toy_options(), check_alternation=True)


def test_gate_one_is_plain_lora_and_gate_zero_is_the_frozen_model():
    model, make_batch = toy_task()
    with torch.no_grad():
        for param in lorakit.core.adapter_parameters(model).values():
            param.normal_()
    x = make_batch("val", torch.Generator().manual_seed(3))["x"]
    with torch.no_grad():
        plain = model(x)
        with lorakit.disabled(model):
            frozen = model(x)
    policy = DiffoRA(toy_options())
    policy.attach(model)
    with torch.no_grad():
        assert not torch.equal(model(x), plain)  # g = 0.5 at start: the gate acts
        policy.logits.fill_(float("inf"))
        assert torch.equal(model(x), plain)
        policy.logits.fill_(float("-inf"))
        assert torch.equal(model(x), frozen)


def test_search_raises_the_planted_modules_gates_and_leaves_the_others_at_half(searched):
    model, policy, optimizer, params, seen, make_batch = searched
    policy.gate_step()  # step 300's beta step
    gates = policy.gates()
    assert gates["m1"] > 0.6 and gates["m3"] > 0.6
    assert abs(gates["m0"] - 0.5) <= 1e-6 and abs(gates["m2"] - 0.5) <= 1e-6  # their beta gradient is exactly 0
    assert policy.gate_steps == 300
    assert seen == ["val"] * 300  # the beta steps only ever saw held-out batches
    x = make_batch("val", torch.Generator().manual_seed(99))
    assert toy_loss(model, x).item() < 1e-2


def test_discretisation_keeps_the_planted_modules_with_their_searched_weights(searched):
    model, policy, optimizer, params, seen, make_batch = searched
    kept_factors = {path: (a.lora_A.weight, a.lora_B.weight, a.lora_A.weight.detach().clone(),
                           a.lora_B.weight.detach().clone()) for path, a in policy.adapters.items()}
    assert {p for p in optimizer.state} == set(params)
    kept = policy.discretise(optimizer)
    assert sorted(kept) == ["m1", "m3"]
    # dropped modules have no LoRA at all; the count is K r (m + n)
    assert {path for path, _ in adapted_layers(model)} == {"m1", "m3"}
    assert isinstance(model.m0, nn.Linear) and isinstance(model.m2, nn.Linear)
    assert trainable_parameters(model)[0] == 2 * 2 * (8 + 8)
    # weight sharing: the same Parameters, bitwise the searched values
    for path in kept:
        a, b, a_value, b_value = kept_factors[path]
        layer = model.get_submodule(path)
        assert layer.adapters["default"].lora_A.weight is a and torch.equal(a, a_value)
        assert layer.adapters["default"].lora_B.weight is b and torch.equal(b, b_value)
    # the final stage's optimizer holds only the kept A, B (their state intact), no beta
    kept_params = {p for path in kept for p in kept_factors[path][:2]}
    assert set(optimizer.state) == kept_params
    assert {p for group in optimizer.param_groups for p in group["params"]} == kept_params
    assert policy.final_ranks() == {"m0": 0, "m1": 2, "m2": 0, "m3": 2}
    config = lorakit.core.adapter_configs(model)["default"]
    assert config.target_modules == ["m1", "m3"] and set(config.rank_pattern) == {"m1", "m3"}
    # the final stage trains on
    batch = make_batch("train", torch.Generator().manual_seed(7))
    toy_loss(model, batch).backward()
    optimizer.step()
    assert not torch.equal(kept_factors["m1"][1], kept_factors["m1"][3])


@pytest.mark.parametrize("fold", [True, False])
def test_kept_modules_compute_the_gated_search_function(fold):
    model, policy, *_, make_batch = run_toy_search(toy_options(fold_gates=fold), steps=60)
    x = make_batch("val", torch.Generator().manual_seed(4))["x"]
    with torch.no_grad():
        top = sorted(torch.argsort(policy.logits, descending=True)[:2].tolist())
        dropped = [i for i in range(4) if i not in top]
        searched_logits = policy.logits.clone()
        policy.logits[dropped] = float("-inf")  # the dropped branches' gates at 0
        if not fold:
            policy.logits[top] = float("inf")
        expected = model(x)
        policy.logits.copy_(searched_logits)
        assert policy.discretise() == [f"m{i}" for i in top]
        after = model(x)
    if fold:  # alpha_i = alpha g_i: equal up to fp32 rounding
        assert (after - expected).abs().max() <= 1e-6
        adapter = model.get_submodule(f"m{top[0]}").adapters["default"]
        assert adapter.alpha == pytest.approx(2.0 * policy.final_gates[f"m{top[0]}"])
    else:  # gate reset to 1: exactly plain LoRA with the searched factors
        assert torch.equal(after, expected)


def test_kept_count_is_ceil_ratio_times_modules():
    assert [kept_count(r, 10) for r in (0.05, 0.1, 0.25, 0.3, 0.5, 1.0)] == [1, 1, 3, 3, 5, 10]
    assert kept_count(0.3, 7) == 3 and kept_count(1e-6, 7) == 1


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.7])
def test_discretisation_keeps_ceil_ratio_modules_of_a_llama(ratio):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    shapes = {path: (layer.in_features, layer.out_features) for path, layer in adapted_layers(model)}
    policy = DiffoRA(DiffoRAOptions(ratio=ratio, search_steps=1))
    policy.attach(model)
    with torch.no_grad():
        policy.logits.copy_(torch.randn(len(shapes), generator=torch.Generator().manual_seed(1)))
    order = [policy.paths[i] for i in torch.argsort(policy.logits, descending=True).tolist()]
    kept = policy.discretise()
    k = math.ceil(ratio * 6)
    assert len(kept) == k and set(kept) == set(order[:k])
    assert trainable_parameters(model)[0] == sum(4 * sum(shapes[path]) for path in kept)


def test_configs_diffora_cannot_gate_are_refused():
    policy = DiffoRA()
    with pytest.raises(lorakit.ConfigError, match="DoRA"):
        policy.prepare_config(tiny_llama(), lorakit.LoraConfig(use_dora=True))
    with pytest.raises(lorakit.ConfigError, match="init='pissa'"):
        policy.prepare_config(tiny_llama(), lorakit.LoraConfig(init="pissa"))
    with pytest.raises(lorakit.ConfigError, match="LoRA adapter"):
        policy.prepare_config(tiny_llama(), lorakit.VeraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(lorakit.ConfigError, match="ratio"):
        build_rank_policy("diffora", {"ratio": 0.0})
    with pytest.raises(lorakit.ConfigError, match="search length"):
        DiffoRA().attach(lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"])))
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    policy = DiffoRA(DiffoRAOptions(search_steps=2))
    policy.attach(model)
    with pytest.raises(lorakit.ConfigError, match="held-out batches"):
        policy.gate_step()


def test_hold_out_splits_the_training_examples():
    policy = DiffoRA(DiffoRAOptions(val_fraction=0.25))
    examples = [{"n": i} for i in range(8)]
    train = policy.hold_out(examples, lambda rows: [row["n"] for row in rows], batch_size=1, seed=3)
    held = [n for batch in policy.val_batches for n in batch]
    assert len(held) == 2 and len(train) == 6
    assert sorted(held + [row["n"] for row in train]) == list(range(8))
    with pytest.raises(lorakit.ConfigError, match="none to train on"):
        DiffoRA(DiffoRAOptions(val_fraction=0.5)).hold_out(examples[:1], list, 1)


# --- a LLM: the result is plain LoRA on the kept modules, which lorakit and PEFT load ------------------

def lm_batches(count: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids} for ids in (torch.randint(0, 128, (2, 8), generator=generator)
                                                           for _ in range(count))]


def test_saved_adapter_is_plain_lora_on_the_kept_modules_that_lorakit_and_peft_load(tmp_path):
    torch.manual_seed(0)
    model = lorakit.inject(tiny_llama().train(), lorakit.LoraConfig(r=4, alpha=8,
                                                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    policy = DiffoRA(DiffoRAOptions(ratio=0.5, search_steps=3, gate_lr=1e-2), val_batches=lm_batches(3, 1))
    policy.attach(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step, batch in enumerate(lm_batches(5, 2)):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        policy.step(step, optimizer)
    assert policy.gate_steps == 3 and len(policy.kept) == 3
    assert len(set(policy.gates().values())) > 1  # the search moved the gates apart
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=INPUT).logits
    lorakit.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and sorted(saved["target_modules"]) == sorted(policy.kept)
    assert set(saved["rank_pattern"]) == set(policy.kept) == set(saved["alpha_pattern"])
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.{path}.lora_{f}.weight" for path in policy.kept for f in "AB"}  # no gates
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert {path for path, _ in adapted_layers(loaded)} == set(policy.kept)
    with torch.no_grad():
        assert (loaded(input_ids=INPUT).logits - expected).abs().max() <= 1e-6
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    lora_paths = {name.removeprefix("base_model.model.") for name, module in theirs.named_modules()
                  if hasattr(module, "lora_A") and "default" in module.lora_A}
    assert lora_paths == set(policy.kept)
    with torch.no_grad():
        assert (theirs(input_ids=INPUT).logits - expected).abs().max() <= 1e-5


# --- transformers.Trainer ---------------------------------------------------------------------------------

class Recorder(TrainerCallback):
    """After each step (placed after the policy): the optimizer's parameters and the kept factors."""

    def __init__(self, policy):
        self.policy, self.steps = policy, []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        params = {id(p) for group in inner.param_groups for p in group["params"]}
        state_ids = {id(p) for p in inner.state}
        factors = {path: a.lora_B.weight.detach().clone() for path, a in self.policy.adapters.items()}
        self.steps.append((params, state_ids, factors, self.policy.gate_steps))


def test_trainer_searches_then_trains_only_the_kept_modules(tmp_path):
    torch.manual_seed(0)
    model = lorakit.inject(tiny_llama().train(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    policy = DiffoRA(DiffoRAOptions(ratio=0.5, search_steps=3, gate_lr=1e-2), val_batches=lm_batches(2, 1))
    recorder = Recorder(policy)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, logging_steps=100)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (12, 8))]
    Trainer(model=model, args=args, train_dataset=data, callbacks=[policy, recorder]).train()
    assert policy.gate_steps == 3 and len(policy.kept) == 2
    kept_ids = {id(p) for path in policy.kept for p in model.get_submodule(path).adapters["default"].parameters()}
    assert len(recorder.steps[1][0]) == 8  # during the search: all 4 modules' A and B
    for params, state_ids, factors, gate_steps in recorder.steps[2:]:
        assert params == kept_ids and state_ids <= kept_ids
    assert [s[3] for s in recorder.steps] == [1, 2, 3, 3, 3, 3]
    for path in policy.kept:  # the kept modules keep training after the selection
        assert not torch.equal(recorder.steps[2][2][path], recorder.steps[5][2][path])
    shapes = {"q_proj": 32 + 32, "v_proj": 32 + 16}
    assert trainable_parameters(model)[0] == sum(4 * shapes[path.rsplit(".", 1)[1]] for path in policy.kept)


# --- lorakit train --rank-policy diffora --------------------------------------------------------------------

def test_lorakit_train_with_diffora_saves_lora_on_the_selected_modules(tmp_path, tiny_model_folder, capsys):
    run = tmp_path / "run"
    train_cli_with_rank_policy(run, tiny_model_folder, "diffora", 6, "--r", "2",
                               "--rank-policy-options", json.dumps({"search_steps": 2, "gate_lr": 1e-2}))
    out = capsys.readouterr().out
    assert "final ranks (diffora)" in out
    ranks = json.loads((run / "metrics.json").read_text())["train"]["ranks"]
    assert len(ranks) == 4 and sorted(ranks.values()) == [0, 0, 2, 2]
    kept = sorted(path for path, rank in ranks.items() if rank)
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == kept
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_folder), run / "adapter")
    for path, rank in ranks.items():
        layer = loaded.base_model.model.get_submodule(path)
        assert (hasattr(layer, "lora_A") and layer.lora_A["default"].weight.shape[0] == rank) == (rank > 0)
