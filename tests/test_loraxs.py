"""LoRA-XS (arXiv 2405.17604) against the LoRA-XS parts of the spec's verification recipe
(../shared/methods/lora-sb.md, items 1, 3, 4, 6) and float64 recomputations."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from conftest import model_output, tiny_gpt2, tiny_llama
from lorakit.core import adapted_layers
from lorakit.core.linalg import truncated_svd
from lorakit.methods.loraxs import LATENT_STD

TARGETS = ["q_proj", "k_proj", "up_proj", "down_proj"]  # square, narrow (16 < 32), wide, tall


def adapters(model):
    return [(layer, layer.adapters["default"]) for _, layer in adapted_layers(model)]


def perturb_latent(model, std: float = 0.3, seed: int = 4) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in adapters(model):
            R = adapter.lora_latent.weight
            R.add_(std * torch.randn(R.shape, generator=generator).to(R.dtype))


def exact_truncation(W: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- recipe 1: the SVD initialisation -----------------------------------------------------------
@pytest.mark.parametrize("builder, targets", [(tiny_llama, TARGETS), (tiny_gpt2, ["c_attn", "c_fc", "c_proj"])])
def test_svd_init_with_identity_latent_is_the_rank_r_truncation(builder, targets):
    r, alpha = 4, 3.0
    model = lorakit.inject(builder().double(), lorakit.LoraXSConfig(r=r, alpha=alpha, target_modules=targets))
    for layer, adapter in adapters(model):
        W = layer.weight_out_in()  # (out, in) also for GPT-2's Conv1D
        B, A = adapter.lora_B.weight, adapter.lora_A.weight
        assert B.dtype == A.dtype == torch.float64
        assert B.shape == (layer.out_features, r) and A.shape == (r, layer.in_features)
        assert relative_error(B @ A, exact_truncation(W, r)) < 1e-8
        eye = torch.eye(r, dtype=torch.float64)
        assert (B.T @ B - eye).abs().max() < 1e-12  # B = U_r: orthonormal columns
        gram = A @ A.T  # A = S_r V_r^T: orthogonal rows whose norms are the singular values
        S = torch.linalg.svdvals(W)[:r]
        assert (gram - torch.diag(torch.diag(gram))).abs().max() < 1e-10
        assert torch.allclose(torch.diag(gram).sqrt(), S, rtol=1e-10)
        adapter.set_factors(B, A, R=eye)
        assert relative_error(adapter.delta_weight(W), (alpha / r) * exact_truncation(W, r)) < 1e-8


def test_svd_signs_are_normalised_so_the_init_is_reproducible():
    first = lorakit.inject(tiny_llama(), lorakit.LoraXSConfig(r=4, target_modules=TARGETS))
    again = lorakit.inject(tiny_llama(), lorakit.LoraXSConfig(r=4, target_modules=TARGETS))
    for (_, a), (_, b) in zip(adapters(first), adapters(again)):
        assert torch.equal(a.lora_B.weight, b.lora_B.weight) and torch.equal(a.lora_A.weight, b.lora_A.weight)
        B = a.lora_B.weight
        assert (B[B.abs().argmax(dim=0), torch.arange(B.shape[1])] > 0).all()


def test_randomized_svd_matches_the_exact_truncation_and_leaves_the_global_rng_alone():
    generator = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(48, 48, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(64, 48, generator=generator, dtype=torch.float64))
    W = U @ torch.diag(0.7 ** torch.arange(48, dtype=torch.float64)) @ V.T  # decaying spectrum
    model = nn.Sequential(nn.Linear(64, 48)).double()
    with torch.no_grad():
        model[0].weight.copy_(W)
    state = torch.get_rng_state()
    lorakit.inject(model, lorakit.LoraXSConfig(r=6, svd_niter=4, target_modules=["0"]))
    assert torch.equal(torch.get_rng_state(), state)
    adapter = model[0].adapters["default"]
    B, A = adapter.lora_B.weight, adapter.lora_A.weight
    assert relative_error(B @ A, exact_truncation(W, 6)) < 1e-8
    assert (B.T @ B - torch.eye(6, dtype=torch.float64)).abs().max() < 1e-12
    U_r, S_r, Vh_r = truncated_svd(W, 6, niter=4)
    assert torch.equal(U_r, B) and torch.equal(S_r[:, None] * Vh_r, A)  # reproducible: fixed seed


def test_half_precision_base_gets_a_float32_svd_and_is_left_unchanged():
    base = tiny_llama().to(torch.bfloat16)
    weights = {name: p.detach().clone() for name, p in base.named_parameters()}
    model = lorakit.inject(base, lorakit.LoraXSConfig(r=4, target_modules=TARGETS))
    for layer, adapter in adapters(model):
        assert adapter.lora_A.weight.dtype == adapter.lora_latent.weight.dtype == torch.float32
        W = layer.weight_out_in().float()
        assert relative_error(adapter.lora_B.weight @ adapter.lora_A.weight, exact_truncation(W, 4)) < 1e-5
    lorakit.unload(model)
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())


# --- recipe 3: only R trains; B and A are frozen and unchanged -----------------------------------
def test_only_the_latent_trains_and_the_frozen_factors_stay_bitwise_unchanged(input_ids):
    r = 5
    model = lorakit.inject(tiny_llama(), lorakit.LoraXSConfig(r=r, alpha=10, target_modules="all-linear"))
    layers = adapters(model)
    assert len(layers) == 14
    trainable, _ = lorakit.trainable_parameters(model)
    assert trainable == r * r * len(layers)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert names and all(name.endswith("adapters.default.lora_latent.weight") for name in names)
    for _, adapter in layers:
        assert not adapter.lora_A.weight.requires_grad and not adapter.lora_B.weight.requires_grad
        assert {n for n, _ in adapter.named_buffers()} == {"lora_A.weight", "lora_B.weight"}
    frozen = {name: b.clone() for name, b in model.named_buffers() if "lora_A" in name or "lora_B" in name}
    base = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    latent = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
    buffers = dict(model.named_buffers())
    assert all(torch.equal(buffers[name], value) for name, value in frozen.items())
    params = dict(model.named_parameters())
    assert all(torch.equal(params[name], value) for name, value in base.items())
    assert all(not torch.equal(params[name], value) for name, value in latent.items())


# --- recipe 4: dL/dR = s B^T (dL/dW) A^T ----------------------------------------------------------
def test_latent_gradient_equals_the_projected_weight_gradient(input_ids):
    r, alpha = 4, 3.0
    model = lorakit.inject(tiny_llama().double(), lorakit.LoraXSConfig(r=r, alpha=alpha, target_modules=TARGETS))
    perturb_latent(model)
    for layer, _ in adapters(model):
        layer.base.weight.requires_grad_(True)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    for layer, adapter in adapters(model):
        G = layer.base.weight.grad  # dL/dW: W enters h only through W x, like the merged W + dW
        B, A = adapter.lora_B.weight, adapter.lora_A.weight
        expected = (alpha / r) * B.T @ G @ A.T
        assert G.abs().max() > 0
        assert (adapter.lora_latent.weight.grad - expected).abs().max() < 1e-10 * max(1.0, expected.abs().max().item())


# --- the equations: forward, delta weight, scale --------------------------------------------------
def test_forward_and_delta_weight_match_the_float64_formula():
    r, alpha = 4, 6.0
    model = lorakit.inject(tiny_llama().double(), lorakit.LoraXSConfig(r=r, alpha=alpha, target_modules=TARGETS))
    perturb_latent(model)
    for layer, adapter in adapters(model):
        W, b = layer.base.weight, layer.base.bias
        B, R, A = adapter.lora_B.weight, adapter.lora_latent.weight, adapter.lora_A.weight
        dW = (alpha / r) * B @ R @ A
        assert (adapter.delta_weight(W) - dW).abs().max() < 1e-12
        inputs = torch.randn(3, 5, layer.in_features, dtype=torch.float64)
        expected = inputs @ (W + dW).T + (0 if b is None else b)
        with torch.no_grad():
            assert (layer(inputs) - expected).abs().max() < 1e-12


@pytest.mark.parametrize("alpha, r, scale", [(None, 8, 1.0), (16.0, 8, 2.0), (4.0, 16, 0.25)])
def test_scale_is_alpha_over_r_and_alpha_none_means_one(alpha, r, scale):
    config = lorakit.LoraXSConfig(r=r, alpha=alpha, target_modules=["up_proj"])
    model = lorakit.inject(tiny_llama(), config)
    assert config.scaling == scale
    assert all(adapter.scaling == scale for _, adapter in adapters(model))


# --- recipe 6: merge / unmerge; W itself is never modified by the method ---------------------------
def test_merge_unmerge_is_exact_and_inject_never_touches_w(input_ids):
    base = tiny_llama().double()
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    model = lorakit.inject(base, lorakit.LoraXSConfig(r=4, alpha=8, target_modules=TARGETS))
    assert all(torch.equal(p, before[name.replace(".base.", ".")]) for name, p in model.named_parameters()
               if not p.requires_grad)  # no residual subtraction: W0 stays as it was
    perturb_latent(model)
    unmerged = model_output(model, input_ids)
    lorakit.merge(model)
    assert (model_output(model, input_ids) - unmerged).abs().max() < 1e-10
    for layer, adapter in adapters(model):
        path = next(p for p, l in adapted_layers(model) if l is layer)
        original = before[path + ".weight"]
        assert (layer.base.weight - (original + adapter.delta_weight(original))).abs().max() < 1e-12
    lorakit.unmerge(model)
    for path, layer in adapted_layers(model):
        assert (layer.base.weight - before[path + ".weight"]).abs().max() < 1e-14
    assert (model_output(model, input_ids) - unmerged).abs().max() < 1e-10


# --- R initialisation --------------------------------------------------------------------------------
def test_zero_latent_is_exactly_the_base_model(input_ids):
    expected = model_output(tiny_llama(), input_ids)
    model = lorakit.inject(tiny_llama(), lorakit.LoraXSConfig(r=8, target_modules="all-linear"))
    assert torch.equal(model_output(model, input_ids), expected)


def test_gaussian_latent_is_the_official_tiny_normal_init(input_ids):
    expected = model_output(tiny_llama(), input_ids)
    torch.manual_seed(3)
    model = lorakit.inject(tiny_llama(), lorakit.LoraXSConfig(r=16, latent_init="gaussian", target_modules="all-linear"))
    values = torch.cat([adapter.lora_latent.weight.detach().flatten() for _, adapter in adapters(model)])
    assert values.numel() == 14 * 256
    assert abs(values.std().item() / LATENT_STD - 1) < 0.05 and abs(values.mean().item()) < 1e-6
    difference = (model_output(model, input_ids) - expected).abs().max().item()
    assert 0 < difference < 1e-3


# --- shapes and config errors ------------------------------------------------------------------------
def test_rank_above_the_smallest_layer_dimension_names_the_layer_and_the_limit():
    model = tiny_llama()
    with pytest.raises(lorakit.ConfigError, match=r"k_proj \(in=32, out=16\) allows at most r=16, got r=17"):
        lorakit.inject(model, lorakit.LoraXSConfig(r=17, target_modules=["q_proj", "k_proj"]))
    assert lorakit.adapter_configs(model) == {}
    assert all(not layer.adapters for _, layer in adapted_layers(model))


@pytest.mark.parametrize("fields", [
    {"r": 0}, {"r": 2.5}, {"alpha": 0.0}, {"alpha": -1.0}, {"dropout": 1.0}, {"init": "pissa"},
    {"latent_init": "kaiming"}, {"svd_niter": 0}, {"target_modules": []},
])
def test_invalid_config_fields_are_refused(fields):
    with pytest.raises(lorakit.ConfigError):
        lorakit.LoraXSConfig(**fields)


def test_set_factors_checks_shapes_and_sets_all_three():
    model = lorakit.inject(tiny_llama(), lorakit.LoraXSConfig(r=4, target_modules=["k_proj"]))
    _, adapter = adapters(model)[0]
    with pytest.raises(lorakit.ConfigError, match=r"B must have shape \(16, 4\)"):
        adapter.set_factors(B=torch.zeros(32, 4), A=torch.zeros(4, 32))
    B, A, R = torch.randn(16, 4, dtype=torch.float64), torch.randn(4, 32), torch.randn(4, 4)
    adapter.set_factors(B=B, A=A, R=R)
    assert adapter.lora_B.weight.dtype == torch.float32 and torch.equal(adapter.lora_B.weight, B.float())
    assert torch.equal(adapter.lora_A.weight, A) and torch.equal(adapter.lora_latent.weight, R)
    assert adapter.lora_latent.weight.requires_grad


# --- the adapter file ------------------------------------------------------------------------------
def test_file_holds_b_a_and_r_under_documented_keys(tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LoraXSConfig(r=4, target_modules=["k_proj"]))
    lorakit.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.k_proj."
    assert tensors[prefix + "lora_A.weight"].shape == (4, 32)
    assert tensors[prefix + "lora_B.weight"].shape == (16, 4)
    assert tensors[prefix + "lora_latent.weight"].shape == (4, 4)
    assert len(tensors) == 6  # two layers x three tensors
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] is None and config["lorakit"]["method"] == "loraxs"
    assert config["alpha"] is None and config["init"] == "svd"


def test_loading_uses_the_saved_factors_not_a_fresh_svd(tmp_path, input_ids):
    model = lorakit.inject(tiny_llama(), lorakit.LoraXSConfig(r=4, alpha=8, target_modules=TARGETS))
    for _, adapter in adapters(model):  # another machine's SVD may pick other signs
        signs = torch.tensor([1.0, -1.0, -1.0, 1.0])
        adapter.set_factors(B=adapter.lora_B.weight * signs, A=signs[:, None] * adapter.lora_A.weight)
    perturb_latent(model)
    expected = model_output(model, input_ids)
    lorakit.save_adapter(model, tmp_path)
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    for (_, saved), (_, loaded) in zip(adapters(model), adapters(reloaded)):
        assert torch.equal(saved.lora_B.weight, loaded.lora_B.weight)
        assert torch.equal(saved.lora_A.weight, loaded.lora_A.weight)
    assert torch.equal(model_output(reloaded, input_ids), expected)
    assert lorakit.trainable_parameters(reloaded)[0] == 0  # loaded frozen by default
    again = lorakit.load_adapter(tiny_llama(), tmp_path, trainable=True)
    assert lorakit.trainable_parameters(again)[0] == 4 * 4 * 8  # r^2 on 2 decoder layers x 4 targets


def test_cli_offers_the_loraxs_fields():
    from lorakit.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--method", "loraxs", "--svd-niter", "3", "--latent-init", "gaussian"])
    assert vars(args)["adapter.svd_niter"] == 3 and vars(args)["adapter.latent_init"] == "gaussian"
