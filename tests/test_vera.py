"""VeRA (arXiv 2310.11454): reference formula, bases regenerated from the seed, PEFT parity both ways."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from conftest import logits_in_fresh_process, model_output, tiny_llama
from lorakit.core import adapted_layers

TARGETS = ["q_proj", "k_proj", "up_proj", "down_proj"]


def perturb(model, seed=4):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def test_forward_matches_the_reference_formula(input_ids):
    model = lorakit.inject(tiny_llama(), lorakit.VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=5))
    perturb(model)
    for path, layer in adapted_layers(model):
        adapter = layer.adapters["default"]
        A = adapter.vera_A[:, : layer.in_features]
        B = adapter.vera_B[: layer.out_features]
        expected_dW = torch.diag(adapter.vera_lambda_b) @ B @ torch.diag(adapter.vera_lambda_d) @ A
        assert torch.allclose(adapter.delta_weight(layer.base.weight), expected_dW, atol=1e-6)
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            assert torch.allclose(layer(x), x @ (layer.base.weight + expected_dW).T, atol=1e-5)
    shared = {adapter.vera_A.data_ptr() for _, layer in adapted_layers(model) for adapter in layer.adapters.values()}
    assert len(shared) == 1  # one shared basis, sized to the largest layer
    assert next(iter(adapted_layers(model)))[1].adapters["default"].vera_A.shape == (8, 48)


def test_saved_file_holds_no_bases_and_names_the_generator(tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.VeraConfig(r=8, target_modules=TARGETS))
    lorakit.save_adapter(model, tmp_path)
    assert all("vera_lambda" in key for key in load_file(tmp_path / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["save_projection"] is False and config["projection_prng_key"] == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        assert "Generator" in json.loads(handle.metadata()["lorakit"])["basis_generator"]


def test_saved_adapter_loads_identically_in_a_fresh_process(tmp_path, input_ids):
    model = lorakit.inject(tiny_llama(), lorakit.VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=11))
    perturb(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    fresh = logits_in_fresh_process(tmp_path / "adapter", input_ids, tmp_path)
    assert torch.equal(fresh, model_output(model, input_ids))


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_vera_adapter_loads_in_lorakit(tmp_path, input_ids, save_projection):
    theirs = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=7,
                                                              save_projection=save_projection))
    perturb(theirs)
    expected = model_output(theirs, input_ids)
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert (model_output(ours, input_ids) - expected).abs().max() <= 1e-6


def test_lorakit_vera_adapter_loads_in_peft(tmp_path, input_ids):
    ours = lorakit.inject(tiny_llama(), lorakit.VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=7))
    perturb(ours)
    lorakit.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert (model_output(theirs, input_ids) - model_output(ours, input_ids)).abs().max() <= 1e-6


def test_saved_projections_that_do_not_fit_are_refused(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=8, target_modules=["q_proj"], save_projection=True))
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "up_proj"]  # widens the shared basis beyond the saved one
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lorakit.AdapterFileError, match="base_model.vera_B"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_random_basis_is_a_pure_function_of_the_seed():
    from lorakit.core.random_basis import kaiming_uniform_bases

    first = kaiming_uniform_bases(3, [(4, 10), (6, 4)])
    again = kaiming_uniform_bases(3, [(4, 10), (6, 4)])
    other = kaiming_uniform_bases(4, [(4, 10), (6, 4)])
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    bound = (3.0 * 2.0 / 10) ** 0.5  # Kaiming-uniform, gain sqrt(2), fan_in = 10
    assert first[0].abs().max() <= bound and first[0].abs().max() > 0.8 * bound


def test_moving_the_model_keeps_one_shared_basis():
    model = lorakit.inject(tiny_llama(), lorakit.VeraConfig(r=8, target_modules=TARGETS))
    model.to(torch.float64)  # a dtype move exercises the same per-module _apply path as a device move
    adapters = [layer.adapters["default"] for _, layer in adapted_layers(model)]
    assert {a.vera_A.dtype for a in adapters} == {torch.float64}
    assert len({a.vera_A.data_ptr() for a in adapters}) == 1 and len({a.vera_B.data_ptr() for a in adapters}) == 1
