"""LISA (arXiv 2403.17919): the spec's verification recipe on a toy model, optimizer-state freeing,
seeded sampling, transformers.Trainer and `lorakit train` integration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

import lorakit
from lorakit import LISA, ConfigError, LoraConfig
from lorakit.optim.lisa import find_blocks, lisa_draw

from conftest import tiny_gpt2, tiny_llama

N_LAYERS, GAMMA, K = 8, 2, 3


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return x + self.norm(self.linear(x))


class Toy(nn.Module):
    """Embedding(50, 16) -> 8 blocks in `layers` -> final LayerNorm -> Linear head 16 -> 50."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.ModuleList(Block() for _ in range(N_LAYERS))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.layers:
            x = block(x)
        return self.head(self.norm(x))

    def outside(self) -> list[nn.Parameter]:
        return [*self.embed.parameters(), *self.norm.parameters(), *self.head.parameters()]


def toy_step(model: Toy, optimizer: torch.optim.Optimizer, step: int, set_to_none: bool = True) -> None:
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(step))
    logits = model(ids[:, :-1])
    nn.functional.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=set_to_none)


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(module: nn.Module, saved: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, s) for p, s in zip(module.parameters(), saved))


def state_params(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for p, s in optimizer.state.items() if s}


def expected_state(model: Toy, active) -> set[int]:
    return {id(p) for p in model.outside()} | {id(p) for i in active for p in model.layers[i].parameters()}


