"""The checks every adapter family must pass, run on every case in `cases.CASES`."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import tiny_llama
from conformance.cases import CASES

TARGETS = ["q_proj", "k_proj", "down_proj", "up_proj"]  # square, narrow, wide and tall layers
INPUT = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(5))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def adapted(case_name: str, seed: int = 0):
    base = tiny_llama(seed)
    reference = logits(base)
    torch.manual_seed(11)
    model = lorakit.inject(base, CASES[case_name].make_config(TARGETS))
    return model, reference


def move_off_init(model) -> None:
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in lorakit.core.adapter_parameters(model).values():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_every_registered_method_has_a_case():
    covered = {case.method for case in CASES.values()}
    assert set(lorakit.registered_methods()) <= covered


@pytest.mark.parametrize("case_name", list(CASES))
def test_identity_at_init(case_name):
    model, reference = adapted(case_name)
    if CASES[case_name].identity_at_init:
        assert (logits(model) - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("case_name", list(CASES))
def test_merge_then_unmerge_restores_base_weight(case_name):
    model, _ = adapted(case_name)
    move_off_init(model)
    before = {path: layer.base.weight.detach().clone() for path, layer in lorakit.core.adapted_layers(model)}
    lorakit.merge(model)
    lorakit.unmerge(model)
    for path, layer in lorakit.core.adapted_layers(model):
        assert relative_error(layer.base.weight, before[path]) <= 1e-6


@pytest.mark.parametrize("case_name", list(CASES))
def test_merged_output_equals_unmerged_output(case_name):
    model, _ = adapted(case_name)
    move_off_init(model)
    unmerged = logits(model)
    lorakit.merge(model)
    assert all(layer.merged == ["default"] for _, layer in lorakit.core.adapted_layers(model))
    assert (logits(model) - unmerged).abs().max() <= 1e-5


@pytest.mark.parametrize("case_name", list(CASES))
def test_save_load_round_trip_on_untouched_base(tmp_path, case_name):
    model, _ = adapted(case_name)
    move_off_init(model)
    expected = logits(model)
    lorakit.save_adapter(model, tmp_path)
    reloaded = lorakit.load_adapter(tiny_llama(0), tmp_path)
    assert (logits(reloaded) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("case_name", list(CASES))
def test_trainable_parameter_count_matches_formula(case_name):
    case = CASES[case_name]
    model, _ = adapted(case_name)
    config = lorakit.adapter_configs(model)["default"]
    expected = sum(
        case.trainable_count(config, layer.in_features, layer.out_features)
        for _, layer in lorakit.core.adapted_layers(model)
    )
    shapes = {(layer.in_features, layer.out_features) for _, layer in lorakit.core.adapted_layers(model)}
    assert len(shapes) >= 2
    trainable, total = lorakit.trainable_parameters(model)
    assert trainable == expected
    assert total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("case_name", list(CASES))
def test_gradients_reach_exactly_the_adapter_parameters(case_name):
    model, _ = adapted(case_name)
    move_off_init(model)  # with B = 0, A would get a zero (but present) gradient
    model.train()
    model(input_ids=INPUT, labels=INPUT).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert trainable and all(".adapters.default." in name for name in trainable)
