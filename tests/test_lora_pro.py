"""LoRA-Pro (arXiv 2407.18242): the spec's verification recipe, the AdamW form against a reference
written from the paper's equations, the choice of parameters, and `lorakit train --optimizer lora-pro`."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import lorakit
from conftest import tiny_llama
from lorakit.optim import build_optimizer, registered_optimizers
from lorakit.optim.lora_pro import LoRAPro, adjusted_gradients, equivalent_gradient, solve_sylvester

M, N, R, S = 12, 10, 3, 2.0  # the recipe: W is m x n, rank r, scaling s
TOL = 1e-10


def recipe(seed: int = 0):
    """B, A, g ~ N(0, 1) in float64 and the LoRA gradients autograd would give for g = dL/dW."""
    gen = torch.Generator().manual_seed(seed)
    B, A, g = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((M, R), (R, N), (M, N)))
    return A, B, g, S * B.T @ g, S * g @ A.T


def projections(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """P_B = B (BᵀB)⁻¹ Bᵀ (m x m) and P_A = Aᵀ (AAᵀ)⁻¹ A (n x n), with exact inverses."""
    return B @ torch.linalg.inv(B.T @ B) @ B.T, A.T @ torch.linalg.inv(A @ A.T) @ A


def kron_sylvester(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """P X + X Q = C by the vectorised (column-major) Kronecker solve (I ⊗ P + Qᵀ ⊗ I) vec X = vec C."""
    r, k = C.shape
    K = torch.kron(torch.eye(k, dtype=C.dtype), P) + torch.kron(Q.T.contiguous(), torch.eye(r, dtype=C.dtype))
    return torch.linalg.solve(K, C.T.reshape(-1)).reshape(k, r).T


def reference_closed_form(A, B, grad_A, grad_B, s, X=None):
    """Theorem 2.1 written out with exact inverses and the m x m projector; X from Theorem 2.2 when None.
    B = 0: the paper's first-step rule g_A = g_A^lora, g_B = (1/s²) g_B^lora (AAᵀ)⁻¹, X = 0."""
    inv_AAt = torch.linalg.inv(A @ A.T)
    if not B.any():
        return grad_A, grad_B @ inv_AAt / s**2
    inv_BtB = torch.linalg.inv(B.T @ B)
    free_A = inv_BtB @ grad_A / s**2
    free_B = (torch.eye(B.shape[0], dtype=B.dtype) - B @ inv_BtB @ B.T) @ grad_B @ inv_AAt / s**2
    if X is None:
        X = kron_sylvester(B.T @ B, A @ A.T, -inv_BtB @ grad_A @ A.T / s**2)
    return free_A + X @ A, free_B - B @ X


