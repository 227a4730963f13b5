"""NOLA (arXiv 2310.02556): the spec's verification recipe, the regenerate-in-backward Function,
bases regenerated from stored seeds (also in a fresh process), and the paper variant."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from conftest import logits_in_fresh_process, model_output, tiny_gpt2, tiny_llama
from lorakit.core import adapted_layers
from lorakit.core.random_basis import UNIFORM_GENERATOR_NAME, uniform_basis_chunks
from lorakit.methods.nola import CombineSeededBases, NolaAdapter

TARGETS = ["q_proj", "k_proj", "up_proj", "down_proj"]


def nola(**kwargs) -> lorakit.NolaConfig:
    return lorakit.NolaConfig(**{"r": 4, "num_basis_a": 16, "num_basis_b": 12, "target_modules": TARGETS, **kwargs})


def perturb(model, seed=4):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "nola_" in name:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))


def all_bases(adapter: NolaAdapter, which: str) -> torch.Tensor:
    """The bases Abar (k, r, in) or Bbar (l, out, r): the seeded draws over sqrt(k) (resp. sqrt(l))."""
    draws = torch.cat([draws for _, draws in adapter.basis_chunks(which)])
    return draws / math.sqrt(draws.shape[0])


def reference_factors(adapter: NolaAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B from the materialised bases, in float64."""
    A = torch.einsum("k,kri->ri", adapter.nola_alpha.double(), all_bases(adapter, "A").double())
    if adapter.nola_A0 is not None:
        A = A + adapter.nola_A0.double()
    B = torch.einsum("l,lor->or", adapter.nola_beta.double(), all_bases(adapter, "B").double())
    return A, B


def test_forward_and_delta_weight_match_the_reference_formula():
    model = lorakit.inject(tiny_llama(), nola(alpha=6.0))
    perturb(model)
    for _, layer in adapted_layers(model):
        adapter = layer.adapters["default"]
        A, B = reference_factors(adapter)
        expected_dW = (6.0 / 4) * B @ A
        assert torch.allclose(adapter.delta_weight(layer.base.weight).double(), expected_dW, atol=1e-6)
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            expected = x.double() @ (layer.base.weight.double() + expected_dW).T
            assert torch.allclose(layer(x).double(), expected, atol=1e-5)


def test_bases_and_A0_have_the_documented_distribution():
    model = lorakit.inject(tiny_llama(), nola(num_basis_a=50, num_basis_b=40))
    _, layer = next(iter(adapted_layers(model)))
    adapter = layer.adapters["default"]
    bases_A, bases_B = all_bases(adapter, "A"), all_bases(adapter, "B")
    assert bases_A.shape == (50, 4, layer.in_features) and bases_B.shape == (40, layer.out_features, 4)
    for bases, k in ((bases_A, 50), (bases_B, 40)):  # Uniform(-1, 1) / sqrt(k)
        assert bases.abs().max() <= 1 / math.sqrt(k) and bases.abs().max() > 0.95 / math.sqrt(k)
        assert abs(bases.mean()) < 0.05 / math.sqrt(k)
    bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5)) on (r, in)
    assert adapter.nola_A0.shape == (4, layer.in_features)
    assert adapter.nola_A0.abs().max() <= bound and adapter.nola_A0.abs().max() > 0.8 * bound


# Recipe 1
def test_identity_at_init_output_equals_base_output_exactly(input_ids):
    base = tiny_llama()
    expected = model_output(base, input_ids)
    model = lorakit.inject(base, lorakit.NolaConfig(target_modules="all-linear"))  # defaults: r=8, k=l=128
    assert torch.equal(model_output(model, input_ids), expected)


# Recipe 2
@pytest.mark.parametrize("k, l", [(16, 12), (128, 128)])
def test_trainable_count_is_k_plus_l_per_layer_whatever_r_and_shape(k, l):
    counts = []
    for r in (4, 16):
        model = lorakit.inject(tiny_llama(), nola(r=r, num_basis_a=k, num_basis_b=l))
        layers = list(adapted_layers(model))
        assert len({(layer.in_features, layer.out_features) for _, layer in layers}) >= 3
        trainable, _ = lorakit.trainable_parameters(model)
        assert trainable == len(layers) * (k + l)
        counts.append(trainable)
    assert counts[0] == counts[1]


# Recipe 3
def test_first_step_gradients_reach_beta_but_not_alpha(input_ids):
    model = lorakit.inject(tiny_llama(), nola())
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    for _, layer in adapted_layers(model):
        adapter = layer.adapters["default"]
        assert adapter.nola_beta.grad.abs().sum() > 0  # A = A0 != 0 carries the gradient to B
        assert torch.equal(adapter.nola_alpha.grad, torch.zeros_like(adapter.nola_alpha))  # B = 0


