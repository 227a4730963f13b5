"""EVA (init="eva"): the spec's verification recipe, PEFT parity (ranks, components, files both
ways), rank-0 layers, and `lorakit train` end to end."""

from __future__ import annotations

import json
import math
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.eva import get_eva_state_dict, initialize_lora_eva_weights
from torch import nn

import lorakit
from conftest import model_output, tiny_llama
from lorakit.core.errors import ConfigError
from lorakit.core.inject import adapted_layers, adapter_parameters
from lorakit.init.eva import EvaOptions, estimate_eva

N_FEATURES = 32


TOKENS = (4, 16)  # batch x seq = 64 tokens per batch


class Probe(nn.Module):
    """Linear(32 -> 16) layers, layer i fed columns `slices[i]` of the activations. The activations travel
    as `input_ids` because PEFT's EVA reads that key to shape its token mask."""

    def __init__(self, slices: list[tuple[int, int]], seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.slices = slices
        self.layers = nn.ModuleList(nn.Linear(N_FEATURES, 16) for _ in slices)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return torch.cat([layer(input_ids[..., a:b]) for layer, (a, b) in zip(self.layers, self.slices)], dim=-1)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def exact_covariance_tokens(sd: torch.Tensor, Q: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """64 tokens whose sample covariance is exactly Q diag(sd^2) Q^T (and mean exactly 0)."""
    N = TOKENS[0] * TOKENS[1]
    G = torch.randn(N, len(sd), generator=generator, dtype=torch.float64)
    P = torch.linalg.qr(G - G.mean(dim=0))[0]  # orthonormal columns, orthogonal to the ones vector
    return math.sqrt(N - 1) * P @ torch.diag(sd) @ Q.T


def batches_of(parts: list[tuple[torch.Tensor, torch.Tensor]], count: int, seed: int = 0) -> list[dict]:
    """`count` batches; part i of the feature axis has spectrum sd_i in the basis Q_i."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.cat([exact_covariance_tokens(sd, Q, generator) for sd, Q in parts], dim=1).float()
        out.append({"input_ids": x.reshape(*TOKENS, -1), "attention_mask": torch.ones(TOKENS, dtype=torch.long)})
    return out


SD_SHARP = torch.tensor([10.0, 5.0, 2.5, 1.0] + [0.1] * 28, dtype=torch.float64)
SD_FLAT = torch.tensor([0.9 ** (j / 2) for j in range(32)], dtype=torch.float64)


def eva_config(targets, r=4, alpha=8.0, **options) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(r=r, alpha=alpha, target_modules=targets, init="eva", init_options=options)


def adapters(model, name="default") -> dict:
    return {path: layer.adapters[name] for path, layer in adapted_layers(model) if name in layer.adapters}


# --- the spec's verification recipe -----------------------------------------------------------

def test_components_recover_the_principal_subspace_and_leave_the_output_unchanged():
    Q = random_orthogonal(32, 1)
    data = batches_of([(SD_SHARP, Q)], 4)
    model = Probe([(0, 32)])
    before = model(**data[0]).detach()
    lorakit.inject(model, eva_config(["layers.0"], rho=1.0), data=data, progress=False)
    adapter = adapters(model)["layers.0"]
    A = adapter.lora_A.weight.detach().double()
    assert A.shape == (4, 32)
    assert (A @ Q[:, :4]).diagonal().abs().min() >= 0.999
    assert torch.equal(adapter.lora_B.weight, torch.zeros_like(adapter.lora_B.weight))
    assert (model(**data[0]) - before).abs().max() == 0


def test_activations_are_mean_centred_before_the_pca():
    # A large common offset is not variance: the components must still be Q's first columns.
    Q = random_orthogonal(32, 1)
    offset = 50.0 * random_orthogonal(32, 9)[:, 0].float()
    data = [dict(b, input_ids=b["input_ids"] + offset) for b in batches_of([(SD_SHARP, Q)], 4)]
    model = lorakit.inject(Probe([(0, 32)]), eva_config(["layers.0"], rho=1.0), data=data, progress=False)
    A = adapters(model)["layers.0"].lora_A.weight.detach().double()
    assert (A @ Q[:, :4]).diagonal().abs().min() >= 0.999


@pytest.mark.parametrize("rho, ranks, alphas", [(2.0, (2, 6), (4.0, 12.0)), (1.0, (4, 4), (8.0, 8.0))])
def test_ranks_follow_explained_variance_ratios_within_the_cap(rho, ranks, alphas):
    # Layer 0's ratios are 0.75, 0.19, 0.047, ...; layer 1's 0.104, 0.093, 0.084, ... With rho = 2 the
    # budget of 8 takes 2 of layer 0's and 6 of layer 1's; comparing raw variances instead of ratios,
    # or dropping the cap, gives another split.
    data = batches_of([(SD_SHARP, random_orthogonal(32, 1)), (SD_FLAT, random_orthogonal(32, 2))], 6)
    model = lorakit.inject(Probe([(0, 32), (32, 64)]), eva_config(["layers.0", "layers.1"], rho=rho), data=data, progress=False)
    found = adapters(model)
    assert tuple(found[p].r for p in ("layers.0", "layers.1")) == ranks
    assert tuple(found[p].alpha for p in ("layers.0", "layers.1")) == alphas
    assert [found[p].scaling for p in ("layers.0", "layers.1")] == [2.0, 2.0]
    config = lorakit.adapter_configs(model)["default"]
    assert config.rank_pattern == {p: r for p, r in zip(("layers.0", "layers.1"), ranks) if r != 4}
    assert config.alpha_pattern == {p: a for p, a in zip(("layers.0", "layers.1"), alphas) if a != 8.0}

    # PEFT, same model and batches: the same ranks and the same components.
    theirs = get_eva_state_dict(Probe([(0, 32), (32, 64)]), data, peft_config=peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["layers.0", "layers.1"], init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=rho)), show_progress_bar=False)
    for path, adapter in found.items():
        assert adapter.lora_A.weight.shape == theirs[path].shape
        assert (adapter.lora_A.weight - theirs[path]).abs().max() <= 1e-6


def test_masked_tokens_do_not_reach_the_components():
    data = batches_of([(SD_SHARP, random_orthogonal(32, 1))], 4)
    mask = torch.ones(TOKENS, dtype=torch.long)
    mask[:, -4:] = 0  # a quarter of the tokens
    clean = [dict(b, attention_mask=mask) for b in data]
    poisoned = [dict(b, attention_mask=mask, input_ids=b["input_ids"].masked_fill(~mask.bool()[..., None], 1e6)) for b in data]
    As = []
    for batches in (clean, poisoned):
        model = lorakit.inject(Probe([(0, 32)]), eva_config(["layers.0"]), data=batches, progress=False)
        As.append(adapters(model)["layers.0"].lora_A.weight.detach())
    assert As[0].shape == As[1].shape and (As[0] - As[1]).abs().max() < 1e-5


def test_label_mask_removes_prompt_tokens_and_can_be_switched_off():
    data = batches_of([(SD_SHARP, random_orthogonal(32, 1))], 4)
    labels = torch.zeros(TOKENS, dtype=torch.long)
    labels[:, :4] = -100
    poisoned = [dict(b, labels=labels, input_ids=b["input_ids"].masked_fill((labels == -100)[..., None], 1e6)) for b in data]
    clean = [dict(b, attention_mask=(labels != -100).long()) for b in poisoned]
    masked = lorakit.inject(Probe([(0, 32)]), eva_config(["layers.0"]), data=poisoned, progress=False)
    reference = lorakit.inject(Probe([(0, 32)]), eva_config(["layers.0"]), data=clean, progress=False)
    A, B = (adapters(m)["layers.0"].lora_A.weight.detach() for m in (masked, reference))
    assert (A - B).abs().max() < 1e-5
    unmasked = estimate_eva(lorakit.inject(Probe([(0, 32)]), lorakit.LoraConfig(r=4, target_modules=["layers.0"])),
                            "default", poisoned, EvaOptions(use_label_mask=False), progress=False)
    ones = torch.full((N_FEATURES,), N_FEATURES ** -0.5, dtype=torch.float64)
    assert (unmasked.components["layers.0"][0] @ ones).abs() > 0.99  # the 1e6 tokens (all ones) dominate


def test_layers_with_identical_inputs_share_one_pca_and_get_identical_components():
    data = batches_of([(SD_SHARP, random_orthogonal(32, 1))], 4)
    model = lorakit.inject(Probe([(0, 32), (0, 32)]), lorakit.LoraConfig(r=4, target_modules=["layers.0", "layers.1"]))
    result = estimate_eva(model, "default", data, EvaOptions(rho=1.0), progress=False)
    assert result.owners == {"layers.0": "layers.0", "layers.1": "layers.0"} and list(result.pcas) == ["layers.0"]
    assert torch.equal(result.components["layers.0"], result.components["layers.1"])
    model = lorakit.inject(Probe([(0, 32), (0, 32)]), eva_config(["layers.0", "layers.1"], rho=1.0), data=data, progress=False)
    found = adapters(model)
    assert torch.equal(found["layers.0"].lora_A.weight, found["layers.1"].lora_A.weight)


def test_the_layer_holding_a_shared_pca_gets_the_largest_rank_of_its_group():
    from types import SimpleNamespace

    from lorakit.init.eva import _redistribute

    # "b" and "c" share the PCA that "b" owns; the budget of 5 cuts through their tied ratios, so
    # whichever of them the sort lists first gets 2 and the other 1: the owner must end with 2.
    pca = lambda *ratios: SimpleNamespace(pca=SimpleNamespace(explained_variance_ratio=torch.tensor(ratios, dtype=torch.float64)))
    pcas = {"a": pca(0.9, 0.8, 0.05), "b": pca(0.5, 0.1, 0.01)}
    for owners in ({"a": "a", "b": "b", "c": "b"}, {"c": "b", "a": "a", "b": "b"}):
        ranks = _redistribute(pcas, owners, dict.fromkeys("abc", 3), budget=5)
        assert ranks == {"a": 2, "b": 2, "c": 1}


def isotropic_batches(count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randn(*TOKENS, N_FEATURES, generator=generator),
             "attention_mask": torch.ones(TOKENS, dtype=torch.long)} for _ in range(count)]


def test_isotropic_input_converges_within_100_batches_to_orthonormal_components():
    model = lorakit.inject(Probe([(0, 32)]), lorakit.LoraConfig(r=4, target_modules=["layers.0"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not converging would warn
        result = estimate_eva(model, "default", isotropic_batches(100), EvaOptions(max_batches=100), progress=False)
    assert result.converged and result.batches < 100
    A = result.components["layers.0"].double()
    assert (A @ A.T - torch.eye(len(A), dtype=torch.float64)).abs().max() <= 1e-5


def test_max_batches_stops_the_loop_with_a_warning_naming_the_layers():
    model = lorakit.inject(Probe([(0, 32)]), lorakit.LoraConfig(r=4, target_modules=["layers.0"]))
    with pytest.warns(UserWarning, match=r"layers.0.*max_batches=3"):
        result = estimate_eva(model, "default", isotropic_batches(2), EvaOptions(max_batches=3), progress=False)
    assert result.batches == 3 and not result.converged


def test_whitening_divides_each_component_by_the_root_of_its_singular_value():
    data = batches_of([(SD_SHARP, random_orthogonal(32, 1))], 4)
    model = lorakit.inject(Probe([(0, 32)]), eva_config(["layers.0"], whiten=True, rho=1.0), data=data, progress=False)
    A = adapters(model)["layers.0"].lora_A.weight.detach()
    reference = estimate_eva(lorakit.inject(Probe([(0, 32)]), lorakit.LoraConfig(r=4, target_modules=["layers.0"])),
                             "default", data, EvaOptions(rho=1.0), progress=False)
    S = reference.pcas["layers.0"].singular_values[:4].float()
    assert (A * S.sqrt()[:, None] - reference.components["layers.0"].float()).abs().max() < 1e-5
    theirs = get_eva_state_dict(Probe([(0, 32)]), data, peft_config=peft.LoraConfig(
        r=4, target_modules=["layers.0"], init_lora_weights="eva", eva_config=peft.EvaConfig(rho=1.0, whiten=True)),
        show_progress_bar=False)
    assert (A - theirs["layers.0"]).abs().max() <= 1e-6


# --- rank 0: the layer loses its adapter, as in PEFT --------------------------------------------

THREE = [(0, 32), (32, 64), (64, 96)]
THREE_TARGETS = ["layers.0", "layers.1", "layers.2"]


def three_layer_data() -> list[dict]:
    # Layers 0 and 1 have three dominant directions, layer 2 none (every ratio 1/32): with r = 2 and
    # rho = 3 the budget of 6 goes to layers 0 and 1 (3 each) and layer 2 gets rank 0.
    iso = torch.ones(32, dtype=torch.float64)
    return batches_of([(SD_SHARP, random_orthogonal(32, 1)), (SD_SHARP, random_orthogonal(32, 2)),
                       (iso, random_orthogonal(32, 3))], 4)


def test_rank_zero_layer_gets_its_base_layer_back_and_files_match_peft_both_ways(tmp_path):
    data = three_layer_data()
    ours = lorakit.inject(Probe(THREE), eva_config(THREE_TARGETS, r=2, alpha=4.0, rho=3.0), data=data, progress=False)
    assert type(ours.layers[2]) is nn.Linear
    config = lorakit.adapter_configs(ours)["default"]
    assert config.rank_pattern == {"layers.0": 3, "layers.1": 3} and config.alpha_pattern == {"layers.0": 6.0, "layers.1": 6.0}
    assert config.target_modules == ["layers.0", "layers.1"]
    assert lorakit.trainable_parameters(ours)[0] == 2 * 3 * (32 + 16)
    assert all(p.requires_grad for p in adapter_parameters(ours).values())

    pm = peft.get_peft_model(Probe(THREE), peft.LoraConfig(r=2, lora_alpha=4, target_modules=THREE_TARGETS,
                                                           init_lora_weights="eva", eva_config=peft.EvaConfig(rho=3.0)))
    initialize_lora_eva_weights(pm, dataloader=data, show_progress_bar=False)
    pc = pm.peft_config["default"]
    assert (pc.rank_pattern, pc.alpha_pattern, sorted(pc.target_modules)) == (config.rank_pattern, config.alpha_pattern, config.target_modules)
    assert type(pm.base_model.model.layers[2]) is nn.Linear
    for i in (0, 1):
        assert (ours.layers[i].adapters["default"].lora_A.weight - pm.base_model.model.layers[i].lora_A["default"].weight).abs().max() <= 1e-6

    perturb_b(ours)
    x = data[0]["input_ids"]
    lorakit.save_adapter(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["eva_config"]["rho"] == 3.0
    assert_same_outputs_after_loading(ours, tmp_path / "ours", lambda: Probe(THREE), {"input_ids": x})


def test_eva_adapters_merge_unmerge_and_train_like_lora():
    model = lorakit.inject(Probe(THREE), eva_config(THREE_TARGETS, r=2, alpha=4.0, rho=3.0), data=three_layer_data(), progress=False)
    perturb_b(model)
    x = three_layer_data()[0]["input_ids"]
    weights = [layer.weight.detach().clone() for layer in model.layers]
    unmerged = model(input_ids=x).detach()
    lorakit.merge(model)
    assert (model(input_ids=x) - unmerged).abs().max() <= 1e-4
    lorakit.unmerge(model)
    assert all((layer.weight - w).abs().max() <= 1e-6 for layer, w in zip(model.layers, weights))
    model(input_ids=x).square().mean().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, p in model.named_parameters() if p.requires_grad}
    assert with_grad == {f"layers.{i}.adapters.default.lora_{f}.weight" for i in (0, 1) for f in "AB"}


def perturb_b(model, scale: float = 0.1) -> None:
    """Move B (zero at init) so that a wrong A, scale or rank would show in the outputs."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for adapter in adapters(model).values():
            adapter.lora_B.weight.add_(scale * torch.randn(adapter.lora_B.weight.shape, generator=generator))


def assert_same_outputs_after_loading(ours, folder, fresh, inputs) -> None:
    with torch.no_grad():
        expected = ours(**inputs)
        expected = getattr(expected, "logits", expected)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # e.g. PEFT's "eva_config is not specified"
            theirs = peft.PeftModel.from_pretrained(fresh(), folder)
        got = theirs(**inputs)
        assert (getattr(got, "logits", got) - expected).abs().max() <= 1e-5
        reloaded = lorakit.load_adapter(fresh(), folder)
        got = reloaded(**inputs)
        assert (getattr(got, "logits", got) - expected).abs().max() <= 1e-5


# --- tiny Llama: PEFT parity, files both ways -----------------------------------------------------

LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def llama_batches(count: int = 4) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 128, (8, 24), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 16:] = 0
        mask[5, 10:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def test_tiny_llama_ranks_and_components_match_peft_and_files_load_both_ways(tmp_path, input_ids):
    data = llama_batches()
    options = dict(rho=2.0, tau=0.95)
    ours = lorakit.inject(tiny_llama(), eva_config(LLAMA_TARGETS, **options), data=data, progress=False)
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                           init_lora_weights="eva", eva_config=peft.EvaConfig(**options)))
    initialize_lora_eva_weights(pm, dataloader=data, show_progress_bar=False)
    pc, config = pm.peft_config["default"], lorakit.adapter_configs(ours)["default"]
    assert config.rank_pattern and (pc.rank_pattern, pc.alpha_pattern) == (config.rank_pattern, config.alpha_pattern)
    theirs = {name[len("base_model.model."):-len(".lora_A.default.weight")]: p
              for name, p in pm.named_parameters() if name.endswith("lora_A.default.weight")}
    found = adapters(ours)
    assert set(found) == set(theirs)
    for path, adapter in found.items():
        # Same algorithm and the same seeded random projection: equal up to fp32 rounding (bitwise here).
        assert adapter.lora_A.weight.shape == theirs[path].shape
        assert (adapter.lora_A.weight - theirs[path]).abs().max() <= 1e-6, path
    assert (model_output(ours, input_ids) - model_output(tiny_llama(), input_ids)).abs().max() == 0

    perturb_b(ours)
    lorakit.save_adapter(ours, tmp_path / "ours")
    assert_same_outputs_after_loading(ours, tmp_path / "ours", tiny_llama, {"input_ids": input_ids})

    perturb_b(pm)  # PEFT's names differ, perturb through its parameters
    pm.save_pretrained(tmp_path / "theirs")
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "theirs")
    assert lorakit.adapter_configs(loaded)["default"].init == "eva"
    assert (model_output(loaded, input_ids) - model_output(pm, input_ids)).abs().max() <= 1e-5