def reference_adamw(A, B, s, gradients, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """The paper's AdamW form, step t = 1, 2, ...: Adam on g̃ with full-size moments, mapped back."""
    beta1, beta2 = betas
    A, B = A.clone(), B.clone()
    exp_avg = exp_avg_sq = torch.zeros(B.shape[0], A.shape[1], dtype=A.dtype)
    for t, g in enumerate(gradients, start=1):
        zero_x = torch.zeros(A.shape[0], A.shape[0], dtype=A.dtype) if B.any() else None  # X = 0 (B = 0: X = 0 anyway)
        free_A, free_B = reference_closed_form(A, B, s * B.T @ g, s * g @ A.T, s, X=zero_x)
        equivalent = s * (B @ free_A + free_B @ A)
        exp_avg = beta1 * exp_avg + (1 - beta1) * equivalent
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * equivalent**2
        G = (exp_avg / (1 - beta1**t)) / ((exp_avg_sq / (1 - beta2**t)).sqrt() + eps)
        grad_A, grad_B = reference_closed_form(A, B, s * B.T @ G, s * G @ A.T, s)
        A, B = A - lr * (grad_A + weight_decay * A), B - lr * (grad_B + weight_decay * B)
    return A, B


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(N, M, bias=False)
        self.out = nn.Linear(M, 7, bias=False)

    def forward(self, x):
        return self.out(self.proj(x))


def lora_model(config: lorakit.LoraConfig | None = None) -> nn.Module:
    torch.manual_seed(0)
    config = config or lorakit.LoraConfig(r=R, alpha=R * S, target_modules=["proj", "out"])
    return lorakit.inject(TwoLayers(), config).double()


def factors(model: nn.Module, layer: str):
    adapter = getattr(model, layer).adapters["default"]
    return adapter.lora_A.weight, adapter.lora_B.weight, adapter.scaling


def set_full_gradient(A, B, s, g):
    """What autograd leaves in .grad when dL/dW_eff = g: g_A = s Bᵀ g, g_B = s g Aᵀ."""
    A.grad, B.grad = s * B.detach().T @ g, s * g @ A.detach().T


# --- the closed form (recipe 1-7) ------------------------------------------------------------------
def test_sylvester_x_satisfies_its_equation():
    A, B, g, grad_A, grad_B = recipe()
    _, _, X = adjusted_gradients(A, B, grad_A, grad_B, S, delta=0.0)
    C = -torch.linalg.inv(B.T @ B) @ grad_A @ A.T / S**2
    assert (B.T @ B @ X + X @ (A @ A.T) - C).abs().max() < TOL
    # and the solver alone, against the Kronecker solve, on SPD matrices of different sizes
    gen = torch.Generator().manual_seed(3)
    P, Q = (torch.randn(k, k + 2, generator=gen, dtype=torch.float64) for k in (4, 3))
    P, Q, C = P @ P.T, Q @ Q.T, torch.randn(4, 3, generator=gen, dtype=torch.float64)
    assert (solve_sylvester(P, Q, C) - kron_sylvester(P, Q, C)).abs().max() < TOL


def test_equivalent_gradient_is_the_tangent_space_projection_of_the_full_gradient():
    A, B, g, grad_A, grad_B = recipe()
    new_A, new_B, _ = adjusted_gradients(A, B, grad_A, grad_B, S, delta=0.0)
    P_B, P_A = projections(A, B)
    expected = P_B @ g + (torch.eye(M, dtype=g.dtype) - P_B) @ g @ P_A
    assert (equivalent_gradient(A, B, new_A, new_B, S) - expected).abs().max() < TOL


def test_equivalent_gradient_satisfies_the_least_squares_normal_equations():
    A, B, g, grad_A, grad_B = recipe(1)
    residual = g - equivalent_gradient(A, B, *adjusted_gradients(A, B, grad_A, grad_B, S, delta=0.0)[:2], S)
    assert (B.T @ residual).abs().max() < TOL and (residual @ A.T).abs().max() < TOL
    assert residual.abs().max() > 0.1  # g itself is not in the rank-2r tangent space


def test_equivalent_gradient_equals_the_brute_force_least_squares_fit():
    A, B, g, grad_A, grad_B = recipe(2)
    # vec(s B Y + s Z A) = J [vec Y; vec Z], column-major vec; J is rank-deficient by r², hence pinv
    eye_n, eye_m = torch.eye(N, dtype=g.dtype), torch.eye(M, dtype=g.dtype)
    J = torch.cat([torch.kron(eye_n, S * B), torch.kron(S * A.T.contiguous(), eye_m)], 1)
    fit = (J @ torch.linalg.pinv(J) @ g.T.reshape(-1)).reshape(N, M).T
    new_A, new_B, _ = adjusted_gradients(A, B, grad_A, grad_B, S, delta=0.0)
    assert (equivalent_gradient(A, B, new_A, new_B, S) - fit).abs().max() < TOL


def test_any_x_gives_the_same_equivalent_gradient():
    A, B, g, grad_A, grad_B = recipe()
    best_A, best_B, _ = adjusted_gradients(A, B, grad_A, grad_B, S, delta=0.0)
    X = torch.randn(R, R, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    other_A, other_B, _ = adjusted_gradients(A, B, grad_A, grad_B, S, x=X, delta=0.0)
    assert (other_A - best_A).abs().max() > 0.1 and (other_B - best_B).abs().max() > 0.1
    assert (equivalent_gradient(A, B, other_A, other_B, S) - equivalent_gradient(A, B, best_A, best_B, S)).abs().max() < TOL


def test_sylvester_x_keeps_the_adjusted_gradients_closest_to_the_lora_gradients():
    A, B, g, grad_A, grad_B = recipe()

    def distance(x):
        new_A, new_B, _ = adjusted_gradients(A, B, grad_A, grad_B, S, x=x, delta=0.0)
        return ((new_A - grad_A) ** 2).sum() + ((new_B - grad_B) ** 2).sum()

    _, _, best = adjusted_gradients(A, B, grad_A, grad_B, S, delta=0.0)
    gen = torch.Generator().manual_seed(7)
    f_best = distance(best)
    assert all(f_best < distance(best + 1e-3 * torch.randn(R, R, generator=gen, dtype=torch.float64)) for _ in range(20))
    assert f_best < distance("zero")


@pytest.mark.parametrize("mode", ["adamw", "sgd"])
def test_b_zero_projects_on_a_and_leaves_a_in_place(mode):
    A, B, g, _, _ = recipe()
    B = torch.zeros_like(B)
    new_A, new_B, X = adjusted_gradients(A, B, S * B.T @ g, S * g @ A.T, S, delta=0.0)
    P_B, P_A = projections(A, torch.eye(M, R, dtype=g.dtype))
    assert (equivalent_gradient(A, B, new_A, new_B, S) - g @ P_A).abs().max() < 1e-12
    assert not new_A.any() and not X.any()
    model = lora_model()  # LoRA's standard init: B = 0
    A, B, s = factors(model, "proj")
    assert not B.any()
    before = A.detach().clone()
    set_full_gradient(A, B, s, g)
    LoRAPro(model, lr=0.1, mode=mode).step()
    assert torch.equal(A, before) and B.abs().min() > 0


def test_default_ridge_stays_close_to_the_exact_inverses():
    A, B, g, grad_A, grad_B = recipe()
    exact = adjusted_gradients(A, B, grad_A, grad_B, S, delta=0.0)
    ridged = adjusted_gradients(A, B, grad_A, grad_B, S)
    assert all((e - r).abs().max() < 1e-7 for e, r in zip(exact, ridged))


# --- the optimiser (recipe 8 and the AdamW form) --------------------------------------------------------
def test_adamw_with_zero_betas_and_eps_steps_along_the_closed_form_of_sign_of_g_tilde():
    model = lora_model()
    A, B, s = factors(model, "proj")
    _, _, g, _, _ = recipe()
    with torch.no_grad():
        A.copy_(recipe(4)[0])
        B.copy_(recipe(4)[1])
    A0, B0 = A.detach().clone(), B.detach().clone()
    set_full_gradient(A, B, s, g)
    optimizer = LoRAPro(model, lr=1.0, betas=(0.0, 0.0), eps=0.0, delta=0.0)
    optimizer.step()
    P_B, P_A = projections(A0, B0)
    sign = torch.sign(P_B @ g + (torch.eye(M, dtype=g.dtype) - P_B) @ g @ P_A)
    expected_A, expected_B = reference_closed_form(A0, B0, s * B0.T @ sign, s * sign @ A0.T, s)
    assert ((A0 - A) - expected_A).abs().max() < TOL and ((B0 - B) - expected_B).abs().max() < TOL
    state = optimizer.state[A]
    assert state["exp_avg"].shape == (M, N) and state["exp_avg_sq"].shape == (M, N) and state["step"] == 1


def test_adamw_form_matches_the_paper_equations_over_steps_from_standard_init():
    """Three steps from B = 0 with the true step count t = 1, 2, 3 (the official code's t + 1 fails this)."""
    model = lora_model()
    optimizer = LoRAPro(model, lr=1e-2, weight_decay=0.1, delta=0.0)
    layers = {name: factors(model, name) for name in ("proj", "out")}
    starts = {name: (A.detach().clone(), B.detach().clone()) for name, (A, B, _) in layers.items()}
    gen = torch.Generator().manual_seed(11)
    gradients = {name: [torch.randn(B.shape[0], A.shape[1], generator=gen, dtype=torch.float64) for _ in range(3)]
                 for name, (A, B, _) in layers.items()}
    for t in range(3):
        for name, (A, B, s) in layers.items():
            set_full_gradient(A, B, s, gradients[name][t])
        optimizer.step()
    for name, (A, B, s) in layers.items():
        expected_A, expected_B = reference_adamw(*starts[name], s, gradients[name], lr=1e-2, weight_decay=0.1)
        assert (A - expected_A).abs().max() < 1e-9 and (B - expected_B).abs().max() < 1e-9, name


def test_each_adapter_uses_its_own_scaling():
    """rsLoRA and a per-module rank: s = alpha / sqrt(r) differs per layer (the official code fixes s = 2)."""
    config = lorakit.LoraConfig(r=R, alpha=6, use_rslora=True, rank_pattern={"out": 2}, target_modules=["proj", "out"])
    model = lora_model(config)
    optimizer = LoRAPro(model, lr=1e-2, delta=0.0)
    gen = torch.Generator().manual_seed(12)
    for name, r in (("proj", R), ("out", 2)):
        A, B, s = factors(model, name)
        assert s == pytest.approx(6 / math.sqrt(r)) and s != 2.0
        with torch.no_grad():
            B.normal_(generator=gen)
        g = torch.randn(B.shape[0], A.shape[1], generator=gen, dtype=torch.float64)
        start = (A.detach().clone(), B.detach().clone())
        set_full_gradient(A, B, s, g)
        optimizer.step()
        expected_A, expected_B = reference_adamw(*start, s, [g], lr=1e-2)
        assert (A - expected_A).abs().max() < 1e-9 and (B - expected_B).abs().max() < 1e-9, name
        A.grad = B.grad = None


def test_sgd_mode_moves_the_effective_weight_along_minus_the_projected_gradient():
    model = lora_model()
    A, B, s = factors(model, "proj")
    A0, B0, g, _, _ = recipe(6)
    with torch.no_grad():
        A.copy_(A0)
        B.copy_(B0)
    set_full_gradient(A, B, s, g)
    LoRAPro(model, lr=1e-6, mode="sgd", delta=0.0).step()
    P_B, P_A = projections(A0, B0)
    projected = P_B @ g + (torch.eye(M, dtype=g.dtype) - P_B) @ g @ P_A
    change = s * (B @ A - B0 @ A0)
    assert (change + 1e-6 * projected).abs().max() < 1e-10  # first order: the O(η²) term is ~1e-12
    expected_A, expected_B = reference_closed_form(A0, B0, s * B0.T @ g, s * g @ A0.T, s)
    assert ((A0 - A) / 1e-6 - expected_A).abs().max() < 1e-6


def test_state_dict_round_trip_continues_identically():
    gen = torch.Generator().manual_seed(13)

    def run(model, optimizer, steps):
        for _ in range(steps):
            for name in ("proj", "out"):
                A, B, s = factors(model, name)
                set_full_gradient(A, B, s, torch.randn(B.shape[0], A.shape[1], generator=gen, dtype=torch.float64))
            optimizer.step()

    model = lora_model()
    optimizer = LoRAPro(model, lr=1e-2)
    run(model, optimizer, 2)
    saved_model, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    state = gen.get_state()
    run(model, optimizer, 1)
    resumed = lora_model()
    resumed.load_state_dict(saved_model)
    resumed_optimizer = LoRAPro(resumed, lr=1e-2)
    resumed_optimizer.load_state_dict(saved_state)
    gen.set_state(state)
    run(resumed, resumed_optimizer, 1)
    for (key, p), q in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), key
    assert resumed_optimizer.state[factors(resumed, "proj")[0]]["step"] == 3


# --- which parameters ------------------------------------------------------------------------------
def test_parameters_outside_any_pair_get_plain_adamw():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    norm = model.model.norm.weight.requires_grad_(True)
    optimizer = LoRAPro(model, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6)
    lora = {id(p) for group in optimizer.param_groups if group["lora_pro"] for p in group["params"]}
    assert lora == {id(p) for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}
    assert [p for group in optimizer.param_groups if not group["lora_pro"] for p in group["params"]] == [norm]
    reference_param = nn.Parameter(norm.detach().clone())
    reference = torch.optim.AdamW([reference_param], lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        grad = torch.randn(norm.shape, generator=gen)
        norm.grad, reference_param.grad = grad.clone(), grad.clone()
        optimizer.step()
        reference.step()
    assert (norm - reference_param).abs().max() < 1e-6


def test_unsupported_adapters_are_clear_errors():
    with pytest.raises(lorakit.ConfigError, match="DoRA"):
        LoRAPro(lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, use_dora=True, target_modules=["q_proj"])))
    with pytest.raises(lorakit.ConfigError, match="keeps A frozen"):
        LoRAPro(lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, freeze_a=True, target_modules=["q_proj"])))
    with pytest.raises(lorakit.ConfigError, match="has none"):
        LoRAPro(lorakit.inject(tiny_llama(), lorakit.VeraConfig(r=4, target_modules=["q_proj"])))
    with pytest.raises(lorakit.ConfigError, match="betas"):
        LoRAPro(lora_model(), betas=(0.9, 1.0))


