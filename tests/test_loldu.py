"""LoLDU (arXiv 2410.13618) against the spec's verification recipe (../shared/methods/loldu.md).

References are computed independently of the adapter: the dense P, L, U of `torch.linalg.lu`
and the paper's own form of the layer, W_res + s P L_r diag(z) U_r.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import lorakit
from conftest import logits_in_fresh_process, model_output, tiny_gpt2, tiny_llama
from lorakit.core import adapted_layers
from lorakit.methods.loldu import ldu_decomposition

TARGETS = ["q_proj", "k_proj", "up_proj", "down_proj"]


def toy(in_features: int, out_features: int, config: lorakit.LolduConfig, dtype=torch.float32, weight=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features)).to(dtype)
    if weight is not None:
        with torch.no_grad():
            model[0].weight.copy_(weight)
    lorakit.inject(model, config)
    layer = model[0]
    return model, layer, layer.adapters["default"]


def paper_factors(W: torch.Tensor, r: int):
    """Dense P, L_r, D_r, U_r (unit diagonal) straight from torch.linalg.lu, as the official code does."""
    P, L, U = torch.linalg.lu(W)
    D = torch.diagonal(U)
    return P, L[:, :r], D[:r], (U / D[:, None])[:r]


def perturb(model, seed: int = 3, std: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lorakit.core.adapter_parameters(model).values():
            param.add_(std * torch.randn(param.shape, generator=generator).to(param.dtype))


# Recipe 1 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_ldu_decomposition_reconstructs_w_with_unit_diagonals(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    pivot_rows, L, D, U = ldu_decomposition(W)
    rebuilt = (L @ torch.diag(D) @ U)[pivot_rows]
    assert ((rebuilt - W).norm() / W.norm()).item() < 1e-5
    k = min(shape)
    assert L.shape == (shape[0], k) and U.shape == (k, shape[1])
    assert torch.equal(torch.diagonal(L), torch.ones(k))
    assert torch.allclose(torch.diagonal(U), torch.ones(k), atol=1e-6)
    assert torch.equal(torch.triu(L, diagonal=1), torch.zeros_like(L))
    assert torch.equal(torch.tril(U, diagonal=-1), torch.zeros_like(U))
    # The index permutation is torch.linalg.lu's P, row for row.
    P, L_ref, _ = torch.linalg.lu(W)
    assert torch.equal(torch.eye(shape[0])[pivot_rows], P)
    assert torch.equal(L, L_ref)


# Recipe 2 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, r", [((32, 48), 4), ((48, 32), 3), ((20, 20), 20)])
def test_identity_at_init_is_exact(shape, r):
    in_features, out_features = shape
    model, layer, adapter = toy(in_features, out_features, lorakit.LolduConfig(r=r, target_modules=["0"]))
    W = layer.base.weight.detach()
    P, L_r, D_r, U_r = paper_factors(W, r)
    sigma = 1.0 / r
    W_res = W - sigma * P @ L_r @ torch.diag(D_r) @ U_r  # the paper's frozen residual
    assert (W_res + sigma * P @ L_r @ torch.diag(D_r) @ U_r - W).abs().max() < 1e-5
    assert torch.equal(adapter.vector_z.detach(), D_r) and torch.equal(adapter.lu_diagonal, D_r)
    assert torch.equal(adapter.coefficients(), torch.zeros(r))
    x = torch.randn(5, in_features)
    with torch.no_grad():
        assert torch.equal(model(x), layer.base(x))


def test_identity_at_init_on_a_bf16_base():
    model, layer, adapter = toy(32, 48, lorakit.LolduConfig(target_modules=["0"]), dtype=torch.bfloat16)
    assert adapter.vector_z.dtype == torch.float32 and adapter.lower.dtype == torch.float32
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(x)
        assert out.dtype == torch.bfloat16 and torch.equal(out, layer.base(x))


@pytest.mark.parametrize("train_scale", [False, True])
def test_trained_layer_equals_the_papers_residual_form(train_scale):
    """lorakit's W + P L_r diag(s z - s0 D_r) U_r is the paper's W_res + s P L_r diag(z) U_r, any z and s."""
    r, alpha = 5, 2.0
    model, layer, adapter = toy(40, 24, lorakit.LolduConfig(r=r, alpha=alpha, train_scale=train_scale, target_modules=["0"]))
    perturb(model)
    W = layer.base.weight.detach()
    P, L_r, D_r, U_r = paper_factors(W, r)
    s0 = alpha / r
    W_res = W - s0 * P @ L_r @ torch.diag(D_r) @ U_r
    s = adapter.scaling_factor.detach()
    if train_scale:
        assert s.item() != pytest.approx(s0)  # the perturbation moved the scale too
    W_eff = W_res + s * P @ L_r @ torch.diag(adapter.vector_z.detach()) @ U_r
    assert (W + adapter.delta_weight(W) - W_eff).abs().max() < 1e-5
    x = torch.randn(6, 40)
    with torch.no_grad():
        assert (model(x) - (x @ W_eff.T + layer.base.bias)).abs().max() < 1e-5


def test_trainable_scale_gets_the_papers_gradient_at_init():
    """d loss / d s at init is g . (P L_r diag(D_r) U_r) x, not zero (a form s (z - D_r) would give zero)."""
    model, layer, adapter = toy(24, 16, lorakit.LolduConfig(r=4, train_scale=True, target_modules=["0"]))
    x = torch.randn(7, 24)
    model(x).sum().backward()
    P, L_r, D_r, U_r = paper_factors(layer.base.weight.detach(), 4)
    expected = (x @ (P @ L_r @ torch.diag(D_r) @ U_r).T).sum()
    assert torch.allclose(adapter.scaling_factor.grad, expected, rtol=1e-5)
    assert torch.allclose(adapter.vector_z.grad, adapter.initial_scale * ((x @ U_r.T) * (torch.ones(7, 16) @ (P @ L_r))).sum(0), rtol=1e-5)


# Recipe 3 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("train_scale, per_layer", [(False, lambda r: r), (True, lambda r: r + 1)])
def test_trainable_count_is_r_per_layer(train_scale, per_layer):
    model = lorakit.inject(tiny_llama(), lorakit.LolduConfig(r=6, train_scale=train_scale, target_modules=TARGETS))
    layers = list(adapted_layers(model))
    trainable, _ = lorakit.trainable_parameters(model)
    assert trainable == len(layers) * per_layer(6)
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert names == ({"vector_z", "scaling_factor"} if train_scale else {"vector_z"})


# Recipe 4 -------------------------------------------------------------------------------------

def test_one_diagonal_step_is_the_rank_one_outer_product():
    r = 4
    model, layer, adapter = toy(32, 48, lorakit.LolduConfig(r=r, target_modules=["0"]))
    with torch.no_grad():
        adapter.vector_z[0] += 1.0
    W = layer.base.weight.detach()
    P, L_r, _, U_r = paper_factors(W, r)
    dW = adapter.delta_weight(W)
    assert (dW - (1.0 / r) * torch.outer(P @ L_r[:, 0], U_r[0])).abs().max() < 1e-6
    assert torch.linalg.matrix_rank(dW.detach(), rtol=1e-5).item() == 1


# Recipe 5 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_merge_then_unmerge_restores_w_and_merged_output_matches(dtype, tolerance):
    model, layer, adapter = toy(32, 48, lorakit.LolduConfig(r=6, train_scale=True, target_modules=["0"]), dtype=dtype)
    perturb(model)
    W = layer.base.weight.detach().clone()
    x = torch.randn(5, 32, dtype=dtype)
    with torch.no_grad():
        unmerged = model(x)
        lorakit.merge(model)
        assert (layer.base.weight - W).abs().max() > 1e-3  # the merge changed W
        assert (model(x) - unmerged).abs().max() < tolerance
        lorakit.unmerge(model)
    assert (layer.base.weight - W).abs().max() < tolerance


def test_gpt2_conv1d_layers_merge_and_reload(tmp_path, input_ids):
    model = lorakit.inject(tiny_gpt2(), lorakit.LolduConfig(r=4, target_modules=["c_attn", "c_fc"]))
    assert model_output(model, input_ids).equal(model_output(tiny_gpt2(), input_ids))
    perturb(model)
    expected = model_output(model, input_ids)
    lorakit.save_adapter(model, tmp_path)
    reloaded = lorakit.load_adapter(tiny_gpt2(), tmp_path)
    assert (model_output(reloaded, input_ids) - expected).abs().max() < 1e-5
    lorakit.merge(model)
    assert (model_output(model, input_ids) - expected).abs().max() < 1e-5


# Recipe 6 -------------------------------------------------------------------------------------

def test_training_recovers_a_teacher_on_the_ldu_basis():
    r, in_features, out_features = 4, 32, 24
    model, layer, adapter = toy(in_features, out_features, lorakit.LolduConfig(r=r, target_modules=["0"]))
    generator = torch.Generator().manual_seed(7)
    W = layer.base.weight.detach()
    P, L_r, D_r, U_r = paper_factors(W, r)
    delta = torch.randn(r, generator=generator)
    teacher = W + (1.0 / r) * P @ L_r @ torch.diag(delta) @ U_r
    X = torch.randn(256, in_features, generator=generator)
    target = X @ teacher.T + layer.base.bias.detach()
    # The output is linear in z, so the loss is a convex quadratic: L-BFGS (through autograd and
    # the adapter's forward) reaches the optimum in a few iterations where Adam needs thousands.
    optimizer = torch.optim.LBFGS([adapter.vector_z], lr=1, max_iter=200, tolerance_grad=1e-12,
                                  tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (model(X) - target).pow(2).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        final = (model(X) - target).pow(2).mean().item()
    assert final < 1e-8
    assert (adapter.vector_z.detach() - D_r - delta).abs().max() < 1e-4


# Recipe 7 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["zero first column", "zero matrix", "rank one"])
def test_zero_pivots_give_no_nan(kind):
    generator = torch.Generator().manual_seed(1)
    W = torch.randn(24, 16, generator=generator)
    if kind == "zero first column":
        W[:, 0] = 0
    elif kind == "zero matrix":
        W.zero_()
    else:
        W = torch.outer(torch.randn(24, generator=generator), torch.randn(16, generator=generator))
    pivot_rows, L, D, U = ldu_decomposition(W)
    assert torch.isfinite(L).all() and torch.isfinite(D).all() and torch.isfinite(U).all()
    assert ((L @ torch.diag(D) @ U)[pivot_rows] - W).abs().max() < 1e-5
    model, layer, adapter = toy(16, 24, lorakit.LolduConfig(r=4, train_scale=True, target_modules=["0"]), weight=W)
    x = torch.randn(5, 16, generator=generator)
    assert torch.equal(model(x).detach(), layer.base(x).detach())
    perturb(model)
    out = model(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(adapter.vector_z.grad).all()
    assert torch.isfinite(adapter.delta_weight(W)).all()


# Recipe 8 -------------------------------------------------------------------------------------

def test_dense_p_and_index_p_forwards_agree_exactly():
    r = 5
    model, layer, adapter = toy(32, 48, lorakit.LolduConfig(r=r, target_modules=["0"]))
    perturb(model)
    P, L_r, _, U_r = paper_factors(layer.base.weight.detach(), r)
    assert torch.equal(adapter.lower, P @ L_r) and torch.equal(adapter.upper, U_r)
    x = torch.randn(9, 32)
    with torch.no_grad():
        # The paper's order: L_r first, then the dense permutation matrix P.
        dense = layer.base(x) + F.linear(adapter.coefficients() * F.linear(x, U_r), L_r) @ P.T
        assert torch.equal(model(x), dense)
    assert all(buffer.shape != (48, 48) for buffer in adapter.buffers())  # no dense P is kept


# Shapes, configs and files --------------------------------------------------------------------

def test_rank_above_min_dimension_names_the_layer_and_the_limit():
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(lorakit.ConfigError, match=r"k_proj.*in=32, out=16.*largest r is 16"):
        lorakit.inject(model, lorakit.LolduConfig(r=17, target_modules=TARGETS))
    assert not lorakit.adapter_configs(model) and not list(adapted_layers(model))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("field, value", [("r", 0), ("r", 2.5), ("alpha", 0.0), ("train_scale", "yes")])
def test_invalid_config_values_are_refused(field, value):
    with pytest.raises(lorakit.ConfigError, match=field):
        lorakit.LolduConfig(**{field: value})


def test_file_holds_z_and_d_r_only_and_reloads_exactly(tmp_path, input_ids):
    model = lorakit.inject(tiny_llama(), lorakit.LolduConfig(r=4, target_modules=TARGETS))
    perturb(model)
    expected = model_output(model, input_ids)
    lorakit.save_adapter(model, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in keys} == {"vector_z", "lu_diagonal"} and len(keys) == 2 * len(TARGETS) * 2
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] is None and config["lorakit"]["method"] == "loldu" and config["r"] == 4
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path, trainable=True)
    assert torch.equal(model_output(reloaded, input_ids), expected)
    assert lorakit.trainable_parameters(reloaded)[0] == 4 * len(keys) // 2


def test_saved_adapter_loads_identically_in_a_fresh_process(tmp_path, input_ids):
    model = lorakit.inject(tiny_llama(), lorakit.LolduConfig(r=6, train_scale=True, target_modules=TARGETS))
    perturb(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    fresh = logits_in_fresh_process(tmp_path / "adapter", input_ids, tmp_path)
    assert torch.equal(fresh, model_output(model, input_ids))


def test_adapter_loads_on_a_bf16_copy_of_its_base(tmp_path, input_ids):
    model = lorakit.inject(tiny_llama(), lorakit.LolduConfig(r=4, target_modules=TARGETS))
    perturb(model)
    expected = model_output(model, input_ids)
    lorakit.save_adapter(model, tmp_path)
    reloaded = lorakit.load_adapter(tiny_llama().to(torch.bfloat16), tmp_path)
    assert ((model_output(reloaded, input_ids).float() - expected).norm() / expected.norm()).item() < 2e-2


def test_adapter_from_another_base_is_refused(tmp_path):
    model = lorakit.inject(tiny_llama(0), lorakit.LolduConfig(r=4, target_modules=TARGETS))
    lorakit.save_adapter(model, tmp_path)
    with pytest.raises(lorakit.AdapterFileError, match="trained on another base model"):
        lorakit.load_adapter(tiny_llama(1), tmp_path)


def test_refused_load_leaves_the_model_untouched(tmp_path):
    model = lorakit.inject(tiny_llama(0), lorakit.LolduConfig(r=4, target_modules=TARGETS))
    lorakit.save_adapter(model, tmp_path)
    other = tiny_llama(1)
    flags = {name: p.requires_grad for name, p in other.named_parameters()}
    with pytest.raises(lorakit.AdapterFileError):
        lorakit.load_adapter(other, tmp_path)
    assert not list(adapted_layers(other)) and not lorakit.adapter_configs(other)
    assert {name: p.requires_grad for name, p in other.named_parameters()} == flags


def test_refused_checkpoint_leaves_the_injected_adapter_as_it_was(tmp_path):
    trained = lorakit.inject(tiny_llama(0), lorakit.LolduConfig(r=4, target_modules=TARGETS))
    with torch.no_grad():
        for param in lorakit.core.adapter_parameters(trained).values():
            param.add_(0.5)
    lorakit.save_adapter(trained, tmp_path)
    other = tiny_llama(0)
    last_path, _ = list(adapted_layers(trained))[-1]
    with torch.no_grad():  # only the last targeted layer differs, so the earlier ones load first
        other.get_submodule(last_path).weight.mul_(3.0)
    lorakit.inject(other, lorakit.LolduConfig(r=4, target_modules=TARGETS))
    before = {k: v.clone() for k, v in lorakit.core.adapter_parameters(other).items()}
    with pytest.raises(lorakit.AdapterFileError, match="trained on another base model"):
        lorakit.core.io.load_adapter_weights(other, tmp_path)
    after = lorakit.core.adapter_parameters(other)
    assert all(torch.equal(before[k], after[k]) for k in before)