# --- options, errors, progress ------------------------------------------------------------------

@pytest.mark.parametrize("options, field", [({"rho": 0.5}, "rho"), ({"tau": 0.0}, "tau"), ({"tau": 1.5}, "tau"),
                                             ({"max_batches": 0}, "max_batches"), ({"sigma": 1}, "sigma"),
                                             ({"block_cache_mb": -1}, "block_cache_mb")])
def test_invalid_options_name_the_option(options, field):
    with pytest.raises(ConfigError, match=field):
        eva_config(["q_proj"], **options)


def test_defaults_are_peft_evaconfig_defaults():
    ours = EvaOptions().to_file_dict()["eva_config"]
    theirs = peft.EvaConfig()
    assert ours == {key: getattr(theirs, key) for key in ours}


def test_missing_or_empty_data_is_a_clear_error():
    with pytest.raises(ConfigError, match="data"):
        lorakit.inject(tiny_llama(), eva_config(["q_proj"]))
    model = tiny_llama()
    with pytest.raises(ConfigError, match="no batches"):
        lorakit.inject(model, eva_config(["q_proj"]), data=[], progress=False)
    assert not list(adapted_layers(model)) and not lorakit.adapter_configs(model)


def test_progress_shows_a_bar_and_prints_the_wall_time(capsys):
    data = batches_of([(SD_SHARP, random_orthogonal(32, 1))], 3)
    lorakit.inject(Probe([(0, 32)]), eva_config(["layers.0"]), data=data, progress=True)
    captured = capsys.readouterr()
    assert "EVA" in captured.err  # tqdm's bar
    assert "EVA: 1 layers" in captured.out and captured.out.rstrip().endswith("s")