def test_registered_and_built_from_options():
    assert "lora-pro" in registered_optimizers()
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    optimizer = build_optimizer("lora-pro", model, lr=1e-3, weight_decay=0.01,
                                options={"mode": "sgd", "betas": [0.9, 0.95], "delta": 1e-6})
    assert isinstance(optimizer, lorakit.optim.LoRAPro)
    group = optimizer.param_groups[0]
    settings = (group["mode"], group["betas"], group["delta"], group["lr"], group["weight_decay"])
    assert settings == ("sgd", (0.9, 0.95), 1e-6, 1e-3, 0.01)
    assert group["scalings"] == [16.0 / 2] * 4  # alpha / r of each LoRA layer
    with pytest.raises(lorakit.ConfigError, match="mode='adam'"):
        build_optimizer("lora-pro", model, lr=1e-3, options={"mode": "adam"})


def test_train_with_lora_pro_end_to_end(tmp_path, tiny_model_folder):
    from lorakit.train import TrainConfig, train

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Repeat the word: w{i}", "response": f"w{i}"}) for i in range(24)))
    config = TrainConfig(model=str(tiny_model_folder), data=str(data), output_dir=str(tmp_path / "run"), max_steps=2,
                         batch_size=4, save_steps=0, logging_steps=1, eval_examples=2, max_new_tokens=2,
                         eval_fraction=0.2, learning_rate=1e-3, optimizer="lora-pro", adapter={"r": 4, "alpha": 8})
    metrics = train(config, progress=False)
    assert metrics["train"]["steps"] == 2
    saved = lorakit.load_adapter(lorakit.models.load(str(tiny_model_folder))[0], tmp_path / "run" / "adapter")
    assert any(p.abs().max() > 0 for n, p in saved.named_parameters() if "lora_B" in n)  # the optimiser moved B
