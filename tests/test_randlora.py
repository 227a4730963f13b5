"""RandLoRA (arXiv 2502.00987): the spec's recipe 1-8, PEFT parity both ways, bases from the seed."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import lorakit
from conftest import logits_in_fresh_process, model_output, tiny_gpt2, tiny_llama
from lorakit.core import adapted_layers
from lorakit.core.random_basis import RANDLORA_GENERATOR_NAME, randlora_bases

TARGETS = ["q_proj", "k_proj", "up_proj", "down_proj"]  # square, narrow, wide and tall layers


class Holder(nn.Module):
    """One Linear layer called `lin`, so a test can pick any (in, out)."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(in_features, out_features, dtype=dtype)

    def forward(self, x):
        return self.lin(x)


def adapted(in_features, out_features, r, dtype=torch.float64, **kwargs):
    model = lorakit.inject(Holder(in_features, out_features, dtype), lorakit.RandLoraConfig(r=r, target_modules=["lin"], **kwargs))
    return model, model.lin.adapters["default"]


def randomise(model, seed=4, std=1.0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "randlora_" in name:
                param.copy_(std * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def reference_delta(adapter) -> torch.Tensor:
    """s * sum_n B_n diag(Lambda[:, n]) A diag(Gamma[n]), B_n[:, k] = column k N + n of the stacked B."""
    r, n_bases = adapter.randlora_lambda.shape
    A = adapter.randlora_A[:, 0, : adapter.d_min].double()
    B_flat = adapter.randlora_B[: adapter.d_max, :n_bases, :].double().reshape(adapter.d_max, n_bases * r)
    lam, gamma = adapter.randlora_lambda.double(), adapter.randlora_gamma.double()
    total = torch.zeros(adapter.d_max, adapter.d_min, dtype=torch.float64)
    for n in range(n_bases):
        B_n = torch.stack([B_flat[:, k * n_bases + n] for k in range(r)], dim=1)
        total += B_n @ torch.diag(lam[:, n]) @ A @ torch.diag(gamma[n])
    scale = adapter.config.alpha / adapter.config.r
    if adapter.config.scaling == "official":
        scale /= math.sqrt(n_bases)
    delta = scale * total
    return delta if adapter.in_features == adapter.d_min else delta.T


# 1 ------------------------------------------------------------------------------------------
def test_output_equals_base_output_exactly_at_init(input_ids):
    reference = model_output(tiny_llama(), input_ids)
    model = lorakit.inject(tiny_llama(), lorakit.RandLoraConfig(r=4, target_modules=TARGETS))
    assert torch.equal(model_output(model, input_ids), reference)


# 2 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_features, out_features, r, n_bases, count", [(64, 48, 8, 6, 336), (50, 64, 16, 4, 264)])
def test_trainable_count_and_shapes_match_the_formula_and_peft(in_features, out_features, r, n_bases, count):
    model, adapter = adapted(in_features, out_features, r, dtype=torch.float32)
    d_min = min(in_features, out_features)
    assert adapter.randlora_lambda.shape == (r, n_bases) and adapter.randlora_gamma.shape == (n_bases, d_min)
    assert lorakit.trainable_parameters(model)[0] == count == n_bases * (r + d_min)
    theirs = peft.get_peft_model(Holder(in_features, out_features, torch.float32), peft.RandLoraConfig(r=r, target_modules=["lin"]))
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == count
    # and the same initial values: Lambda = 0, Gamma = 1 / max(N, d_min)
    assert torch.equal(adapter.randlora_lambda, torch.zeros(r, n_bases))
    assert torch.equal(adapter.randlora_gamma, theirs.base_model.model.lin.randlora_gamma["default"])
    assert adapter.randlora_gamma[0, 0].item() == pytest.approx(1 / max(n_bases, d_min))


# 3 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_features, out_features, r", [(64, 48, 8), (50, 64, 16)])
def test_update_is_full_rank_where_lora_of_equal_budget_is_not(in_features, out_features, r):
    model, adapter = adapted(in_features, out_features, r)
    randomise(model)
    d_min = min(in_features, out_features)
    assert torch.linalg.matrix_rank(adapter.delta_weight(model.lin.base.weight)) == d_min
    budget = lorakit.trainable_parameters(model)[0]
    lora_rank = budget // (in_features + out_features)  # the LoRA rank with at most the same count
    lora = torch.randn(out_features, lora_rank, dtype=torch.float64) @ torch.randn(lora_rank, in_features, dtype=torch.float64)
    assert torch.linalg.matrix_rank(lora) <= lora_rank < d_min


# 4 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scaling", ["official", "peft"])
@pytest.mark.parametrize("in_features, out_features, r", [(64, 48, 8), (50, 64, 16), (40, 40, 6)])
def test_delta_and_forward_equal_the_reference_sum(in_features, out_features, r, scaling):
    model, adapter = adapted(in_features, out_features, r, alpha=3.0, scaling=scaling)
    randomise(model)
    expected = reference_delta(adapter)
    assert expected.shape == (out_features, in_features)
    assert (adapter.delta_weight(model.lin.base.weight) - expected).abs().max() < 1e-10
    x = torch.randn(5, in_features, dtype=torch.float64)
    with torch.no_grad():
        assert (model(x) - (x @ (model.lin.base.weight + expected).T + model.lin.base.bias)).abs().max() < 1e-10


def test_official_scaling_divides_by_sqrt_of_the_number_of_bases():
    _, official = adapted(64, 48, 8, alpha=16.0)
    _, peft_rule = adapted(64, 48, 8, alpha=16.0, scaling="peft")
    assert official.scale == pytest.approx(16.0 / 8 / math.sqrt(6)) and peft_rule.scale == 16.0 / 8


# 5 ------------------------------------------------------------------------------------------
def test_a_layer_and_its_transpose_train_the_same_shapes_and_give_transposed_updates():
    wide_model, wide = adapted(48, 64, 8)
    tall_model, tall = adapted(64, 48, 8)
    assert wide.randlora_lambda.shape == tall.randlora_lambda.shape == (8, 6)
    assert wide.randlora_gamma.shape == tall.randlora_gamma.shape == (6, 48)
    randomise(wide_model)
    randomise(tall_model)
    assert torch.equal(wide.randlora_A, tall.randlora_A) and torch.equal(wide.randlora_B, tall.randlora_B)
    assert torch.allclose(wide.delta_weight(None), tall.delta_weight(None).T, atol=1e-12)


# 6 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_features, out_features", [(64, 48), (48, 64)])
def test_merge_then_unmerge_restores_w_and_merged_output_equals_unmerged_in_fp64(in_features, out_features):
    model, _ = adapted(in_features, out_features, 8)
    randomise(model)
    weight = model.lin.base.weight.detach().clone()
    x = torch.randn(5, in_features, dtype=torch.float64)
    with torch.no_grad():
        unmerged = model(x)
        lorakit.merge(model)
        assert (model(x) - unmerged).abs().max() < 1e-10
        lorakit.unmerge(model)
    assert (model.lin.base.weight - weight).abs().max() < 1e-10


# 7 ------------------------------------------------------------------------------------------
def test_bases_are_a_pure_function_of_the_key():
    first = lorakit.inject(tiny_llama(), lorakit.RandLoraConfig(r=4, target_modules=TARGETS, projection_prng_key=5))
    again = lorakit.inject(tiny_llama(1), lorakit.RandLoraConfig(r=4, target_modules=TARGETS, projection_prng_key=5))
    other = lorakit.inject(tiny_llama(), lorakit.RandLoraConfig(r=4, target_modules=TARGETS, projection_prng_key=6))
    a, b, c = (next(adapted_layers(m))[1].adapters["default"] for m in (first, again, other))
    assert torch.equal(a.randlora_A, b.randlora_A) and torch.equal(a.randlora_B, b.randlora_B)
    assert not torch.equal(a.randlora_A, c.randlora_A)
    assert a.randlora_A.shape == (4, 1, 48) and a.randlora_B.shape == (48, 12, 4)  # sized to the largest layer
    ptrs = {layer.adapters["default"].randlora_B.data_ptr() for _, layer in adapted_layers(first)}
    assert len(ptrs) == 1  # one storage, sliced per layer


def test_saved_file_holds_no_bases_and_names_the_generator(tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.RandLoraConfig(r=4, target_modules=TARGETS))
    lorakit.save_adapter(model, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys and all(k.endswith(("randlora_lambda", "randlora_gamma")) for k in keys)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "RANDLORA" and config["save_projection"] is False
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        extras = json.loads(handle.metadata()["lorakit"])
    assert extras["basis_generator"] == RANDLORA_GENERATOR_NAME and extras["scaling"] == "official"


def test_saved_adapter_loads_identically_in_a_fresh_process(tmp_path, input_ids):
    model = lorakit.inject(tiny_llama(), lorakit.RandLoraConfig(r=4, alpha=8, target_modules=TARGETS, projection_prng_key=11))
    randomise(model, std=0.3)
    lorakit.save_adapter(model, tmp_path / "adapter")
    fresh = logits_in_fresh_process(tmp_path / "adapter", input_ids, tmp_path)
    assert (fresh - model_output(model, input_ids)).abs().max() <= 1e-6  # Lambda is rescaled by sqrt(N) on the way


# 8 ------------------------------------------------------------------------------------------
def test_fits_a_full_rank_target_better_than_any_rank_r_lora():
    target_model, target = adapted(32, 32, 4, alpha=4.0)
    randomise(target_model, seed=9)
    with torch.no_grad():
        wanted = target.delta_weight(None)
    singular = torch.linalg.svdvals(wanted)
    assert (singular > 1e-8 * singular[0]).sum() == 32  # a full-rank target
    eckart_young = (singular[4:].square().sum().sqrt() / singular.square().sum().sqrt()).item()

    model, adapter = adapted(32, 32, 4, alpha=4.0)  # same key, so the same bases
    optimiser = torch.optim.Adam([adapter.randlora_lambda, adapter.randlora_gamma], lr=1e-2)
    for _ in range(3000):
        optimiser.zero_grad()
        loss = (adapter.delta_weight(None) - wanted).square().sum()
        loss.backward()
        optimiser.step()
    error = ((adapter.delta_weight(None) - wanted).norm() / wanted.norm()).item()
    assert error < 0.5 * eckart_young


def test_einsum_gradients_equal_autograd_of_the_plain_product():
    from lorakit.methods.randlora import ScaledSharedBasis

    A = torch.randn(3, 7, dtype=torch.float64)
    lam = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l, g: ScaledSharedBasis.apply(A, l, g), (lam, gamma))


# PEFT parity ----------------------------------------------------------------------------------
def peft_config(basis="dense", **kwargs):
    return peft.RandLoraConfig(target_modules=TARGETS, sparse=basis == "sparse", very_sparse=basis == "very_sparse", **kwargs)


@pytest.mark.parametrize("basis", ["dense", "sparse", "very_sparse"])
@pytest.mark.parametrize("scaling", ["official", "peft"])
def test_same_weights_give_peft_outputs(input_ids, basis, scaling):
    theirs = peft.get_peft_model(tiny_llama(), peft_config(basis, r=4, randlora_alpha=8, projection_prng_key=2))
    randomise(theirs, std=0.3)
    ours = lorakit.inject(tiny_llama(), lorakit.RandLoraConfig(r=4, alpha=8, scaling=scaling, basis=basis,
                                                               target_modules=TARGETS, projection_prng_key=2))
    their_params = {n: p for n, p in theirs.named_parameters() if "randlora_" in n}
    for path, layer in adapted_layers(ours):
        adapter = layer.adapters["default"]
        their_layer = theirs.base_model.model.get_submodule(path)
        assert torch.equal(adapter.randlora_A, their_layer.randlora_A["default"])  # bit for bit
        assert torch.equal(adapter.randlora_B, their_layer.randlora_B["default"])
        with torch.no_grad():  # official scaling: the same update needs Lambda * sqrt(N)
            adapter.randlora_lambda.copy_(their_params[f"base_model.model.{path}.randlora_lambda.default"] / adapter.file_lambda_factor)
            adapter.randlora_gamma.copy_(their_params[f"base_model.model.{path}.randlora_gamma.default"])
    assert (model_output(ours, input_ids) - model_output(theirs, input_ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("basis", ["dense", "sparse"])
def test_peft_randlora_folder_loads_in_lorakit(tmp_path, input_ids, save_projection, basis):
    theirs = peft.get_peft_model(tiny_llama(), peft_config(basis, r=4, randlora_alpha=8, projection_prng_key=7, save_projection=save_projection))
    randomise(theirs, std=0.3)
    expected = model_output(theirs, input_ids)
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert lorakit.adapter_configs(ours)["default"].scaling == "peft"
    assert (model_output(ours, input_ids) - expected).abs().max() <= 1e-6


def test_saved_projections_are_loaded_not_regenerated(tmp_path, input_ids):
    theirs = peft.get_peft_model(tiny_llama(), peft_config(r=4, randlora_alpha=8, save_projection=True))
    randomise(theirs, std=0.3)
    with torch.no_grad():  # bases no seed would give: only a loader that reads them can match
        theirs.base_model.randlora_A["default"].mul_(-2.0)
    expected = model_output(theirs, input_ids)
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert (model_output(ours, input_ids) - expected).abs().max() <= 1e-6
    lorakit.save_adapter(ours, tmp_path / "again")  # and lorakit still never writes bases
    assert all("randlora_A" not in k for k in load_file(tmp_path / "again" / "adapter_model.safetensors"))


@pytest.mark.parametrize("scaling", ["official", "peft"])
def test_lorakit_randlora_adapter_loads_in_peft(tmp_path, input_ids, scaling):
    ours = lorakit.inject(tiny_llama(), lorakit.RandLoraConfig(r=4, alpha=8, scaling=scaling, target_modules=TARGETS, projection_prng_key=7))
    randomise(ours, std=0.3)
    lorakit.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert (model_output(theirs, input_ids) - model_output(ours, input_ids)).abs().max() <= 1e-5


def test_gpt2_conv1d_layers_match_peft(input_ids):
    targets = ["c_attn", "c_fc", "mlp.c_proj"]  # 32->96, 32->128, 128->32 (transposed roles)
    theirs = peft.get_peft_model(tiny_gpt2(), peft.RandLoraConfig(r=8, randlora_alpha=8, target_modules=targets, fan_in_fan_out=True))
    randomise(theirs, std=0.3)
    ours = lorakit.inject(tiny_gpt2(), lorakit.RandLoraConfig(r=8, alpha=8, scaling="peft", target_modules=targets))
    their_params = {n: p for n, p in theirs.named_parameters() if "randlora_" in n}
    for path, layer in adapted_layers(ours):
        with torch.no_grad():
            layer.adapters["default"].randlora_lambda.copy_(their_params[f"base_model.model.{path}.randlora_lambda.default"])
            layer.adapters["default"].randlora_gamma.copy_(their_params[f"base_model.model.{path}.randlora_gamma.default"])
    assert (model_output(ours, input_ids) - model_output(theirs, input_ids)).abs().max() <= 1e-5
    unmerged = model_output(ours, input_ids)
    lorakit.merge(ours)
    assert (model_output(ours, input_ids) - unmerged).abs().max() <= 1e-5


# Edge cases -----------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["embed_tokens", "conv"])
def test_embedding_and_convolution_targets_are_refused(target):
    model = tiny_llama()
    model.conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(lorakit.TargetError, match="cannot adapt"):
        lorakit.inject(model, lorakit.RandLoraConfig(r=4, target_modules=[target]))


def test_rank_above_d_min_gives_one_basis():
    model, adapter = adapted(64, 16, 40)
    assert adapter.num_bases == 1 and adapter.randlora_gamma.shape == (1, 16)
    assert lorakit.trainable_parameters(model)[0] == 40 + 16
    randomise(model)
    assert torch.linalg.matrix_rank(adapter.delta_weight(None)) == 16


def test_second_adapter_with_other_rank_gets_its_own_bases(input_ids):
    model = lorakit.inject(tiny_llama(), lorakit.RandLoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    randomise(model, std=0.3)
    first = model_output(model, input_ids)
    lorakit.inject(model, lorakit.RandLoraConfig(r=8, alpha=8, target_modules=TARGETS, projection_prng_key=3), name="wide")
    q = model.model.layers[0].self_attn.q_proj
    assert q.adapters["default"].randlora_A.shape == (4, 1, 32) and q.adapters["wide"].randlora_A.shape == (8, 1, 48)
    assert torch.equal(model_output(model, input_ids), first)  # the new adapter is inactive and leaves the first alone
    lorakit.set_active(model, ["default", "wide"])
    randomise(model, seed=5, std=0.3)
    lorakit.set_active(model, ["wide"])
    wide_only = model_output(model, input_ids)
    assert not torch.allclose(wide_only, first)


def test_invalid_fields_are_refused_with_the_allowed_values():
    with pytest.raises(lorakit.ConfigError, match="basis"):
        lorakit.RandLoraConfig(basis="ternary")
    with pytest.raises(lorakit.ConfigError, match="scaling"):
        lorakit.RandLoraConfig(scaling="rslora")
    with pytest.raises(lorakit.ConfigError, match="r="):
        lorakit.RandLoraConfig(r=0)


def test_sparse_bases_are_ternary_with_the_documented_density():
    A, B = randlora_bases(0, 16, 8, 128, 256, sparsity=3.0)
    values = torch.unique(B * B.std() / B.abs().max())  # undo the std scaling
    assert set(values.round().tolist()) <= {-1.0, 0.0, 1.0}
    assert abs((B != 0).float().mean().item() - 1 / 3) < 0.02
    assert abs(B.std().item() - 1.0) < 1e-5 and abs(A.std().item() - 1.0) < 1e-5