# --- lorakit train ----------------------------------------------------------------------------------

def test_train_with_eva_init_runs_end_to_end_and_writes_a_peft_adapter(tmp_path, tiny_model_folder):
    from transformers import LlamaForCausalLM

    from lorakit.train import TrainConfig, train

    rows = [{"prompt": f"Repeat the word: w{i}", "response": f"w{i} w{i} w{i}"} for i in range(40)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = TrainConfig.from_dict(dict(
        model=str(tiny_model_folder), data=str(data), output_dir=str(tmp_path / "run"), method="lora", max_steps=2,
        batch_size=8, save_steps=2, logging_steps=1, eval_examples=4, max_new_tokens=2, eval_fraction=0.1,
        init_batches=4, adapter={"r": 4, "alpha": 8, "init": "eva", "target_modules": ["q_proj", "v_proj", "down_proj"],
                                 "init_options": {"use_label_mask": False, "tau": 0.9}}))
    metrics = train(config, progress=False)
    assert metrics["train"]["steps"] == 2
    folder = tmp_path / "run" / "adapter"
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["eva_config"]["tau"] == 0.9
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    assert_same_outputs_after_loading(lorakit.load_adapter(LlamaForCausalLM.from_pretrained(tiny_model_folder), folder),
                                      folder, lambda: LlamaForCausalLM.from_pretrained(tiny_model_folder), {"input_ids": ids})


def test_estimation_forwards_stop_after_the_last_layer_still_collecting():
    model = tiny_llama()
    head_calls = []
    model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    blocks = []
    model.model.layers[1].register_forward_hook(lambda *args: blocks.append(1))
    data = llama_batches()
    lorakit.inject(model, eva_config(["q_proj", "v_proj"], rho=2.0, tau=0.95), data=data, progress=False)
    assert len(head_calls) == 1  # only the first pass (which finds the shared inputs) runs to the head
    # the last block still runs while its own q/v collect, but never to completion (its MLP comes after v_proj)
    assert len(blocks) == 1


def test_block_cache_skips_converged_blocks_without_changing_ranks_or_components():
    """Six blocks at tau = 0.99: block 0's layers converge before the last ones, so later passes resume
    from block 0's kept output. The result must equal the uncached run's and PEFT's exactly."""
    data, options = llama_batches(), dict(rho=2.0, tau=0.99)
    results, attention_calls = {}, {}
    for cache_mb in (1024.0, 1e-6, 0.0):  # on; too small to keep one output; off
        model = lorakit.inject(tiny_llama(layers=6), lorakit.LoraConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS))
        calls = []
        model.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
        results[cache_mb] = estimate_eva(model, "default", data, EvaOptions(**options, block_cache_mb=cache_mb),
                                         progress=False)
        attention_calls[cache_mb] = len(calls)
    cached, starved, plain = results[1024.0], results[1e-6], results[0.0]
    assert cached.skipped_blocks > 0 and starved.skipped_blocks == plain.skipped_blocks == 0
    assert attention_calls[1024.0] < attention_calls[1e-6] == attention_calls[0.0] == plain.batches + 1
    for result in (cached, starved):
        assert result.batches == plain.batches and result.ranks == plain.ranks
        assert all(torch.equal(result.components[path], plain.components[path]) for path in plain.components)

    pm = peft.get_peft_model(tiny_llama(layers=6), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                                   init_lora_weights="eva",
                                                                   eva_config=peft.EvaConfig(**options)))
    initialize_lora_eva_weights(pm, dataloader=data, show_progress_bar=False)
    theirs = {name[len("base_model.model."):-len(".lora_A.default.weight")]: p
              for name, p in pm.named_parameters() if name.endswith("lora_A.default.weight")}
    assert set(theirs) == {path for path, rank in cached.ranks.items() if rank > 0}
    for path, A in theirs.items():
        assert (cached.components[path] - A).abs().max() <= 1e-6, path


