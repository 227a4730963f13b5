"""Same weights give the same outputs in lorakit and PEFT, and adapter files load both ways."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit
from conftest import MODEL_BUILDERS, model_output, tiny_llama

VARIANTS = {
    "lora": dict(),
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
    "gaussian": dict(init="gaussian"),
    "pissa": dict(init="pissa"),
    "pissa_niter": dict(init="pissa", pissa_niter_k=4),
    "olora": dict(init="olora"),
    "freeze_a": dict(freeze_a=True),
}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"]}
TOLERANCE = 1e-5


def peft_config(options: dict) -> peft.LoraConfig:
    init = options.get("init", "default")
    if init == "default":
        init = True
    if options.get("pissa_niter_k"):
        init = f"pissa_niter_{options['pissa_niter_k']}"
    return peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=options["target_modules"], use_rslora=options.get("use_rslora", False),
        use_dora=options.get("use_dora", False), init_lora_weights=init,
    )


def perturb(model: torch.nn.Module) -> None:
    """Move the adapter away from its initial point so the update is not trivially zero."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name or "lora_A" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("architecture", ["llama", "bert"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lorakit_adapter_loads_in_peft_with_identical_outputs(tmp_path, input_ids, architecture, variant):
    options = dict(VARIANTS[variant], target_modules=TARGETS[architecture])
    ours = lorakit.inject(MODEL_BUILDERS[architecture](), lorakit.LoraConfig(r=4, alpha=8, **options))
    perturb(ours)
    expected = model_output(ours, input_ids)
    lorakit.save_adapter(ours, tmp_path)

    theirs = peft.PeftModel.from_pretrained(MODEL_BUILDERS[architecture](), tmp_path)
    assert (model_output(theirs, input_ids) - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("architecture", ["llama", "bert"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_adapter_loads_in_lorakit_with_identical_outputs(tmp_path, input_ids, architecture, variant):
    options = dict(VARIANTS[variant], target_modules=TARGETS[architecture])
    theirs = peft.get_peft_model(MODEL_BUILDERS[architecture](), peft_config(options))
    randomized_init = options.get("pissa_niter_k") is not None
    if randomized_init:
        # A raw randomized-SVD PiSSA file cannot be reproduced on load (PEFT's own loader redraws
        # the random projection too); PEFT's answer is its conversion to a plain rank-2r LoRA.
        theirs.peft_config["default"].init_lora_weights = True
        theirs.save_pretrained(tmp_path / "initial")
        theirs.peft_config["default"].init_lora_weights = peft_config(options).init_lora_weights
    perturb(theirs)
    expected = model_output(theirs, input_ids)
    if randomized_init:
        theirs.save_pretrained(tmp_path, path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    else:
        theirs.save_pretrained(tmp_path)

    ours = lorakit.load_adapter(MODEL_BUILDERS[architecture](), tmp_path)
    assert (model_output(ours, input_ids) - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("architecture", ["llama", "bert"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_weights_give_same_outputs_as_peft(input_ids, architecture, variant):
    """Copy PEFT's freshly initialised and perturbed tensors into lorakit's modules, in memory."""
    options = dict(VARIANTS[variant], target_modules=TARGETS[architecture])
    theirs = peft.get_peft_model(MODEL_BUILDERS[architecture](), peft_config(options))
    perturb(theirs)
    ours = lorakit.inject(MODEL_BUILDERS[architecture](), lorakit.LoraConfig(r=4, alpha=8, **options))
    their_state = peft.get_peft_model_state_dict(theirs)
    with torch.no_grad():
        for path, layer in lorakit.core.adapted_layers(ours):
            adapter = layer.adapters["default"]
            prefix = f"base_model.model.{path}."
            adapter.load_file_tensors({k[len(prefix):]: v for k, v in their_state.items() if k.startswith(prefix)})
            their_base = theirs.base_model.model.get_submodule(path).base_layer.weight
            if options.get("pissa_niter_k") is None:  # deterministic inits: both computed W_res alike
                assert torch.allclose(layer.base.weight, their_base, atol=1e-6)
            layer.base.weight.copy_(their_base)
    assert (model_output(ours, input_ids) - model_output(theirs, input_ids)).abs().max() <= TOLERANCE
    for mode in ("train", "eval"):  # identical dropout-free training-mode outputs too
        getattr(ours, mode)()
        getattr(theirs, mode)()
    assert (model_output(ours, input_ids) - model_output(theirs, input_ids)).abs().max() <= TOLERANCE


def test_peft_adapter_saved_with_random_init_loads(tmp_path, input_ids):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    expected = model_output(theirs, input_ids)
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert (model_output(ours, input_ids) - expected).abs().max() <= 1e-5