def test_recipe_exactly_gamma_blocks_per_period_frozen_blocks_unchanged_and_state_only_for_active():
    model = Toy()
    lisa = LISA(model, active_layers=GAMMA, interval=K, seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    switches, sets = [], []
    for step in range(12):
        if lisa.begin_step(step, optimizer):
            switches.append(step)
            period_start = [snapshot(block) for block in model.layers], snapshot(model.head)
        # 1. exactly gamma blocks fully trainable, the others fully frozen; outside always trainable
        flags = [{p.requires_grad for p in block.parameters()} for block in model.layers]
        assert all(len(f) == 1 for f in flags)
        active = tuple(i for i, f in enumerate(flags) if f == {True})
        assert len(active) == GAMMA and active == lisa.active
        assert all(p.requires_grad for p in model.outside())
        sets.append(active)
        # zero (not None) gradients: a frozen block must still be skipped by AdamW (no decay, no state)
        toy_step(model, optimizer, step, set_to_none=False)
        # 4. optimizer state: E, final norm, H and the active blocks only
        assert state_params(optimizer) == expected_state(model, active)
        if step % K == K - 1:  # 3. end of a period: frozen blocks bitwise unchanged, active ones and head moved
            blocks_before, head_before = period_start
            for i, block in enumerate(model.layers):
                assert same(block, blocks_before[i]) == (i not in active), (step, i)
            assert not same(model.head, head_before)
    # 2. redrawn at t = 0, 3, 6, 9 only (4 draws), constant inside each period, the period's seeded draw
    assert switches == [0, 3, 6, 9]
    assert sets == [lisa_draw(N_LAYERS, GAMMA, t // K, seed=3) for t in range(12)]
    assert len(set(sets)) > 1


def periods_with_reactivation(seed: int, periods: int = 4):
    """(block, period) where the block is active again after at least one period frozen, and
    (block, period) where a block active for exactly the one period before stays active across the
    switch; None when the seed has neither."""
    draws = [lisa_draw(N_LAYERS, GAMMA, i, seed) for i in range(periods)]
    back = [(b, i) for i in range(2, periods) for b in draws[i] if b not in draws[i - 1] and any(b in d for d in draws[:i - 1])]
    kept = [(b, i) for i in range(1, periods) for b in draws[i] if b in draws[i - 1] and (i == 1 or b not in draws[i - 2])]
    return (back[0], kept[0]) if back and kept else None


def test_reactivated_block_starts_with_fresh_moments_and_a_kept_block_keeps_them():
    seed = next(s for s in range(1000) if periods_with_reactivation(s))
    (back, back_period), (kept, kept_period) = periods_with_reactivation(seed)
    model = Toy()
    lisa = LISA(model, active_layers=GAMMA, interval=K, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(4 * K):
        lisa.begin_step(step, optimizer)
        toy_step(model, optimizer, step)
        if step == back_period * K:  # first update after re-activation: Adam step 1, not a resumed count
            assert float(optimizer.state[model.layers[back].linear.weight]["step"]) == 1
        if step == kept_period * K:  # active in the previous period too: its moments continue
            assert float(optimizer.state[model.layers[kept].linear.weight]["step"]) == K + 1
        assert float(optimizer.state[model.head.weight]["step"]) == step + 1  # always-on: never reset


def state_numel(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)


@pytest.mark.parametrize("keep_stale_state", [False, True])
def test_optimizer_state_stays_bounded_over_many_periods_unless_stale_state_is_kept(keep_stale_state):
    model = Toy()
    lisa = LISA(model, active_layers=GAMMA, interval=1, seed=0, keep_stale_state=keep_stale_state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    block = sum(p.numel() for p in model.layers[0].parameters())
    bound = 2 * (sum(p.numel() for p in model.outside()) + GAMMA * block)  # exp_avg + exp_avg_sq
    sizes = []
    for step in range(40):
        lisa.begin_step(step, optimizer)
        toy_step(model, optimizer, step)
        sizes.append(state_numel(optimizer))
        assert all(p.grad is None for i, b in enumerate(model.layers) if i not in lisa.active for p in b.parameters())
    if keep_stale_state:  # LMFlow's callback: grows to the full-training state
        assert sizes[-1] == 2 * sum(p.numel() for p in model.parameters()) > bound
    else:
        assert max(sizes) == bound


def test_sampling_is_uniform_without_duplicates():
    counts = np.zeros(N_LAYERS)
    for period in range(4000):
        draw = lisa_draw(N_LAYERS, GAMMA, period, seed=7)
        assert len(draw) == len(set(draw)) == GAMMA
        counts[list(draw)] += 1
    frequency = counts / 4000
    assert frequency.min() >= 0.22 and frequency.max() <= 0.28


def test_bernoulli_paper_mode_has_gamma_active_blocks_in_expectation_only():
    sizes = np.array([len(lisa_draw(N_LAYERS, GAMMA, period, seed=7, sampling="bernoulli")) for period in range(4000)])
    assert abs(sizes.mean() - GAMMA) <= 0.1
    assert (sizes == 0).any() and (sizes >= 3).any()


def test_draws_are_reproducible_from_the_seed_and_a_resumed_run_draws_the_same_blocks():
    assert [lisa_draw(30, 2, i, seed=5) for i in range(20)] == [lisa_draw(30, 2, i, seed=5) for i in range(20)]
    assert [lisa_draw(30, 2, i, seed=5) for i in range(20)] != [lisa_draw(30, 2, i, seed=6) for i in range(20)]
    straight = LISA(Toy(), GAMMA, K, seed=1)
    for step in range(8):
        straight.begin_step(step)
    resumed = LISA(Toy(), GAMMA, K, seed=1)
    assert resumed.begin_step(7) and resumed.active == straight.active == lisa_draw(N_LAYERS, GAMMA, 2, seed=1)


def test_restore_makes_every_managed_parameter_trainable_again():
    model = Toy()
    lisa = LISA(model, GAMMA, K)
    lisa.begin_step(0)
    assert sum(p.requires_grad for p in model.parameters()) < len(list(model.parameters()))
    lisa.restore()
    assert all(p.requires_grad for p in model.parameters())


def test_on_an_adapter_model_only_adapter_parameters_are_switched():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "default")
    before = {name for name, p in model.named_parameters() if p.requires_grad}
    lisa = LISA(model, active_layers=1, interval=2, seed=0)
    assert lisa.blocks is model.model.layers
    lisa.begin_step(0)
    now = {name for name, p in model.named_parameters() if p.requires_grad}
    (active,) = lisa.active
    assert now == {n for n in before if n.startswith(f"model.layers.{active}.")}
    assert now and all("lora_" in n for n in now)  # base weights, embeddings and head stay frozen


def test_blocks_are_found_or_named_with_clear_errors():
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    assert find_blocks(llama) is llama.model.layers and find_blocks(gpt2) is gpt2.h
    assert find_blocks(llama, "model.layers") is llama.model.layers
    with pytest.raises(ConfigError, match="does not name a ModuleList.*model.layers"):
        find_blocks(llama, "model.blocks")
    with pytest.raises(ConfigError, match="more than the model's 2 blocks"):
        LISA(llama, active_layers=3)
    with pytest.raises(ConfigError, match="interval=0"):
        LISA(llama, interval=0)
    frozen = tiny_llama().requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to sample"):
        LISA(frozen)


def test_an_optimizer_missing_block_parameters_is_an_error():
    model = Toy()
    lisa = LISA(model, GAMMA, K)
    lisa.begin_step(0)
    late = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])  # built after the freeze
    with pytest.raises(ConfigError, match="does not hold 24 block parameter"):
        lisa.begin_step(3, late)


class Batches(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.randint(0, 128, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


class StateCheck(TrainerCallback):
    """After each optimizer step: state only for the always-on parameters and LISA's active blocks."""

    def __init__(self, lisa: LISA, outside: set[int]):
        self.lisa, self.outside, self.seen = lisa, outside, []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        blocks = {id(p) for i in self.lisa.active for p in model.model.layers[i].parameters()}
        assert state_params(optimizer.optimizer) == self.outside | blocks
        self.seen.append(self.lisa.active)


def test_full_parameter_lisa_in_transformers_trainer(tmp_path):
    model = tiny_llama().train()
    outside = {id(p) for n, p in model.named_parameters() if not n.startswith("model.layers.")}
    lisa = LISA(active_layers=1, interval=2, seed=4)  # bound by on_train_begin
    check = StateCheck(lisa, outside)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True)
    Trainer(model=model, args=args, train_dataset=Batches(), callbacks=[lisa, check]).train()
    assert check.seen == [lisa_draw(2, 1, step // 2, seed=4) for step in range(6)]
    assert all(p.requires_grad for p in model.parameters())  # restored at on_train_end


def test_lorakit_train_with_lisa_trains_only_the_sampled_layers_adapters(tmp_path, tiny_model_folder):
    from lorakit.train import TrainConfig, train

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Repeat the word: w{i}", "response": f"w{i}"}) for i in range(40)))
    model, tokenizer = lorakit.models.load(str(tiny_model_folder))
    config = TrainConfig.from_dict(dict(
        model=str(tiny_model_folder), data=str(data), output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2,
        save_steps=0, logging_steps=1, eval_examples=2, max_new_tokens=1, eval_batch_size=2, eval_fraction=0.2, learning_rate=1e-2,
        adapter={"r": 4, "alpha": 8}, lisa_layers=1, lisa_interval=2))  # one period: one layer trains
    metrics = train(config, progress=False, model=model, tokenizer=tokenizer)
    assert metrics["train"]["steps"] == 2
    (trained,) = lisa_draw(2, 1, 0, seed=config.seed)
    saved = load_file(Path(config.output_dir) / "adapter" / "adapter_model.safetensors")
    for key, value in saved.items():
        if "lora_B" in key:  # B starts at zero: only the sampled layer's B moved
            assert bool(value.abs().sum() > 0) == (f"layers.{trained}." in key), key
    with pytest.raises(ConfigError, match="lisa_layers=-1"):
        TrainConfig(lisa_layers=-1).validate()