class ResidualBlocks(nn.Module):
    """Three residual blocks run in `order`; in (0, 1, 2, 1) block 1's output depends on when it runs."""

    def __init__(self, order: tuple[int, ...]):
        super().__init__()
        torch.manual_seed(0)
        self.order = order
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(N_FEATURES, N_FEATURES), nn.Tanh()) for _ in range(3))

    def forward(self, input_ids, attention_mask=None, labels=None):
        x = input_ids
        for index in self.order:
            x = x + self.layers[index](x)
        return x


def test_block_cache_stays_off_when_a_block_runs_twice_per_forward():
    from lorakit.init.eva import _ResumingForward

    model = lorakit.inject(ResidualBlocks((0, 1, 2, 1)), lorakit.LoraConfig(r=2, target_modules=["0"]))
    layers = dict(adapted_layers(model))
    forward = _ResumingForward(model, layers, budget_bytes=2**20)
    assert forward.blocks is model.layers and set(forward.block_of.values()) == {0, 1, 2}
    batch = batches_of([(SD_SHARP, random_orthogonal(32, 1))], 1)[0]
    forward(id(batch), batch, ["layers.2.0"])  # before the checking pass nothing is kept
    assert forward.kept == {}
    forward.full_pass(batch)
    assert forward.blocks is None
    for _ in range(2):  # block 1's output would otherwise be kept, then returned for both its calls
        forward(id(batch), batch, ["layers.2.0"])
    assert forward.kept == {} and forward.skipped_blocks == 0

    single = lorakit.inject(ResidualBlocks((0, 1, 2)), lorakit.LoraConfig(r=2, target_modules=["0"]))
    forward = _ResumingForward(single, dict(adapted_layers(single)), budget_bytes=2**20)
    forward.full_pass(batch)
    forward(id(batch), batch, ["layers.2.0"])
    forward(id(batch), batch, ["layers.2.0"])
    assert forward.blocks is single.layers and forward.skipped_blocks == 2  # blocks 0 and 1 come from the cache
