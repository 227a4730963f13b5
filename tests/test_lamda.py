"""LaMDA (arXiv 2406.12832): the B S A layer against its formula, and the progressive freezing of B
(schedule, true freezing under AdamW, dropped optimizer state) in a plain loop, under
transformers.Trainer and through `lorakit.train.train`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

import lorakit
from conftest import model_output, tiny_llama
from lorakit.core import adapted_layers
from lorakit.train.callbacks import LamdaFreezeCallback, LamdaFreezer, lamda_frozen_columns, training_callbacks

TARGETS = ["q_proj", "k_proj", "up_proj", "down_proj"]


def lamda_adapters(model):
    return [(layer, layer.adapters["default"]) for _, layer in adapted_layers(model)]


def perturb(model, seed=4):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in lamda_adapters(model):
            for param in (adapter.lamda_S, adapter.lamda_B):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def random_loss(model, step: int) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(100 + step))
    return model(input_ids=ids, labels=ids).loss


# --- the layer ---------------------------------------------------------------------------------

def test_adapted_model_equals_base_exactly_at_init(input_ids):
    base_out = model_output(tiny_llama(), input_ids)
    model = lorakit.inject(tiny_llama(), lorakit.LamdaConfig(r=4, target_modules=TARGETS))
    assert torch.equal(model_output(model, input_ids), base_out)


def test_forward_and_delta_weight_match_the_reference_formula():
    model = lorakit.inject(tiny_llama(), lorakit.LamdaConfig(r=4, alpha=8, target_modules=TARGETS))
    perturb(model)
    for layer, adapter in lamda_adapters(model):
        A, S, B = adapter.lamda_A.double(), adapter.lamda_S.double(), adapter.lamda_B.double()
        expected_dW = (8 / 4) * B @ S @ A
        assert torch.allclose(adapter.delta_weight(layer.base.weight).double(), expected_dW, atol=1e-6)
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            expected = x.double() @ (layer.base.weight.double() + expected_dW).T
            assert torch.allclose(layer(x).double(), expected, atol=1e-5)


def test_initialisation_follows_the_official_code():
    torch.manual_seed(0)
    model = lorakit.inject(tiny_llama(), lorakit.LamdaConfig(r=8, target_modules=TARGETS))
    for layer, adapter in lamda_adapters(model):
        # kaiming_uniform(a=sqrt(5)) draws from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        assert adapter.lamda_A.abs().max() <= 1 / math.sqrt(layer.in_features)
        assert adapter.lamda_A.abs().max() > 0.8 / math.sqrt(layer.in_features)
        assert adapter.lamda_S.abs().max() <= 1 / math.sqrt(8)
        assert torch.equal(adapter.lamda_B, torch.zeros(layer.out_features, 8))
        assert "lamda_A" not in dict(adapter.named_parameters())  # A is a buffer: no optimizer can move it
        assert adapter.lamda_S.requires_grad and adapter.lamda_B.requires_grad


def test_svd_init_uses_the_top_right_singular_vectors_of_W():
    model = lorakit.inject(tiny_llama(), lorakit.LamdaConfig(r=4, init="svd", target_modules=TARGETS))
    for layer, adapter in lamda_adapters(model):
        _, _, vh = torch.linalg.svd(layer.base.weight.double(), full_matrices=False)
        A = adapter.lamda_A.double()
        assert torch.allclose(A @ A.T, torch.eye(4, dtype=torch.float64), atol=1e-5)  # orthonormal rows
        # The top-4 directions, up to sign (the SVD runs in fp32, hence the tolerance).
        assert torch.allclose((A @ vh[:4].T).abs(), torch.eye(4, dtype=torch.float64), atol=1e-4)


def test_svd_init_rank_above_the_layer_size_is_a_clear_error():
    with pytest.raises(lorakit.ConfigError, match="r <= min"):
        lorakit.inject(tiny_llama(), lorakit.LamdaConfig(r=20, init="svd", target_modules=["k_proj"]))  # k_proj is 16x32


@pytest.mark.parametrize("fields, message", [
    (dict(eta=0.0), "eta=0.0"), (dict(eta=1.5), "eta=1.5"), (dict(init="pissa"), "init='pissa'"),
    (dict(freeze_end_step=0), "freeze_end_step=0"), (dict(r=0), "r=0"),
    (dict(freeze_end_step=10, code_compatible=True), "code_compatible"),
])
def test_invalid_config_values_are_named(fields, message):
    with pytest.raises(lorakit.ConfigError, match=message.replace("(", r"\(")):
        lorakit.LamdaConfig(**fields)


def test_merge_unmerge_restores_W_and_merged_equals_unmerged(input_ids):
    model = lorakit.inject(tiny_llama(), lorakit.LamdaConfig(r=4, alpha=8, target_modules=TARGETS))
    perturb(model)
    before = {id(layer): layer.base.weight.detach().clone() for layer, _ in lamda_adapters(model)}
    unmerged = model_output(model, input_ids)
    lorakit.merge(model)
    assert (model_output(model, input_ids) - unmerged).abs().max() < 1e-5
    lorakit.unmerge(model)
    for layer, _ in lamda_adapters(model):
        assert torch.allclose(layer.base.weight, before[id(layer)], atol=1e-6)


def test_random_A_is_saved_and_reloads_exactly_whatever_the_rng_state(tmp_path, input_ids):
    torch.manual_seed(123)
    model = lorakit.inject(tiny_llama(), lorakit.LamdaConfig(r=4, target_modules=TARGETS))
    perturb(model)
    expected = model_output(model, input_ids)
    lorakit.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {key.rsplit(".", 1)[1] for key in saved} == {"lamda_A", "lamda_S", "lamda_B"}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] is None and config["lorakit"]["method"] == "lamda" and config["eta"] == 0.3
    torch.manual_seed(999)  # a different A would be drawn at inject; the file's A must win
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(model_output(reloaded, input_ids), expected)


# --- the schedule --------------------------------------------------------------------------------

def test_paper_schedule_freezes_one_column_every_end_over_r_steps():
    r, T, end = 8, 100, 80
    for t in range(T + 1):
        assert lamda_frozen_columns(t, r, T, freeze_end_step=end) == min(r, t * r // end) == min(r, math.floor(t * r / 80))
    assert lamda_frozen_columns(80, r, T, freeze_end_step=end) == r and lamda_frozen_columns(79, r, T, freeze_end_step=end) == r - 1
    # Default end: eta * max_steps.
    assert [lamda_frozen_columns(t, 4, 100) for t in (7, 8, 15, 30, 31)] == [0, 1, 2, 4, 4]


def test_code_compatible_schedule_is_the_official_formula():
    r, T = 8, 100
    for G in (1, 4):
        for t in range(T + 1):
            official = int(t * G / (0.3 * T * G))  # gradual_freeze_B with total_iter = t * G micro-steps
            assert lamda_frozen_columns(t, r, T, code_compatible=True, gradient_accumulation_steps=G) == min(r, official)
    assert lamda_frozen_columns(T, r, T, code_compatible=True) < r  # the code never freezes B fully for r > 3


def test_freezer_applies_the_schedule_step_by_step():
    for config, expected in [
        (lorakit.LamdaConfig(r=8, freeze_end_step=80, target_modules=["q_proj"]), lambda t: min(8, math.floor(t * 8 / 80))),
        (lorakit.LamdaConfig(r=8, code_compatible=True, target_modules=["q_proj"]), lambda t: min(8, math.floor(t / (0.3 * 100)))),
    ]:
        model = lorakit.inject(tiny_llama(), config)
        freezer = LamdaFreezer(model, max_steps=100)
        for step in range(100):  # t = step + 1 is the optimizer step about to run
            freezer.begin_step(step)
            assert all(adapter.frozen_columns == expected(step + 1) for _, adapter in lamda_adapters(model))
            freezer.end_step()


def adamw_run(model, steps: int, freezer: LamdaFreezer | None = None, naive_grad_zeroing: bool = False):
    """AdamW (lr 1e-2, weight decay 0.1) on a random loss; B of every layer after each step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    history = [[adapter.lamda_B.detach().clone() for _, adapter in lamda_adapters(model)]]
    for step in range(steps):
        if freezer is not None:
            freezer.begin_step(step, optimizer)
        random_loss(model, step).backward()
        if naive_grad_zeroing:  # the official code's way: zero the gradient of the frozen columns
            t = lamda_frozen_columns(step + 1, 4, steps, freeze_end_step=8)
            for _, adapter in lamda_adapters(model):
                adapter.lamda_B.grad[:, :t] = 0
        optimizer.step()
        if freezer is not None:
            freezer.end_step()
        optimizer.zero_grad()
        history.append([adapter.lamda_B.detach().clone() for _, adapter in lamda_adapters(model)])
    return optimizer, history


