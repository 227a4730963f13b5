"""LoRA-GA (`LoraConfig(init="lora-ga")`): the spec's verification recipe, the shared gradient
estimator, PEFT comparison (same gradient estimate; PEFT's port breaks the first-step identity),
save/load exact against the untouched base, undo on failure, and `lorakit train` end to end."""

from __future__ import annotations

import copy
import json
import math

import peft
import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

import lorakit
from lorakit.core.errors import ConfigError
from lorakit.core.inject import adapted_layers, adapter_parameters
from lorakit.init import lora_ga
from lorakit.init.gradients import estimate_gradients, targets_of
from lorakit.methods.lora import LoraConfig
from conftest import model_output, tiny_llama

M, N, R, ALPHA, GAMMA = 64, 48, 4, 16.0, 16.0
S = ALPHA / R
C = M ** 0.25 / math.sqrt(GAMMA)  # the "stable" scale of A and B


class LinearLoss(nn.Module):
    """One Linear W (M x N) whose loss is the linear L = <G, W_eff>: with inputs = I_N,
    proj(inputs) = W_eff^T, so sum(W_eff^T * G^T) = <G, W_eff> and dL/dW_eff = G exactly."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(N, M, bias=False)
        nn.init.normal_(self.proj.weight)

    def forward(self, inputs, labels):
        return {"loss": (self.proj(inputs) * labels.T).sum()}


def toy_gradient(seed: int = 1) -> torch.Tensor:
    return torch.randn(M, N, generator=torch.Generator().manual_seed(seed))


def best_rank(matrix: torch.Tensor, k: int) -> torch.Tensor:
    U, Sv, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return U[:, :k] @ torch.diag(Sv[:k]) @ Vh[:k]


def ga_toy(direction: str = "ArB2r", **options):
    model = LinearLoss()
    W0 = model.proj.weight.detach().clone()
    G = toy_gradient()
    config = LoraConfig(r=R, alpha=ALPHA, target_modules=["proj"], init="lora-ga",
                        init_options={"direction": direction, "svd_niter": None, **options})
    torch.manual_seed(3)  # "random" direction draws from the global RNG
    lorakit.inject(model, config, data=[{"inputs": torch.eye(N), "labels": G}], progress=False)
    adapter = model.proj.adapters["default"]
    return model, W0, G, adapter


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --- recipe 1-3: invariance and the first-step identity --------------------------------------
def test_init_leaves_the_effective_weight_unchanged():
    model, W0, _, adapter = ga_toy()
    effective = model.proj.weight_out_in() + adapter.scaling * adapter.lora_weight()
    assert (effective - W0).abs().max() < 1e-5
    assert adapter.scaling == S
    assert adapter.lora_B.weight.abs().max() > 0 and adapter.lora_A.weight.abs().max() > 0


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr", "random"])
def test_first_step_moves_the_weight_along_the_best_rank_2r_gradient(direction):
    model, _, G, adapter = ga_toy(direction)
    model(inputs=torch.eye(N), labels=G)["loss"].backward()
    A, B = adapter.lora_A.weight, adapter.lora_B.weight
    first_order = S * (B.grad @ A + B @ A.grad)
    assert relative(first_order, S ** 2 * C ** 2 * best_rank(G, 2 * R)) < 1e-5


def test_factors_are_the_official_singular_vector_blocks_without_singular_values():
    _, _, G, adapter = ga_toy("ArB2r")
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    A, B = adapter.lora_A.weight.double() / C, adapter.lora_B.weight.double() / C
    assert torch.allclose(A.abs(), Vh[:R].abs(), atol=1e-5)  # rows of V^T (up to sign), unit norm
    assert torch.allclose(B.abs(), U[:, R:2 * R].abs(), atol=1e-5)


def test_one_sgd_step_approximates_the_full_finetuning_step():
    model, _, G, adapter = ga_toy()
    A, B = adapter.lora_A.weight, adapter.lora_B.weight
    before = S * (B @ A).detach().double()
    model(inputs=torch.eye(N), labels=G)["loss"].backward()
    torch.optim.SGD([A, B], lr=1e-4).step()
    moved = S * (B @ A).detach().double() - before
    assert relative(moved, -1e-4 * S ** 2 * C ** 2 * best_rank(G, 2 * R)) < 1e-2


def peft_first_step(model: nn.Module, G: torch.Tensor) -> torch.Tensor:
    """PEFT's own LoRA-GA port on the same toy: the first-order weight move s (dB A + B dA)."""
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights="lora_ga",
                             lora_ga_config=peft.tuners.lora.config.LoraGAConfig())
    batch = {"inputs": torch.eye(N), "labels": G}
    peft.tuners.lora.preprocess_loraga(model, config, lambda: model(**batch)["loss"].backward())
    wrapped = peft.get_peft_model(model, config)
    wrapped(**batch)["loss"].backward()
    layer = wrapped.base_model.model.proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return S * (B.grad @ A + B @ A.grad)


