"""ALLoRA (arXiv 2410.09692): the spec's verification recipe, a real model, `lorakit train`."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lorakit
from conftest import tiny_llama
from lorakit.core import adapted_layers
from lorakit.optim import ALLoRA, build_optimizer
from lorakit.optim.allora import allora_coefficients

ETA = 2.0


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 6)

    def forward(self, x):
        return self.proj(x)


def toy(seed: int = 0, B: torch.Tensor | None = None, A: torch.Tensor | None = None):
    """Frozen Linear(8 -> 6) in float64 with a scaling-free, dropout-free LoRA (r = 2), as the paper."""
    torch.manual_seed(seed)
    model = lorakit.inject(Toy().double(), lorakit.LoraConfig(r=2, alpha=2, dropout=0.0, target_modules=["proj"]))
    adapter = model.proj.adapters["default"]
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        random_A, random_B = (torch.randn(shape, generator=generator, dtype=torch.float64) for shape in ((2, 8), (6, 2)))
        adapter.lora_A.weight.copy_(A if A is not None else random_A)
        adapter.lora_B.weight.copy_(B if B is not None else random_B)
    return model, adapter


def data():
    generator = torch.Generator().manual_seed(11)
    return torch.randn(5, 8, generator=generator, dtype=torch.float64), torch.randn(5, 6, generator=generator, dtype=torch.float64)


def reference(model, adapter, x, target):
    """Plain float64 recomputation: δ = dL/dy, G = δᵀ x, c from the explicit B A."""
    W, b = model.proj.base.weight.detach(), model.proj.base.bias.detach()
    A, B = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach()
    y = (x @ (W + B @ A).T + b).requires_grad_(True)
    nn.functional.mse_loss(y, target).backward()
    G = y.grad.T @ x
    c = 1 / torch.sqrt(torch.linalg.norm(B @ A, dim=1) + 1 / ETA**2)
    return {"G": G, "c": c, "plain_A": B.T @ G, "plain_B": G @ A.T,
            "allora_A": B.T @ torch.diag(c) @ G, "allora_B": torch.diag(c) @ G @ A.T}


def allora_grads(model, x, target):
    model.zero_grad()
    nn.functional.mse_loss(model(x), target).backward()
    adapter = model.proj.adapters["default"]
    return adapter.lora_A.weight.grad.clone(), adapter.lora_B.weight.grad.clone()


def test_forward_is_the_unscaled_lora_product_and_has_no_dropout():
    model, adapter = toy()
    ALLoRA(model, lr=1e-3, eta=ETA)
    model.train()
    x, _ = data()
    W, b = model.proj.base.weight, model.proj.base.bias
    expected = x @ (W + adapter.lora_B.weight @ adapter.lora_A.weight).T + b
    first, second = model(x), model(x)
    assert torch.allclose(first, expected, rtol=0, atol=1e-13)
    assert torch.equal(first, second)


def test_escape_from_zero_every_row_gets_eta_and_a_gets_no_gradient():
    model, adapter = toy(B=torch.zeros(6, 2, dtype=torch.float64))
    optimizer = ALLoRA(model, lr=1e-3, eta=ETA)
    x, target = data()
    grad_A, grad_B = allora_grads(model, x, target)
    ref = reference(model, adapter, x, target)
    assert torch.equal(optimizer.coefficients()["proj.adapters.default"], torch.full((6,), ETA, dtype=torch.float64))
    assert torch.allclose(grad_B, ETA * ref["plain_B"], rtol=0, atol=1e-13)
    assert ref["plain_B"].abs().max() > 1e-3  # the check above is not 0 == 0
    assert torch.equal(grad_A, torch.zeros_like(grad_A))


def test_coefficient_is_the_inverse_square_root_of_the_row_norm_plus_one_over_eta_squared():
    A = torch.randn(2, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    B = torch.randn(6, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    B[0] *= 1.5 / torch.linalg.norm(B[0] @ A)  # ||(B A)_0|| = 1.5
    B[1] = 0.0  # a zero row in the same layer
    model, adapter = toy(A=A, B=B)
    optimizer = ALLoRA(model, lr=1e-3, eta=ETA)
    x, target = data()
    grad_A, grad_B = allora_grads(model, x, target)
    c = optimizer.coefficients()["proj.adapters.default"]
    assert abs(c[0].item() - 1 / 1.75**0.5) / (1 / 1.75**0.5) < 1e-9  # 0.75593
    assert c[1].item() == ETA
    # ... and it is what rescales B's gradient, row by row.
    ref = reference(model, adapter, x, target)
    assert torch.allclose(grad_B[0], c[0] * ref["plain_B"][0], rtol=1e-12, atol=1e-14)
    assert torch.allclose(grad_B[1], ETA * ref["plain_B"][1], rtol=1e-12, atol=1e-14)


def test_factor_gradients_follow_the_rule_and_grad_a_is_not_a_rescaled_plain_gradient():
    model, adapter = toy(seed=5)
    ALLoRA(model, lr=1e-3, eta=ETA)
    x, target = data()
    grad_A, grad_B = allora_grads(model, x, target)
    ref = reference(model, adapter, x, target)
    assert ref["c"].max() - ref["c"].min() > 0.05  # the c_i differ
    assert (grad_B - ref["allora_B"]).abs().max() < 1e-10
    assert (grad_A - ref["allora_A"]).abs().max() < 1e-10
    # Not plain grad_A times any scalar (rescaling only B, or A by a single factor, is wrong).
    plain = ref["plain_A"]
    best = (grad_A * plain).sum() / (plain * plain).sum()
    assert (grad_A - best * plain).norm() > 1e-3 * grad_A.norm()


def test_input_gradient_is_that_of_plain_lora():
    x, target = data()
    grads = []
    for use_allora in (True, False):
        model, _ = toy(seed=6)
        if use_allora:
            ALLoRA(model, lr=1e-3, eta=ETA)
        inputs = x.clone().requires_grad_(True)
        nn.functional.mse_loss(model(inputs), target).backward()
        grads.append(inputs.grad)
    assert torch.equal(grads[0], grads[1])


def test_coefficient_is_a_forward_time_constant_that_follows_the_weights():
    model, adapter = toy(seed=7)
    optimizer = ALLoRA(model, lr=0.1, eta=ETA)
    x, target = data()
    allora_grads(model, x, target)
    before = optimizer.coefficients()["proj.adapters.default"]
    assert before.grad_fn is None and not before.requires_grad
    assert torch.allclose(before, reference(model, adapter, x, target)["c"], rtol=1e-12, atol=0)
    optimizer.step()
    _, grad_B = allora_grads(model, x, target)
    after = optimizer.coefficients()["proj.adapters.default"]
    ref = reference(model, adapter, x, target)
    assert torch.allclose(after, ref["c"], rtol=1e-12, atol=0) and (after - before).abs().max() > 1e-3
    assert (grad_B - ref["allora_B"]).abs().max() < 1e-10


def test_merged_weight_is_w_plus_b_a_and_gives_the_same_outputs():
    model, adapter = toy(seed=8)
    ALLoRA(model, lr=1e-3, eta=ETA)
    x, _ = data()
    with torch.no_grad():
        expected = model(x)
        W = model.proj.base.weight.clone()
        lorakit.merge(model)
        assert torch.allclose(model.proj.base.weight, W + adapter.lora_B.weight @ adapter.lora_A.weight, rtol=0, atol=1e-15)
        assert (model(x) - expected).abs().max() < 1e-12


def test_gradients_accumulate_over_micro_batches_and_no_grad_forwards_change_nothing():
    model, adapter = toy(seed=9)
    optimizer = ALLoRA(model, lr=1e-3, eta=ETA)
    x, target = data()
    model.zero_grad()
    with torch.no_grad():
        model(x)  # evaluation between micro-batches must not disturb the pending backward
    first = nn.functional.mse_loss(model(x[:2]), target[:2], reduction="sum")
    with torch.no_grad():
        model(x)
    second = nn.functional.mse_loss(model(x[2:]), target[2:], reduction="sum")
    (first + second).backward()
    ref = reference(model, adapter, x, target)
    scale = x.shape[0] * target.shape[1]  # "sum" instead of "mean"
    assert (adapter.lora_A.weight.grad - scale * ref["allora_A"]).abs().max() < 1e-9
    assert (adapter.lora_B.weight.grad - scale * ref["allora_B"]).abs().max() < 1e-9
    optimizer.remove_hooks()
    grad_A, grad_B = allora_grads(model, x, target)
    assert (grad_A - ref["plain_A"]).abs().max() < 1e-12 and (grad_B - ref["plain_B"]).abs().max() < 1e-12


def test_every_layer_of_a_real_model_gets_the_rule_on_token_batches(input_ids):
    """tiny Llama, fp32, (batch, seq, features) inputs: ALLoRA's grads from the plain model's δ and x."""
    config = lorakit.LoraConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    models = [lorakit.inject(tiny_llama(), config) for _ in range(2)]
    for model in models:
        torch.manual_seed(2)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(0.2 * torch.randn(param.shape))
    ours, plain = models
    optimizer = ALLoRA(ours, lr=1e-3, eta=ETA)
    seen: dict[str, dict] = {}
    for path, layer in adapted_layers(plain):
        adapter = layer.adapters["default"]
        record = seen.setdefault(path, {})
        adapter.lora_A.register_forward_hook(lambda m, i, o, r=record: r.__setitem__("x", i[0]))
        adapter.lora_B.register_forward_hook(lambda m, i, o, r=record: r.__setitem__("u", o) or o.retain_grad())
    for model in models:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    coefficients = optimizer.coefficients()
    assert len(coefficients) == 6
    for (path, layer), (_, plain_layer) in zip(adapted_layers(ours), adapted_layers(plain)):
        adapter = layer.adapters["default"]
        A, B = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach()
        c = 1 / torch.sqrt(torch.linalg.norm(B @ A, dim=1) + 1 / ETA**2)
        assert torch.allclose(coefficients[f"{path}.adapters.default"], c, rtol=1e-5)
        delta = seen[path]["u"].grad.reshape(-1, B.shape[0])
        x = seen[path]["x"].reshape(-1, A.shape[1])
        G = delta.T @ x
        assert torch.allclose(adapter.lora_B.weight.grad, torch.diag(c) @ G @ A.T, rtol=1e-4, atol=1e-7), path
        assert torch.allclose(adapter.lora_A.weight.grad, B.T @ torch.diag(c) @ G, rtol=1e-4, atol=1e-7), path
        plain_grad = plain_layer.adapters["default"].lora_B.weight.grad
        assert torch.allclose(adapter.lora_B.weight.grad, c[:, None] * plain_grad, rtol=1e-4, atol=1e-7), path


def test_registry_options_and_clear_errors():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = build_optimizer("allora", model, lr=1e-3, weight_decay=0.1, options={"eta": 1.0})
    assert isinstance(optimizer, ALLoRA) and optimizer.eta == 1.0 and optimizer.param_groups[0]["weight_decay"] == 0.1
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(lorakit.ConfigError, match="eta=0"):
        build_optimizer("allora", model, lr=1e-3, options={"eta": 0})
    vera = lorakit.inject(tiny_llama(), lorakit.VeraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(lorakit.ConfigError, match="ALLoRA needs trainable \\(A, B\\) factors"):
        ALLoRA(vera, lr=1e-3)


def test_coefficient_helper_matches_the_explicit_product():
    generator = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 10, generator=generator, dtype=torch.float64), torch.randn(7, 3, generator=generator, dtype=torch.float64)
    expected = 1 / torch.sqrt(torch.linalg.norm(B @ A, dim=1) + 1 / 3.0**2)
    assert torch.allclose(allora_coefficients(A, B, 3.0), expected, rtol=1e-12, atol=0)


def test_lorakit_train_uses_allora(tmp_path, tiny_model_folder, monkeypatch):
    from lorakit.train import TrainConfig, runner, train

    built = []

    def spy(*args, **kwargs):
        built.append(build_optimizer(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(runner, "build_optimizer", spy)
    rows = [{"prompt": f"Repeat the word: w{i}", "response": f"w{i}"} for i in range(24)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = TrainConfig(model=str(tiny_model_folder), data=str(tmp_path / "train.jsonl"),
                         output_dir=str(tmp_path / "run"), max_steps=2, batch_size=4, save_steps=0, logging_steps=1,
                         eval_examples=2, max_new_tokens=1, eval_fraction=0.2, warmup_steps=0, learning_rate=1e-2, adapter={"r": 4, "alpha": 4},
                         optimizer="allora", optimizer_options={"eta": 2.0})
    metrics = train(config, progress=False)
    assert metrics["train"]["steps"] == 2
    (optimizer,) = built
    assert isinstance(optimizer, ALLoRA)
    steps = {float(state["step"]) for state in optimizer.state.values()}
    assert steps == {2.0}  # the Trainer stepped this optimiser, twice
    coefficients = optimizer.coefficients()
    assert len(coefficients) == 14  # 2 layers x 7 all-linear targets, hooked during training
    assert any((c < ETA).any() for c in coefficients.values())  # B left 0 after the first step