def test_A_and_the_base_are_never_updated_by_adamw_with_weight_decay():
    model = lorakit.inject(tiny_llama(), lorakit.LamdaConfig(r=4, target_modules=TARGETS))
    A_before = [adapter.lamda_A.clone() for _, adapter in lamda_adapters(model)]
    W_before = [layer.base.weight.clone() for layer, _ in lamda_adapters(model)]
    S_before = [adapter.lamda_S.detach().clone() for _, adapter in lamda_adapters(model)]
    adamw_run(model, 20)  # the optimizer is given every parameter of the model
    for (layer, adapter), A, W, S in zip(lamda_adapters(model), A_before, W_before, S_before):
        assert torch.equal(adapter.lamda_A, A) and torch.equal(layer.base.weight, W)
        assert not torch.equal(adapter.lamda_S, S)


def test_frozen_columns_stay_bitwise_unchanged_under_adamw_and_trainable_count_drops_to_r_squared():
    config = lorakit.LamdaConfig(r=4, freeze_end_step=8, target_modules=TARGETS)
    model = lorakit.inject(tiny_llama(), config)
    outs = [layer.out_features for layer, _ in lamda_adapters(model)]
    assert lorakit.trainable_parameters(model)[0] == sum(16 + out * 4 for out in outs)
    freezer = LamdaFreezer(model, max_steps=10)
    optimizer, history = adamw_run(model, 10, freezer)
    for t in range(1, 11):  # the t-th step leaves its frozen columns exactly as they were
        n = lamda_frozen_columns(t, 4, 10, freeze_end_step=8)
        for before, after in zip(history[t - 1], history[t]):
            assert torch.equal(after[:, :n], before[:, :n])
            if n < 4:
                assert not torch.equal(after[:, n:], before[:, n:])  # the others still train
    # Fully frozen: only S trains, and the optimizer keeps no state for B.
    assert lorakit.trainable_parameters(model)[0] == len(outs) * 4 * 4
    B_params = {adapter.lamda_B for _, adapter in lamda_adapters(model)}
    assert not B_params & set(optimizer.state)
    assert all(adapter.lamda_S in optimizer.state for _, adapter in lamda_adapters(model))


