"""LoRA-GGPO / MGPO (lorakit.optim.GGPO): the spec's verification recipe on a toy LoRA layer,
checkpoints, adapters without factors, and `lorakit train --optimizer ggpo` end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.optim import GGPO, build_optimizer

RHO, MU, BETA = 0.05, 0.9, 0.9


class Toy(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.proj = nn.Linear(16, 12, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


def toy(seed=0, dtype=torch.float32, **lora):
    torch.manual_seed(seed)
    return lorakit.inject(Toy(dtype), lorakit.LoraConfig(r=4, alpha=8, target_modules=["proj"], **lora))


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 16, generator=g), torch.randn(8, 12, generator=g)


def factors(model):
    adapter = model.proj.adapters["default"]
    return adapter.lora_A.weight, adapter.lora_B.weight, adapter.scaling


def mse(model, step, scale=1.0):
    x, y = batch(step)
    x = x.to(model.proj.base.weight.dtype)
    return scale * ((model(x).float() - y) ** 2).mean()


def weight_space_grad_norm(model):
    A, B, s = factors(model)
    return torch.linalg.vector_norm(s * (B.grad @ A.detach() + B.detach() @ A.grad))


def expected_epsilon(model, optimizer, gbar):
    A, B, s = factors(model)
    v = s * (optimizer.state[B]["exp_avg"] @ A.detach() + B.detach() @ optimizer.state[A]["exp_avg"])
    kappa = min(1.0 / float(gbar), 10.0)
    return -RHO * kappa * v / v.norm(), kappa


def test_rho_zero_trajectory_is_bitwise_plain_lora_adamw():
    ours, plain = toy(), toy()
    optimizer = GGPO(ours, lr=1e-2, rho=0.0, mu=MU)
    reference = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-2, betas=(MU, 0.999), weight_decay=0.0)
    for step in range(5):
        for model, opt in ((ours, optimizer), (plain, reference)):
            mse(model, step).backward()
            opt.step()
            opt.zero_grad()
        for a, b in zip(factors(ours)[:2], factors(plain)[:2]):
            assert torch.equal(a, b), step
    assert optimizer.grad_norm_ema[0] is not None  # the machinery ran, and changed nothing


def test_first_step_forward_runs_at_the_unperturbed_weight():
    model = toy()
    optimizer = GGPO(model, lr=1e-2)
    x, _ = batch(0)
    model.eval()
    with torch.no_grad():
        clean = model(x)
    model.train()
    assert optimizer.perturbation(0) is None
    assert torch.equal(model(x), clean)


@pytest.mark.parametrize("scale", [1.0, 1e-3], ids=["kappa-1-over-gbar", "kappa-clamped-at-10"])
def test_perturbation_is_minus_rho_kappa_normalised_weight_space_momentum(scale):
    model = toy()
    optimizer = GGPO(model, lr=1e-2, rho=RHO, mu=MU, beta=BETA)
    gbar = None
    for step in range(3):
        mse(model, step, scale).backward()
        n = weight_space_grad_norm(model)
        gbar = n if gbar is None else BETA * gbar + (1 - BETA) * n
        optimizer.step()
        optimizer.zero_grad()
    eps, kappa = expected_epsilon(model, optimizer, gbar)
    assert (kappa == 10.0) == (scale < 1)
    ours = optimizer.perturbation(0)
    assert (ours - eps).norm() / eps.norm() < 1e-6
    assert abs(ours.norm() / (RHO * kappa) - 1) < 1e-6
    # The training forward is the forward at W + eps (the sign matters: -momentum).
    A, B, s = factors(model)
    x, _ = batch(7)
    W, b = model.proj.base.weight, model.proj.base.bias
    expected = F.linear(x, W + eps, b) + s * (x @ A.T) @ B.T
    model.train()
    assert (model(x) - expected).abs().max() < 1e-6
    assert (model(x) - (F.linear(x, W - eps, b) + s * (x @ A.T) @ B.T)).abs().max() > 1e-4


def test_gradients_are_those_of_lora_at_the_perturbed_base_weight():
    model = toy()
    optimizer = GGPO(model, lr=1e-2)
    for step in range(2):
        mse(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    eps = optimizer.perturbation(0).clone()
    A, B, s = factors(model)
    ref_A, ref_B = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    x, y = batch(2)
    W, b = model.proj.base.weight, model.proj.base.bias
    ref_loss = ((F.linear(x, W + eps, b) + s * (x @ ref_A.T) @ ref_B.T - y) ** 2).mean()
    ref_loss.backward()
    mse(model, 2).backward()
    assert (A.grad - ref_A.grad).abs().max() < 1e-6 and (B.grad - ref_B.grad).abs().max() < 1e-6
    unperturbed_B = torch.autograd.grad(((F.linear(x, W, b) + s * (x @ A.T) @ B.T - y) ** 2).mean(), B)[0]
    assert (B.grad - unperturbed_B).abs().max() > 1e-6  # the perturbation does change the gradient


def test_bf16_base_weight_is_bitwise_restored_after_20_steps():
    model = toy(dtype=torch.bfloat16)
    original = model.proj.base.weight.detach().clone()
    optimizer = GGPO(model, lr=1e-2)
    perturbed_steps = 0
    for step in range(20):
        perturbed_steps += optimizer.perturbation(0) is not None
        mse(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert perturbed_steps == 19
    assert torch.equal(model.proj.base.weight, original)


def test_gradient_norm_ema_is_beta_weighted_after_each_backward():
    model = toy()
    optimizer = GGPO(model, lr=1e-2, beta=0.7)
    norms = []
    for step in range(2):
        mse(model, step).backward()
        norms.append(weight_space_grad_norm(model))
        optimizer.step()
        optimizer.zero_grad()
    assert abs(optimizer.grad_norm_ema[0] / (0.7 * norms[0] + 0.3 * norms[1]) - 1) < 1e-6
    # Gradient accumulation: the EMA advances per micro-batch from the cumulative .grad (official trainer).
    before = optimizer.grad_norm_ema[0].clone()
    mse(model, 2).backward()
    first = weight_space_grad_norm(model)
    mse(model, 3).backward()
    cumulative = weight_space_grad_norm(model)
    expected = 0.7 * (0.7 * before + 0.3 * first) + 0.3 * cumulative
    assert abs(optimizer.grad_norm_ema[0] / expected - 1) < 1e-6


@pytest.mark.parametrize("variant", ["mgpo", "ggpo_v1_experimental"])
def test_one_forward_and_one_backward_per_step(variant):
    model = toy()
    optimizer = GGPO(model, lr=1e-2, variant=variant)
    calls = {"forward": 0, "backward": 0}
    model.proj.base.register_forward_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    model.proj.register_full_backward_hook(lambda *_: calls.__setitem__("backward", calls["backward"] + 1))
    for step in range(4):
        def closure():
            optimizer.zero_grad()
            loss = mse(model, step)
            loss.backward()
            return loss

        optimizer.step(closure)
        assert calls == {"forward": step + 1, "backward": step + 1}
    assert optimizer.perturbation(0) is not None  # steps 2-4 ran perturbed


def test_v1_zero_sigma_and_beta_is_bitwise_plain_lora():
    ours, plain = toy(), toy()
    optimizer = GGPO(ours, lr=1e-2, variant="ggpo_v1_experimental", v1_sigma=0.0, v1_beta=0.0)
    reference = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0)
    for step in range(5):
        for model, opt in ((ours, optimizer), (plain, reference)):
            mse(model, step).backward()
            opt.step()
            opt.zero_grad()
        for a, b in zip(factors(ours)[:2], factors(plain)[:2]):
            assert torch.equal(a, b), step


def test_v1_no_noise_before_the_first_step_or_in_eval_mode():
    model = toy()
    optimizer = GGPO(model, lr=1e-2, variant="ggpo_v1_experimental")
    x, _ = batch(0)
    model.eval()
    with torch.no_grad():
        clean = model(x)
    model.train()
    assert torch.equal(model(x), clean)
    mse(model, 0).backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        clean = model(x)
        assert torch.equal(model(x), clean)
        model.train()
        assert not torch.equal(model(x), clean)


@pytest.mark.parametrize("norm_dim", ["rows", "cols"])
def test_v1_noise_std_matches_sigma_c_plus_beta_g_squared_over_sqrt_count(norm_dim):
    sigma, beta = 0.05, 0.5
    model = toy()
    optimizer = GGPO(model, lr=1e-2, variant="ggpo_v1_experimental", v1_sigma=sigma, v1_beta=beta, norm_dim=norm_dim)
    mse(model, 0).backward()
    A, B, s = factors(model)
    dim = 1 if norm_dim == "rows" else 0
    g = torch.linalg.vector_norm(s * (B.grad @ A.detach() + B.detach() @ A.grad), dim=dim)
    optimizer.step()
    W = model.proj.base.weight.detach()
    w0 = torch.linalg.vector_norm(W, dim=dim).mean()  # 12 rows / 16 columns: all of them are sampled
    c = torch.sqrt(w0**2 + ((s * B.detach() @ A.detach()) ** 2).sum(dim=dim))
    count = W.shape[0] if norm_dim == "rows" else W.shape[1]
    expected = (sigma * c + beta * g**2) / count**0.5
    torch.manual_seed(1)
    draws = torch.stack([optimizer.perturbation(0) for _ in range(10_000)])
    per_row = draws.permute(1, 0, 2) if norm_dim == "rows" else draws.permute(2, 0, 1)  # (rows or cols, draws, ...)
    measured = per_row.reshape(per_row.shape[0], -1).std(dim=1)
    assert ((measured / expected) - 1).abs().max() < 0.03
    assert (expected.max() / expected.min()) > 1.05  # per-row (column) scales really differ


def test_unperturbed_context_detach_and_saving_never_see_the_perturbation(tmp_path):
    model = toy()
    original = model.proj.base.weight.detach().clone()
    optimizer = GGPO(model, lr=1e-2)
    for step in range(2):
        mse(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    x, _ = batch(5)
    model.eval()
    with torch.no_grad():
        clean = model(x)
        model.train()
        assert not torch.equal(model(x), clean)
        with optimizer.unperturbed():
            assert torch.equal(model(x), clean)
        lorakit.save_adapter(model, tmp_path / "adapter")  # in training mode, with the hooks attached
        optimizer.detach()
        assert torch.equal(model(x), clean)
        optimizer.attach()
        assert not torch.equal(model(x), clean)
    assert torch.equal(model.proj.base.weight, original)
    fresh = Toy()
    fresh.proj.load_state_dict(model.proj.base.state_dict())
    reloaded = lorakit.load_adapter(fresh, tmp_path / "adapter")
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), clean)


def test_state_dict_round_trip_restores_the_ema_and_the_perturbation():
    model = toy()
    optimizer = GGPO(model, lr=1e-2)
    for step in range(3):
        mse(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    state = copy.deepcopy(optimizer.state_dict())
    resumed = GGPO(model, lr=1e-2)
    optimizer.detach()
    resumed.load_state_dict(state)
    assert torch.equal(resumed.grad_norm_ema[0], optimizer.grad_norm_ema[0])
    assert torch.equal(resumed.perturbation(0), optimizer.perturbation(0))


def test_frozen_a_uses_zero_momentum_for_a():
    model = toy(freeze_a=True)
    optimizer = GGPO(model, lr=1e-2)
    for step in range(2):
        mse(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    A, B, s = factors(model)
    v = s * optimizer.state[B]["exp_avg"] @ A.detach()
    eps = optimizer.perturbation(0)
    assert (eps / eps.norm() + v / v.norm()).abs().max() < 1e-6


def test_adapters_without_factors_train_with_plain_adamw_or_fail_alone():
    vera_only = lorakit.inject(Toy(), lorakit.VeraConfig(r=4, target_modules=["proj"]))
    with pytest.raises(lorakit.ConfigError, match="no trainable \\(A, B\\) factor pairs"):
        GGPO(vera_only, lr=1e-2)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 12)

        def forward(self, x):
            return self.b(self.a(x))

    model = lorakit.inject(Two(), lorakit.LoraConfig(r=2, target_modules=["a"]), "lora")
    lorakit.inject(model, lorakit.VeraConfig(r=4, target_modules=["b"]), "vera")
    lorakit.set_active(model, ["lora", "vera"])
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name or ".vera_lambda" in name)  # inject froze the first adapter
    optimizer = GGPO(model, lr=1e-2)
    assert [pair.path for pair in optimizer.pairs] == ["a[lora]"]
    vera_params = [p for n, p in model.named_parameters() if p.requires_grad and ".vera_lambda" in n]
    assert vera_params and all(any(p is q for q in optimizer.param_groups[0]["params"]) for p in vera_params)


def test_options_are_validated_and_registered():
    model = toy()
    assert isinstance(build_optimizer("ggpo", model, lr=1e-3, options={"rho": 0.01, "mu": 0.8, "beta": 0.8}), GGPO)
    with pytest.raises(lorakit.ConfigError, match="rho=-0.1"):
        GGPO(model, rho=-0.1)
    with pytest.raises(lorakit.ConfigError, match="variant"):
        GGPO(model, variant="sam")
    with pytest.raises(lorakit.ConfigError, match="has no field"):
        build_optimizer("ggpo", model, lr=1e-3, options={"radius": 0.1})


def test_lorakit_train_with_ggpo_runs_and_saves_an_unperturbed_adapter(tmp_path, tiny_model_folder, monkeypatch):
    from transformers import LlamaForCausalLM

    from lorakit.train import TrainConfig, train

    rows = [{"prompt": f"Repeat the word: w{i}", "response": f"w{i}"} for i in range(40)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = TrainConfig.from_dict(dict(
        model=str(tiny_model_folder), data=str(data), output_dir=str(tmp_path / "run"), optimizer="ggpo",
        optimizer_options={"rho": 0.05}, max_steps=2, batch_size=4, logging_steps=1, eval_examples=2,
        max_new_tokens=1, eval_fraction=0.2, learning_rate=1e-2, adapter={"r": 4, "alpha": 8},
    ))
    model, tokenizer = lorakit.models.load(str(tiny_model_folder))
    perturbed = []
    original = GGPO.perturbation

    def recording(self, index):
        eps = original(self, index)
        perturbed.append(eps is not None)
        return eps

    monkeypatch.setattr(GGPO, "perturbation", recording)
    metrics = train(config, progress=False, model=model, tokenizer=tokenizer)
    assert metrics["train"]["steps"] == 2
    assert any(perturbed) and not all(perturbed)  # step 2's forward ran perturbed, step 1's did not
    base = LlamaForCausalLM.from_pretrained(tiny_model_folder)
    base_weights = dict(base.named_parameters())
    for name, layer in adapted_layers(model):
        assert torch.equal(layer.base.weight, base_weights[name + ".weight"]), name
    reloaded = lorakit.load_adapter(base, tmp_path / "run" / "adapter")
    model.eval()
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