def test_peft_port_breaks_the_identity_that_lorakit_keeps():
    """PEFT multiplies B by diag(S) and scales B only: its first step is not along G_2r."""
    torch.manual_seed(0)
    theirs = peft_first_step(LinearLoss(), toy_gradient()).double()
    target = best_rank(toy_gradient(), 2 * R)
    assert (theirs * target).sum() / (theirs.norm() * target.norm()) < 0.9  # 0.67 here
    model, _, G, adapter = ga_toy()
    model(inputs=torch.eye(N), labels=G)["loss"].backward()
    ours = S * (adapter.lora_B.weight.grad @ adapter.lora_A.weight + adapter.lora_B.weight @ adapter.lora_A.weight.grad)
    assert (ours.double() * target).sum() / (ours.double().norm() * target.norm()) > 1 - 1e-6


# --- options -------------------------------------------------------------------------------
def test_scales_gd_and_unit_and_norm_clip():
    _, _, _, unit = ga_toy(scale="unit")
    _, _, _, gd = ga_toy(scale="gd")
    _, _, _, stable = ga_toy()
    assert torch.allclose(unit.lora_A.weight * C, stable.lora_A.weight, atol=1e-6)
    assert torch.allclose(unit.lora_B.weight / S, gd.lora_B.weight, atol=1e-6)
    # norm_clip: a tiny gamma makes s B A larger than W; clipping shrinks it to max|W|.
    model, W0, _, clipped = ga_toy(stable_gamma=1e-6, norm_clip=True)
    offset = clipped.scaling * clipped.lora_weight()
    assert offset.abs().max() <= W0.abs().max() * (1 + 1e-5)
    assert (model.proj.weight_out_in() + offset - W0).abs().max() < 1e-3


def test_randomized_svd_default_matches_exact_on_a_gapped_gradient():
    U, _ = torch.linalg.qr(torch.randn(M, 2 * R + 4, generator=torch.Generator().manual_seed(5)))
    V, _ = torch.linalg.qr(torch.randn(N, 2 * R + 4, generator=torch.Generator().manual_seed(6)))
    G = U @ torch.diag(2.0 ** -torch.arange(2 * R + 4.0)) @ V.T
    A, B = lora_ga.lora_ga_factors(G, R, S, lora_ga.LoraGAOptions())  # svd_niter=4, q = 4r
    Ae, Be = lora_ga.lora_ga_factors(G, R, S, lora_ga.LoraGAOptions(svd_niter=None))
    assert torch.allclose(A.T @ A, Ae.T @ Ae, atol=1e-4) and torch.allclose(B @ B.T, Be @ Be.T, atol=1e-4)


def test_options_are_validated_and_rank_must_fit():
    with pytest.raises(ConfigError, match="direction"):
        LoraConfig(init="lora-ga", init_options={"direction": "BrA2r"})
    with pytest.raises(ConfigError, match="unknown|stable_gama"):
        LoraConfig(init="lora-ga", init_options={"stable_gama": 16})
    model = LinearLoss()
    W0 = model.proj.weight.detach().clone()
    with pytest.raises(ConfigError, match="2r <= min"):
        lorakit.inject(model, LoraConfig(r=30, target_modules=["proj"], init="lora-ga"),
                       data=[{"inputs": torch.eye(N), "labels": toy_gradient()}], progress=False)
    assert isinstance(model.proj, nn.Linear) and torch.equal(model.proj.weight, W0)
    with pytest.raises(ConfigError, match="data"):
        lorakit.inject(model, LoraConfig(r=4, target_modules=["proj"], init="lora-ga"))


# --- recipe 4: the gradient estimator ---------------------------------------------------------
class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(6, 10)
        self.down = nn.Linear(10, 3)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x, labels):
        return {"loss": ((self.down(torch.tanh(self.up(self.dropout(x)))) - labels) ** 2).mean()}


def mlp_batches(count: int = 3):
    gen = torch.Generator().manual_seed(2)
    return [{"x": torch.randn(5, 6, generator=gen), "labels": torch.randn(5, 3, generator=gen)} for _ in range(count)]


def test_estimator_returns_the_mean_of_per_batch_gradients_and_leaves_no_grad():
    reference = TwoLayer()
    per_batch = {"up": [], "down": []}
    for batch in mlp_batches():
        reference.zero_grad()
        reference(**batch)["loss"].backward()
        for name in per_batch:
            per_batch[name].append(getattr(reference, name).weight.grad.clone())
    model = TwoLayer().eval()
    lorakit.inject(model, LoraConfig(r=2, target_modules=["up", "down"]))
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    grads = estimate_gradients(model, targets_of(model, "default"), mlp_batches(), progress=False)
    for name in per_batch:
        assert (grads[name] - torch.stack(per_batch[name]).mean(0)).abs().max() < 1e-6
        assert grads[name].device.type == "cpu"
    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert not model.training and not any(layer.adapters_disabled for _, layer in adapted_layers(model))