def test_a_fresh_freezer_resumes_the_schedule_exactly(tmp_path):
    """What `lorakit train --resume` does: reload the adapter and optimizer state, start a new freezer."""
    config = lorakit.LamdaConfig(r=4, dropout=0.0, freeze_end_step=6, target_modules=["q_proj", "up_proj"])
    straight = lorakit.inject(tiny_llama(), config)
    adamw_run(straight, 8, LamdaFreezer(straight, max_steps=8))

    first = lorakit.inject(tiny_llama(), config)
    optimizer, _ = adamw_run(first, 4, LamdaFreezer(first, max_steps=8))
    lorakit.save_adapter(first, tmp_path)
    resumed = lorakit.load_adapter(tiny_llama(), tmp_path, trainable=True)
    resumed.train()
    new_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.1)
    new_optimizer.load_state_dict(optimizer.state_dict())
    freezer = LamdaFreezer(resumed, max_steps=8)
    for step in range(4, 8):  # resumed with 2 columns frozen, fully frozen at step 6
        freezer.begin_step(step, new_optimizer)
        random_loss(resumed, step).backward()
        new_optimizer.step()
        freezer.end_step()
        new_optimizer.zero_grad()
    for (_, ours), (_, reference) in zip(lamda_adapters(resumed), lamda_adapters(straight)):
        assert torch.equal(ours.lamda_B, reference.lamda_B) and torch.equal(ours.lamda_S, reference.lamda_S)