# Recipe 4
def test_bases_regenerate_bitwise_from_the_seed_whatever_the_chunk_size():
    model = lorakit.inject(tiny_llama(), nola(num_basis_a=10, basis_chunk_size=3))
    _, layer = next(iter(adapted_layers(model)))
    adapter = layer.adapters["default"]
    first, again = all_bases(adapter, "A"), all_bases(adapter, "A")
    assert torch.equal(first, again)
    adapter.config.basis_chunk_size = 10  # one chunk: the same values, drawn at once
    assert torch.equal(all_bases(adapter, "A"), first)
    other = lorakit.inject(tiny_llama(), nola(num_basis_a=10, basis_seed=1))
    other_adapter = next(iter(adapted_layers(other)))[1].adapters["default"]
    assert not torch.equal(all_bases(other_adapter, "A"), first)
    seeds = {tuple(layer.adapters["default"].nola_seeds.tolist()) for _, layer in adapted_layers(model)}
    assert len(seeds) == len(list(adapted_layers(model)))  # every matrix has its own seeds


def test_chunked_and_unchunked_adapters_agree(input_ids):
    outputs = []
    for chunk in (1, 5, 64):
        model = lorakit.inject(tiny_llama(), nola(basis_chunk_size=chunk))
        perturb(model)
        outputs.append(model_output(model, input_ids))
    assert all(torch.allclose(out, outputs[0], atol=1e-6) for out in outputs)


def test_file_holds_only_coefficients_and_seeds_and_names_the_generator(tmp_path, input_ids):
    model = lorakit.inject(tiny_llama(), nola())
    perturb(model)
    expected = model_output(model, input_ids)
    lorakit.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {key.rsplit(".", 1)[1] for key in tensors} == {"nola_alpha", "nola_beta", "nola_seeds"}
    assert all(t.dtype == torch.int64 and t.shape == (3,) for k, t in tensors.items() if k.endswith("nola_seeds"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] is None
    assert config["lorakit"] == {"method": "nola", "basis_generator": UNIFORM_GENERATOR_NAME}
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(model_output(reloaded, input_ids), expected)


def test_loader_uses_the_seeds_in_the_file(tmp_path, input_ids):
    model = lorakit.inject(tiny_llama(), nola())
    perturb(model)
    lorakit.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("q_proj.nola_seeds"))
    tensors[key] = torch.tensor([1, 2, 3])
    save_file(tensors, path, metadata={"format": "pt"})
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    adapter = reloaded.get_submodule(key[len("base_model.model."):].rsplit(".", 1)[0]).adapters["default"]
    assert adapter.nola_seeds.tolist() == [1, 2, 3]
    assert torch.equal(adapter.nola_A0, adapter._draw_A0())
    assert torch.equal(all_bases(adapter, "A")[0], next(uniform_basis_chunks(1, 1, adapter.nola_A0.shape, 1))[1][0] / 4)
    assert torch.equal(all_bases(adapter, "B")[0], next(uniform_basis_chunks(2, 1, (adapter.out_features, 4), 1))[1][0] / math.sqrt(12))
    assert not torch.equal(model_output(reloaded, input_ids), model_output(model, input_ids))