def test_estimator_restores_every_flag_when_a_batch_fails():
    model = TwoLayer()
    lorakit.inject(model, LoraConfig(r=2, target_modules=["up", "down"]))
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    batches = mlp_batches(2) + [{"x": torch.randn(5, 6)}]  # no labels
    with pytest.raises(TypeError):
        estimate_gradients(model, targets_of(model, "default"), batches, progress=False)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(layer.adapters_disabled for _, layer in adapted_layers(model))


# --- recipe 5: save / load against the untouched base, undo on failure -------------------------
def llama_batches(count: int = 2):
    gen = torch.Generator().manual_seed(4)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 128, (2, 12), generator=gen)
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def test_trained_adapter_saves_exactly_against_the_untouched_base(tmp_path, input_ids):
    model = tiny_llama()
    base_out = model_output(tiny_llama(), input_ids)
    config = LoraConfig(r=4, alpha=8, use_rslora=True, init="lora-ga")
    lorakit.inject(model, config, data=llama_batches(), progress=False)
    assert (model_output(model, input_ids) - base_out).abs().max() < 1e-4  # identical at init
    params = list(adapter_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for batch in llama_batches(5):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()
    trained = model_output(model, input_ids)
    lorakit.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True  # the rank-2r plain LoRA
    ours = lorakit.load_adapter(tiny_llama(), tmp_path / "adapter")
    assert (model_output(ours, input_ids) - trained).abs().max() < 1e-4
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    assert (model_output(theirs, input_ids) - trained).abs().max() < 1e-4
    # merged into W_res == unmerged; unloading gives the untouched base back.
    lorakit.merge(model)
    assert (model_output(model, input_ids) - trained).abs().max() < 1e-4
    lorakit.unmerge(model)
    plain = lorakit.unload(model)
    assert (model_output(plain, input_ids) - base_out).abs().max() < 1e-4


def test_gradient_matches_peft_estimate():
    model = tiny_llama()
    batches = llama_batches(3)
    theirs_model = copy.deepcopy(model)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights="lora_ga",
                             lora_ga_config=peft.tuners.lora.config.LoraGAConfig())

    def train_step():
        for batch in batches:
            theirs_model(**batch).loss.backward()

    peft.tuners.lora.loraga.estimate_gradients(theirs_model, config, train_step)
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    ours = estimate_gradients(model, targets_of(model, "default"), batches, progress=False)
    for path, grad in ours.items():
        assert (grad - theirs_model.get_submodule(path)._peft_loraga_grad).abs().max() < 1e-6


def test_failure_while_rewriting_leaves_the_model_untouched(monkeypatch):
    model = tiny_llama()
    W0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    calls = []
    original = lora_ga._rewrite

    def failing(layer, adapter, A, B):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        original(layer, adapter, A, B)

    monkeypatch.setattr(lora_ga, "_rewrite", failing)
    with pytest.raises(RuntimeError, match="boom"):
        lorakit.inject(model, LoraConfig(r=4, init="lora-ga"), data=llama_batches(1), progress=False)
    assert not list(adapted_layers(model))
    for name, p in model.named_parameters():
        assert torch.allclose(p, W0[name], atol=1e-6), name
        assert p.requires_grad


# --- end to end ----------------------------------------------------------------------------------
def test_lorakit_train_with_lora_ga(tmp_path, tiny_model_folder, capsys):
    from lorakit.train import TrainConfig, train

    rows = [{"prompt": f"Repeat the word: w{i}", "response": f"w{i}"} for i in range(40)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = TrainConfig.from_dict(dict(
        model=str(tiny_model_folder), data=str(data), output_dir=str(tmp_path / "run"), max_steps=3, batch_size=4,
        save_steps=0, logging_steps=1, eval_examples=4, max_new_tokens=2, eval_fraction=0.2, learning_rate=1e-2,
        init_batches=2, adapter={"r": 4, "alpha": 8, "init": "lora-ga"}))
    metrics = train(config, progress=True)
    assert metrics["train"]["steps"] == 3
    assert "LoRA-GA: initialised" in capsys.readouterr().out
    run = tmp_path / "run" / "adapter"
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    ours = lorakit.load_adapter(LlamaForCausalLM.from_pretrained(tiny_model_folder), run)
    theirs = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model_folder), run)
    with torch.no_grad():
        assert (theirs(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max() <= 1e-5