def test_zeroing_the_gradient_alone_does_not_freeze_columns_under_adamw():
    """Why the freezer restores columns: the official code's gradient zeroing lets AdamW move them."""
    model = lorakit.inject(tiny_llama(), lorakit.LamdaConfig(r=4, target_modules=TARGETS))
    _, history = adamw_run(model, 6, naive_grad_zeroing=True)
    t = lamda_frozen_columns(6, 4, 6, freeze_end_step=8)  # 3 columns "frozen" at step 6
    assert t == 3 and not torch.equal(history[6][0][:, :t], history[5][0][:, :t])


def test_freezer_needs_a_lamda_adapter():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(lorakit.ConfigError, match="no LaMDA adapter"):
        LamdaFreezer(model, max_steps=10)
    assert training_callbacks("lora") == [] and isinstance(training_callbacks("lamda")[0], LamdaFreezeCallback)


# --- under transformers.Trainer -------------------------------------------------------------------

class RecordB(TrainerCallback):
    def __init__(self, model):
        self.model, self.history = model, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.history.append([adapter.lamda_B.detach().clone() for _, adapter in lamda_adapters(self.model)])

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.history.append([adapter.lamda_B.detach().clone() for _, adapter in lamda_adapters(self.model)])
        self.optimizer = optimizer


def test_callback_freezes_columns_under_transformers_trainer_with_accumulation(tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LamdaConfig(r=4, dropout=0.0, freeze_end_step=6, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (40, 8), generator=generator)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=1.0,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=100)
    recorder = RecordB(model)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[LamdaFreezeCallback(), recorder]).train()
    assert len(recorder.history) == 9
    for t in range(1, 9):
        n = lamda_frozen_columns(t, 4, 8, freeze_end_step=6)
        for before, after in zip(recorder.history[t - 1], recorder.history[t]):
            assert torch.equal(after[:, :n], before[:, :n])
            if n < 4:
                assert not torch.equal(after[:, n:], before[:, n:])
    assert not any(adapter.lamda_B.requires_grad for _, adapter in lamda_adapters(model))
    assert not {adapter.lamda_B for _, adapter in lamda_adapters(model)} & set(recorder.optimizer.state)


def test_lorakit_train_installs_the_freezing_callback_for_lamda(tmp_path, tiny_model_folder):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Repeat the word: w{i}", "response": f"w{i}"}) for i in range(40)))
    from lorakit.train import TrainConfig, train

    config = TrainConfig.from_dict(dict(
        model=str(tiny_model_folder), data=str(data), output_dir=str(tmp_path / "run"), method="lamda", max_steps=4,
        batch_size=4, save_steps=0, logging_steps=1, eval_examples=2, max_new_tokens=2, learning_rate=1e-2,
        adapter={"r": 4, "alpha": 8, "freeze_end_step": 4}))
    metrics = train(config, progress=False)
    assert metrics["train"]["trainable_parameters"] == sum(16 + 4 * out for out in (32, 16, 16, 32, 64, 64, 32)) * 2
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    Bs = [value for key, value in saved.items() if key.endswith("lamda_B")]
    assert len(Bs) == 14
    # The first step already freezes column 0 (1 * 4 // 4 = 1), so it keeps its initial zeros;
    # column 1 moved in step 1 only, column 3 in steps 1-3: without the callback all would move.
    assert all(torch.equal(B[:, 0], torch.zeros_like(B[:, 0])) for B in Bs)
    assert all(B[:, 1:].abs().sum() > 0 for B in Bs)