def test_file_from_another_generator_is_refused(tmp_path):
    lorakit.save_adapter(lorakit.inject(tiny_llama(), nola()), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["lorakit"]["basis_generator"] = "numpy.random.default_rng"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lorakit.ConfigError, match="numpy.random.default_rng"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_saved_adapter_loads_identically_in_a_fresh_process(tmp_path, input_ids):
    model = lorakit.inject(tiny_llama(), nola(basis_seed=11))
    perturb(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    fresh = logits_in_fresh_process(tmp_path / "adapter", input_ids, tmp_path)
    assert torch.equal(fresh, model_output(model, input_ids))


# Recipe 5
def test_forward_and_backward_leave_the_global_rng_stream_alone(input_ids):
    base = tiny_llama()
    model = lorakit.inject(tiny_llama(), nola())
    perturb(model)

    def draws(run) -> torch.Tensor:
        torch.manual_seed(123)
        before = torch.rand(3)
        run()
        return torch.cat([before, torch.rand(3)])

    def adapted_step():
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        lorakit.merge(model)
        lorakit.unmerge(model)

    assert torch.equal(draws(adapted_step), draws(lambda: base(input_ids=input_ids)))


# Recipe 6
def seeded_chunks(seed: int, count: int, shape: tuple[int, int], chunk: int):
    return lambda: uniform_basis_chunks(seed, count, shape, chunk)


@pytest.mark.parametrize("chunk", [5, 2])
def test_regenerating_function_passes_gradcheck(chunk):
    k, l, r, d_in, d_out = 5, 5, 2, 6, 4
    alpha = torch.randn(k, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(l, dtype=torch.float64, requires_grad=True)
    make_A = seeded_chunks(1, k, (r, d_in), chunk)
    make_B = seeded_chunks(2, l, (d_out, r), chunk)
    assert torch.autograd.gradcheck(lambda c: CombineSeededBases.apply(c, make_A, r, d_in, 0.3), (alpha,))
    assert torch.autograd.gradcheck(lambda c: CombineSeededBases.apply(c, make_B, d_out, r, 0.5), (beta,))
    x = torch.randn(3, d_in, dtype=torch.float64)

    def product(a, b):
        A = CombineSeededBases.apply(a, make_A, r, d_in, 1 / math.sqrt(k))
        B = CombineSeededBases.apply(b, make_B, d_out, r, 1 / math.sqrt(l))
        return x @ A.T @ B.T

    assert torch.autograd.gradcheck(product, (alpha, beta))


def test_adapter_gradients_pass_gradcheck_in_float64():
    layer = torch.nn.Linear(6, 4).double()
    adapter = NolaAdapter(lorakit.NolaConfig(r=2, num_basis_a=5, num_basis_b=5, target_modules=["x"]), 6, 4, "layer").double()
    perturb(adapter)
    x = torch.randn(3, 6, dtype=torch.float64)

    # gradcheck perturbs its own copies of the inputs; route them into the adapter's parameters
    def functional(alpha, beta):
        return torch.func.functional_call(adapter, {"nola_alpha": alpha, "nola_beta": beta}, (x, layer(x), layer))

    params = (adapter.nola_alpha.detach().clone().requires_grad_(), adapter.nola_beta.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(functional, params)


def test_graph_keeps_no_basis_tensor(input_ids):
    config = nola(num_basis_a=64, num_basis_b=64)
    model = lorakit.inject(tiny_llama(), config)
    _, layer = next(iter(adapted_layers(model)))
    adapter = layer.adapters["default"]
    saved = []
    x = torch.randn(2, layer.in_features)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        adapter(x, layer.base(x), layer.base).sum().backward()
    assert max(saved) < 64 * config.r * layer.in_features / 8  # factors and activations only
    big = [b for b in adapter.buffers() if b.numel() > config.r * layer.in_features]
    assert not big  # the only cached tensor is A0 (r x in)


# Recipe 7
def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_merge_and_unmerge(builder, input_ids):
    targets = TARGETS if builder is tiny_llama else ["c_attn", "c_fc"]
    model = lorakit.inject(builder(), nola(target_modules=targets))
    perturb(model)
    before = {path: layer.base.weight.detach().clone() for path, layer in adapted_layers(model)}
    xs = {path: torch.randn(5, layer.in_features) for path, layer in adapted_layers(model)}
    with torch.no_grad():
        unmerged_layers = {path: layer(xs[path]) for path, layer in adapted_layers(model)}
    unmerged = model_output(model, input_ids)
    lorakit.merge(model)
    with torch.no_grad():
        for path, layer in adapted_layers(model):
            assert relative_error(layer(xs[path]), unmerged_layers[path]) < 1e-6
    assert (model_output(model, input_ids) - unmerged).abs().max() < 1e-5  # through the whole network
    lorakit.unmerge(model)
    for path, layer in adapted_layers(model):
        assert relative_error(layer.base.weight, before[path]) < 1e-6


# Recipe 8
def test_identity_bases_can_fit_any_rank_r_update():
    r, d_in, d_out = 2, 6, 4
    adapter = NolaAdapter(lorakit.NolaConfig(r=r, alpha=2.0, num_basis_a=r * d_in, num_basis_b=d_out * r,
                                             target_modules=["x"]), d_in, d_out, "layer")

    def identity_chunks(which):
        shape = (r, d_in) if which == "A" else (d_out, r)
        count = shape[0] * shape[1]
        return iter([(0, torch.eye(count).reshape(count, *shape))])  # bases: E_i / sqrt(count)

    adapter.basis_chunks = identity_chunks
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(d_out, r, generator=generator) @ torch.randn(r, d_in, generator=generator)
    optimiser = torch.optim.Adam(adapter.parameters(), lr=0.02)
    for _ in range(1500):
        optimiser.zero_grad()
        loss = (adapter.delta_weight(None) - target).pow(2).sum()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        error = ((adapter.delta_weight(None) - target).norm() / target.norm()).item()
    assert error < 1e-3


def test_paper_variant_has_no_A0_and_starts_off_identity(input_ids):
    base = tiny_llama()
    reference = model_output(base, input_ids)
    model = lorakit.inject(base, nola(variant="paper"))
    for _, layer in adapted_layers(model):
        adapter = layer.adapters["default"]
        assert adapter.nola_A0 is None
        assert torch.equal(adapter.nola_alpha, torch.full((16,), 1 / 16))
        assert torch.equal(adapter.nola_beta, torch.full((12,), 1 / 12))
    assert not torch.allclose(model_output(model, input_ids), reference)
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    for _, layer in adapted_layers(model):
        adapter = layer.adapters["default"]
        assert adapter.nola_alpha.grad.abs().sum() > 0 and adapter.nola_beta.grad.abs().sum() > 0


@pytest.mark.parametrize("field, value", [("variant", "vit"), ("num_basis_a", 0), ("num_basis_b", 2.5),
                                          ("basis_chunk_size", 0), ("r", 0), ("basis_seed", "1")])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(lorakit.ConfigError, match=field):
        lorakit.NolaConfig(**{field: value})
