"""LoRA-SB (`LoraXSConfig(init="lora-sb")`): the spec's verification recipe (items 2-7), the
update functions, save/load without data, and that LoRA-XS's weight SVD leaves the factors alone."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.errors import ConfigError
from lorakit.core.inject import adapted_layers, trainable_parameters
from lorakit.init import lora_sb
from lorakit.init.lora_sb import LoraSBOptions, first_update
from lorakit.methods.loraxs import LoraXSConfig

OUT, IN, R = 48, 64, 4


class LinearLoss(nn.Module):
    """L = <G, W_eff> through one Linear (inputs = I_IN): dL/dW_eff = G exactly."""

    def __init__(self, out_features: int = OUT, in_features: int = IN, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(in_features, out_features, bias=False, dtype=torch.float64)
        nn.init.normal_(self.proj.weight)

    def forward(self, inputs, labels):
        return {"loss": (self.proj(inputs) * labels.T).sum()}


def gradient(seed: int = 1) -> torch.Tensor:
    return torch.randn(OUT, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def sb_toy(update: str = "gradient", svd_niter=None, r: int = R, **options):
    model = LinearLoss()
    W0 = model.proj.weight.detach().clone()
    G = gradient()
    config = LoraXSConfig(r=r, target_modules=["proj"], init="lora-sb",
                          init_options={"update": update, "svd_niter": svd_niter, **options})
    lorakit.inject(model, config, data=[{"inputs": torch.eye(IN, dtype=torch.float64), "labels": G}], progress=False)
    return model, W0, G, model.proj.adapters["default"]


def tail_norm(matrix: torch.Tensor, r: int) -> float:
    singular = torch.linalg.svdvals(matrix)
    return singular[r:].pow(2).sum().sqrt().item()


# --- item 2: the factors are the truncated SVD of the first update --------------------------------
@pytest.mark.parametrize("svd_niter, tolerance", [(None, 1e-6), (10, 1e-3)])
def test_factors_are_the_best_rank_r_approximation_of_the_first_update(svd_niter, tolerance):
    _, _, G, adapter = sb_toy("gradient", svd_niter, lr=0.5, warmup_ratio=1.0, total_steps=1)
    update = -0.5 * G
    B, Rm, A = adapter.lora_B.weight, adapter.lora_latent.weight, adapter.lora_A.weight
    error = (update - B @ Rm @ A).norm().item()
    assert abs(error - tail_norm(update, R)) / tail_norm(update, R) < tolerance
    eye = torch.eye(R, dtype=torch.float64)
    assert torch.allclose(B.T @ B, eye, atol=1e-10) and torch.allclose(A @ A.T, eye, atol=1e-10)
    assert torch.allclose(Rm, torch.diag(torch.diagonal(Rm)))  # R = diag(S_r)
    assert adapter.scaling == 1.0


def test_init_takes_the_approximate_first_step_and_svd_of_w_does_not_overwrite_it():
    model, W0, G, adapter = sb_toy("sign")
    eta = LoraSBOptions().eta_eff
    U, S, Vh = torch.linalg.svd(-eta * torch.sign(G), full_matrices=False)
    best = U[:, :R] @ torch.diag(S[:R]) @ Vh[:R]
    assert torch.allclose(adapter.delta_weight(W0), best, atol=1e-12 + 1e-8 * best.abs().max())
    assert torch.equal(model.proj.weight_out_in(), W0)  # W itself is never modified
    x = torch.randn(3, IN, dtype=torch.float64)
    assert not torch.allclose(model.proj(x), x @ W0.T)  # deliberately not the base model


# --- item 3: trainable count, frozen factors ---------------------------------------------------
def test_only_r_squared_parameters_train_and_b_a_stay_bitwise_frozen():
    model, _, G, adapter = sb_toy()
    assert trainable_parameters(model)[0] == R * R
    assert not adapter.lora_A.weight.requires_grad and not adapter.lora_B.weight.requires_grad
    A0, B0 = adapter.lora_A.weight.clone(), adapter.lora_B.weight.clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(inputs=torch.eye(IN, dtype=torch.float64), labels=G)["loss"].backward()
        optimizer.step()
    assert torch.equal(adapter.lora_A.weight, A0) and torch.equal(adapter.lora_B.weight, B0)


# --- item 4: gradient identity -------------------------------------------------------------------
def test_gradient_of_r_is_the_projected_weight_gradient():
    model, _, G, adapter = sb_toy()
    model(inputs=torch.eye(IN, dtype=torch.float64), labels=G)["loss"].backward()
    B, A = adapter.lora_B.weight, adapter.lora_A.weight
    expected = adapter.scaling * B.T @ G @ A.T
    assert (adapter.lora_latent.weight.grad - expected).abs().max() < 1e-10


# --- item 5: the silver-bullet toy ---------------------------------------------------------------
class Regression(nn.Module):
    def __init__(self, W0: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(W0.shape[1], W0.shape[0], bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.proj.weight.copy_(W0)

    def forward(self, x, labels):
        return {"loss": 0.5 * (self.proj(x) - labels).pow(2).sum() / x.shape[0]}


def fit(config: LoraXSConfig, W0, batch, steps: int = 500, lr: float = 0.1) -> float:
    model = Regression(W0)
    lorakit.inject(model, config, data=[batch] if config.init == "lora-sb" else None, progress=False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch)["loss"]
        loss.backward()
        optimizer.step()
    return model(**batch)["loss"].item()


def test_silver_bullet_toy_lora_sb_reaches_the_teacher_and_lora_xs_does_not():
    gen = torch.Generator().manual_seed(0)
    out_f, in_f, r, n = 24, 32, 4, 512
    Q, _ = torch.linalg.qr(torch.randn(n, in_f, dtype=torch.float64, generator=gen))
    X = Q * n ** 0.5  # X^T X = n I
    W0 = torch.randn(out_f, in_f, dtype=torch.float64, generator=gen)
    target = 0.25 * torch.randn(out_f, r, dtype=torch.float64, generator=gen) @ torch.randn(r, in_f, dtype=torch.float64, generator=gen)
    batch = {"x": X, "labels": X @ (W0 + target).T}
    sb = LoraXSConfig(r=r, target_modules=["proj"], init="lora-sb",
                      init_options={"update": "gradient", "lr": 0.5, "warmup_ratio": 1.0, "total_steps": 1, "svd_niter": None})
    xs = LoraXSConfig(r=r, target_modules=["proj"], latent_init="gaussian")
    torch.manual_seed(0)
    assert fit(sb, W0, batch) < 1e-6
    assert fit(xs, W0, batch) > 10


# --- item 6: merge / unmerge ---------------------------------------------------------------------
def test_merge_equals_unmerged_and_unmerge_restores_w():
    model, W0, _, _ = sb_toy("sign")
    x = torch.randn(5, IN, dtype=torch.float64)
    with torch.no_grad():
        unmerged = model.proj(x)
        lorakit.merge(model)
        assert (model.proj(x) - unmerged).abs().max() < 1e-10
        lorakit.unmerge(model)
    assert (model.proj.weight_out_in() - W0).abs().max() < 1e-12


# --- item 7: the sign update and eta_eff --------------------------------------------------------
def test_sign_update_is_minus_eta_eff_times_the_sign():
    options = LoraSBOptions(lr=2e-4, warmup_ratio=0.05, total_steps=400)
    assert options.eta_eff == 2e-4 / (0.05 * 400)
    G = torch.tensor([[3.0, -0.001, 0.0], [-7.0, 1e-9, 2.0]])
    expected = -options.eta_eff * torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 1.0]])
    assert torch.equal(first_update(G, options), expected)
    assert torch.equal(first_update(G, LoraSBOptions(update="gradient", lr=2e-4, warmup_ratio=0.05, total_steps=400)),
                       -options.eta_eff * G)


def test_update_functions_are_pluggable(monkeypatch):
    monkeypatch.setitem(lora_sb.UPDATE_FUNCTIONS, "double", lambda grad, eta: -2 * eta * grad)
    _, _, G, adapter = sb_toy("double", lr=0.5, warmup_ratio=1.0, total_steps=1, r=IN if IN < OUT else OUT)
    B, Rm, A = adapter.lora_B.weight, adapter.lora_latent.weight, adapter.lora_A.weight
    assert torch.allclose(B @ Rm @ A, -1.0 * G, atol=1e-10)  # full rank: exact


def test_options_and_config_are_validated():
    with pytest.raises(ConfigError, match="update"):
        LoraXSConfig(r=4, init="lora-sb", init_options={"update": "adam"})
    with pytest.raises(ConfigError, match="warmup_ratio"):
        LoraXSConfig(r=4, init="lora-sb", init_options={"warmup_ratio": 0.0})
    with pytest.raises(ConfigError, match="alpha"):
        LoraXSConfig(r=4, alpha=16, init="lora-sb")
    with pytest.raises(ConfigError, match="takes no options"):
        LoraXSConfig(r=4, init_options={"update": "sign"})
    with pytest.raises(ConfigError, match="data"):
        lorakit.inject(LinearLoss(), LoraXSConfig(r=4, target_modules=["proj"], init="lora-sb"))


# --- save / load: the file holds B, R, A; loading needs no data -----------------------------------
def test_save_load_round_trip_needs_no_data(tmp_path):
    model, W0, G, adapter = sb_toy("sign")
    with torch.no_grad():
        adapter.lora_latent.weight.add_(0.01)  # "trained"
    x = torch.randn(4, IN, dtype=torch.float64)
    with torch.no_grad():
        expected = model.proj(x)
    lorakit.save_adapter(model, tmp_path / "sb")
    saved = json.loads((tmp_path / "sb" / "adapter_config.json").read_text())
    assert saved["init"] == "lora-sb" and saved["init_options"]["update"] == "sign"
    fresh = LinearLoss()
    assert torch.equal(fresh.proj.weight, W0)
    lorakit.load_adapter(fresh, tmp_path / "sb")
    with torch.no_grad():
        assert (fresh.proj(x) - expected).abs().max() < 1e-12
    assert torch.equal(fresh.proj.weight_out_in(), W0)


def test_on_a_transformer_the_init_prints_its_wall_time(capsys):
    from conftest import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    lorakit.inject(model, LoraXSConfig(r=4, init="lora-sb"), data=[{"input_ids": ids, "labels": ids}] * 2)
    assert "LoRA-SB: initialised 14 layers" in capsys.readouterr().out
    assert trainable_parameters(model)[0] == 14 * 16
    for _, layer in adapted_layers(model):
        B = layer.adapters["default"].lora_B.weight
        assert torch.allclose(B.T @ B, torch.eye(4), atol=1e-5)


def test_a_training_run_gives_lora_sb_its_own_learning_rate_and_schedule():
    from lorakit.init.lora_sb import LoraSBOptions
    from lorakit.train import TrainConfig
    from lorakit.train.runner import run_init_options

    config = TrainConfig(learning_rate=3e-3, max_steps=50, warmup_steps=5)
    assert run_init_options(LoraSBOptions, config) == {"lr": 3e-3, "total_steps": 50, "warmup_ratio": 0.1}
    assert LoraSBOptions(**run_init_options(LoraSBOptions, config)).eta_eff == pytest.approx(3e-3 / 5)
    from lorakit.init.eva import EvaOptions

    assert run_init_options(EvaOptions, config) == {}
