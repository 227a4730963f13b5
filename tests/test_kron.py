"""Kronecker adapters (DiffuseKronA, arXiv 2402.17412; PEFT LoKr): the spec's verification recipe,
shape errors, dropout semantics, and PEFT LoKr parity both ways."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft.tuners.lokr.layer import factorization as peft_factorization
from torch import nn

import lorakit
from conftest import model_output, tiny_llama
from lorakit.core import adapted_layers
from lorakit.methods.kron import factorization, kron_matvec

TARGETS = ["q_proj", "k_proj", "up_proj", "down_proj"]


class OneLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.proj(x)


def perturb(model, seed=3, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lokr_" in name:
                param.add_(scale * torch.randn(param.shape, generator=generator))


# --- recipe 1: the Kronecker identity behind the efficient forward ------------------------------
@pytest.mark.parametrize("shapes", [((4, 3), (5, 6)), ((2, 8), (16, 3))])  # both association orders
def test_kron_matvec_equals_kronecker_product_times_x(shapes):
    generator = torch.Generator().manual_seed(0)
    A, B = torch.randn(*shapes[0], generator=generator), torch.randn(*shapes[1], generator=generator)
    x = torch.randn(shapes[0][1] * shapes[1][1], generator=generator)
    assert torch.allclose(kron_matvec(A, B, x), torch.kron(A, B) @ x, atol=1e-5)
    X = x.reshape(shapes[0][1], shapes[1][1])  # row-major
    assert torch.allclose(kron_matvec(A, B, x), (A @ X @ B.T).reshape(-1), atol=1e-5)


# --- recipe 2: identity at init, official init ---------------------------------------------------
def test_default_is_diffusekrona_with_official_init_and_identity():
    config = lorakit.KronConfig()
    assert (config.a1, config.a2, config.factor_layout) == (64, 8, "diffusekrona")
    model = OneLinear(in_features=128, out_features=256)
    x = torch.randn(2, 5, 128)
    expected = model(x).detach()
    torch.manual_seed(1)
    lorakit.inject(model, lorakit.KronConfig(target_modules=["proj"]))
    adapter = model.proj.adapters["default"]
    assert adapter.lokr_w1.shape == (64, 8) and adapter.lokr_w2.shape == (4, 16)
    assert torch.count_nonzero(adapter.lokr_w2) == 0
    assert abs(adapter.lokr_w1.std().item() - 1 / 64) < 0.2 / 64  # A ~ N(0, (1/a1)^2)
    assert adapter.scaling == 1.0
    with torch.no_grad():
        assert torch.equal(model(x), expected)


# --- recipe 3 and 4: layer vs merged weight, parameter count -------------------------------------
def test_layer_forward_equals_merged_weight_and_counts_parameters():
    model = OneLinear(in_features=64, out_features=48)
    lorakit.inject(model, lorakit.KronConfig(a1=8, a2=4, target_modules=["proj"]))
    layer = model.proj
    adapter = layer.adapters["default"]
    perturb(model)
    A, B = adapter.lokr_w1.detach(), adapter.lokr_w2.detach()
    assert A.shape == (8, 4) and B.shape == (6, 16)
    assert lorakit.trainable_parameters(model)[0] == 128  # a1 a2 + b1 b2 = 32 + 96
    W, b = layer.base.weight.detach(), layer.base.bias.detach()
    for x in (torch.randn(64), torch.randn(5, 64), torch.randn(3, 7, 64)):
        with torch.no_grad():
            out = model(x)
        assert out.shape == (*x.shape[:-1], 48)
        assert torch.allclose(out, x @ (W + torch.kron(A, B)).T + b, atol=1e-5)
    assert torch.allclose(adapter.delta_weight(W), torch.kron(A, B), atol=1e-7)


def test_forward_never_forms_the_kronecker_product(monkeypatch):
    model = OneLinear(in_features=64, out_features=48)
    lorakit.inject(model, lorakit.KronConfig(a1=8, a2=4, target_modules=["proj"]))
    perturb(model)
    expected = model(torch.ones(2, 64)).detach()

    def refuse(*args, **kwargs):
        raise AssertionError("forward formed the Kronecker product")

    monkeypatch.setattr(torch, "kron", refuse)
    assert torch.allclose(model(torch.ones(2, 64)), expected)


# --- recipe 5: rank ---------------------------------------------------------------------------------
def test_kronecker_update_rank_is_product_of_factor_ranks():
    model = OneLinear(in_features=64, out_features=48).double()
    lorakit.inject(model, lorakit.KronConfig(a1=8, a2=4, init="random", target_modules=["proj"]))
    adapter = model.proj.adapters["default"]
    dW = adapter.delta_weight(model.proj.base.weight).detach()
    assert torch.linalg.matrix_rank(dW).item() == min(8, 4) * min(6, 16) == 24
    # far above a LoRA of the same parameter budget (128 / (48 + 64) -> rank 1)


# --- recipe 6: divisibility ---------------------------------------------------------------------------
@pytest.mark.parametrize("a1, a2, bad", [(5, 4, "a1=5 does not divide out=48"), (8, 3, "a2=3 does not divide in=64")])
def test_factors_that_do_not_divide_the_layer_are_refused(a1, a2, bad):
    model = OneLinear(in_features=64, out_features=48)
    x = torch.randn(3, 64)
    expected = model(x).detach()
    with pytest.raises(lorakit.ConfigError, match=bad) as err:
        lorakit.inject(model, lorakit.KronConfig(a1=a1, a2=a2, target_modules=["proj"]))
    assert "proj (in=64, out=48)" in str(err.value) and "divisors" in str(err.value)
    assert lorakit.adapter_configs(model) == {} and torch.equal(model(x), expected)  # nothing left behind


# --- recipe 8: DiffuseKronA = LoKr with full factors and alpha = r ------------------------------------
def test_diffusekrona_reproduces_lokr_delta_weight_when_factors_agree():
    theirs = peft.get_peft_model(OneLinear(16, 16), peft.LoKrConfig(r=4, alpha=4, decompose_factor=4, target_modules=["proj"]))
    perturb(theirs)
    lokr_layer = theirs.base_model.model.proj
    w1, w2 = lokr_layer.lokr_w1["default"], lokr_layer.lokr_w2["default"]  # full w2: r >= max(4, 4) / 2
    ours = lorakit.inject(OneLinear(16, 16), lorakit.KronConfig(a1=4, a2=4, target_modules=["proj"]))
    adapter = ours.proj.adapters["default"]
    with torch.no_grad():
        adapter.lokr_w1.copy_(w1)
        adapter.lokr_w2.copy_(w2)
    expected = lokr_layer.get_delta_weight("default")
    assert (adapter.delta_weight(ours.proj.base.weight) - expected).abs().max() <= 1e-6


# --- PEFT LoKr: factor sizes, layout, parity both ways -----------------------------------------------
def test_factorization_matches_peft():
    for dim in range(1, 200):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 64):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


PEFT_CONFIGS = {
    "default": dict(),
    "low-rank-w2": dict(r=2, alpha=6),
    "rank-at-the-boundary": dict(r=4, alpha=3, decompose_both=True),  # r == max(w2 dims) / 2: full w2
    "decompose-both": dict(r=1, alpha=2, decompose_both=True),
    "factor-4": dict(r=3, decompose_factor=4, decompose_both=True),
    "patterns": dict(r=2, alpha=4, rank_pattern={"k_proj": 1, r"layers\.1\.mlp\.up_proj": 8}, alpha_pattern={"down_proj": 5}),
    "lycoris-init": dict(r=2, init_weights="lycoris"),
}


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_lokr_mode_builds_peft_lokr_parameters(name):
    kwargs = dict(PEFT_CONFIGS[name])
    theirs = peft.get_peft_model(tiny_llama(), peft.LoKrConfig(target_modules=TARGETS, **kwargs))
    peft_params = {k.replace(".default", "").removeprefix("base_model.model."): v
                   for k, v in theirs.named_parameters() if "lokr_" in k}
    ours = lorakit.inject(tiny_llama(), lorakit.KronConfig.from_file_dict(
        {"peft_type": "LOKR", "target_modules": TARGETS, **kwargs}))
    our_params = {k.replace(".adapters.default", ""): v for k, v in lorakit.core.adapter_parameters(ours).items()}
    assert {k: v.shape for k, v in our_params.items()} == {k: v.shape for k, v in peft_params.items()}
    # PEFT's init: the same factors are zero (identity at init), the others drawn
    assert {k for k, v in our_params.items() if not v.any()} == {k for k, v in peft_params.items() if not v.any()}


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_peft_lokr_folder_loads_in_lorakit(tmp_path, input_ids, name):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoKrConfig(target_modules=TARGETS, **PEFT_CONFIGS[name]))
    perturb(theirs)
    expected = model_output(theirs, input_ids)
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert lorakit.adapter_configs(ours)["default"].factor_layout == "lokr"
    assert (model_output(ours, input_ids) - expected).abs().max() <= 1e-5
    lorakit.merge(ours)
    assert (model_output(ours, input_ids) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("kwargs", [
    dict(r=2, alpha=6.0),
    dict(r=1, decompose_both=True, decompose_factor=3, init="lycoris"),
    dict(r=2, rank_pattern={"k_proj": 1}, alpha_pattern={"up_proj": 3.0}),
])
def test_lorakit_lokr_folder_loads_in_peft(tmp_path, input_ids, kwargs):
    ours = lorakit.inject(tiny_llama(), lorakit.KronConfig(factor_layout="lokr", target_modules=TARGETS, **kwargs))
    perturb(ours)
    lorakit.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOKR" and "lorakit" not in config
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert (model_output(theirs, input_ids) - model_output(ours, input_ids)).abs().max() <= 1e-5


def test_diffusekrona_layout_is_saved_in_lorakit_format_and_round_trips(tmp_path, input_ids):
    ours = lorakit.inject(tiny_llama(), lorakit.KronConfig(a1=16, a2=2, target_modules=TARGETS))
    perturb(ours)
    lorakit.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] is None and config["lorakit"] == {"method": "kron"}
    assert (config["a1"], config["a2"]) == (16, 2)
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert (model_output(reloaded, input_ids) - model_output(ours, input_ids)).abs().max() == 0


# --- configuration errors and unsupported targets --------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(r=4), "r only applies with factor_layout='lokr'"),
    (dict(decompose_factor=4, decompose_both=True), "decompose_factor, decompose_both only apply"),
    (dict(factor_layout="lokr", a1=16), "a1=16, a2=8 only apply with factor_layout='diffusekrona'"),
    (dict(factor_layout="lokr", decompose_factor=0), "decompose_factor=0 is invalid"),
    (dict(a2=0), "a2=0 is invalid"),
    (dict(factor_layout="kron"), "factor_layout='kron' is invalid"),
    (dict(rank_dropout=1.0), r"rank_dropout=1.0 is invalid"),
])
def test_invalid_configs_name_the_field(kwargs, match):
    with pytest.raises(lorakit.ConfigError, match=match):
        lorakit.KronConfig(**kwargs)


@pytest.mark.parametrize("key, value", [("exclude_modules", ["k_proj"]), ("layers_to_transform", [0]),
                                        ("modules_to_save", ["lm_head"]), ("init_weights", "gaussian")])
def test_peft_config_fields_lorakit_cannot_honour_are_refused(key, value):
    with pytest.raises(lorakit.ConfigError, match=key):
        lorakit.KronConfig.from_file_dict({"peft_type": "LOKR", "target_modules": TARGETS, key: value})


def test_convolution_and_embedding_targets_are_refused():
    model = nn.Sequential(nn.Embedding(10, 16), nn.Conv1d(16, 16, 1), nn.Linear(16, 16))
    for target in (["0"], ["1"]):
        with pytest.raises(lorakit.TargetError, match="cannot adapt"):
            lorakit.inject(model, lorakit.KronConfig(factor_layout="lokr", target_modules=target))


# --- dropout semantics (PEFT's rank_dropout / module_dropout) ----------------------------------------
def _update(model, x):
    with lorakit.disabled(model):
        base = model(x)
    return model(x) - base


def test_rank_dropout_drops_whole_output_rows_in_training_only():
    model = OneLinear(in_features=64, out_features=48)
    lorakit.inject(model, lorakit.KronConfig(a1=8, a2=4, rank_dropout=0.5, target_modules=["proj"]))
    perturb(model)
    x = torch.randn(6, 64)
    with torch.no_grad():
        full = _update(model.eval(), x)
        torch.manual_seed(0)
        dropped = _update(model.train(), x)
    kept = (dropped != 0).all(dim=0)
    assert 0 < kept.sum() < 48 and (dropped[:, ~kept] == 0).all()
    assert torch.allclose(dropped[:, kept], full[:, kept], atol=1e-6)


def test_rank_dropout_scale_rescales_kept_rows_by_the_mask_mean():
    model = OneLinear(in_features=64, out_features=48)
    lorakit.inject(model, lorakit.KronConfig(a1=8, a2=4, rank_dropout=0.5, rank_dropout_scale=True, target_modules=["proj"]))
    perturb(model)
    x = torch.randn(6, 64)
    with torch.no_grad():
        full = _update(model.eval(), x)
        torch.manual_seed(0)
        dropped = _update(model.train(), x)
    kept = (dropped != 0).all(dim=0)
    assert torch.allclose(dropped[:, kept], full[:, kept] * 48 / kept.sum(), atol=1e-5)


def test_module_dropout_skips_the_whole_update_in_training_only():
    model = OneLinear(in_features=64, out_features=48)
    lorakit.inject(model, lorakit.KronConfig(a1=8, a2=4, module_dropout=0.5, target_modules=["proj"]))
    perturb(model)
    x = torch.randn(2, 64)
    with torch.no_grad():
        full = _update(model.eval(), x)
        assert full.abs().max() > 0
        torch.manual_seed(0)
        outcomes = [_update(model.train(), x) for _ in range(30)]
    skipped = sum(bool((u == 0).all()) for u in outcomes)
    applied = sum(bool(torch.allclose(u, full, atol=1e-6)) for u in outcomes)
    assert skipped + applied == 30 and 0 < skipped < 30


def test_half_precision_base_gets_fp32_factors_and_keeps_its_dtype(input_ids):
    model = tiny_llama().to(torch.bfloat16)
    lorakit.inject(model, lorakit.KronConfig(factor_layout="lokr", r=2, target_modules=TARGETS))
    adapter = next(iter(adapted_layers(model)))[1].adapters["default"]
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    assert model_output(model, input_ids).dtype == torch.bfloat16


def test_gpt2_conv1d_layers_merge_exactly(input_ids):
    from conftest import tiny_gpt2

    model = lorakit.inject(tiny_gpt2(), lorakit.KronConfig(a1=8, a2=4, target_modules=["c_attn", "c_fc", "c_proj"]))
    perturb(model)
    unmerged = model_output(model, input_ids)
    lorakit.merge(model)
    assert (model_output(model, input_ids) - unmerged).abs().max() <= 1e-5
